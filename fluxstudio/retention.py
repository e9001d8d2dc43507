"""How much of the LoRAs' effect survives the output's quantization, measured on every fused tensor as it streams.

For a fused tensor W' = W + ΔW stored as Q(W'), the retained part of the LoRA is
    <deq(Q(W')) − W, ΔW> / |ΔW|²  =  1 + <e, ΔW> / |ΔW|²,   e = deq(Q(W')) − W'
and a build's score is the |ΔW|²-weighted mean over its tensors. ΔW is never materialized: with ΔW = Σ s·U·D (the
LoRA factors the fuse already holds), <e, ΔW> = Σ s·sum((Uᵀe) ⊙ D) and |ΔW|² = Σ s·s'·sum((UᵀU') ⊙ (D D'ᵀ)), a
rank-r product per tensor. 1.0 means the LoRA is there in full; a base that was quantized before (its weights
already on the grid) scores near 0, because rounding snaps the small ΔW back to where it was.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fluxstudio.fuse import TensorJob

WARN_BELOW = 0.9
WORST = 5


@dataclass
class Retention:
    jobs: dict[str, TensorJob]  # the tensors a LoRA changes
    num: dict[str, float] = field(default_factory=dict)
    den: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # spent measuring (decoding what was stored included): what the score costs a build

    @classmethod
    def of(cls, jobs: list[TensorJob]) -> Retention:
        return cls({j.name: j for j in jobs if (j.deltas or j.bias_deltas) and j.replacement is None})

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def add(self, name: str, fused: torch.Tensor, stored: torch.Tensor) -> None:
        """One tensor: its fused value (as the writer had it) and what the output stores, dequantized into a tensor
        of the caller's own (it is overwritten with the error: a new tensor the size of a weight costs more)."""
        job = self.jobs.get(name)
        if job is None:
            return
        e = stored.to(device=fused.device, dtype=torch.float32).sub_(fused)
        if job.bias_deltas or fused.dim() != 2:  # small tensors: ΔW itself
            dw = sum(b.to(fused.device, torch.float32) * w for b, w in job.bias_deltas)
            cross, den = float((e * dw).sum()), float((dw * dw).sum())
        else:
            ups = [d.up.to(fused.device, torch.float32) * d.weight for d in job.deltas]
            downs = [torch.nn.functional.pad(d.down.to(fused.device, torch.float32), (0, fused.shape[1] - d.down.shape[1]))
                     for d in job.deltas]
            cross = float(sum(((u.T @ e) * d).sum() for u, d in zip(ups, downs)))
            den = float(sum(((u.T @ u2) * (d @ d2.T)).sum() for u, d in zip(ups, downs) for u2, d2 in zip(ups, downs)))
        if den > 0:
            self.num[name], self.den[name] = den + cross, den

    @property
    def score(self) -> float | None:
        total = sum(self.den.values())
        return round(sum(self.num.values()) / total, 4) if total else None

    def worst(self, n: int = WORST) -> list[dict]:
        """The modules that kept least of their LoRA change (among those carrying at least 0.1% of it)."""
        total = sum(self.den.values())
        ratios = sorted((self.num[k] / self.den[k], k) for k in self.den if self.den[k] >= total / 1000)
        return [{"module": k.removesuffix(".weight"), "retained": round(r, 4)} for r, k in ratios[:n]]


def warnings(score: float | None, worst: list[dict], precision: str) -> list[str]:
    """One sentence when the output lost a real part of the LoRAs' effect."""
    if score is None or score >= WARN_BELOW:
        return []
    names = ", ".join(w["module"] for w in worst[:3])
    return [f"Warning: only {100 * score:.1f}% of the LoRA effect was kept (least in {names}): "
            f"use a higher precision than {precision}, or a base that was not quantized before."]
