"""The whole-pipeline export: the folder `FluxPipeline.from_pretrained(out)` loads with nothing else.

FluxStudio writes the components it changes (the fused transformer, a fused or re-quantized text encoder) and
hard-links the rest (VAE, scheduler, tokenizers, untouched encoders) from the base, copying where the file system
cannot link. The base's own files are never written to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fluxstudio.errors import BadInputError

INDEX = "model_index.json"


def pipeline_root(base_path: Path) -> Path:
    """The pipeline folder of a base given as the folder itself or as its transformer/ subfolder."""
    for folder in (base_path, base_path.parent):
        if (folder / INDEX).is_file():
            return folder
    raise BadInputError(
        f"{base_path.name} is a transformer alone, without the pipeline around it (model_index.json, text encoders, "
        "VAE, tokenizers).", "Pick the whole diffusers pipeline folder (or repo) of the base model.", (base_path,),
    )


def components(root: Path) -> list[str]:
    """The component folders model_index.json names (those with a class, and present)."""
    try:
        index = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BadInputError(f"{root / INDEX} is not valid JSON.", "Download the model again.", (root / INDEX,)) from None
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise BadInputError(
            f"The base pipeline lacks its {', '.join(missing)} folder{'s' if len(missing) > 1 else ''}.",
            "Download the whole model (FluxStudio fetches it when the output is a pipeline).", (root,),
        )
    return sorted(names)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def copy_bytes(root: Path, names: list[str], target_dir: Path) -> int:
    """Bytes that linking these components into target_dir would take: nothing where a hard link is possible."""
    probe = target_dir if target_dir.exists() else target_dir.parent
    total = 0
    for name in names:
        for f in _files(root / name):
            real = f.resolve()
            if real.stat().st_dev != probe.stat().st_dev:
                total += real.stat().st_size
    return total


def link(root: Path, names: list[str], target: Path) -> None:
    """Hard-link (or copy) the files of these components and model_index.json into `target`.

    Files in the Hugging Face cache are symlinks into its blobs: the blob itself is linked, never the link.
    """
    for f in [root / INDEX] + [f for name in names for f in _files(root / name)]:
        dst = target / f.relative_to(root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        real = f.resolve()
        try:
            os.link(real, dst)
        except OSError:
            shutil.copyfile(real, dst)
