"""Sketch search QGIS plugin: sketch on the map, search raster mosaics through the worker."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import SketchSearchPlugin

    return SketchSearchPlugin(iface)
