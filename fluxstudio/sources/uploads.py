"""A LoRA a person uploaded: kept in the app process's own folder, once, by its content."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from pathlib import Path

from fluxstudio.engine.safefile import sha256
from fluxstudio.errors import DiskSpaceError
from fluxstudio.units import free_bytes, human_bytes

MARGIN = 64 << 20  # what the disk keeps free beside a copy


def keep(src: Path, folder: Path) -> Path:
    """Move (or, from another disk, copy) an accepted upload into `folder` as `SHA12-NAME`; the same file uploaded
    twice is kept once. A copy checks the free disk first and leaves no part behind when the disk fills."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{sha256(src)[:12]}-{src.name}"
    if dest.exists():
        return dest
    part = folder / f".{uuid.uuid4().hex}.part"
    try:
        try:
            os.replace(src, part)  # the server's copy itself when it is on the same disk: nothing written twice
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            size = src.stat().st_size
            if free_bytes(folder) < size + MARGIN:
                raise DiskSpaceError(
                    f"Not enough free disk to keep this {human_bytes(size)} upload.",
                    "Free some space and upload it again.",
                ) from None
            shutil.copyfile(src, part)
        part.replace(dest)
    except OSError as exc:
        part.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                "The disk ran full while keeping the upload.", "Free some space and upload it again."
            ) from None
        raise
    return dest


def discard(src: Path) -> None:
    """Remove the web server's copy of an upload, and its own folder once empty."""
    src.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        src.parent.rmdir()
