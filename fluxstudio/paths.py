"""Where FluxStudio keeps its files. All paths are absolute; FLUXSTUDIO_HOME overrides the default."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def home() -> Path:
    """The app's data folder (demo models, logs, settings, default outputs)."""
    override = os.environ.get("FLUXSTUDIO_HOME")
    base = Path(override) if override else Path(platformdirs.user_data_dir("FluxStudio", appauthor=False))
    return base.expanduser().resolve()


def outputs_dir() -> Path:
    return home() / "outputs"


def demo_dir() -> Path:
    return home() / "demo"


def logs_dir() -> Path:
    return home() / "logs"


def sessions_dir() -> Path:
    """One folder per running app process (its uploads, the web server's temporary files)."""
    return home() / "sessions"
