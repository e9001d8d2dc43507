"""One BFL-keyed .safetensors for ComfyUI, Forge and SwarmUI: bf16, fp8, the older scaled fp8, or Forge's NF4.

Keys are BFL's own, bare (no `model.diffusion_model.` prefix): ComfyUI, Forge and diffusers (FLUX.2 too) read them.
The fused text encoders, when a LoRA trains them, are written beside it in ComfyUI's layouts. `BflFormat` is what
the one-file formats share (GGUF too): the width diffusers' single-file loader needs, the encoders beside.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from fluxstudio.engine import manifest
from fluxstudio.engine.fuse import FusePlan
from fluxstudio.engine.models import BaseModel, Family
from fluxstudio.engine.shards import ShardedWriter, header_bound
from fluxstudio.formats.base import DEMO_PREVIEWS, PIPELINES, Format, Option, Settings, Why, Writer, pipeline_lines
from fluxstudio.formats.writers import BflWriter, EncoderFile, SafetensorsWriter
from fluxstudio.quant import Precision, Rows
from fluxstudio.quant.nf4 import NF4
from fluxstudio.quant.plain import BF16, FP8, SCALED_FP8

ENCODER_FILES = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl_fp8_e4m3fn"}
FLUX1_WIDTH = 3072  # diffusers' single-file converters hard-code it


class BflFormat(Format):
    """A format of one BFL-keyed file, with the fused text encoders beside it."""

    def encoder_writer(self, component: str, encoder: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        return EncoderFile(encoder, plan.jobs, f"{Path(settings.filename).stem}.{ENCODER_FILES[component]}.safetensors")

    def width_problem(self, width: int) -> Why | None:
        if width == FLUX1_WIDTH:
            return None
        return Why(
            "diffusers reads single files and GGUF only at FLUX.1's real width (its converter assumes 3072), and "
            "this base is narrower.",
            DEMO_PREVIEWS + " Real FLUX models preview in every format diffusers loads.",
        )


class SingleFileWriter(BflWriter, SafetensorsWriter):
    """One BFL-keyed .safetensors: the Linear weights at one precision, the rest in bf16."""

    def __init__(self, codec: Precision, base: BaseModel, jobs, filename: str) -> None:
        SafetensorsWriter.__init__(self)
        BflWriter.__init__(self, codec.key, codec.from_fp32, base, jobs, filename)
        self.codec = codec

    def _codec(self, name: str) -> Precision:
        return self.codec if self.quantized(name) else BF16

    def header(self) -> dict[str, str]:
        """What the header's metadata says of the weights, beside the manifest."""
        return {}

    def need_bytes(self) -> int:
        return sum(self._codec(n).nbytes(s) for n, s in self.shapes.items())

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        markers = self.codec.file_markers()
        keys = [k for name in self.shapes for k in self._codec(name).names(name)] + list(markers)
        self.shards = ShardedWriter(folder, 0, header_bound(keys), self.header() | metadata, single_name=self.filename)
        for key, value in markers.items():
            self.shards.add(key, value)

    def encode_bfl(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._codec(name).encode(name, t)

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]) -> Rows:
        return self._codec(name).rows(name, out, self.shapes[name])

    def close(self, final: dict | None = None) -> list[Path]:
        assert self.shards is not None, "open() first"
        if final and (entry := manifest.refit(self.shards.metadata, final, escaped=True)):
            self.shards.metadata.update(entry)
        return self.shards.close()


class SingleFileFormat(BflFormat):
    key = "single-file"
    label = "ComfyUI / Forge / SwarmUI, one file"
    extension = ".safetensors"
    options: tuple[Option, ...] = (BF16, FP8, SCALED_FP8, NF4)
    default = "fp8-scaled"
    where = (
        "ComfyUI: put it in models/diffusion_models/ and use the Load Diffusion Model node. "
        "Forge: put it in models/Stable-diffusion/. SwarmUI: models/diffusion_models/."
    )
    NOT_IN_DIFFUSERS: ClassVar[dict[str, str]] = {
        "nf4": "Forge",
        "fp8-scaled": "ComfyUI and Forge",
    }  # and who reads them instead

    def main_writer(self, precision: str, base: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        option = self.option(precision)
        assert isinstance(option, Precision)
        return SingleFileWriter(option, base, plan.jobs, settings.filename)

    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        if reader := self.NOT_IN_DIFFUSERS.get(precision):
            readers = f"{reader} read" if " and " in reader else f"{reader} reads"
            return (
                f"# diffusers does not read {precision} single files ({readers} them).\n"
                "# For diffusers, build the diffusers format or a GGUF file instead."
            )
        cls = family.class_name
        pipe_cls, repo = PIPELINES[family.key]
        repo = pipeline or repo
        return pipeline_lines(
            self.option(precision),
            family,
            f"from diffusers import {cls}, {pipe_cls}",
            f'transformer = {cls}.from_single_file(\n    r"{path}", config=r"{repo}", subfolder="transformer", '
            "torch_dtype=torch.bfloat16,\n)",
            pipeline,
        )

    def preview_problem(self, precision: str) -> Why | None:
        if reader := self.NOT_IN_DIFFUSERS.get(precision):
            return Why(
                f"diffusers cannot load a {precision} single file ({reader} read it), so it has no preview.",
                "Build the diffusers format or a GGUF file to preview the same weights.",
            )
        return None
