"""Pictures of hits for the results list, drawn in the background from the map's visible rasters.

Drawn on the GUI thread, one after another, a thousand hits over a basemap froze QGIS for
minutes; each picture is now a map render job of its own, and the list shows it when it is done.
"""

from __future__ import annotations

from typing import Optional

from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsRectangle
from qgis.PyQt.QtCore import QObject, QSize
from qgis.PyQt.QtGui import QIcon, QPixmap
from qgis.PyQt.QtWidgets import QListWidgetItem

SHOWN = 50  # the best hits given a picture (each is a render of every visible raster, a basemap's too)


class Thumbnails(QObject):
    def __init__(self, parent: Optional[QObject] = None):
        super().__init__(parent)
        self._jobs: dict = {}  # running job -> the list item it draws for (None: cancelled, the item may be gone)

    def draw(self, item: QListWidgetItem, extent: QgsRectangle, crs, rasters: list, size: int = 64) -> None:
        settings = QgsMapSettings()
        settings.setLayers(rasters)
        settings.setDestinationCrs(crs)
        settings.setExtent(extent)
        settings.setOutputSize(QSize(size, size))
        job = QgsMapRendererParallelJob(settings)
        self._jobs[job] = item
        job.finished.connect(lambda: self._done(job))
        job.start()

    def _done(self, job: QgsMapRendererParallelJob) -> None:
        item = self._jobs.pop(job, None)  # the job goes with its last reference, once it has finished
        if item is not None:
            item.setIcon(QIcon(QPixmap.fromImage(job.renderedImage())))

    def cancel(self) -> None:
        """Stop drawing for the list's items (before they are cleared); the jobs end by themselves."""
        for job in self._jobs:
            self._jobs[job] = None
            job.cancelWithoutBlocking()

    def shutdown(self) -> None:
        """Stop every job and wait for it (on unload)."""
        for job in list(self._jobs):
            self._jobs[job] = None
            job.cancel()
        self._jobs.clear()
