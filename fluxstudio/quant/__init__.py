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

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Literal
import torch

Rows = Callable[[int, int], torch.Tensor]


class Precision(ABC):
    key: str
    note: str = ""
    from_fp32: bool = False
    runtime: Literal["bf16", "fp8", "nf4", "own-file"] = "bf16"
    double_quant: bool | None = None  # NF4's option (None where it does not apply)

    @property
    @abstractmethod
    def bytes_per_param(self) -> float: ...

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.ceil(math.prod(shape) * self.bytes_per_param)

    def names(self, key: str) -> list[str]:
        return [key]

    @abstractmethod
    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def rows(self, key: str, stored: dict[str, torch.Tensor]) -> Rows:
        t = stored[key]
        return lambda start, stop: t[start:stop].to(torch.float32, copy=True)

    def config(self) -> dict | None:
        """The `quantization_config` a loader needs to read these weights (None: plain tensors)."""
        return None

    def file_markers(self) -> dict[str, torch.Tensor]:
        """Tensors a one-file output carries once to say that its weights are stored this way."""
        return {}


PRECISIONS: dict[str, Precision] = {}


def register(precision: Precision) -> Precision:
    PRECISIONS[precision.key] = precision
    return precision


def get(key: str) -> Precision:
    if not PRECISIONS:
        from fluxstudio.quant import ggml, nf4, plain  # noqa: F401 - each registers its precisions

    return PRECISIONS[key]
