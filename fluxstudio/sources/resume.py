"""Downloads that survive a closed or killed app: resumed from the bytes on disk, verified, then put in the HF cache.

What huggingface_hub (2.4) and hf_xet do on their own: `hf_hub_download` writes every file, plain LFS over HTTP or
Xet-backed through hf_xet, into a process-unique `blobs/<etag>.<random>.incomplete`. Within one process, HTTP
retries resume with a Range request; an error deletes the file; a killed process leaves it behind, and no later
process ever reads it (the name is random), so a restart downloads everything again and the cache keeps the
garbage. hf_xet reconstructs a file from content-addressed chunks straight into that same temporary file; its chunk
cache (HF_XET_CHUNK_CACHE_SIZE_BYTES) is off in the wheels unless configured, and it never resumes a target file.

So FluxStudio downloads each file itself, with huggingface_hub's own HTTP code: a Range request on the file's
resolve URL (or where it redirects: Xet-backed files are served over HTTP with byte ranges too) into
`blobs/<id>.partial`, a name that depends only on the file, under huggingface_hub's own lock for that blob. The bytes
are hashed as they arrive and checked against the repo's metadata (sha256 for LFS files, the git blob id for the
rest) before the file is renamed to `blobs/<etag>`; huggingface_hub then links it into `snapshots/`, so diffusers
and huggingface_hub find it as if they had downloaded it themselves.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from typing_extensions import Self

from fluxstudio.errors import CancelledError, HubError
from fluxstudio.units import human_bytes

if TYPE_CHECKING:
    from typing_extensions import Self

PARTIAL = ".partial"
STALE_DAYS = 14  # a partial download no one resumed for this long is removed at the next start
READ_CHUNK = 8 << 20
CHUNK = 1 << 20  # download chunk: progress (and cancel) at least every MiB


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit, with what the Hub's file metadata says it must be."""

    repo_id: str
    filename: str
    commit: str
    size: int
    sha256: str = ""  # LFS files
    blob_id: str = ""  # the git blob id (every file)

    @property
    def key(self) -> str:
        """The file's identity, known before any request: names its partial download."""
        return self.sha256 or self.blob_id


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def partial_path(cache: Path, remote: RemoteFile) -> Path:
    return repo_dir(cache, remote.repo_id) / "blobs" / f"{remote.key}{PARTIAL}"


def present(cache: Path, remote: RemoteFile) -> int:
    """Bytes of this file already downloaded (0 when none, or when what is there cannot be this file)."""
    try:
        size = partial_path(cache, remote).stat().st_size
    except OSError:
        return 0
    return size if size <= remote.size else 0


def _lock_path(cache: Path, folder: str, etag: str) -> Path:
    """huggingface_hub's own lock for a blob: its downloads of the same file wait for ours, and the other way round."""
    return cache / ".locks" / folder / f"{etag}.lock"


@contextmanager
def _locked(path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    while True:
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            waiting()  # another process is downloading this file; the caller may cancel
    try:
        yield
    finally:
        lock.release()


def _unowned(path: Path) -> bool:
    """Whether no process holds this lock now (a killed process's locks are released by the OS)."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return False
    lock.release()
    return True


class _Hasher:
    """sha256 of the bytes (LFS files) or their git blob id (the rest); restartable from zero."""

    def __init__(self, remote: RemoteFile) -> None:
        self.remote = remote
        self.reset()

    def reset(self) -> None:
        if self.remote.sha256:
            self.h = hashlib.sha256()
        else:
            self.h = hashlib.sha1()
            self.h.update(b"blob %d\0" % self.remote.size)

    def matches(self) -> bool:
        return self.h.hexdigest() == (self.remote.sha256 or self.remote.blob_id)


class _HashingFile:
    """The file huggingface_hub's http_get writes into, hashing what it writes. http_get rewinds to 0 when a server
    ignores the Range request and sends the whole file."""

    def __init__(self, f, hasher: _Hasher, check: Callable[[], None]) -> None:
        self.f, self.hasher, self.check = f, hasher, check

    def write(self, data: bytes) -> int:
        self.hasher.h.update(data)
        n = self.f.write(data)
        self.check()  # after the write: a cancel keeps every byte that arrived
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        if (pos, whence) != (0, 0):
            raise OSError("unexpected seek in a download")
        self.hasher.reset()
        return self.f.seek(0)

    def tell(self) -> int:
        return self.f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self.f.truncate(size)


class _ByteSink:
    """The tqdm stand-in http_get reports to: byte counts go to `sink` (which may raise CancelledError)."""

    def __init__(self, sink: Callable[[int], None], **kwargs) -> None:
        self.n = 0
        self._sink = sink

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        self._sink(int(n or 0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass


def _hash_present(path: Path, hasher: _Hasher, have: int, check: Callable[[], None]) -> None:
    with path.open("rb") as f:
        left = have
        while left:
            block = f.read(min(READ_CHUNK, left))
            if not block:
                raise OSError(f"{path.name} shrank while it was read")
            hasher.h.update(block)
            left -= len(block)
            check()


def fetch(
    remote: RemoteFile,
    cache: Path,
    *,
    endpoint: str | None,
    token: str | bool | None,
    sink: Callable[[int], None],
    check: Callable[[], None],
    note: Callable[[str], None],
) -> None:
    """Download one file into the HF cache's blobs/, resuming a partial download of it; then link it (snapshots/).

    `sink(n)` gets each new byte count (negative when a server forces a restart), `check()` is called after each
    write and while waiting, and may raise CancelledError; `note(sentence)` tells the user what happened (a damaged partial download started over).
    A partial download is kept on any failure or cancel, for the next attempt.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    constants.DOWNLOAD_CHUNK_SIZE = CHUNK

    url = hf_hub_url(remote.repo_id, remote.filename, revision=remote.commit, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    if not meta.etag:
        raise OSError(f"the Hub gave no ETag for {remote.filename}")  # as the client itself refuses
    blob = repo_dir(cache, remote.repo_id) / "blobs" / meta.etag
    partial = partial_path(cache, remote)
    headers = build_hf_headers(token=token)
    source = meta.location or url
    if urlparse(source).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a signed CDN address: it must not get the token
    with _locked(_lock_path(cache, blob.parent.parent.name, meta.etag), check):
        for stale in blob.parent.glob(f"{meta.etag}.*.incomplete"):
            stale.unlink(
                missing_ok=True
            )  # huggingface_hub's, from a killed process: we hold the lock, no one writes it
        while not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            have = present(cache, remote)
            hasher = _Hasher(remote)
            if have:
                _hash_present(partial, hasher, have, check)
            with partial.open("ab" if have else "wb") as f:
                http_get(  # a file-like object and a tqdm-like class, used as it uses them
                    source,
                    _HashingFile(f, hasher, check),  # type: ignore[arg-type]
                    resume_size=have,
                    headers=headers,
                    expected_size=remote.size,
                    displayed_filename=remote.filename,
                    tqdm_class=lambda *a, **k: _ByteSink(sink),  # type: ignore[arg-type]
                )
            if hasher.matches():
                os.replace(partial, blob)
                break
            partial.unlink()
            sink(-remote.size)
            if not have:
                raise HubError(
                    f"The download of {remote.filename} from {remote.repo_id} does not match the Hub's checksum.",
                    "It was deleted. Try again; if it keeps failing, something on the network alters downloads.",
                )
            note(
                f"The partly downloaded {remote.filename} was damaged (its checksum did not match), so it was "
                "deleted and downloaded again from the start."
            )
    # huggingface_hub finds the blob in place and only links it into snapshots/ (and writes refs/): no bytes move
    hf_hub_download(
        remote.repo_id, remote.filename, revision=remote.commit, endpoint=endpoint, token=token, cache_dir=str(cache)
    )


def reclaim(cache: Path, repo_ids: list[str] | None = None) -> int:
    """Remove interrupted downloads no running process owns; the bytes freed.

    huggingface_hub's `*.incomplete` files are never resumed by another process, so they go. FluxStudio's own
    partial downloads stay for a resume unless their file is complete already or nobody resumed them for
    STALE_DAYS.
    """
    freed = 0
    folders = [repo_dir(cache, r) for r in repo_ids] if repo_ids is not None else list(cache.glob("models--*"))
    for folder in folders:
        blobs = folder / "blobs"
        if not blobs.is_dir():
            continue
        for path in [*blobs.glob("*.incomplete"), *blobs.glob(f"*{PARTIAL}")]:
            etag = path.name.split(".")[0]
            try:
                stat = path.stat()
                resumable = (
                    path.suffix == PARTIAL
                    and not (blobs / etag).exists()
                    and time.time() - stat.st_mtime < STALE_DAYS * 86400
                )
                if resumable or not _unowned(_lock_path(cache, folder.name, etag)):
                    continue  # a partial download to resume, or one in progress
                path.unlink()
                freed += stat.st_size
            except OSError:
                continue
    return freed


def discard(cache: Path, remotes: list[RemoteFile]) -> int:
    """Delete the partial downloads of these files (a person chose to start over); the bytes freed."""
    freed = 0
    for remote in remotes:
        path = partial_path(cache, remote)
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
    return freed


def cancelled(kept: int) -> CancelledError:
    if not kept:
        return CancelledError("Download cancelled.", "Nothing was kept.")
    return CancelledError(
        f"Download cancelled: {human_bytes(kept)} kept; starting again resumes from there.",
        "Or discard it under Base model.",
    )
