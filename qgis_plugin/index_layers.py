"""An index's tiles (INDEX_DIR/tiles.gpkg, written by the worker) as a layer a user can look at."""

from __future__ import annotations

import os
from typing import Optional

from qgis.core import QgsFillSymbol, QgsSingleSymbolRenderer, QgsVectorLayer

LAYER_PREFIX = "Index tiles: "


def tiles_layer_name(index_name: str) -> str:
    return f"{LAYER_PREFIX}{index_name}"


def why_no_tiles_layer(index: dict) -> Optional[str]:
    """Why the tiles of a `list_indexes` item cannot be shown here, or None when they can."""
    path = index.get("tiles_layer")
    if not path:
        return (f"Index “{index['name']}” has no tiles layer yet: the worker writes it when an indexing run "
                "ends. Build or extend it first.")
    if not os.path.isfile(path):
        return (f"The tiles layer of “{index['name']}” is on the worker's machine ({path}), not here: copy it "
                "to this machine and add it with Layer > Add Layer.")
    return None


def tiles_layer(index: dict) -> QgsVectorLayer:
    """The tiles of a `list_indexes` item as outlines (check why_no_tiles_layer first)."""
    layer = QgsVectorLayer(index["tiles_layer"], tiles_layer_name(index["name"]), "ogr")
    symbol = QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "40,120,220,160",
                                         "outline_width": "0.2"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    return layer
