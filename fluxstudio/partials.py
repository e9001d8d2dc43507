"""Hidden work folders (`.NAME.partial-*`, `.NAME.old-*`) and who owns them.

A build writes into a partial folder and renames it into place at the end; a killed build (SIGKILL, power loss)
leaves it behind. Each partial folder records its owner (pid and process start time); `reclaim` removes the ones
no running process owns, at every build start and at the app's start.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import psutil

OWNER = ".owner"
PATTERNS = (".*.partial-*", ".*.old-*")


def _me() -> str:
    return f"{os.getpid()} {psutil.Process().create_time():.3f}"


def mark(folder: Path) -> None:
    """Record this process as the owner of a work folder."""
    (folder / OWNER).write_text(_me(), encoding="utf-8")


def work_folder(target: Path) -> Path:
    """A new hidden `.NAME.partial-*` folder beside `target`, owned by this process."""
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    mark(tmp)
    return tmp


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished file or folder into place; an output it replaces is removed only afterwards."""
    if tmp.is_file():
        tmp.replace(out)
        return
    (tmp / OWNER).unlink(missing_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.replace(old)
    tmp.replace(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def owned(folder: Path) -> bool:
    """Whether a running process owns this work folder (a reused pid does not count: its start time differs)."""
    try:
        pid, started = (folder / OWNER).read_text(encoding="utf-8").split()
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01
    except (OSError, ValueError, psutil.Error):
        return False


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def reclaim(folder: Path) -> int:
    """Remove the work folders in `folder` that no running process owns; the bytes freed."""
    freed = 0
    if not folder.is_dir():
        return 0
    for pattern in PATTERNS:
        for stale in folder.glob(pattern):
            if stale.is_dir() and not stale.is_symlink() and not owned(stale):
                try:
                    size = _size(stale)
                    shutil.rmtree(stale)
                    freed += size
                except OSError:
                    continue  # in use or not ours to remove: try again next time
    return freed
