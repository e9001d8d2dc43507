"""Tensor encodings: how one weight is stored at a precision, and read back. Nothing here knows of formats.

Each precision is one class, registered once by its key, with its size, its encoder and its decoder side by side
(as gguf-py's `quants.py` does for ggml's types):
- `encode(key, weight)`: a float tensor (CPU or GPU) -> {name: tensor to store}, on the CPU;
- `rows(key, stored)`: rows [start, stop) of what was stored, back in float32, a new tensor each call (the
  LoRA-retention score compares them chunk by chunk);
- `nbytes(shape)`, `names(key)`: what `encode` will write, before it runs (the disk check, the reserved headers).
`from_fp32` says whether it is made from the fused float32 sum itself (fp8, rounded once) or from its bfloat16
rounding (everything else: the same bytes as quantizing a bf16 checkpoint of the fused model afterwards); `runtime`,
how diffusers computes with it (bf16, fp8 by layerwise casting, or bitsandbytes' NF4).
"""

from __future__ import annotations

from fluxstudio.quant import ggml, ggml_lowbit, nf4, plain  # noqa: F401 - each registers its precisions
from fluxstudio.quant.base import PRECISIONS, Precision, Rows, register

__all__ = ["PRECISIONS", "Precision", "Rows", "get", "register"]


def get(key: str) -> Precision:
    return PRECISIONS[key]
