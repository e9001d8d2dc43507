"""Saved outputs: the folders and files in the outputs directory that carry a FluxStudio manifest."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fluxstudio.engine import manifest
from fluxstudio.errors import BadInputError
from fluxstudio.flows import preview

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Entry:
    name: str
    base: str
    loras: tuple[tuple[str, float], ...]
    format: str
    precision: str
    size_bytes: int
    created: str
    preview: str = ""  # the saved Try-it figures, one line ("" when none)


def safe_name(text: str, default: str = "fused") -> str:
    """An output name that is a plain file or folder name: letters, digits, '.', '_' and '-' only, never a path."""
    name = SAFE_NAME.sub("-", text.strip()).strip(".-_")[:80]
    return name or default


def free_name(folder: Path, name: str, extension: str = "") -> str:
    """`name`, or the first of name-2, name-3, … that nothing in `folder` holds: no output, no companion file, no
    build in progress (its lock file). A second build of the same name keeps both."""
    name = safe_name(name)

    def taken(candidate: str) -> bool:
        out = folder / (candidate + extension)
        lock = folder / f".{out.name}.lock"  # a build in progress
        companions = folder.glob(f"{candidate}.*.safetensors")  # a one-file output's fused text encoders
        return out.exists() or out.is_symlink() or lock.exists() or any(companions)

    stem = name.removesuffix(extension) if extension else name
    n, candidate = 1, stem
    while taken(candidate):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _companions(path: Path, data: dict) -> list[Path]:
    """The fused text-encoder files a one-file output has beside it (plain names, in the same folder)."""
    names = data.get("text_encoder_files") or [] if path.is_file() else []
    return [path.parent / n for n in names if isinstance(n, str) and safe_name(n) == n and (path.parent / n).is_file()]


def _candidates(folder: Path):
    for sub in folder.iterdir():
        if not sub.name.startswith(".") and (sub.is_dir() or sub.suffix in manifest.ONE_FILE):
            yield sub


def list_outputs(folder: Path) -> list[Entry]:
    entries = []
    if not folder.is_dir():
        return entries
    for sub in _candidates(folder):
        data = manifest.read(sub)
        if data is None:
            continue  # not ours, or damaged: leave it alone
        try:
            entries.append(
                Entry(
                    name=sub.name,
                    base=str(data["base"].get("ref", "?")),
                    loras=tuple((str(lr.get("ref") or lr["name"]), float(lr["scale"])) for lr in data.get("loras", [])),
                    format=str(data.get("format", "diffusers")),
                    precision=str(data["precision"]),
                    size_bytes=_size(sub) + sum(_size(c) for c in _companions(sub, data)),
                    created=str(data.get("created", "")),
                    preview=summary(preview.read(sub)),
                )
            )
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return sorted(entries, key=lambda e: e.created, reverse=True)


def summary(p: preview.PreviewResult | None) -> str:
    """A saved preview in one line: each image's it/s."""
    if p is None:
        return ""
    return " · ".join(f"({r.key}) {r.it_per_s:.2f} it/s" for r in p.renders)


def delete_output(folder: Path, name: str) -> None:
    """Delete one saved output by name: only a direct child of `folder` with a manifest, never anything else."""
    if safe_name(name) != name:
        raise BadInputError(f"'{name}' is not an output name.", "Pick an output from the library.")
    target = folder / name
    data = None if target.is_symlink() or not target.exists() else manifest.read(target)
    if data is None:
        raise BadInputError(f"There is no saved output called {name}.", "Refresh the library to see what is there.")
    shown = preview.folder_for(target)
    if shown.is_dir() and not shown.is_symlink():
        shutil.rmtree(shown)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        for companion in _companions(target, data):
            companion.unlink()
        target.unlink()
