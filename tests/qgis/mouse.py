"""Real mouse strokes for Qt widgets (the map canvas viewport, the sketch pad)."""

from qgis.PyQt.QtCore import QEvent, QPointF, Qt
from qgis.PyQt.QtGui import QMouseEvent
from qgis.PyQt.QtWidgets import QApplication


def drag(widget, points: list[tuple[int, int]]) -> None:
    """Press at the first point, move through the others, release at the last."""
    def event(kind, x, y, buttons):
        return QMouseEvent(kind, QPointF(x, y), Qt.LeftButton, buttons, Qt.NoModifier)
    QApplication.sendEvent(widget, event(QEvent.MouseButtonPress, *points[0], Qt.LeftButton))
    for x, y in points[1:]:
        QApplication.sendEvent(widget, event(QEvent.MouseMove, x, y, Qt.LeftButton))
    QApplication.sendEvent(widget, event(QEvent.MouseButtonRelease, *points[-1], Qt.NoButton))
