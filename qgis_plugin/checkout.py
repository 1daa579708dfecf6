"""Where the sketch-search repository (the "checkout") is: the worker's code and its set-up script.

A developer's plugin folder is often a link to CHECKOUT/qgis_plugin; a plugin installed from the
zip knows no checkout until the user names one in the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .settings import Setting

SETUP_SCRIPT = Path("scripts") / "setup"


def is_checkout(folder: Path) -> bool:
    """Whether `folder` holds the worker package and the set-up script."""
    return (folder / "worker" / "__init__.py").is_file() and (folder / SETUP_SCRIPT).is_file()


def plugin_checkout() -> Optional[Path]:
    """The checkout this plugin folder lies in, links resolved, or None (an installed zip)."""
    here = Path(__file__).resolve().parent
    return here.parent if is_checkout(here.parent) else None


def known_checkout() -> Optional[Path]:
    """The checkout in the settings, else the plugin's own; None when neither is one."""
    configured = Setting.WORKER_DIR.as_path()
    if configured:
        return Path(configured) if is_checkout(Path(configured)) else None
    return plugin_checkout()


def venv_python(checkout: Path) -> Path:
    """The Python of a checkout's .venv (what its scripts/setup makes)."""
    windows = checkout / ".venv" / "Scripts" / "python.exe"
    return windows if windows.exists() else checkout / ".venv" / "bin" / "python"
