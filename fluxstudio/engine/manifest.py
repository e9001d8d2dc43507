"""The FluxStudio manifest: what went into an output (inputs with revisions and sha256, scales, format, versions)
and, for folders, what the build measured. One place writes and reads it, wherever it lives:

- a diffusers folder: `fluxstudio.json` beside the weights;
- a single .safetensors: the `fluxstudio` entry of the header's `__metadata__`;
- a .gguf: the `fluxstudio` string of its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "fluxstudio.json"
KEY = "fluxstudio"
ONE_FILE = (".safetensors", ".gguf")


SLACK = 1024  # room kept in a one-file output's manifest for what the build measures (it is written first)


def dumps(manifest: dict, **kw) -> str:
    """Strict JSON (no NaN or Infinity, which strict readers refuse): a value that is not a number is a bug upstream."""
    return json.dumps(manifest, allow_nan=False, **kw)


def embedded(manifest: dict, room: int = 0) -> dict[str, str]:
    """The metadata entry that one-file outputs carry, padded with `room` spaces (JSON ignores them) so that a
    longer manifest can replace it in place at the end of the build."""
    return {KEY: dumps(manifest, separators=(",", ":")) + " " * room}


def refit(old: dict[str, str], manifest: dict, escaped: bool = False) -> dict[str, str] | None:
    """The final manifest in exactly the room the padded one took (as UTF-8 bytes, or as an escaped JSON string
    for a safetensors header), or None when it does not fit."""
    text = dumps(manifest, separators=(",", ":"))
    size = (lambda v: len(json.dumps(v))) if escaped else (lambda v: len(v.encode("utf-8")))
    extra = size(old[KEY]) - size(text)
    return {KEY: text + " " * extra} if extra >= 0 else None


def write_folder(folder: Path, manifest: dict) -> None:
    (folder / FILE).write_text(dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read(path: Path) -> dict | None:
    """The manifest of an output folder or file, or None when it is not a FluxStudio output (or is damaged)."""
    try:
        if path.is_dir():
            return json.loads((path / FILE).read_text(encoding="utf-8")) if (path / FILE).is_file() else None
        if path.suffix == ".safetensors":
            from fluxstudio.engine.safefile import read_header

            raw = read_header(path).metadata.get(KEY)
        elif path.suffix == ".gguf":
            raw = _gguf_string(path, KEY)
        else:
            return None
        return json.loads(raw) if raw else None
    except (ValueError, OSError, KeyError, IndexError, TypeError):
        return None
    except Exception:  # noqa: BLE001 - a foreign or broken file in the outputs folder is skipped, not fatal
        return None


def _gguf_string(path: Path, key: str) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return bytes(field.parts[-1]).decode("utf-8") if field is not None else None
