"""The `Precision` every encoding subclasses, and the registry they add themselves to."""

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

    bytes_per_param: float

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.ceil(math.prod(shape) * self.bytes_per_param)

    def names(self, key: str) -> list[str]:
        return [key]

    @abstractmethod
    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def encode_rows(self, key: str, rows: torch.Tensor, whole: torch.Tensor) -> dict[str, torch.Tensor]:
        """Some rows of `whole` stored as they are within it (what a fitted file's measure samples): each row on its
        own here; a precision with a scale for the whole tensor overrides this."""
        return self.encode(key, rows)

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        """Rows [start, stop) of what `encode` stored, in float32, a new tensor each call (`shape`: the weight's own,
        where the stored form is padded)."""
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
    """Add a precision to the registry (each module registers its own, once, when it is imported)."""
    PRECISIONS[precision.key] = precision
    return precision
