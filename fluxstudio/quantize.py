"""Output precisions: turn one fused fp32 tensor into the tensors to write, plus the config block.

- bf16: plain bfloat16.
- fp8:  Linear weights as float8_e4m3fn (clamped to +-448), everything diffusers' layerwise casting skips kept
        bf16, so `from_pretrained(..., torch_dtype=bf16)` + `enable_layerwise_casting(fp8, bf16)` runs it.
- nf4:  bitsandbytes' serialized Linear4bit layout exactly as diffusers writes it (blocksize 64).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

Precision = Literal["bf16", "fp8", "nf4"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp8", "nf4")
FP8_MAX = 448.0
NF4_BLOCK = 64
CHUNK = 1 << 20  # elements per CPU quantization chunk: bit-identical, faster, bounded temporaries


@dataclass(frozen=True)
class Quantizer:
    precision: str
    quantized_modules: frozenset[str]  # Linear modules whose weight gets the low-precision format
    double_quant: bool = False
    device: str = "cpu"

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.quantized_modules

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 (or any float) tensor -> {key: tensor} to write, all on CPU."""
        if not self.is_quantized(name) or self.precision == "bf16":
            return {name: fused.to(torch.bfloat16).cpu()}
        if self.precision == "fp8":
            return {name: fused.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).cpu()}
        return nf4_encode(name, fused.to(torch.bfloat16), self.double_quant)

    def estimate_bytes(self, name: str, numel: int) -> int:
        if not self.is_quantized(name) or self.precision == "bf16":
            return numel * 2
        if self.precision == "fp8":
            return numel
        return (numel + 1) // 2 + 4 * math.ceil(numel / NF4_BLOCK) + 64 + 256

    def config_block(self) -> dict | None:
        if self.precision != "nf4":
            return None
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }


def layerwise_skip_patterns(model_cls: type) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(getattr(model_cls, "_skip_layerwise_casting_patterns", None) or ())


def make_quantizer(
    precision: str, linear_modules: frozenset[str], model_cls: type, double_quant: bool = False, device: str = "cpu"
) -> Quantizer:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    modules = linear_modules
    if precision == "fp8":
        skip = layerwise_skip_patterns(model_cls)
        modules = frozenset(m for m in linear_modules if not any(re.search(p, m) for p in skip))
    return Quantizer(precision, modules, double_quant, device)


def _bnb():
    """Import bitsandbytes quietly: on CPU it logs a scary line about an optional kernels package."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        import bitsandbytes.functional as F
    finally:
        logger.setLevel(level)
    return F


def nf4_encode(name: str, weight: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 of a bf16 weight, serialized like diffusers' Linear4bit state dict."""
    F = _bnb()
    op = torch.ops.bitsandbytes.quantize_4bit.default
    if weight.is_cuda:
        packed, absmax = op(weight, NF4_BLOCK, "nf4", torch.uint8)
    else:
        flat = weight.reshape(-1)
        parts = [op(flat[i : i + CHUNK], NF4_BLOCK, "nf4", torch.uint8) for i in range(0, flat.numel(), CHUNK)]
        packed = torch.cat([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
        absmax = torch.cat([a for _, a in parts]) if len(parts) > 1 else parts[0][1]
    code = F.get_4bit_type("nf4", device=weight.device)
    if double_quant:  # the same steps as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(
            absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=NF4_BLOCK, code=code,
            quant_type="nf4", offset=offset, state2=state2,
        )
    else:
        state = F.QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=NF4_BLOCK, code=code, quant_type="nf4"
        )
    out = {name: packed.cpu()}
    out.update({f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
    return out
