"""ComfyUI's native quantized checkpoint (`comfy_quant`): one BFL-keyed .safetensors in which each quantized Linear
`L` carries its config in `L.comfy_quant`, and the header lists them all in `_quantization_metadata`
(`{"format_version": "1.0", "layers": {L: config}}`), as ComfyUI's `load_diffusion_model` reads them
(`comfy/utils.py::convert_old_quants`, `comfy/ops.py::_load_quantized_module`).

The weights are quantized by comfy-kitchen (`fluxstudio.quant.comfy`) from the fused float32 sums, rounded once.
Kept in bf16, as ComfyUI's own converters keep them: biases, norms and every 1-D tensor, FLUX.1's `img_in`, `txt_in`,
`time_in`, `vector_in`, `guidance_in` and `final_layer`, and FLUX.2's stream-modulation Linears. ConvRot needs
inputs in groups of 256: a Linear whose width does not divide is stored as plain INT8 per row, and a note says so.

A file fitted to a size (`FITTED`: `fit-fp8`, `fit-nvfp4`, `fit-int8`, one per generation of cards) gives each Linear
weight the precision, among those the generation multiplies natively and bf16, that makes the fit's measure least
(engine/fit.py); ComfyUI reads each layer's own config, so they mix in one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxstudio import units
from fluxstudio.engine import fit
from fluxstudio.engine.fuse import FusePlan
from fluxstudio.engine.models import BaseModel, Family
from fluxstudio.errors import BadInputError
from fluxstudio.formats.base import Option, Runtime, Settings, Writer
from fluxstudio.formats.fitting import Fitting
from fluxstudio.formats.single_file import BflFormat, SingleFileWriter
from fluxstudio.quant import Precision
from fluxstudio.quant.comfy import FP8, INT8, INT8_CONVROT, MXFP8, NVFP4, ComfyPrecision, Int8
from fluxstudio.quant.plain import BF16

KEEP_FLUX2 = ("double_stream_modulation_img.", "double_stream_modulation_txt.", "single_stream_modulation.")
METADATA = "_quantization_metadata"


class ComfyWriter(SingleFileWriter):
    """A single file whose quantized Linears carry ComfyUI's per-layer config, listed again in the header."""

    def __init__(self, codec: ComfyPrecision, base: BaseModel, jobs, filename: str) -> None:
        super().__init__(codec, base, jobs, filename)
        self.codecs = {n: self._choose(codec, n) for n in self.shapes}
        if fallback := [n for n, c in self.codecs.items() if c is INT8 and codec is not INT8]:
            more = " …" if len(fallback) > 3 else ""
            self.notes.append(
                f"{len(fallback)} Linear weights have inputs that are not a multiple of {Int8.GROUP} "
                f"({', '.join(fallback[:3])}{more}): stored as plain INT8"
            )

    def quantized(self, name: str) -> bool:
        return super().quantized(name) and not name.startswith(KEEP_FLUX2)

    def _choose(self, codec: ComfyPrecision, name: str) -> Precision:
        if not self.quantized(name):
            return BF16
        return codec if codec.fits(self.shapes[name]) else INT8  # only ConvRot refuses a shape

    def _codec(self, name: str) -> Precision:
        return self.codecs[name]

    def header(self) -> dict[str, str]:
        layers = {n[: -len(".weight")]: c.config for n, c in self.codecs.items() if isinstance(c, ComfyPrecision)}
        return {METADATA: json.dumps({"format_version": "1.0", "layers": layers})}


@dataclass(frozen=True)
class FitFor:
    """A file fitted to a size for one generation of cards: each Linear weight at the candidate that makes the
    measure least (engine/fit.py), among what those cards multiply natively in ComfyUI, and bf16."""

    key: str
    cards: str
    candidates: tuple[Precision, ...]
    runtime: Runtime = "own-file"
    double_quant: bool | None = None

    @property
    def label(self) -> str:
        kinds = ", ".join(c.key for c in self.candidates)
        return f"Fit a size, for {self.cards} · each Linear weight in {kinds}, chosen to fit the size below"

    @property
    def note(self) -> str:
        return (
            f"ComfyUI native, fitted to a size for {self.cards}: each Linear weight in the precision (of "
            f"{', '.join(c.key for c in self.candidates)}) that keeps the most of the model and the LoRA within it."
        )

    @property
    def bytes_per_param(self) -> float:
        return min(c.bytes_per_param for c in self.candidates)  # at least


# What each generation of cards multiplies natively in ComfyUI (the advice's rule): a fitted file mixes only these
FITTED = (
    FitFor("fit-fp8", "RTX 40, L4, L40S and H100", (FP8, BF16)),
    FitFor("fit-nvfp4", "RTX 50 and B200", (NVFP4, FP8, MXFP8, BF16)),
    FitFor("fit-int8", "RTX 30 and A100", (INT8, BF16)),
)
OVERHEAD = 1 << 20  # the header's JSON (keys, shapes, the layers' configs, the manifest), at most


class FittedComfyWriter(Fitting, ComfyWriter):
    """A comfy_quant file whose Linear weights each take the candidate of `option` that makes the total error least
    with the file within `budget` bytes; ComfyUI reads each layer's own `comfy_quant`, so a file may mix them."""

    def __init__(self, option: FitFor, base: BaseModel, jobs, filename: str, budget: int) -> None:
        first = option.candidates[0]
        assert isinstance(first, ComfyPrecision)
        ComfyWriter.__init__(self, first, base, jobs, filename)
        self.option, self.budget = option, budget
        self.choosable = {n: list(option.candidates) for n in self.shapes if self.quantized(n)}
        self.fixed = OVERHEAD + sum(BF16.nbytes(s) for n, s in self.shapes.items() if n not in self.choosable)
        if (least := self.least()) > budget:
            raise BadInputError(
                f"A {units.human_bytes(budget)} file cannot hold this model: even {first.key} for every weight makes "
                f"{units.human_bytes(least)}.",
                f"Allow at least {units.human_bytes(least)}, or fit a GGUF file to this size (its types go lower).",
            )
        self.summary = {}

    def uniform(self) -> dict[str, tuple[dict[str, str], int]]:
        return {
            c.key: (
                dict.fromkeys(self.choosable, c.key),
                self.fixed + sum(c.nbytes(self.shapes[n]) for n in self.choosable),
            )
            for c in self.option.candidates
            if c is not BF16
        }

    @property
    def ladder(self) -> tuple[str, ...]:
        sizes = {key: size for key, (_, size) in self.uniform().items()}
        return tuple(sorted(sizes, key=sizes.__getitem__))

    def apply(self, mix: dict[str, fit.Choice]) -> None:
        by_key = {c.key: c for c in self.option.candidates}
        for n, c in mix.items():
            self.codecs[n] = by_key[c.key]

    def planned_bytes(self) -> int:
        return ComfyWriter.need_bytes(self) + OVERHEAD


class ComfyFormat(BflFormat):
    key = "comfyui"
    label = "ComfyUI native (comfy_quant): fp8 matmul, NVFP4 / MXFP8 for RTX 50, INT8 for RTX 30 and A100"
    extension = ".safetensors"
    options: tuple[Option, ...] = (FP8, NVFP4, MXFP8, INT8, INT8_CONVROT)
    fitted: tuple[Option, ...] = FITTED
    default = "fp8"
    families = ("flux1", "flux2")
    where = (
        "ComfyUI (of January 2026 or newer): put it in models/diffusion_models/ and use the Load Diffusion Model "
        "node; ComfyUI reads the comfy_quant layers and multiplies in the file's own precision where the card "
        "can (fp8 on RTX 40/50 and H100, NVFP4 and MXFP8 on RTX 50 with a PyTorch built for CUDA 13, INT8 on "
        "RTX 30 and A100). Forge Neo: models/Stable-diffusion/."
    )

    def main_writer(self, precision: str, base: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        codec = self.option(precision)
        if isinstance(codec, FitFor):
            return FittedComfyWriter(codec, base, plan.jobs, settings.filename, settings.fit_bytes)
        assert isinstance(codec, ComfyPrecision)
        return ComfyWriter(codec, base, plan.jobs, settings.filename)

    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        return (
            "# diffusers has no loader for ComfyUI's comfy_quant files: load it in ComfyUI (Load Diffusion Model).\n"
            "# For diffusers, build the diffusers format or a GGUF file of the same weights."
        )

    def load_transformer(self, path: Path, config: Path):
        """The output as diffusers can run it, converted in memory: ComfyUI's fp8 layers as BFL's fp8r (the same
        fp8 bytes, the tensor's scale on every row) through diffusers' `BFLQuantizationConfig`, which multiplies in
        fp8 on cards of compute 8.9+; NVFP4, MXFP8 and INT8 dequantized by comfy-kitchen into bf16 (diffusers reads
        no MXFP8 or INT8 layout, and its NVFP4 one needs calibrated input scales that these files do not carry)."""
        from diffusers import BFLQuantizationConfig, FluxTransformer2DModel

        state, fp8 = for_diffusers(path)
        quantized = {"quantization_config": BFLQuantizationConfig(torch.bfloat16)} if fp8 else {}
        load = FluxTransformer2DModel.from_single_file  # it takes a state dict too, which its hints leave out
        return load(state, config=str(config), dtype=torch.bfloat16, **quantized)  # type: ignore[arg-type]


def for_diffusers(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A comfy_quant file's tensors as diffusers' single-file loader takes them, and whether any stays fp8: fp8
    weights keep their bytes with a per-row `weight_scale` (BFL's fp8r), every other quantized weight is
    dequantized by comfy-kitchen into bf16, and the markers go. The whole file is in memory, as diffusers' loader
    holds it anyway. At FLUX's real width no weight is padded, so the stored shapes are the model's."""
    from safetensors.torch import load_file

    codecs = {json.dumps(c.config, sort_keys=True): c for c in ComfyFormat.options if isinstance(c, ComfyPrecision)}
    stored = load_file(str(path))
    out, fp8 = {}, False
    for key in [k for k in stored if k.endswith(".comfy_quant")]:
        weight = key[: -len("comfy_quant")] + "weight"
        codec = codecs[json.dumps(json.loads(bytes(stored[key].tolist())), sort_keys=True)]
        if codec is FP8:
            rows = stored[weight].shape[0]
            out[weight], out[weight + "_scale"] = stored[weight], stored[weight + "_scale"].expand(rows).clone()
            fp8 = True
        else:
            out[weight] = codec.rows(weight, stored)(0, stored[weight].shape[0]).to(torch.bfloat16)
        for name in codec.names(weight):
            stored.pop(name)
    return stored | out, fp8
