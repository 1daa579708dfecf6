"""A map tool to pick a place: drag a rectangle over a raster layer ("Pick a place", query by example)."""

from __future__ import annotations

from typing import Optional

from qgis.core import (QgsCoordinateTransform, QgsGeometry, QgsMapLayerType, QgsProject, QgsRasterLayer, QgsRectangle,
                       QgsWkbTypes)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import QPoint, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from .crs_names import crs_name


class PlaceMapTool(QgsMapTool):
    """Drag a rectangle; `picked` gives it in map coordinates (the canvas CRS): the map rectangle
    round the one dragged on screen, which a rotated canvas shows turned. Its two map corners
    were taken: at 45 degrees a square dragged was a line, refused as an empty box (a probe's)."""

    picked = pyqtSignal(QgsRectangle)

    def __init__(self, canvas):
        super().__init__(canvas)
        self.canvas = canvas
        self._start: Optional[QPoint] = None  # on screen
        self.band = QgsRubberBand(canvas, QgsWkbTypes.PolygonGeometry)
        self.band.setColor(QColor(30, 120, 220, 60))
        self.band.setStrokeColor(QColor(30, 120, 220, 230))
        self.band.setWidth(2)
        self.setCursor(Qt.CrossCursor)

    def canvasPressEvent(self, event) -> None:  # noqa: N802
        if event.button() == Qt.LeftButton:
            self._start = event.pos()
            self.band.reset(QgsWkbTypes.PolygonGeometry)

    def canvasMoveEvent(self, event) -> None:  # noqa: N802
        if self._start is not None:
            self._show(self._dragged(event.pos()))

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802
        if self._start is None or event.button() != Qt.LeftButton:
            return
        dragged = self._dragged(event.pos())
        self._start = None
        self._show(dragged)
        self.picked.emit(dragged.boundingBox())

    def _dragged(self, end: QPoint) -> QgsGeometry:
        """The rectangle dragged on screen from the press to `end`, in map coordinates."""
        x0, y0, x1, y1 = self._start.x(), self._start.y(), end.x(), end.y()
        return QgsGeometry.fromPolygonXY([[self.toMapCoordinates(QPoint(x, y))
                                           for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]])

    def _show(self, dragged: QgsGeometry) -> None:
        self.band.setToGeometry(dragged, None)

    def clear(self) -> None:
        self.band.reset(QgsWkbTypes.PolygonGeometry)

    def deactivate(self) -> None:
        self._start = None
        super().deactivate()


def raster_under(rect: QgsRectangle, map_crs, active=None) -> Optional[QgsRasterLayer]:
    """The raster layer a rectangle (map CRS) was dragged over: the active layer when it is a
    file raster under half the rectangle or more, else the visible one under most of it, the
    topmost of equals. The topmost one touching it was taken: a box dragged over the sheet below
    another, the neighbour's edge in its corner, searched a sliver of the neighbour (a probe's)."""
    project = QgsProject.instance()
    visible = [node.layer() for node in project.layerTreeRoot().findLayers() if node.isVisible()]
    shares = {}
    for layer in ([active] if active is not None else []) + visible:
        if (layer is None or layer.id() in shares or layer.type() != QgsMapLayerType.RasterLayer
                or layer.providerType() != "gdal"):
            continue
        box = QgsCoordinateTransform(map_crs, layer.crs(), project).transformBoundingBox(rect)
        under = box.intersect(layer.extent())
        if box.area() > 0 and not under.isEmpty():
            shares[layer.id()] = (layer, under.area() / box.area())
        elif box.intersects(layer.extent()):  # a box of no area (a click): touched is under
            shares[layer.id()] = (layer, 0.0)
    if not shares:
        return None
    if active is not None and active.id() in shares and shares[active.id()][1] >= 0.5:
        return active
    return max(shares.values(), key=lambda held: held[1])[0]  # max keeps the first, the topmost, of equals


def example_of(rect: QgsRectangle, map_crs, layer: QgsRasterLayer) -> dict:
    """The `example` of a search: the raster's file, the rectangle as a box in the raster's CRS."""
    box = QgsCoordinateTransform(map_crs, layer.crs(), QgsProject.instance()).transformBoundingBox(rect)
    crs = layer.crs()
    return {"raster": layer.source().split("|")[0], "bbox": [box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum()],
            "crs": crs_name(crs) or "EPSG:4326"}
