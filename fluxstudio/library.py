"""Saved outputs: the folders in the outputs directory that carry a FluxStudio manifest."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fluxstudio.errors import BadInputError

MANIFEST = "fluxstudio.json"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Entry:
    name: str
    base: str
    loras: tuple[tuple[str, float], ...]
    precision: str
    size_bytes: int
    created: str


def safe_name(text: str, default: str = "fused") -> str:
    """An output name that is a plain folder name: letters, digits, '.', '_' and '-' only, never a path."""
    name = SAFE_NAME.sub("-", text.strip()).strip(".-_")[:80]
    return name or default


def list_outputs(folder: Path) -> list[Entry]:
    entries = []
    if not folder.is_dir():
        return entries
    for sub in folder.iterdir():
        manifest = sub / MANIFEST
        if sub.name.startswith(".") or not manifest.is_file():
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            entries.append(Entry(
                name=sub.name,
                base=str(data["base"].get("ref", "?")),
                loras=tuple((str(lr.get("ref") or lr["name"]), float(lr["scale"])) for lr in data.get("loras", [])),
                precision=str(data["precision"]),
                size_bytes=sum(p.stat().st_size for p in sub.iterdir() if p.is_file()),
                created=str(data.get("created", "")),
            ))
        except (ValueError, KeyError, TypeError, OSError):
            continue  # not ours, or damaged: leave it alone
    return sorted(entries, key=lambda e: e.created, reverse=True)


def delete_output(folder: Path, name: str) -> None:
    """Delete one saved output by name; only a direct subfolder with a manifest, never anything else."""
    if safe_name(name) != name:
        raise BadInputError(f"'{name}' is not an output name.")
    target = folder / name
    if not (target / MANIFEST).is_file():
        raise BadInputError(f"There is no saved output called {name}.")
    shutil.rmtree(target)
