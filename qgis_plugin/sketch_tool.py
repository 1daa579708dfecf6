"""A map tool for freehand strokes over the canvas, kept in map coordinates."""

from __future__ import annotations

import math

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsCsException, QgsPointXY, QgsProject,
                       QgsWkbTypes)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

MIN_STROKE_PX = 4  # a stroke smaller on screen is a click's slip: dropped, as a click is
MIN_SKETCH_PX = 32  # a sketch drawn smaller on screen is too coarse to search (the worker draws it at 224 px)


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
        self._units_per_px: list[float | None] = []  # the map's scale as each stroke was drawn (None: reprojected since)
        self._drawing = False
        self._reach: list[int] = []  # the stroke being drawn's screen extent: x0, y0, x1, y1
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
        width = world_width(new)
        if width is not None:
            moved = made_whole(moved, width, self.canvas.extent().center().x())
        self._strokes, self.strokes_crs = moved, new
        self._units_per_px = [None] * len(moved)
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
        self._reach = [event.pos().x(), event.pos().y()] * 2
        point = self.toMapCoordinates(event.pos())
        self._strokes.append([point])
        self._units_per_px.append(self.canvas.mapUnitsPerPixel())
        band = self._new_band()
        band.addPoint(point)
        self._bands.append(band)

    def canvasMoveEvent(self, event) -> None:  # noqa: N802
        if not self._drawing:
            return
        x, y = event.pos().x(), event.pos().y()
        self._reach = [min(self._reach[0], x), min(self._reach[1], y), max(self._reach[2], x), max(self._reach[3], y)]
        point = self.toMapCoordinates(event.pos())
        self._strokes[-1].append(point)
        self._bands[-1].addPoint(point)

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802
        if not self._drawing:
            return
        self._drawing = False
        x0, y0, x1, y1 = self._reach
        if len(self._strokes[-1]) < 2 or max(x1 - x0, y1 - y0) < MIN_STROKE_PX:  # a click, or its slip: unsaid
            self._drop_last()
        else:
            self.strokes_changed.emit(len(self._strokes))

    def _drop_last(self) -> None:
        self._strokes.pop()
        self._units_per_px.pop()
        self.canvas.scene().removeItem(self._bands.pop())

    def undo(self) -> None:
        if self._strokes:
            self._drop_last()
            self.strokes_changed.emit(len(self._strokes))

    def clear(self) -> None:
        for band in self._bands:
            self.canvas.scene().removeItem(band)
        self._strokes, self._bands, self._units_per_px = [], [], []
        self.strokes_changed.emit(0)

    def drawn_px(self) -> float | None:
        """How many screen pixels the sketch spanned as drawn (at the finest scale a stroke was
        drawn at); None without strokes, or once they were reprojected (the scales were another
        CRS's). A search is asked of the map's view after zooming out, so the view now says
        nothing of how coarsely the sketch was drawn."""
        if not self._strokes or None in self._units_per_px:
            return None
        to_screen = self.canvas.getCoordinateTransform()  # as the map is shown now, turned or not
        shown = [to_screen.transform(p) for stroke in self._strokes for p in stroke]
        xs, ys = [p.x() for p in shown], [p.y() for p in shown]
        return max(max(xs) - min(xs), max(ys) - min(ys)) * self.canvas.mapUnitsPerPixel() / min(self._units_per_px)

    def set_pen_width(self, width: int) -> None:
        self.pen_width = width
        for band in self._bands:
            band.setWidth(width)

    def strokes(self) -> list[list[list[float]]]:
        """Strokes as [[x, y], ...] lists in `strokes_crs` (the canvas CRS unless they are hidden)."""
        return [[[p.x(), p.y()] for p in stroke] for stroke in self._strokes]


def world_width(crs: QgsCoordinateReferenceSystem) -> float | None:
    """How far x runs once round the Earth in a CRS whose x wraps the same at every latitude
    (360 in lon/lat; 40,075 km in web Mercator, or a Mercator centred on the Pacific), in its
    units; None in any other. Read from the steps a degree of longitude takes, at four longitudes
    a quarter turn apart (one may straddle the CRS's edge) on the equator and at 60 degrees. None
    for an invalid CRS (a project with "No CRS"), which leaves points as they are: 360 read from it
    moved strokes in metres by whole 360 m."""
    if not crs.isValid():
        return None
    to_crs = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:4326"), crs, QgsProject.instance())
    try:
        steps = [(b.x() - a.x(), b.y() - a.y()) for lat in (0.0, 60.0) for lon in (-150.0, -60.0, 30.0, 120.0)
                 for a, b in [(to_crs.transform(QgsPointXY(lon, lat)), to_crs.transform(QgsPointXY(lon + 1.0, lat)))]]
    except QgsCsException:
        return None
    step = sorted(dx for dx, _ in steps)[len(steps) // 2]
    alike = [dx for dx, dy in steps if math.isclose(dx, step, rel_tol=1e-6) and abs(dy) <= 1e-9 * abs(dx)]
    return 360.0 * step if step > 0 and len(alike) >= len(steps) - 2 else None


def made_whole(strokes: list[list[QgsPointXY]], width: float, centre_x: float) -> list[list[QgsPointXY]]:
    """Strokes reprojected into a CRS whose x wraps every `width`, each point moved by whole turns
    to lie the short way round from the one before, and the sketch by whole turns to lie nearest
    `centre_x` (the map's centre): PROJ put the points past 180 degrees at the CRS's other edge,
    and a sketch over Fiji was drawn as lines across the whole world (the search was right: the
    worker makes strokes whole itself)."""
    whole, last = [], None
    for stroke in strokes:
        moved = []
        for point in stroke:
            x = point.x() if last is None else point.x() - width * round((point.x() - last) / width)
            moved.append(QgsPointXY(x, point.y()))
            last = x
        whole.append(moved)
    xs = [p.x() for stroke in whole for p in stroke]
    turns = round((centre_x - (min(xs) + max(xs)) / 2) / width) if xs else 0
    return [[QgsPointXY(p.x() + turns * width, p.y()) for p in stroke] for stroke in whole]
