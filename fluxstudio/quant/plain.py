"""bf16, and fp8 (float8_e4m3fn, clamped to ±448) bare or with a float32 scale per tensor (weight = fp8 × scale)."""

from __future__ import annotations

import torch

from fluxstudio.quant.base import Precision, Rows, register

FP8_MAX = 448.0


class Bf16(Precision):
    key = "bf16"
    note = "bf16 weights: full quality, the most VRAM."
    bytes_per_param = 2

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: weight.to(torch.bfloat16).cpu()}


class Fp8(Precision):
    key = "fp8"
    note = "Linear weights as float8_e4m3fn: half the VRAM of bf16."
    bytes_per_param = 1
    from_fp32 = True
    runtime = "fp8"

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: fp8_encode(weight)}


class ScaledFp8(Precision):
    """The older scaled-fp8 spelling (Forge, ComfyUI's `convert_old_quants`): `L.scale_weight` beside `L.weight`."""

    key = "fp8-scaled"
    note = (
        "Linear weights as float8_e4m3fn with a float32 scale per tensor (weight = fp8 × scale): less error than a "
        "plain fp8 cast. For Forge and ComfyUI before 2026, which multiply it in bf16; for today's ComfyUI pick "
        "ComfyUI native fp8, which it multiplies in fp8."
    )
    bytes_per_param = 1
    from_fp32 = True
    runtime = "fp8"

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return super().nbytes(shape) + 4

    @staticmethod
    def scale_key(key: str) -> str:
        return key[: -len("weight")] + "scale_weight"

    def names(self, key: str) -> list[str]:
        return [key, self.scale_key(key)]

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        lo, hi = (v.float() for v in torch.aminmax(weight))  # no |t| temporary: linear1 alone is a quarter GB in fp32
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        return {key: fp8_encode(weight, scale), self.scale_key(key): scale.reshape(()).cpu()}

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        t, scale = stored[key], stored[self.scale_key(key)]
        return lambda start, stop: t[start:stop].float() * scale

    def file_markers(self) -> dict[str, torch.Tensor]:
        # ComfyUI recognises scaled fp8 by this marker; two elements ask it to compute the matmul in full precision
        # (comfy/utils.py::convert_old_quants). The file carries no input scales, and ComfyUI's older fp8 matmul (as
        # Forge's) casts an unscaled input clamped to ±448: tests/test_comfy_native.py shows what that costs.
        return {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}


def fp8_encode(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """weight (/ scale) clamped to ±448 as float8_e4m3fn, on the CPU; a chunk of rows at a time, so that no full-size
    float32 temporary sits beside the fused weight (a single file's linear1 alone is a quarter GB in float32)."""
    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    rows, dst = weight.reshape(-1, weight.shape[-1]), out.view(-1, weight.shape[-1])
    step = max(1, (1 << 20) // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        chunk = rows[i : i + step].to(torch.float32, copy=True)  # never the caller's tensor: it is scored after
        dst[i : i + step] = (chunk if scale is None else chunk.div_(scale)).clamp_(-FP8_MAX, FP8_MAX)
    return out.cpu()


BF16, FP8, SCALED_FP8 = register(Bf16()), register(Fp8()), register(ScaledFp8())
