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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fluxstudio.engine.fuse import TensorJob

WARN_BELOW = 0.9
CHUNK = 1 << 20  # values compared at a time
WORST = 5


def change_size(ups: list[torch.Tensor], downs: list[torch.Tensor]) -> float:
    """|Σ U_i·D_i|² without making the product: Σ_ij sum((U_iᵀU_j) ⊙ (D_i D_jᵀ)) (the scales folded into U)."""
    return float(
        sum(
            ((u.T @ u2) * (d @ d2.T)).sum()
            for u, d in zip(ups, downs, strict=True)
            for u2, d2 in zip(ups, downs, strict=True)
        )
    )


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

    def add(self, name: str, fused: torch.Tensor, stored_rows: Callable[[int, int], torch.Tensor]) -> None:
        """One tensor: its fused value (as the writer had it) and rows [start, stop) of what the output stores, in
        fp32 tensors of the caller's own (each is overwritten with the error). The error is taken a chunk of rows at
        a time, which stays in cache: a third of the time of decoding the whole weight first."""
        job = self.jobs.get(name)
        if job is None:
            return
        device = fused.device
        if job.bias_deltas or fused.dim() != 2:  # small tensors: ΔW itself
            e = stored_rows(0, fused.shape[0]).to(device, torch.float32).sub_(fused)
            dw = sum((b.to(device, torch.float32) * w for b, w in job.bias_deltas), torch.zeros((), device=device))
            cross, den = float((e * dw).sum()), float((dw * dw).sum())
        else:
            ups = [d.up.to(device, torch.float32) * d.weight for d in job.deltas]
            downs = [
                torch.nn.functional.pad(d.down.to(device, torch.float32), (0, fused.shape[1] - d.down.shape[1]))
                for d in job.deltas
            ]
            ue = [torch.zeros(u.shape[1], fused.shape[1], device=device) for u in ups]  # Σ over chunks of Uᵀ·e
            step = max(1, CHUNK // fused.shape[1])
            for start in range(0, fused.shape[0], step):
                stop = min(start + step, fused.shape[0])
                e = stored_rows(start, stop).to(device, torch.float32).sub_(fused[start:stop])
                for acc, u in zip(ue, ups, strict=False):
                    acc.addmm_(u[start:stop].T, e)
            cross = float(sum((acc * d).sum() for acc, d in zip(ue, downs, strict=False)))
            den = change_size(ups, downs)
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


def describe(score: float | None) -> str:
    """The score as the result says it ("" without a LoRA), with what a figure over 100% means: rounding moved the
    stored weights a little further along the LoRA's change than the LoRA itself, so all of its effect is there."""
    if score is None:
        return ""
    text = f"LoRA effect kept: {100 * score:.1f}%"
    if score > 1.0:
        text += " (over 100%: rounding went slightly past the LoRA's change, so all of its effect is there)"
    return text


def warnings(score: float | None, worst: list[dict], precision: str) -> list[str]:
    """One sentence when the output lost a real part of the LoRAs' effect."""
    if score is None or score >= WARN_BELOW:
        return []
    names = ", ".join(w["module"] for w in worst[:3])
    return [
        (
            f"Warning: only {100 * score:.1f}% of the LoRA effect was kept (least in {names}): "
            f"use a higher precision than {precision}, or a base that was not quantized before."
        )
    ]
