"""ComfyUI's own quantized weights (`comfy_quant`), made by comfy-kitchen, ComfyUI's kernel library.

Each weight is quantized by comfy-kitchen's layout classes (its eager backend on the CPU, CUDA on a GPU) and
serialized as ComfyUI serializes them (`QuantizedTensor.state_dict`), so that the bytes are ComfyUI's by
construction; beside it goes `L.comfy_quant`, the layer's JSON config as ComfyUI's `_quantized_weight_state_dict`
writes it (`json.dumps`, uint8). Read in ComfyUI's `comfy/quant_ops.py` (`QUANT_ALGOS`) and `comfy/ops.py`
(`_load_quantized_module`):

- fp8: F8_E4M3 `weight`, F32 `weight_scale` = amax / 448, no input scale: ComfyUI's Linear then quantizes each
  input with its own amax / 448 (comfy-kitchen's `TensorCoreFP8Layout.quantize` with no scale) and multiplies in fp8
  by `torch._scaled_mm` on compute capability 8.9+ (RTX 40/50, H100); older cards dequantize to bf16;
- nvfp4: U8 `weight` (two E2M1 values a byte, padded to 16 × 16), F8_E4M3 `weight_scale` (one per 16 values, in
  cuBLAS's swizzled tiles of 128 rows), F32 `weight_scale_2` = amax / (448 · 6);
- mxfp8: F8_E4M3 `weight` (padded to 32 × 32), E8M0 `weight_scale` (one per 32 values, swizzled; stored as U8);
- int8: I8 `weight`, F32 `weight_scale` per row [out, 1] (`int8_tensorwise`); the ConvRot variant first rotates
  each group of 256 inputs by a normalised Hadamard block (`"convrot": true, "convrot_groupsize": 256`).

A weight is quantized a chunk of rows at a time with the whole tensor's scale, so that memory stays near one copy of
it; the chunks are multiples of the 128-row tiles the block scales are swizzled in, and `tests/test_comfy_native.py`
checks that the result is bit for bit comfy-kitchen's quantization of the whole tensor.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar, Literal

import torch

from fluxstudio.quant.base import Precision, Rows

CHUNK_ROWS = 1024  # a multiple of 128 (the swizzle's tiles)


def _ck():
    import comfy_kitchen  # noqa: F401 - registers its backends
    from comfy_kitchen import tensor

    return tensor


def _roundup(n: int, m: int) -> int:
    return -(-n // m) * m


def marker(config: dict) -> torch.Tensor:
    """A layer's `comfy_quant` tensor: the UTF-8 bytes of its JSON config, as ComfyUI writes it."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def _amax(weight: torch.Tensor) -> torch.Tensor:
    lo, hi = (v.float() for v in torch.aminmax(weight))  # no |w| temporary: linear1 alone is a quarter GB
    return torch.maximum(-lo, hi)


class ComfyPrecision(Precision):
    """One of ComfyUI's formats: a comfy-kitchen layout, the suffixes it stores, and the layer's config."""

    layout: str
    config: ClassVar[dict]  # the layer's `comfy_quant` JSON
    suffixes: tuple[str, ...]  # beside `weight`, in comfy-kitchen's state_dict order
    block_rows = 1  # rows that share their scales' tiles: chunks are multiples of it
    from_fp32 = True  # quantized from the fused float32 sums, rounded once
    runtime: Literal["own-file"] = (
        "own-file"  # the preview's unfused base: the base alone in this format, as people download it
    )

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape can be stored this way."""
        return True

    def marker_key(self, key: str) -> str:
        return key[: -len("weight")] + "comfy_quant"

    def names(self, key: str) -> list[str]:
        return [key] + [key + s for s in self.suffixes] + [self.marker_key(key)]

    def quantize(self, chunk: torch.Tensor, scale: torch.Tensor | None):
        """(qdata, params) of comfy-kitchen's layout for a chunk of rows, with the whole tensor's scale."""
        raise NotImplementedError

    def global_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        return None

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._encode(key, weight, self.global_scale(weight))

    def encode_rows(self, key: str, rows: torch.Tensor, whole: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._encode(key, rows, self.global_scale(whole))

    def _encode(self, key: str, weight: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        tensor = _ck()
        step = _roundup(CHUNK_ROWS, self.block_rows)
        # in float32 (a bf16 weight the LoRA left alone too): comfy-kitchen scales in its input's dtype
        parts = [self.quantize(weight[i : i + step].float(), scale) for i in range(0, weight.shape[0], step)]
        params = self.join([p for _, p in parts], tuple(weight.shape))
        qdata = torch.cat([q for q, _ in parts])
        out = tensor.QuantizedTensor(qdata, self.layout, params).state_dict(key)
        out = {
            k: (v.view(torch.uint8) if v.dtype == getattr(torch, "float8_e8m0fnu", None) else v).cpu()
            for k, v in out.items()
        }
        return out | {self.marker_key(key): marker(self.config)}

    def join(self, params: list, shape: tuple[int, ...]):
        """The layout's parameters of the whole tensor from its chunks'."""
        raise NotImplementedError

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        """Rows of the stored weight dequantized by comfy-kitchen, a tile of rows at a time (kept for the next call),
        without the padding (`shape`: the weight's own)."""
        last: dict[str, object] = {}
        step = _roundup(CHUNK_ROWS, self.block_rows)
        cols = shape[1] if shape else None

        def rows(start: int, stop: int) -> torch.Tensor:
            parts = []
            for tile in range(start // step * step, stop, step):
                if last.get("tile") != tile:
                    last["tile"], last["values"] = tile, self.dequantize_rows(key, stored, tile, tile + step)
                values = last["values"]
                assert isinstance(values, torch.Tensor)
                parts.append(values[max(start - tile, 0) : min(stop, tile + step) - tile, :cols])
            return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

        return rows

    def dequantize_rows(self, key: str, stored: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class ComfyFp8(ComfyPrecision):
    key = "fp8"
    note = (
        "Linear weights as float8_e4m3fn with a float32 scale per tensor, in ComfyUI's own comfy_quant layout: "
        "ComfyUI (2026 and newer) multiplies them in fp8 on RTX 40/50 and H100-class cards, scaling each layer's "
        "input from its own largest value. Forge and older ComfyUI: pick the scaled-fp8 single file."
    )
    bytes_per_param = 1
    layout = "TensorCoreFP8Layout"
    config: ClassVar[dict] = {"format": "float8_e4m3fn"}
    suffixes = ("_scale",)

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + 4 + len(json.dumps(self.config))

    def global_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return _amax(weight) / torch.finfo(torch.float8_e4m3fn).max

    def quantize(self, chunk, scale):
        return _ck().TensorCoreFP8Layout.quantize(chunk, scale=scale)

    def join(self, params: list, shape: tuple[int, ...]):
        return type(params[0])(scale=params[0].scale, orig_dtype=params[0].orig_dtype, orig_shape=shape)

    def dequantize_rows(self, key, stored, start, stop):
        import comfy_kitchen as ck

        return ck.dequantize_per_tensor_fp8(stored[key][start:stop], stored[key + "_scale"], torch.float32)


class Nvfp4(ComfyPrecision):
    key = "nvfp4"
    note = (
        "NVFP4 (4-bit E2M1, an fp8 scale per 16 values): about a quarter of bf16, and RTX 50 cards multiply it "
        "natively in ComfyUI (with a PyTorch built for CUDA 13)."
    )
    bytes_per_param = 0.5 + 1 / 16
    layout = "TensorCoreNVFP4Layout"
    config: ClassVar[dict] = {"format": "nvfp4"}
    suffixes = ("_scale", "_scale_2")
    block_rows = 128

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows, cols = _roundup(shape[0], 16), _roundup(shape[1], 16)
        return rows * cols // 2 + _roundup(rows, 128) * _roundup(cols // 16, 4) + 4 + len(json.dumps(self.config))

    def global_scale(self, weight: torch.Tensor) -> torch.Tensor:
        from comfy_kitchen.float_utils import F4_E2M1_MAX, F8_E4M3_MAX

        return _amax(weight) / (F8_E4M3_MAX * F4_E2M1_MAX)

    def quantize(self, chunk, scale):
        return _ck().TensorCoreNVFP4Layout.quantize(chunk, scale=scale)

    def join(self, params: list, shape: tuple[int, ...]):
        first = params[0]
        return type(first)(
            scale=first.scale,
            orig_dtype=first.orig_dtype,
            orig_shape=shape,
            block_scale=torch.cat([p.block_scale for p in params]),
        )

    def dequantize_rows(self, key, stored, start, stop):
        import comfy_kitchen as ck

        q, blocks = (
            stored[key][start:stop],
            stored[key + "_scale"][start : start + _roundup(min(stop, stored[key].shape[0]) - start, 128)],
        )
        values = ck.dequantize_nvfp4(q, stored[key + "_scale_2"], blocks, torch.float32)
        return values[: q.shape[0]]


class Mxfp8(ComfyPrecision):
    key = "mxfp8"
    note = "MXFP8 (fp8 values with a power-of-two scale per 32): fp8's size with finer scales; RTX 50 and B200 multiply it."
    bytes_per_param = 1 + 1 / 32
    layout = "TensorCoreMXFP8Layout"
    config: ClassVar[dict] = {"format": "mxfp8"}
    suffixes = ("_scale",)
    block_rows = 128

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows, cols = _roundup(shape[0], 32), _roundup(shape[1], 32)
        return rows * cols + _roundup(rows, 128) * _roundup(cols // 32, 4) + len(json.dumps(self.config))

    def quantize(self, chunk, scale):
        return _ck().TensorCoreMXFP8Layout.quantize(chunk)

    def join(self, params: list, shape: tuple[int, ...]):
        first = params[0]
        return type(first)(scale=torch.cat([p.scale for p in params]), orig_dtype=first.orig_dtype, orig_shape=shape)

    def dequantize_rows(self, key, stored, start, stop):
        import comfy_kitchen as ck

        q = stored[key][start:stop]
        blocks = stored[key + "_scale"][start : start + _roundup(q.shape[0], 128)].view(torch.float8_e8m0fnu)
        return ck.dequantize_mxfp8(q, blocks, torch.float32)[: q.shape[0]]


class Int8(ComfyPrecision):
    key = "int8"
    note = (
        "INT8 weights with a float32 scale per row (ComfyUI's int8_tensorwise): fp8's size, and RTX 30 / A100 "
        "cards multiply it natively in ComfyUI."
    )
    bytes_per_param = 1
    layout = "TensorWiseINT8Layout"
    config: ClassVar[dict] = {"format": "int8_tensorwise"}
    suffixes = ("_scale",)
    convrot = False
    GROUP = 256

    def fits(self, shape: tuple[int, ...]) -> bool:
        return not self.convrot or shape[1] % self.GROUP == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape) + 4 * shape[0] + len(json.dumps(self.config))

    def quantize(self, chunk, scale):
        return _ck().TensorWiseINT8Layout.quantize(
            chunk, per_channel=True, convrot=self.convrot, convrot_groupsize=self.GROUP
        )

    def join(self, params: list, shape: tuple[int, ...]):
        first = params[0]
        return type(first)(
            scale=torch.cat([p.scale for p in params]),
            orig_dtype=first.orig_dtype,
            orig_shape=shape,
            convrot=first.convrot,
            convrot_groupsize=first.convrot_groupsize,
        )

    def dequantize_rows(self, key, stored, start, stop):
        tensor = _ck()
        q, scale = stored[key][start:stop], stored[key + "_scale"][start:stop]
        params = tensor.TensorWiseINT8Layout.Params(
            scale=scale,
            orig_dtype=torch.float32,
            orig_shape=tuple(q.shape),
            convrot=self.convrot,
            convrot_groupsize=self.GROUP,
        )
        return tensor.TensorWiseINT8Layout.dequantize(q, params)


class Int8ConvRot(Int8):
    key = "int8-convrot"
    note = (
        "INT8 per row after a Hadamard rotation of each 256 inputs (ComfyUI's ConvRot): less error than plain INT8 "
        "at the same size, for RTX 30 / A100 cards."
    )
    config: ClassVar[dict] = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    convrot = True


# Not in quant's registry: "fp8" there is the plain cast; the ComfyUI format offers these objects itself.
FP8, NVFP4, MXFP8, INT8, INT8_CONVROT = ComfyFp8(), Nvfp4(), Mxfp8(), Int8(), Int8ConvRot()
