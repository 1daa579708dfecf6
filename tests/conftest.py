"""Shared fixtures: real rasters from the registry packages scripts/setup fetched, one model,
and one real index built once per session."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# run before a command to run it as a user is: root's power over file modes taken away, so that a
# mode 000 holds (the tests run as root here); nothing for a user
AS_A_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []

from worker.assets import load_asset_paths


def as_a_terminal_starts_it() -> None:
    """A subprocess's preexec_fn: its own process group (Ctrl-C is sent to a whole group) and
    the default actions of Ctrl-C and of a closed terminal. A test run in the background, as CI
    may run it, ignores SIGINT (and under nohup SIGHUP), and the commands it started inherited
    that: they went on through the test's Ctrl-C, or its hangup."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    return {k: Path(v) for k, v in load_asset_paths().items()}


@pytest.fixture(scope="session")
def model():
    from worker.model.loading import load_model

    return load_model(device="cpu", sketch_modules="none")


@pytest.fixture(scope="session")
def s2_index(tmp_path_factory, assets, model) -> Path:
    """The Sentinel-2 scene (16-bit, 1933x1947, EPSG:32618) indexed at scales 1 and 2."""
    from worker.store import IndexWriter
    from worker.tiling import TileSettings

    out = tmp_path_factory.mktemp("s2") / "index"
    IndexWriter(out, model, TileSettings(scales=(1, 2))).build([assets["s2_rgb"]])
    return out


@pytest.fixture
def rmnp_copy(tmp_path, assets) -> Path:
    dest = tmp_path / "rmnp-rgb.tif"
    shutil.copy(assets["rmnp_rgb"], dest)
    return dest


def write_raster(path: Path, data: np.ndarray, **profile) -> Path:
    import rasterio

    base = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2],
            "dtype": data.dtype}
    base.update(profile)
    with rasterio.open(path, "w", **base) as dst:
        dst.write(data)
    return path


def damaged_near_its_end(folder: Path, assets: dict[str, Path]) -> tuple[Path, bytes]:
    """rmnp written as deflate tiles, a few near its end overwritten: its first tiles read, later
    ones (and those of scale 2, which span it) fail. Returns the file and its bytes before."""
    import rasterio

    with rasterio.open(assets["rmnp_rgb"]) as src:
        path = write_raster(folder / "damaged.tif", src.read(), crs=src.crs, transform=src.transform, compress="deflate",
                            tiled=True, blockxsize=64, blockysize=64)
    whole = path.read_bytes()
    data = bytearray(whole)
    start = len(data) * 9 // 10
    data[start:start + 4_000] = np.random.default_rng(0).integers(0, 256, 4_000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path, whole
