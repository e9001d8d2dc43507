"""A reference (`demo`, a local path, a Hub repo) to files on this machine, and where they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fluxstudio.errors import BadInputError
from fluxstudio.progress import Run, running
from fluxstudio.sources.hub import Hub
from fluxstudio.sources.refs import parse_ref


def resolve(
    text: str, kind: Literal["base", "lora"], hub: Hub, run: Run | None = None, parts: list[str] | None = None
) -> tuple[Path, dict]:
    """A local path for a base or LoRA reference, downloading from the Hub if need be, and its origin for the
    manifest (with `notes` the person should see). For a base from the Hub, `parts` are the components to download
    (None: the whole pipeline)."""
    run = running(run)
    ref = parse_ref(text)
    if ref.kind == "demo":
        from fluxstudio.sources import demo

        return (demo.ensure_base() if kind == "base" else demo.ensure_lora()), {"ref": "demo"}
    if ref.kind == "local":
        if not ref.path.exists():
            what = "base model folder" if kind == "base" else "LoRA file"
            raise BadInputError(f"The {what} {ref.path} does not exist.", "Check the path.", (ref.path,))
        return ref.path, {"ref": ref.path.name}
    got = hub.fetch_base(ref, run, parts) if kind == "base" else hub.fetch_lora(ref, run)
    run.notes.extend(got.notes)
    return got.path, {"ref": ref.display(), "repo_id": ref.repo_id, "revision": got.revision}
