"""A map tool for freehand strokes over the canvas, kept in map coordinates."""

from __future__ import annotations

from qgis.core import QgsCoordinateTransform, QgsCsException, QgsPointXY, QgsProject, QgsWkbTypes
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor


class SketchMapTool(QgsMapTool):
    """Strokes are kept in the canvas CRS, the one a search names: when the map's CRS changes,
    they are reprojected and stay where they were drawn. A CRS that cannot place them (the far
    side of an orthographic view) hides them, kept in the CRS they were in (`strokes_crs`), and
    they are shown again in one that can; drawing there starts a new sketch. They were cleared,
    unsaid."""

    strokes_changed = pyqtSignal(int)  # number of strokes
    strokes_hidden = pyqtSignal()  # the map's CRS cannot place the strokes: they are kept, not shown

    def __init__(self, canvas, pen_width: int = 3):
        super().__init__(canvas)
        self.canvas = canvas
        self.pen_width = pen_width
        self._strokes: list[list[QgsPointXY]] = []
        self._bands: list[QgsRubberBand] = []
        self._drawing = False
        self.strokes_crs = canvas.mapSettings().destinationCrs()  # the CRS of the strokes kept
        canvas.destinationCrsChanged.connect(self._follow_crs)
        self.setCursor(Qt.CrossCursor)

    def _follow_crs(self) -> None:
        new = self.canvas.mapSettings().destinationCrs()
        if not self._strokes or new == self.strokes_crs:
            self.strokes_crs = new
            self._draw_bands()
            return
        try:
            transform = QgsCoordinateTransform(self.strokes_crs, new, QgsProject.instance())
            moved = [[transform.transform(p) for p in stroke] for stroke in self._strokes]
        except QgsCsException:  # no place in the new CRS: kept as they are, and hidden
            for band in self._bands:
                band.reset(QgsWkbTypes.LineGeometry)
            self.strokes_hidden.emit()
            return
        self._strokes, self.strokes_crs = moved, new
        self._draw_bands()

    def _draw_bands(self) -> None:
        for band, stroke in zip(self._bands, self._strokes):
            band.reset(QgsWkbTypes.LineGeometry)
            for point in stroke:
                band.addPoint(point)

    def _new_band(self) -> QgsRubberBand:
        band = QgsRubberBand(self.canvas, QgsWkbTypes.LineGeometry)
        band.setColor(QColor(220, 30, 30, 220))
        band.setWidth(self.pen_width)
        return band

    def canvasPressEvent(self, event) -> None:  # noqa: N802
        if event.button() != Qt.LeftButton:
            return
        if self.strokes_crs != self.canvas.mapSettings().destinationCrs():  # hidden strokes: a new sketch here
            self.clear()
            self.strokes_crs = self.canvas.mapSettings().destinationCrs()
        self._drawing = True
        point = self.toMapCoordinates(event.pos())
        self._strokes.append([point])
        band = self._new_band()
        band.addPoint(point)
        self._bands.append(band)

    def canvasMoveEvent(self, event) -> None:  # noqa: N802
        if not self._drawing:
            return
        point = self.toMapCoordinates(event.pos())
        self._strokes[-1].append(point)
        self._bands[-1].addPoint(point)

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802
        if not self._drawing:
            return
        self._drawing = False
        if len(self._strokes[-1]) < 2:  # a click, not a stroke
            self._strokes.pop()
            self.canvas.scene().removeItem(self._bands.pop())
        self.strokes_changed.emit(len(self._strokes))

    def undo(self) -> None:
        if self._strokes:
            self._strokes.pop()
            self.canvas.scene().removeItem(self._bands.pop())
            self.strokes_changed.emit(len(self._strokes))

    def clear(self) -> None:
        for band in self._bands:
            self.canvas.scene().removeItem(band)
        self._strokes, self._bands = [], []
        self.strokes_changed.emit(0)

    def set_pen_width(self, width: int) -> None:
        self.pen_width = width
        for band in self._bands:
            band.setWidth(width)

    def strokes(self) -> list[list[list[float]]]:
        """Strokes as [[x, y], ...] lists in `strokes_crs` (the canvas CRS unless they are hidden)."""
        return [[[p.x(), p.y()] for p in stroke] for stroke in self._strokes]
