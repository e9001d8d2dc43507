"""The writers behind each format: they order the engine's tensors, encode each fused tensor, and write the files.

Every output follows one protocol, so the engine does not know which one it feeds:
- `jobs`: the plan's tensors in the order this output needs them (BFL groups kept together);
- `need_bytes()`: the size estimate the disk check and the app both use;
- `open(folder, metadata)`, `encode(name, fused) -> {key: tensor}`, `write(key, tensor)`, `close(final) -> files`
  (one-file outputs put the final manifest where the first one was), `abort()`;
- `retention`: the LoRA-retention score, fed by `encode` with what it stored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from fluxstudio.engine import manifest
from fluxstudio.formats import Format
from fluxstudio.formats.bfl import Assembler, layout, swap_halves
from fluxstudio.engine.fuse import TensorJob
from fluxstudio.quant import ggml
from fluxstudio.quant.legacy import FP8_MAX, encoded_bytes, fp8_encode, make_quantizer, nf4_encode, nf4_rows
from fluxstudio.engine.retention import Retention
from fluxstudio.engine.shards import ShardedWriter, header_bound

# The small input/output layers keep a high precision in every one-file format (city96's rule for GGUF).
KEEP_HIGH = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
SINGLE_PREFIX = ""  # bare BFL names, as BFL's own files: ComfyUI, Forge and diffusers (FLUX.2 too) read them


class _Safetensors:
    """Writing through a ShardedWriter (the diffusers folder and the single file)."""

    writer: ShardedWriter | None = None

    def write(self, key: str, value: torch.Tensor) -> None:
        self.writer.add(key, value)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    @property
    def total_bytes(self) -> int:
        return self.writer.total_bytes if self.writer else 0


class DiffusersOutput(_Safetensors):
    """A diffusers folder: sharded safetensors, config.json (+ quantization_config)."""

    def __init__(self, precision: str, base, jobs: list[TensorJob], config_updates: dict, shard_bytes: int,
                 double_quant: bool = False, score: bool = True) -> None:
        self.quantizer = make_quantizer(precision, base.linear_modules, base.family.model_class(), double_quant)
        self.jobs = jobs
        self.base, self.config_updates, self.shard_bytes = base, config_updates, shard_bytes
        self.prefix = "diffusion_pytorch_model" if base.family.library == "diffusers" else "model"
        self.notes: list[str] = []
        self.retention = Retention.of(jobs if score else [])  # a text encoder's writer does not score (nothing reads it)

    def need_bytes(self) -> int:
        return sum(self.quantizer.estimate_bytes(j.name, math.prod(j.out_shape)) for j in self.jobs)

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        self.folder = folder
        keys = [k for j in self.jobs for k in self.quantizer.keys(j.name)]
        self.writer = ShardedWriter(folder, self.shard_bytes, header_bound(keys), prefix=self.prefix)

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.quantizer.encode(name, fused)
        if name in self.retention.jobs:
            with self.retention.timed():
                self.retention.add(name, fused, self.quantizer.stored_rows(name, out))
        return out

    def close(self, final: dict | None = None) -> list[Path]:
        files = self.writer.close()
        config = dict(self.base.config) | self.config_updates
        if qconfig := self.quantizer.config_block():
            config["quantization_config"] = qconfig | (
                {"llm_int8_skip_modules": sorted(self.quantizer.kept_modules)} if self.base.family.library == "transformers" else {})
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return files + [self.folder / "config.json"]


class _BflOutput:
    """What the one-file formats share: BFL names, groups streamed together, the output file's name."""

    def __init__(self, fmt: Format, precision: str, base, jobs: list[TensorJob], filename: str) -> None:
        self.precision, self.filename = precision, filename
        groups = layout(base.family.key, [j.name for j in jobs])
        self.groups = {g.name: g for g in groups}
        by_name = {j.name: j for j in jobs}
        self.jobs = [by_name[p] for g in groups for p in g.parts]
        self.shapes = {
            g.name: (sum(by_name[p].out_shape[0] for p in g.parts), *by_name[g.parts[0]].out_shape[1:]) for g in groups
        }
        self.rows = {p: [by_name[q].out_shape[0] for q in g.parts] for g in groups for p in g.parts}
        # fp8 is made from the fp32 sums (rounded once); everything else from their bf16 rounding
        self.assembler = Assembler(groups, torch.float32 if precision.startswith("fp8") else torch.bfloat16)
        self.notes: list[str] = []
        self.retention = Retention.of(jobs)

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        done = self.assembler.add(name, fused, self.rows[name])
        if done is None:
            return {}
        out = self.encode_bfl(*done)
        group, t = self.groups[done[0]], done[1]
        if any(p in self.retention.jobs for p in group.parts):  # the score, per diffusers tensor of the group
            with self.retention.timed():
                self._score(group, t, out)
        return out

    def _score(self, group, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        rows_of = self.stored_rows(group.name, out)
        if group.swapped:  # the final modulation (small): decoded whole and swapped back
            stored, t = swap_halves(rows_of(0, t.shape[0])), swap_halves(t)

            def rows_of(a: int, b: int) -> torch.Tensor:
                return stored[a:b]
        start = 0
        for part, rows in zip(group.parts, self.rows[group.parts[0]]):
            self.retention.add(part, t[start : start + rows], lambda a, b, at=start: rows_of(at + a, at + b))
            start += rows

    def quantized(self, name: str) -> bool:
        return name.endswith(".weight") and len(self.shapes[name]) == 2 and not name.startswith(KEEP_HIGH)


class SingleFileOutput(_BflOutput, _Safetensors):
    """One BFL-keyed .safetensors: bf16, fp8, scaled fp8 or Forge's NF4 layout."""

    def need_bytes(self) -> int:
        return sum(encoded_bytes(self.precision if self.quantized(n) else "bf16", math.prod(s)) for n, s in self.shapes.items())

    def keys(self) -> list[str]:
        out = []
        for name in self.shapes:
            key = SINGLE_PREFIX + name
            out.append(key)
            if self.quantized(name) and self.precision == "fp8-scaled":
                out.append(key[: -len("weight")] + "scale_weight")
            if self.quantized(name) and self.precision == "nf4":
                out += [f"{key}.absmax", f"{key}.quant_map", f"{key}.quant_state.bitsandbytes__nf4"]
        return out + ([SINGLE_PREFIX + "scaled_fp8"] if self.precision == "fp8-scaled" else [])

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        self.writer = ShardedWriter(folder, 0, header_bound(self.keys()), metadata, single_name=self.filename)
        if self.precision == "fp8-scaled":
            # ComfyUI and Forge recognise scaled fp8 by this marker; two elements ask ComfyUI to compute the matmul
            # in full precision, since the file carries no input scales (comfy/utils.py::convert_old_quants).
            self.writer.add(SINGLE_PREFIX + "scaled_fp8", torch.zeros(2, dtype=torch.float8_e4m3fn))

    def encode_bfl(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        key = SINGLE_PREFIX + name
        if not self.quantized(name) or self.precision == "bf16":
            return {key: t.to(torch.bfloat16).cpu()}
        if self.precision == "nf4":
            return nf4_encode(key, t.to(torch.bfloat16))
        if self.precision == "fp8":
            return {key: fp8_encode(t)}
        lo, hi = (v.float() for v in torch.aminmax(t))  # no |t| temporary: linear1 alone is a quarter GB in fp32
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return {key: fp8_encode(t, scale), key[: -len("weight")] + "scale_weight": scale.reshape(()).cpu()}

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]):
        """Rows [start, stop) of what `encode_bfl` stored, in fp32, each call a new tensor (the retention score's)."""
        key = SINGLE_PREFIX + name
        if self.quantized(name) and self.precision == "nf4":
            return nf4_rows(key, out)
        t, scale = out[key], out.get(key[: -len("weight")] + "scale_weight")
        return lambda start, stop: t[start:stop].float() * (scale if scale is not None else 1.0)

    def close(self, final: dict | None = None) -> list[Path]:
        if final and (entry := manifest.refit(self.writer.metadata, final, escaped=True)):
            self.writer.metadata.update(entry)
        return self.writer.close()


class EncoderFile(_Safetensors):
    """A fused text encoder as one file for ComfyUI and Forge, beside the transformer: CLIP-L in bf16 with the
    `text_model.` keys ComfyUI's CLIP loaders read, T5-XXL with fp8 Linear weights (the t5xxl_fp8_e4m3fn layout)."""

    def __init__(self, base, jobs: list[TensorJob], filename: str) -> None:
        self.base, self.filename = base, filename
        self.jobs = [j for j in jobs if not j.name.endswith("position_ids")]  # a buffer older files carry
        precision = "fp8" if base.family.key == "t5" else "bf16"
        self.quantizer = make_quantizer(precision, base.linear_modules, base.family.model_class())
        self.notes: list[str] = []

    def key(self, name: str) -> str:
        return "text_model." + self.base.canonical(name) if self.base.family.key == "clip_l" else name

    def need_bytes(self) -> int:
        return sum(self.quantizer.estimate_bytes(j.name, math.prod(j.out_shape)) for j in self.jobs)

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        self.writer = ShardedWriter(folder, 0, header_bound([self.key(j.name) for j in self.jobs]), single_name=self.filename)

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.quantizer.encode(name, fused)
        return {self.key(name): out[name]}

    def close(self, final: dict | None = None) -> list[Path]:
        return self.writer.close()


# GGUF precision -> (type of the weights it quantizes, GGUF file type)
GGUF_TYPES = {"F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_S": "Q5_K", "Q5_0": "Q5_0",
              "Q4_K_S": "Q4_K", "Q4_0": "Q4_0"}
FILE_TYPES = {"F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K_S": 16, "Q5_0": 8, "Q4_K_S": 14, "Q4_0": 2}


class GgufOutput(_BflOutput):
    """One .gguf with BFL names and city96's conventions; the header is written first, from the plan."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.types = {name: self.tensor_type(name) for name in self.shapes}
        fallback = [n for n, t in self.types.items() if t == "F16" and self._wanted(n) not in ("F16", "F32")]
        if fallback:
            block = ggml.TYPES[GGUF_TYPES[self.precision]].block
            self.notes.append(f"{len(fallback)} tensors have rows that are not a multiple of {block} "
                              f"({', '.join(fallback[:3])}{' …' if len(fallback) > 3 else ''}): stored as F16 instead")

    def _wanted(self, name: str) -> str:
        if len(self.shapes[name]) < 2 or math.prod(self.shapes[name]) <= 1024 or name.startswith(KEEP_F32):
            return "F32"
        return "F16" if name.startswith(KEEP_HIGH) else GGUF_TYPES[self.precision]

    def tensor_type(self, name: str) -> str:
        want = self._wanted(name)
        if want in ggml.TYPES and self.shapes[name][-1] % ggml.TYPES[want].block:
            return "F16"  # city96's patch falls back to F16 where rows do not fit the blocks
        return want

    def nbytes(self, name: str) -> int:
        shape, t = self.shapes[name], self.types[name]
        if t in ggml.TYPES:
            return math.prod(shape[:-1]) * ggml.TYPES[t].row_bytes(shape[-1])
        return math.prod(shape) * (4 if t == "F32" else 2)

    def need_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.shapes) + 32 * len(self.shapes) + (1 << 20)

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        import gguf

        self.path = folder / self.filename
        self.w = gguf.GGUFWriter(self.path, "flux")
        self.w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        self.w.add_file_type(FILE_TYPES[self.precision])
        self.metadata = metadata
        for key, value in metadata.items():
            self.w.add_string(key, value)
        for name, shape in self.shapes.items():
            t = self.types[name]
            raw = None if t in ("F32", "F16") else gguf.GGMLQuantizationType[t]
            self.w.add_tensor_info(name, shape, np.float16 if t == "F16" else np.float32, self.nbytes(name), raw_dtype=raw)
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_ti_data_to_file()
        self.written = 0

    def encode_bfl(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        # GGUF is made from the bf16 rounding of the fused tensor: the same file as converting the bf16 single file
        x = t.to(torch.bfloat16)
        kind = self.types[name]
        if kind == "F32":
            return {name: x.float().cpu()}
        if kind == "F16":
            return {name: x.to(torch.float16).cpu()}
        if kind == "BF16":
            return {name: x.cpu().view(torch.int16)}
        return {name: ggml.quantize(x, kind)}

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]):
        """Rows [start, stop) of what `encode_bfl` stored, in fp32, each call a new tensor (the retention score's)."""
        kind, data, shape = self.types[name], out[name], self.shapes[name]
        if kind in ggml.TYPES:  # 2-D: one row of blocks per weight row
            return lambda start, stop: ggml.dequantize(data[start:stop], kind, (stop - start, *shape[1:]))
        data = data.view(torch.bfloat16) if kind == "BF16" else data
        return lambda start, stop: data[start:stop].to(torch.float32, copy=True)

    def write(self, key: str, value: torch.Tensor) -> None:
        expected = next(iter(self.w.tensors[0]), None)
        if key != expected:  # the header was written from the plan: data must come in the same order
            raise RuntimeError(f"GGUF tensor {key} written where {expected} was planned")
        self.w.write_tensor_data(value.contiguous().numpy())
        self.written += value.numel() * value.element_size()

    def close(self, final: dict | None = None) -> list[Path]:
        self.w.close()
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
        if getattr(self, "w", None) is not None:
            self.w.close()

    @property
    def total_bytes(self) -> int:
        return getattr(self, "written", 0)


def make_output(fmt: Format, precision: str, base, jobs: list[TensorJob], config_updates: dict, filename: str,
                shard_bytes: int, double_quant: bool = False):
    if not fmt.extension:  # diffusers, and the pipeline's transformer/ folder
        return DiffusersOutput(precision, base, jobs, config_updates, shard_bytes, double_quant)
    cls = SingleFileOutput if fmt.key == "single-file" else GgufOutput
    return cls(fmt, precision, base, jobs, filename)
