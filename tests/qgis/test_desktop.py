"""The real QGIS desktop under Xvfb, with the plugin installed from the built zip as a new user
would (no worker set up, no settings): the dock as it first opens, then a search's result layer.

The screenshots are kept in test-artifacts/ (qgis_first_run.png, qgis_after_search.png) for a
person to look at.
"""

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, load_packager

ARTIFACTS = REPO / "test-artifacts"


@pytest.mark.skipif(shutil.which("xvfb-run") is None or shutil.which("qgis") is None, reason="needs xvfb-run and qgis")
def test_desktop_first_run_then_search_with_screenshots(tmp_path, worker, raster_root):
    from PIL import Image

    profile = tmp_path / "profiles" / "profiles" / "default"  # --profiles-path P keeps P/profiles/NAME
    package = load_packager().build_zip(tmp_path / "sketch_search.zip")
    with zipfile.ZipFile(package) as z:  # what "Install from ZIP" does
        z.extractall(profile / "python" / "plugins")
    installed = profile / "python" / "plugins" / "sketch_search"
    assert (installed / "wire" / "protocol.py").is_file() and not (installed / "wire").is_symlink()
    (profile / "QGIS").mkdir(parents=True)
    (profile / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nsketch_search=true\n")

    ARTIFACTS.mkdir(exist_ok=True)
    first_run, screenshot = ARTIFACTS / "qgis_first_run.png", ARTIFACTS / "qgis_after_search.png"
    for png in (first_run, screenshot):
        png.unlink(missing_ok=True)
    status_file = tmp_path / "status.json"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "SKETCH_TEST_HELPERS": str(Path(__file__).parent), "SKETCH_TEST_RASTER": str(raster_root / "rmnp-rgb.tif"),
           "SKETCH_TEST_ENDPOINT": worker.bind, "SKETCH_TEST_STATUS": str(status_file),
           "SKETCH_TEST_SCREENSHOT": str(screenshot), "SKETCH_TEST_FIRST_RUN": str(first_run),
           "XDG_RUNTIME_DIR": str(runtime)}
    env.pop("QT_QPA_PLATFORM", None)  # a real window on the virtual screen
    for name in ("SKETCH_SEARCH_WORKER_PYTHON", "SKETCH_SEARCH_WORKER_DIR"):
        env.pop(name, None)  # a new user has set nothing
    cmd = ["timeout", "150", "xvfb-run", "-a", "-s", "-screen 0 1280x800x24", "qgis", "--nologo", "--noversioncheck",
           "--profiles-path", str(tmp_path / "profiles"), "--code", str(Path(__file__).with_name("desktop_startup.py"))]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, f"QGIS did not quit cleanly (rc {result.returncode})"
    assert status_file.exists(), f"QGIS ended without a status (rc {result.returncode}): {result.stderr[-2000:]}"
    status = json.loads(status_file.read_text())
    assert status["ok"], status
    assert "needs a worker" in status["first_run_notice"] and "Set up worker" in status["first_run_notice"]
    assert status["options_pages"] == 1, "the plugin's page is in Settings > Options"
    assert status["hits"] == 5 and status["layer"].startswith("Sketch search 1: rmnp")
    for png in (first_run, screenshot):
        image = Image.open(png)
        assert image.size[0] >= 1000 and image.size[1] >= 600
        assert len(set(image.convert("RGB").resize((64, 40)).getdata())) > 50  # a rendered desktop, not a blank frame
