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

from fluxstudio.engine.fuse import FusePlan
from fluxstudio.engine.models import INDEX, BaseModel, Family
from fluxstudio.errors import BadInputError
from fluxstudio.formats.base import PIPELINES, BuildPlan, Settings, Writer
from fluxstudio.formats.diffusers import DiffusersFormat, DiffusersWriter
from fluxstudio.quant import get

T5 = "text_encoder_2"


class PipelineFormat(DiffusersFormat):
    key = "pipeline"
    label = "pipeline (diffusers): transformer, text encoders, VAE, tokenizers"
    where = "Load the whole pipeline in one line (snippet below); it needs nothing else."
    encoder_options = ("bf16", "fp8", "nf4")  # T5-XXL's
    writes_encoders = True
    links_base = True
    holds = "pipeline"

    def base_parts(self, lora_components: set[str]) -> list[str] | None:
        return None  # everything: what is not rewritten is linked

    def subfolder(self, component: str) -> str:
        return component

    def forced_encoders(self, settings: Settings) -> set[str]:
        return {T5} if settings.t5_precision not in ("", "bf16") else set()

    def encoder_writer(self, component: str, encoder: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        precision = settings.t5_precision if component == T5 and settings.t5_precision else "bf16"
        codec = self.codec(precision, settings)
        return DiffusersWriter(codec, encoder, plan.jobs, {}, settings.shard_bytes, score=False)

    def plan(self, base_path, base, loras, precision, settings, ignore_unmatched=False) -> BuildPlan:
        planned = super().plan(base_path, base, loras, precision, settings, ignore_unmatched)
        assert planned.root is not None
        written = {p.where for p in planned.parts}
        planned.linked = [c for c in components(planned.root) if c not in written]
        return planned

    def link(self, planned: BuildPlan, folder: Path) -> None:
        if planned.linked and planned.root is not None:
            link(planned.root, planned.linked, folder)

    def linked_bytes(self, planned: BuildPlan, target: Path) -> int:
        return copy_bytes(planned.root, planned.linked, target) if planned.linked and planned.root else 0

    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        pipe_cls, _ = PIPELINES[family.key]
        lines = [
            "import torch",
            f"from diffusers import {pipe_cls}",
            "",
            f'pipe = {pipe_cls}.from_pretrained(r"{path}", torch_dtype=torch.bfloat16)',
        ]
        fp8 = [c for c, p in (("transformer", precision), (T5, t5)) if p and get(p).runtime == "fp8"]
        lines += [
            f"pipe.{c}.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)"
            if c == "transformer"
            else f"apply_layerwise_casting(pipe.{c}, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)"
            for c in fp8
        ]
        if T5 in fp8:
            lines.insert(2, "from diffusers.hooks import apply_layerwise_casting")
        return "\n".join(lines + ['pipe.enable_model_cpu_offload()  # or pipe.to("cuda") on a large card'])


def components(root: Path) -> list[str]:
    """The component folders model_index.json names (those with a class, and present)."""
    try:
        index = json.loads((root / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BadInputError(
            f"{root / INDEX} is not valid JSON.", "Download the model again.", (root / INDEX,)
        ) from None
    names = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]]
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise BadInputError(
            f"The base pipeline lacks its {', '.join(missing)} folder{'s' if len(missing) > 1 else ''}.",
            "Download the whole model (FluxStudio fetches it when the output is a pipeline).",
            (root,),
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
