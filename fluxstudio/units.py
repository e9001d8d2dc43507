"""Byte sizes for people (parse "5GB", print 1.2 GB) and the one free-disk reader."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB)")
    value = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError("the size must be positive")
    return value


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def gb(n: float, approx: bool = False) -> str:
    """Gigabytes with two decimals ("12.50 GB"), or a rounded figure ("~12 GB", "~9.7 GB") for estimates."""
    if not approx:
        return f"{n / 1e9:.2f} GB"
    return f"~{n / 1e9:.0f} GB" if n >= 10e9 else f"~{n / 1e9:.1f} GB"


def existing_parent(path: Path) -> Path:
    """The path itself or its nearest existing parent (where free disk can be measured)."""
    path = Path(path).resolve()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free disk where `path` is (or would be created)."""
    return shutil.disk_usage(existing_parent(path)).free
