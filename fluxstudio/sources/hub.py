"""Base models and LoRAs from the Hugging Face Hub, through the real huggingface_hub client and its cache.

Only what a job needs is downloaded (model_index.json and the base's transformer/ files, plus the text encoders a
LoRA changes, or every component for a pipeline export; one LoRA file), into the
standard HF cache, so models a diffusers user already has are reused, and cached ones work offline. Every Hub
failure becomes one actionable sentence (ERROR_TABLE). Tokens come from huggingface_hub itself (HF_TOKEN or the
stored login) and never appear in a message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fluxstudio import units
from fluxstudio.errors import BadInputError, DiskSpaceError, FluxStudioError, HubError
from fluxstudio.progress import ProgressEvent, Run, Stage, running
from fluxstudio.sources import resume
from fluxstudio.sources.refs import HUB_URL, HubRef

log = logging.getLogger(__name__)

# -- errors -------------------------------------------------------------------------------------------------


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_network(exc: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    mod = type(exc).__module__
    return isinstance(exc, (OfflineModeIsEnabled, ConnectionError, TimeoutError)) or mod.startswith(
        ("httpx", "httpcore")
    )


def hub_error(exc: BaseException, repo_id: str, revision: str = "main", filename: str = "") -> FluxStudioError:
    """One sentence (and a next step) for any failure of the Hub client. Order matters: subclasses first."""
    from huggingface_hub import errors as e

    while isinstance(exc, e.LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # "not in the cache, and the Hub said ...": what the Hub said is the news
    url = f"{HUB_URL}/{repo_id}"
    what = f"{filename} in {repo_id}" if filename else repo_id
    status = _status(exc)
    table: list[tuple[Callable[[BaseException], bool], str, str]] = [
        (
            lambda x: isinstance(x, e.GatedRepoError),
            f"{repo_id} is gated.",
            f"Accept the licence at {url} and use a token with access.",
        ),
        (
            lambda x: isinstance(x, e.RevisionNotFoundError),
            f"The revision '{revision}' does not exist in {repo_id}.",
            "Check the branch, tag or commit.",
        ),
        (
            lambda x: isinstance(x, e.RemoteEntryNotFoundError),
            f"The file {filename or '?'} is not in {repo_id}.",
            f"Check the file name at {url}.",
        ),
        (
            lambda x: isinstance(x, e.RepositoryNotFoundError) and status != 401 or status == 404,
            f"The repository {repo_id} was not found.",
            "Check the name; a private repo needs a token with access.",
        ),
        (
            lambda x: status == 401 and isinstance(x, e.RepositoryNotFoundError),
            f"The repository {repo_id} was not found, or it is private.",
            "Check the name; a private repo needs a token with access.",
        ),
        (
            lambda x: status == 401,
            "The Hugging Face token was refused (401): it is invalid or has expired.",
            "Create a new token at https://huggingface.co/settings/tokens and log in again.",
        ),
        (
            lambda x: status == 403,
            f"Access to {what} is forbidden with this token (403).",
            "Use a token with read access to this repo (fine-grained tokens need it granted).",
        ),
        (lambda x: status == 429, "The Hub is rate-limiting downloads (429).", "Wait a few minutes, then try again."),
        (lambda x: status is not None and status >= 500, f"The Hub failed to answer ({status}).", "Try again later."),
        (
            lambda x: "Consistency check failed" in str(x) or type(x).__name__ == "RemoteProtocolError",
            f"The download of {what} was cut short (the connection dropped).",
            "Run it again: what was downloaded is kept and the rest resumes.",
        ),
        (_is_network, "Cannot reach the Hugging Face Hub.", "Check the internet connection, then try again."),
    ]
    for match, message, hint in table:
        if match(exc):
            return HubError(message, hint)
    return HubError(
        f"Downloading {what} failed ({type(exc).__name__}).", "Try again; if it keeps failing, see the log."
    )


# -- downloads ----------------------------------------------------------------------------------------------


PIPELINE_FILES = (".safetensors", ".json", ".txt", ".model")  # weights, configs, tokenizers (no pickles)


def base_files(names: list[str], subpath: str = "", parts: Sequence[str] | None = ("transformer",)) -> list[str]:
    """The files a base needs from a repo: model_index.json and the component folders in `parts` (None: every
    component of the pipeline; never the repo's top-level single files)."""
    if subpath:
        keep = [n for n in names if n.endswith((".safetensors", ".json"))]
        return [n for n in keep if n.startswith(subpath + "/") and "/" not in n[len(subpath) + 1 :]]
    if not any(n.startswith("transformer/") for n in names):
        return [n for n in names if n.endswith((".safetensors", ".json")) and "/" not in n]

    def wanted(name: str) -> bool:
        folder, _, rest = name.partition("/")
        if not rest:  # top level: only the index, never BFL's single files (flux1-dev.safetensors, ae.safetensors)
            return name == "model_index.json"
        if parts is None:
            return name.endswith(PIPELINE_FILES)
        return folder in parts and "/" not in rest and name.endswith((".safetensors", ".json"))

    return [n for n in names if wanted(n)]


@dataclass(frozen=True)
class Fetched:
    path: Path  # a model folder (bases) or a .safetensors file (LoRAs)
    ref: HubRef
    revision: str = ""  # the commit the files come from
    downloaded_bytes: int = 0
    notes: tuple[str, ...] = ()  # what the person should know (a damaged partial download started over)


@dataclass
class Hub:
    """The Hub, as this app uses it. Every I/O dependency is a parameter with the real default."""

    endpoint: str | None = None  # default: HF_ENDPOINT / huggingface.co
    token: str | bool | None = None  # default: HF_TOKEN or the stored login
    cache_dir: str | None = None  # default: HF_HUB_CACHE
    free_bytes: Callable[[Path], int] = units.free_bytes

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token)

    def _cache(self) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE)

    def info(self, ref: HubRef):
        """Model info with file sizes; raises HubError (network errors included)."""
        try:
            return self._api().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001 - mapped to one sentence
            raise hub_error(exc, ref.repo_id, ref.revision) from None

    def fetch_base(
        self, ref: HubRef, run: Run | None = None, parts: Sequence[str] | None = ("transformer",)
    ) -> Fetched:
        """A base's files: model_index.json and the components in `parts` (None: the whole pipeline)."""
        folders = ["*"] if parts is None else list(parts)
        patterns = (
            [f"{ref.subpath}/*"]
            if ref.subpath
            else ["model_index.json", "config.json", "*.safetensors*", *(f"{p}/*" for p in folders)]
        )

        def choose(names: list[str]) -> list[str]:
            return base_files(names, ref.subpath, parts)

        def usable(names: list[str]) -> None:
            if not any(n.endswith(".safetensors") for n in names):
                raise BadInputError(
                    f"{ref.display()} has no .safetensors transformer weights.",
                    "Pick a diffusers-format FLUX repo (with a transformer/ folder).",
                )

        fetched = self._fetch(ref, choose, usable, patterns, running(run))
        return replace(fetched, path=fetched.path / ref.subpath if ref.subpath else fetched.path)

    def fetch_lora(self, ref: HubRef, run: Run | None = None) -> Fetched:
        chosen: list[str] = []

        def choose(names: list[str]) -> list[str]:
            if ref.subpath.endswith(".safetensors"):
                chosen[:] = [ref.subpath]
                return chosen
            inside = [n for n in names if not ref.subpath or n.startswith(ref.subpath.rstrip("/") + "/")]
            files = [n for n in inside if n.endswith(".safetensors")]
            if len(files) > 1 and any(n.endswith("pytorch_lora_weights.safetensors") for n in files):
                files = [n for n in files if n.endswith("pytorch_lora_weights.safetensors")][:1]  # diffusers' choice
            if not files and any(n.endswith((".bin", ".pt", ".ckpt", ".pth")) for n in inside):
                raise BadInputError(
                    f"{ref.display()} has its LoRA only as a pickle file.",
                    "FluxStudio reads only .safetensors (pickle files can run code).",
                )
            if not files:
                raise BadInputError(f"{ref.display()} has no .safetensors file.", "Check the repo id.")
            if len(files) > 1:
                raise BadInputError(
                    f"{ref.repo_id} has {len(files)} LoRA files ({', '.join(files[:4])}{' ...' if len(files) > 4 else ''}).",
                    f"Name one, e.g. {ref.repo_id}/{files[0]}",
                )
            chosen[:] = files
            return chosen

        patterns = [ref.subpath] if ref.subpath.endswith(".safetensors") else ["*.safetensors"]
        fetched = self._fetch(ref, choose, lambda names: None, patterns, running(run))
        return replace(fetched, path=fetched.path / chosen[0])

    def _fetch(self, ref: HubRef, choose, usable, patterns: list[str], run: Run) -> Fetched:
        try:
            info = self._api().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        except Exception as exc:  # noqa: BLE001
            error = hub_error(exc, ref.repo_id, ref.revision)
            if not _is_network(exc):
                raise error from None
            return self._from_cache(ref, patterns, choose, error)
        files = choose(sorted(s.rfilename for s in info.siblings or []))
        usable(files)
        remotes = _remotes(info, files, ref.repo_id)
        missing = [f for f in files if f not in remotes]
        if missing:
            raise HubError(
                f"The file {missing[0]} is not in {ref.repo_id}.", f"Check the file name at {HUB_URL}/{ref.repo_id}."
            )
        downloaded, notes = self._download(ref, [remotes[f] for f in files], run)
        sha = info.sha or ref.revision
        self._remember_revision(ref, sha)
        return Fetched(self._snapshot(ref.repo_id, sha), ref, sha, downloaded, tuple(notes))

    def _snapshot(self, repo_id: str, sha: str) -> Path:
        return resume.repo_dir(self._cache(), repo_id) / "snapshots" / sha

    def _remember_revision(self, ref: HubRef, sha: str) -> None:
        """Write refs/<revision> as snapshot_download does, so the same reference resolves offline later."""
        if ref.revision == sha:
            return
        refs = resume.repo_dir(self._cache(), ref.repo_id) / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        tmp = refs / f".{ref.revision.replace('/', '_')}.tmp"
        tmp.write_text(sha)
        os.replace(tmp, refs / ref.revision)

    def _cached(self, remote: resume.RemoteFile) -> bool:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            remote.repo_id, remote.filename, cache_dir=self.cache_dir, revision=remote.commit
        )
        return isinstance(found, str)

    def _download(self, ref: HubRef, remotes: list[resume.RemoteFile], run: Run) -> tuple[int, list[str]]:
        """Download what is not in the cache, resuming partial downloads; (bytes transferred, notes)."""
        cache = self._cache()
        resume.reclaim(cache, [ref.repo_id])
        todo = [r for r in remotes if not self._cached(r)]
        total = sum(r.size for r in todo)
        done = start = sum(resume.present(cache, r) for r in todo)
        probe = units.existing_parent(cache)
        free = self.free_bytes(probe)
        if total - start > free:
            raise DiskSpaceError(
                f"Not enough free disk to download {ref.display()}: it needs {units.gb(total - start)} more and "
                f"{probe} has {units.gb(free)} free.",
                "Free some space, or set HF_HOME to a larger disk.",
                (probe,),
            )
        message = f"Downloading {ref.repo_id}"
        if start:
            message = f"Resuming {ref.repo_id} at {units.human_bytes(start)} of {units.human_bytes(total)}"
        notes: list[str] = []

        def check() -> None:
            if run.cancelled:
                raise resume.cancelled(sum(resume.present(cache, r) for r in todo))

        for i, remote in enumerate(todo):

            def tell(n: int = 0, i: int = i, remote: resume.RemoteFile = remote) -> None:
                nonlocal done
                done += n
                run.report(
                    ProgressEvent(
                        Stage.DOWNLOAD,
                        i,
                        len(todo),
                        done,
                        total,
                        item=remote.filename,
                        message=message,
                        bytes_start=start,
                    )
                )

            tell()
            try:
                resume.fetch(
                    remote, cache, endpoint=self.endpoint, token=self.token, sink=tell, check=check, note=notes.append
                )
            except FluxStudioError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise hub_error(exc, ref.repo_id, ref.revision, remote.filename) from None
        run.report(
            ProgressEvent(
                Stage.DOWNLOAD,
                len(todo),
                len(todo),
                total,
                total,
                message=f"Downloaded {ref.repo_id}",
                bytes_start=start,
            )
        )
        return total - start, notes

    def _from_cache(self, ref: HubRef, patterns: list[str], choose, error: FluxStudioError) -> Fetched:
        """Offline or unreachable: use what the cache has for this revision, or say what it has instead."""
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(
                    ref.repo_id,
                    revision=ref.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=True,
                    allow_patterns=patterns,
                )
            )
            names = sorted(str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*") if p.is_file())
            files = choose(names)
            if files and all((folder / f).exists() for f in files):
                return Fetched(folder, ref, folder.name, 0)
        except FluxStudioError:
            raise
        except Exception:
            log.debug("nothing usable of %s in the cache", ref.display(), exc_info=True)
        cached = self.cached_repos()
        raise HubError(
            f"{error.message} {ref.display()} is not in the local cache.",
            error.hint,
            detail=f"Already downloaded: {', '.join(cached[:5])}." if cached else "",
        )

    def cached_repos(self) -> list[str]:
        from huggingface_hub import scan_cache_dir

        try:
            return sorted(r.repo_id for r in scan_cache_dir(self.cache_dir).repos if r.repo_type == "model")
        except Exception:  # noqa: BLE001 - no cache yet
            return []

    def download_plan(self, ref: HubRef, parts: Sequence[str] | None = ("transformer",)) -> DownloadPlan:
        """What getting a base (these components of it) costs, from the Hub's file metadata and what this machine has."""
        info = self.info(ref)
        remotes = _remotes(
            info, base_files(sorted(s.rfilename for s in info.siblings or []), ref.subpath, parts), ref.repo_id
        )
        cached = [r for r in remotes.values() if self._cached(r)]
        todo = [r for r in remotes.values() if r not in cached]
        partial = sum(resume.present(self._cache(), r) for r in todo)
        return DownloadPlan(
            sum(r.size for r in todo) - partial, sum(r.size for r in cached), partial, bool(info.gated), todo
        )

    def discard(self, ref: HubRef) -> int:
        """Delete the partial downloads of a base (a person chose to start over); the bytes freed."""
        return resume.discard(self._cache(), self.download_plan(ref).todo)

    def reclaim(self) -> int:
        """Remove interrupted downloads that no running process owns and nobody will resume (at the app's start)."""
        return resume.reclaim(self._cache())


@dataclass(frozen=True)
class DownloadPlan:
    todo_bytes: int  # still to download
    cached_bytes: int  # complete in the cache
    partial_bytes: int  # downloaded already, of files not complete yet: a download resumes there
    gated: bool
    todo: list[resume.RemoteFile]


def _remotes(info, names: list[str], repo_id: str) -> dict[str, resume.RemoteFile]:
    """The repo's file metadata (size, sha256, blob id) for these files, at the info's commit."""
    by_name = {s.rfilename: s for s in info.siblings or []}
    return {
        n: resume.RemoteFile(
            repo_id,
            n,
            info.sha,
            by_name[n].size or 0,
            by_name[n].lfs.sha256 if by_name[n].lfs else "",
            by_name[n].blob_id or "",
        )
        for n in names
        if n in by_name
    }


def save_token(token: str) -> str:
    """Check a token with the Hub and store it with huggingface_hub's own login (HF_HOME/token); returns the user.

    The token is never logged or echoed; an invalid one gives the 401 sentence.
    """
    import logging

    from huggingface_hub import login, whoami

    token = token.strip()
    if not token:
        raise BadInputError("The token is empty.", "Paste a token from https://huggingface.co/settings/tokens.")
    try:
        user = whoami(token=token).get("name", "")
        hub_logger = logging.getLogger("huggingface_hub")
        level = hub_logger.level
        hub_logger.setLevel(logging.ERROR)  # login() logs where the token file is; keep the page quiet
        try:
            login(token=token, add_to_git_credential=False)
        finally:
            hub_logger.setLevel(level)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, "your account") from None
    return user


def has_token() -> bool:
    """Whether huggingface_hub has a token to send (HF_TOKEN or a stored login)."""
    from huggingface_hub import get_token

    return get_token() is not None
