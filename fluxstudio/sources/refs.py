"""What a person names as a base or a LoRA: the demo, a local path, or a Hub repo, parsed in one place.

A reference is one of three types with a `kind` that tells them apart (`DemoRef | LocalRef | HubRef`), so that code
that needs a Hub repo id or a local path can only get one from the type that has it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fluxstudio.errors import BadInputError

HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class DemoRef:
    """The built-in demo base or LoRA."""

    text: str = "demo"
    kind: Literal["demo"] = "demo"

    def display(self) -> str:
        return "demo"


@dataclass(frozen=True)
class LocalRef:
    """A file or folder on this machine."""

    text: str
    path: Path
    kind: Literal["local"] = "local"

    def display(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class HubRef:
    """A Hub repo, at a revision, and optionally one file or folder in it."""

    text: str
    repo_id: str
    revision: str = "main"
    subpath: str = ""
    kind: Literal["hub"] = "hub"

    def display(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{self.repo_id}{rev}{'/' + self.subpath if self.subpath else ''}"


Ref = DemoRef | LocalRef | HubRef

_NAME = r"[A-Za-z0-9][\w.-]*"
_URL = re.compile(
    rf"^https?://[^/]+/(?P<repo>{_NAME}/{_NAME})(?:/(?:blob|resolve|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?/?$"
)
_REPO = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^/]+))?(?:/(?P<path>.+))?$")


def parse_ref(text: str, local: bool = True) -> Ref:
    """Parse what a user typed: `demo`, a path, `owner/name[@rev][/path]`, or a Hub URL.

    With `local=False` (a shared session) nothing on this machine's disk is looked at: a path is refused with the
    same sentence whether or not it exists, so that messages never tell a visitor what is there."""
    text = text.strip()
    if not text:
        raise BadInputError(
            "No model or LoRA given.", "Enter a Hub repo id (owner/name), a Hub URL, a local path or 'demo'."
        )
    if text == "demo":
        return DemoRef()
    if m := _URL.match(text):
        return _hub_ref(text, m)
    looks_local = text.startswith(("/", ".", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text) or "\\" in text
    if looks_local and not local:
        raise BadInputError("Local paths are not available in a shared session.", "Use a Hub repo id or upload a file.")
    if local:
        path = Path(text).expanduser()
        if looks_local or path.exists():
            return LocalRef(text, path.resolve())
    if m := _REPO.match(text):
        return _hub_ref(text, m)
    if not local:
        raise BadInputError(f"'{text}' is not a Hub repo id.", "Use owner/name or a Hub URL, or upload a file.")
    raise BadInputError(
        f"'{text}' is neither an existing path nor a Hub repo id.", "Use owner/name, a Hub URL or a local path."
    )


def _hub_ref(text: str, m: re.Match) -> HubRef:
    repo, revision, subpath = m["repo"], m["rev"] or "main", (m["path"] or "").strip("/")
    # the Hub's own rules for repo ids, and no step out of the repo in a file path
    if (
        ".." in repo
        or "--" in repo
        or ".." in revision
        or any(p in ("", ".", "..") for p in subpath.split("/") if subpath)
    ):
        raise BadInputError(f"'{text}' is not a valid Hub reference.", "Use owner/name[@revision][/file.safetensors].")
    return HubRef(text, repo, revision, subpath)
