"""One .gguf with BFL names and city96's conventions, for ComfyUI-GGUF, Forge, stable-diffusion.cpp and diffusers.

1-D tensors and tensors of up to 1024 values are F32, as are the in/out layers' first Linears; the rest of the
small in/out layers F16; every other weight the file's type, or F16 where its rows do not fit the type's blocks
(city96's patch does the same). The K-mixes follow llama.cpp's per-tensor rules as city96's patch (ComfyUI-GGUF
`tools/lcpp.patch`) lets them reach FLUX's names: only `*attn.qkv.weight` matches one (`attn_qkv`), so Q5_K_M,
Q4_K_M and Q3_K_M raise the double blocks' qkv weights to Q6_K, Q5_K and Q4_K; the rules for `attn_v`,
`attn_output` and `ffn_down`, where Q3_K_L differs from Q3_K_M, match no FLUX tensor, so Q3_K_L would be Q3_K_M
with another file type and is not offered. The header is written first, from the plan, then the data in the
planned order. Block sizes and file types come from the gguf package.

A fitted file (precision "fit", `FittedWriter`) chooses each Linear weight's type among `CANDIDATES` from a first
streaming pass that measures them (engine/fit.py), so that the file fits a size; its general.file_type is that of
the type most of its weights have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fluxstudio import units
from fluxstudio.engine import fit, manifest
from fluxstudio.engine.fuse import FusePlan
from fluxstudio.engine.models import BaseModel, Family
from fluxstudio.errors import BadInputError
from fluxstudio.formats.base import PIPELINES, Option, Runtime, Settings, Writer, pipeline_lines
from fluxstudio.formats.fitting import Fitting
from fluxstudio.formats.single_file import BflFormat
from fluxstudio.formats.writers import KEEP_HIGH, BflWriter
from fluxstudio.quant import Precision, Rows, get
from fluxstudio.quant.ggml import GgmlType

KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")


QKV = "attn.qkv.weight"  # the double blocks' attention inputs: the only FLUX tensors llama.cpp's mixes raise
QKV_SHARE = 0.09  # of FLUX.1-dev's parameters (19 blocks x 2 x 3072 x 9216 of 11.9 B): for the size estimates


@dataclass(frozen=True)
class Preset:
    """A GGUF precision as people download it: the type of its weights (and, in llama.cpp's K-mixes, the type of
    the attention qkv weights), and the file type llama-quantize writes."""

    key: str
    weights: str  # the ggml type of the Linear weights
    note: str
    qkv: str = ""  # the type of the double blocks' attn.qkv weights where the mix raises it ("" as the rest)
    runtime: Runtime = "own-file"
    double_quant: bool | None = None

    @property
    def bytes_per_param(self) -> float:
        rest = get(self.weights).bytes_per_param
        return rest + QKV_SHARE * (get(self.qkv).bytes_per_param - rest) if self.qkv else rest

    @property
    def file_type(self) -> int:
        import gguf

        return int(gguf.LlamaFileType[f"MOSTLY_{self.key}"])

    def tensor_type(self, name: str) -> str:
        """The ggml type of a Linear weight, as city96's patched llama-quantize picks it for this file type."""
        return self.qkv if self.qkv and name.endswith(QKV) else self.weights


PRESETS = (
    Preset("Q8_0", "Q8_0", "GGUF Q8_0: 8.5 bits per weight, indistinguishable from bf16 for most uses."),
    Preset("Q6_K", "Q6_K", "GGUF Q6_K: 6.6 bits per weight."),
    Preset("Q5_K_M", "Q5_K", "GGUF Q5_K_M: Q5_K, with the attention qkv weights in Q6_K (5.6 bits).", "Q6_K"),
    Preset("Q5_K_S", "Q5_K", "GGUF Q5_K_S: 5.5 bits per weight."),
    Preset("Q5_1", "Q5_1", "GGUF Q5_1: 6 bits per weight (a scale and a minimum per 32)."),
    Preset("Q5_0", "Q5_0", "GGUF Q5_0: 5.5 bits per weight."),
    Preset("Q4_K_M", "Q4_K", "GGUF Q4_K_M: Q4_K, with the attention qkv weights in Q5_K (4.6 bits).", "Q5_K"),
    Preset("Q4_K_S", "Q4_K", "GGUF Q4_K_S: 4.5 bits per weight, for 8–12 GB cards."),
    Preset("Q4_1", "Q4_1", "GGUF Q4_1: 5 bits per weight (a scale and a minimum per 32)."),
    Preset("Q4_0", "Q4_0", "GGUF Q4_0: 4.5 bits per weight."),
    Preset("IQ4_XS", "IQ4_XS", "GGUF IQ4_XS: 4.25 bits per weight, non-linear levels (ComfyUI-GGUF of late 2025+)."),
    Preset("IQ4_NL", "IQ4_NL", "GGUF IQ4_NL: 4.5 bits per weight, non-linear levels (ComfyUI-GGUF of late 2025+)."),
    Preset("Q3_K_M", "Q3_K", "GGUF Q3_K_M: Q3_K, with the attention qkv weights in Q4_K (3.5 bits).", "Q4_K"),
    Preset("Q3_K_S", "Q3_K", "GGUF Q3_K_S: 3.4 bits per weight, for 6–8 GB cards."),
    Preset("Q2_K", "Q2_K", "GGUF Q2_K: 2.6 bits per weight, the smallest; visibly softer."),
    Preset("BF16", "BF16", "GGUF BF16: unquantized, as the bf16 file."),
    Preset("F16", "F16", "GGUF F16: unquantized half precision."),
)
# A file fitted to a size (`--fit`): each weight's type chosen from its measured error among these (engine/fit.py)
CANDIDATES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K")
FIT = Preset("fit", "Q4_K", "GGUF fitted to a size: each weight's type (F16 to Q3_K) chosen from its measured error.")
# The one-type files in size order, up to Q8_0: a fitted file keeps the LoRA as the next one up from what fits would
LADDER = ("Q3_K_S", "IQ4_XS", "Q4_K_S", "Q5_K_S", "Q6_K", "Q8_0")
# general.file_type of a fitted file: the llama.cpp file type of the type most of its weights have
FILE_TYPES = {"Q5_K": "Q5_K_S", "Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S"}


class GgufWriter(BflWriter):
    def __init__(self, preset: Preset, base: BaseModel, jobs, filename: str) -> None:
        super().__init__(preset.key, False, base, jobs, filename)
        self.preset = preset
        self.types = {name: self.tensor_type(name) for name in self.shapes}
        fallback = [n for n, t in self.types.items() if t.key == "F16" and self._wanted(n) not in ("F16", "F32")]
        if fallback:
            block = get(self._wanted(fallback[0])).block  # type: ignore[attr-defined]
            self.notes.append(
                f"{len(fallback)} tensors have rows that are not a multiple of {block} "
                f"({', '.join(fallback[:3])}{' …' if len(fallback) > 3 else ''}): stored as F16 instead"
            )
        self.gguf = None  # the gguf package's writer, once open
        self.path: Path | None = None
        self.metadata: dict[str, str] = {}
        self.written = 0

    def _wanted(self, name: str) -> str:
        shape = self.shapes[name]
        if len(shape) < 2 or math.prod(shape) <= 1024 or name.startswith(KEEP_F32):
            return "F32"
        return "F16" if name.startswith(KEEP_HIGH) else self.preset.tensor_type(name)

    def tensor_type(self, name: str) -> Precision:
        want = get(self._wanted(name))
        if isinstance(want, GgmlType) and not want.fits(self.shapes[name]):
            return get("F16")  # city96's patch falls back to F16 where rows do not fit the blocks
        return want

    def need_bytes(self) -> int:
        return sum(self.types[n].nbytes(s) for n, s in self.shapes.items()) + self.overhead

    @property
    def overhead(self) -> int:
        """What the file holds beyond the tensors' data, at most: the header (1 MiB) and each tensor's alignment."""
        return 32 * len(self.shapes) + (1 << 20)

    @property
    def file_type(self) -> int:
        return self.preset.file_type

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        import gguf

        self.path = folder / self.filename
        self.gguf = w = gguf.GGUFWriter(self.path, "flux")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(self.file_type)
        self.metadata = metadata
        for key, value in metadata.items():
            w.add_string(key, value)
        for name, shape in self.shapes.items():
            t = self.types[name]
            raw = None if t.key in ("F32", "F16") else gguf.GGMLQuantizationType[t.key]
            w.add_tensor_info(
                name, shape, np.dtype(np.float16 if t.key == "F16" else np.float32), t.nbytes(shape), raw_dtype=raw
            )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

    def encode_bfl(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        # GGUF is made from the bf16 rounding of the fused tensor: the same file as converting the bf16 single file
        return self.types[name].encode(name, t)

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]) -> Rows:
        return self.types[name].rows(name, out)

    def write(self, key: str, value: torch.Tensor) -> None:
        assert self.gguf is not None, "open() first"
        expected = next(iter(self.gguf.tensors[0]), None)
        if key != expected:  # the header was written from the plan: data must come in the same order
            raise RuntimeError(f"GGUF tensor {key} written where {expected} was planned")
        self.gguf.write_tensor_data(value.contiguous().numpy())
        self.written += value.numel() * value.element_size()

    def close(self, final: dict | None = None) -> list[Path]:
        assert self.gguf is not None and self.path is not None, "open() first"
        self.gguf.close()
        entry = manifest.refit(self.metadata, final) if final else None
        if entry:  # the same number of bytes, in place: nothing after it moves
            old, new = self.metadata[manifest.KEY].encode("utf-8"), entry[manifest.KEY].encode("utf-8")
            with self.path.open("r+b") as f:
                head = f.read(min(self.path.stat().st_size, 1 << 20))
                if head.count(old) == 1:
                    f.seek(head.index(old))
                    f.write(new)
        return [self.path]

    def abort(self) -> None:
        if self.gguf is not None:
            self.gguf.close()

    @property
    def total_bytes(self) -> int:
        return self.written


class FittedWriter(Fitting, GgufWriter):
    """A GGUF file whose Linear weights each take the type (`CANDIDATES`) that makes the total error least with the
    file within `budget` bytes: `fit` measures every tensor in a first streaming pass, then chooses (engine/fit.py)."""

    ladder = LADDER
    made_from = torch.bfloat16  # GGUF is made from the bf16 rounding of the fused sums

    def __init__(self, base: BaseModel, jobs, filename: str, budget: int) -> None:
        GgufWriter.__init__(self, FIT, base, jobs, filename)
        self.base, self.budget = base, budget
        self.choosable = {
            n: [c for k in CANDIDATES if (c := get(k)).fits(self.shapes[n])]  # type: ignore[attr-defined]
            for n in self.shapes
            if self._wanted(n) == FIT.weights
        }
        self.notes.clear()  # a uniform type's F16 fallback: here every candidate that fits is measured
        self.fixed = self.overhead + sum(
            t.nbytes(self.shapes[n]) for n, t in self.types.items() if n not in self.choosable
        )
        if (least := self.least()) > budget:
            message, hint = self._too_small(least)
            raise BadInputError(message, hint)
        self.summary = {}

    def _presets(self) -> dict[str, GgufWriter]:
        """llama.cpp's own types and mixes planned for this model: each one's tensor types and size."""
        return {p.key: GgufWriter(p, self.base, self.jobs, self.filename) for p in PRESETS}

    def uniform(self) -> dict[str, tuple[dict[str, str], int]]:
        return {
            key: ({n: w.types[n].key for n in self.choosable}, w.need_bytes())
            for key, w in self._presets().items()
            if w.preset.weights in CANDIDATES
        }

    def apply(self, mix: dict[str, fit.Choice]) -> None:
        for n, c in mix.items():
            self.types[n] = get(c.key)

    def planned_bytes(self) -> int:
        return GgufWriter.need_bytes(self)

    def _too_small(self, least: int) -> tuple[str, str]:
        sizes = {key: writer.need_bytes() for key, writer in self._presets().items()}
        fitting = [k for k, size in sizes.items() if size <= self.budget]
        message = (
            f"A {units.human_bytes(self.budget)} file cannot hold this model: even {CANDIDATES[-1]} for every weight makes "
            f"{units.human_bytes(least)}."
        )
        if fitting:
            best = max(fitting, key=sizes.__getitem__)
            return (
                message,
                f"{best} makes {units.human_bytes(sizes[best])}: choose it, or a budget of {units.human_bytes(least)} or more.",
            )
        small = min(sizes, key=sizes.__getitem__)
        return (
            message,
            f"The smallest type, {small}, makes {units.human_bytes(sizes[small])}: allow at least {units.human_bytes(least)}.",
        )

    @property
    def file_type(self) -> int:
        import gguf

        most = next(iter(self.summary["types"]), "F16")
        return int(gguf.LlamaFileType[f"MOSTLY_{FILE_TYPES.get(most, most)}"])


class GgufFormat(BflFormat):
    key = "gguf"
    label = "GGUF (ComfyUI-GGUF, Forge, stable-diffusion.cpp, diffusers)"
    extension = ".gguf"
    options: tuple[Option, ...] = PRESETS
    default = "Q8_0"
    where = (
        "ComfyUI: put it in models/unet/ and use the Unet Loader (GGUF) node from ComfyUI-GGUF. "
        "Forge: models/Stable-diffusion/. stable-diffusion.cpp: --diffusion-model FILE."
    )

    fitted: tuple[Option, ...] = (FIT,)

    def main_writer(self, precision: str, base: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        if precision == FIT.key:
            return FittedWriter(base, plan.jobs, settings.filename, settings.fit_bytes)
        preset = self.option(precision)
        assert isinstance(preset, Preset)
        return GgufWriter(preset, base, plan.jobs, settings.filename)

    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        cls = family.class_name
        pipe_cls, repo = PIPELINES[family.key]
        repo = pipeline or repo
        return pipeline_lines(
            self.option(precision),
            family,
            f"from diffusers import {cls}, {pipe_cls}, GGUFQuantizationConfig",
            f'transformer = {cls}.from_single_file(\n    r"{path}", config=r"{repo}", subfolder="transformer",\n'
            "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16,\n)",
            pipeline,
        )

    def load_transformer(self, path: Path, config: Path):
        from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

        return FluxTransformer2DModel.from_single_file(
            str(path),
            config=str(config),
            dtype=torch.bfloat16,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        )
