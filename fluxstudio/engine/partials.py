"""Hidden work folders (`.NAME.partial-*`, `.NAME.old-*`), who owns them, and who owns an output name.

A build writes into a partial folder and renames it into place at the end; a killed build (SIGKILL, power loss)
leaves it behind. Each partial folder records its owner (pid and process start time); `reclaim` removes the ones
no running process owns, at every build start and at the app's start.

An output name has one owner at a time, across processes: `Claim` holds an OS lock on `.NAME.lock` beside it for the
whole build, and `move_into_place` renames only into a name its caller holds. The OS drops a lock when its process
dies, so a killed build never blocks a name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from typing_extensions import Self

from fluxstudio.errors import OutputError

if TYPE_CHECKING:
    from typing_extensions import Self

OWNER = ".owner"
PATTERNS = (".*.partial-*", ".*.old-*")

if os.name == "nt":
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


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


def owned_folder(parent: Path) -> Path:
    """A new folder in `parent` owned by this process (the app's uploads and web-server temp files), removed by
    `reclaim(parent, ("*",))` once this process is gone."""
    folder = parent / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True)
    mark(folder)
    return folder


class Claim:
    """This process's hold on an output name (and the files named after it beside it) while the block runs."""

    def __init__(self, target: Path, what: str = "build") -> None:
        self.target, self.what = target, what
        self.lock = target.parent / f".{target.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> Self:
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(fd)
            except OSError:
                os.close(fd)
                raise OutputError(
                    f"Another {self.what} is writing {self.target.name} right now{self._holder()}.",
                    "Wait for it to finish, or choose another name.",
                ) from None
            if _same_file(self.lock, fd):
                os.ftruncate(fd, 0)
                os.write(fd, _me().encode())
                self._fd = fd
                return self
            os.close(fd)

    def _holder(self) -> str:
        try:
            return f" (process {self.lock.read_text(encoding='utf-8').split()[0]})"
        except (OSError, IndexError):
            return ""

    def covers(self, path: Path) -> bool:
        """The name itself, or a file named after it beside it (`NAME.clip_l.safetensors` beside `NAME.gguf`)."""
        stem = self.target.name.split(".")[0]
        return (
            self._fd is not None
            and path.parent == self.target.parent
            and (path.name == self.target.name or path.name.startswith(stem + "."))
        )

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            _release(self.lock, self._fd)
            self._fd = None


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (its last holder may have removed it as we opened it)."""
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(lock: Path, fd: int) -> None:
    """Remove a held lock file and let go of it. On POSIX the file goes first, while still locked, so that whoever
    opened it meanwhile finds it gone (`_same_file`); Windows cannot remove an open file, so it goes last, if it can."""
    if os.name != "nt":
        lock.unlink(missing_ok=True)
    os.close(fd)
    if os.name == "nt":
        try:
            lock.unlink()
        except OSError:
            pass  # opened by another process meanwhile: it is theirs now


def claim(target: Path, what: str = "build") -> Claim:
    """Hold `target`'s name for the block; one sentence when another process holds it."""
    return Claim(target, what)


def move_into_place(tmp: Path, out: Path, held: Claim) -> None:
    """Rename the finished file or folder into a name `held` covers; an output it replaces is removed only afterwards."""
    if not held.covers(out):
        raise OutputError(f"{out.name} is not this {held.what}'s to write.", "Choose another name.")
    if out.is_symlink():
        raise OutputError(
            f"{out.name} is a symbolic link; FluxStudio does not write through links.",
            "Choose another name, or remove the link.",
        )
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


def _reclaim_locks(folder: Path) -> None:
    """Remove the lock files of builds that were killed (nobody holds their lock)."""
    for lock in folder.glob(".*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            _lock(fd)
        except OSError:
            os.close(fd)  # held: a build is running
            continue
        if _same_file(lock, fd):
            _release(lock, fd)
        else:
            os.close(fd)


def reclaim(folder: Path, patterns: tuple[str, ...] = PATTERNS) -> int:
    """Remove the work folders in `folder` that no running process owns, and stale lock files; the bytes freed."""
    freed = 0
    if not folder.is_dir():
        return 0
    _reclaim_locks(folder)
    for pattern in patterns:
        for stale in folder.glob(pattern):
            if stale.is_dir() and not stale.is_symlink() and not owned(stale):
                try:
                    size = _size(stale)
                    shutil.rmtree(stale)
                    freed += size
                except OSError:
                    continue  # in use or not ours to remove: try again next time
    return freed
