"""“How to sketch”: what a sketch should hold, in the dock, with a link to the README's section."""

from __future__ import annotations

import configparser
import os
from typing import Optional

from qgis.gui import QgsCollapsibleGroupBox
from qgis.PyQt.QtCore import QUrl
from qgis.PyQt.QtWidgets import QLabel, QToolButton, QVBoxLayout, QWidget

from .checkout import known_checkout

README_SECTION = "how-to-sketch"  # the README's "How to sketch" heading, as an anchor
HOW_TO_SKETCH = (
    "<p>Draw the <b>main lines of the place as they lie in the frame</b>: shorelines, roads, rivers, field "
    "edges. Where a line is in your frame is where it is in the place.</p>"
    "<p>The frame may lie anywhere over the rasters, be a bit larger or smaller than a tile and be turned a "
    "little. Use <b>several strokes</b>: a few short ones cannot tell places apart.</p>"
    "<p><b>Where to draw</b>: <i>Draw on map</i> and drag over the map (the strokes' extent is the frame), or "
    "on the pad (the pad is the frame). Open water, haze and flat fields draw blank: sketch something with "
    "lines.</p>")


def readme_url() -> str:
    """The README's section: the checkout's file when there is one, else the plugin's repository."""
    checkout = known_checkout()
    if checkout is not None and (checkout / "README.md").is_file():
        url = QUrl.fromLocalFile(str(checkout / "README.md"))
        url.setFragment(README_SECTION)
        return url.toString()
    metadata = configparser.ConfigParser()
    metadata.read(os.path.join(os.path.dirname(__file__), "metadata.txt"))
    return f"{metadata.get('general', 'repository', fallback='').rstrip('/')}#{README_SECTION}"


class HowToSketch(QgsCollapsibleGroupBox):
    def __init__(self, parent: Optional[QWidget] = None):
        super().__init__("How to sketch", parent)
        self.setObjectName("SketchSearchHowTo")  # its collapsed state is remembered under this name
        self.findChild(QToolButton, "collapseButton").setToolTip("Show or hide how to sketch.")
        layout = QVBoxLayout(self)
        self.text = QLabel(HOW_TO_SKETCH + f'<p><a href="{readme_url()}">More in the README</a></p>')
        self.text.setWordWrap(True)
        self.text.setOpenExternalLinks(True)
        self.text.setToolTip("What a sketch should contain to be found; the link opens the README's section.")
        layout.addWidget(self.text)
