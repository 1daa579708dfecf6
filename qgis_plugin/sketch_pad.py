"""A small drawing pad in the dock: sketch without the map (strokes in pixel coordinates)."""

from __future__ import annotations

from qgis.PyQt.QtCore import QPoint, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QPainter, QPen
from qgis.PyQt.QtWidgets import QSizePolicy, QWidget

from .sketch_tool import MIN_STROKE_PX


class SketchPad(QWidget):
    strokes_changed = pyqtSignal(int)

    def __init__(self, parent=None, pen_width: int = 3):
        super().__init__(parent)
        self.pen_width = pen_width
        self._strokes: list[list[QPoint]] = []
        self.setMinimumSize(160, 160)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setAttribute(Qt.WA_StaticContents)

    def mousePressEvent(self, event) -> None:  # noqa: N802
        if event.button() == Qt.LeftButton:
            self._strokes.append([event.pos()])

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if event.buttons() & Qt.LeftButton and self._strokes:
            self._strokes[-1].append(event.pos())
            self.update()

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        """A stroke ends; a click, or its slip, is dropped unsaid, as on the map: said as a change,
        it made the pad the sketch in use, with no strokes, over the map's (probe). Another
        button's release ends no stroke (a right click made the pad the sketch in use)."""
        if event.button() != Qt.LeftButton or not self._strokes:
            return
        stroke = self._strokes[-1]
        xs, ys = [p.x() for p in stroke], [p.y() for p in stroke]
        if len(stroke) < 2 or max(max(xs) - min(xs), max(ys) - min(ys)) < MIN_STROKE_PX:
            self._strokes.pop()
        else:
            self.strokes_changed.emit(len(self._strokes))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.white)
        painter.setPen(QPen(QColor(150, 150, 150), 1))
        painter.drawRect(self.rect().adjusted(0, 0, -1, -1))
        painter.setPen(QPen(Qt.black, self.pen_width, Qt.SolidLine, Qt.RoundCap, Qt.RoundJoin))
        for stroke in self._strokes:
            for a, b in zip(stroke, stroke[1:]):
                painter.drawLine(a, b)
        painter.end()

    def undo(self) -> None:
        if self._strokes:
            self._strokes.pop()
            self.strokes_changed.emit(len(self._strokes))
            self.update()

    def clear(self) -> None:
        self._strokes = []
        self.strokes_changed.emit(0)
        self.update()

    def strokes(self) -> list[list[list[float]]]:
        """Strokes as [[x, y], ...] in pixels (y down)."""
        return [[[float(p.x()), float(p.y())] for p in stroke] for stroke in self._strokes]
