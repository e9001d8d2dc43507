"""Fit a size: each tensor's precision chosen from its measured error, to make the total error least under a budget.

The measure, for the quantized weights W_t (the fused ones, as the file is made from them), each stored as Q(W_t)
with the error E_t = Q(W_t) − W_t, is what the model loses plus what the LoRA loses:
    Σ_t |E_t|² / Σ_t |W_t|²   +   Σ_t (n/R)·|E_t·P_t|² / |W_t|² · |ΔW_t|²  /  Σ_t |ΔW_t|²
- The first term is the squared output error the layers add for inputs of unit, uncorrelated components, relative
  to the model's: without sample images the inputs are unknown, and |E|² is what ggml's quantizers minimise, block
  by block, without an imatrix. It is absolute per layer, so a layer with larger weights (a larger output) counts
  more.
- The second is what the LoRA-retention score loses: a LoRA change ΔW_t fused into W_t is kept less as the layer's
  relative error grows (rounding shrinks the weights it cannot hold), so each layer's relative error counts by its
  share of the LoRA's change. The relative error is taken where the LoRA acts: P_t (n × R) is an orthonormal basis
  of the inputs the LoRAs read (the rows of their down matrices), |E·P|² the output error on those inputs, and n/R
  scales those R directions to all n. The two terms are weighed alike: the model's error and the LoRA's count as
  much as each other. (A base quantized before, where rounding erases the LoRA outright, is not what this models:
  the build's retention score says so after the fact.)

One promise on top: the LoRA is kept at least as well as by the next one-type file up from the largest that fits the
size (a file fitted to Q4_K_S's size keeps it as Q5_K_S would). Where the mix that makes the measure least would
keep less, the LoRA term is weighed up just enough (`choose_keeping`), and the model's error is made least under
that condition.

The pre-pass measures every candidate on evenly spaced sample rows, each stored as in the whole tensor (ggml's types
and INT8 quantize each row on its own, MXFP8 each 32 values; fp8's and NVFP4's scale of the whole tensor is taken
from the whole tensor) and scales the sums by the rows' share of |W|² (a ratio
estimate: a row's error follows its size, so rows of unequal scales are estimated as well as equal ones). The
choice is the greedy one over each tensor's lower convex hull of (bytes, error): the cheapest error per byte first,
which is the Lagrangian solution at every budget it passes (multiple-choice knapsack).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluxstudio import units

if TYPE_CHECKING:
    from fluxstudio.quant import Precision

MAX_LORA_WEIGHT = 4.0**8  # how far the LoRA term is weighed up to keep the LoRA as the next type up would
SAMPLE_ROWS = 256  # rows measured per tensor (all of a smaller one): tests/test_fit.py shows the estimate's precision


@dataclass(frozen=True)
class Choice:
    key: str  # the precision
    nbytes: int
    error: float


@dataclass(frozen=True)
class LoraInputs:
    """The rows [start, stop) of a tensor that LoRA factors change, the down matrices they read with, and the size
    of their change there (|ΔW|², `change`)."""

    start: int
    stop: int
    downs: torch.Tensor  # [R, n]: every LoRA's down rows on these rows, stacked
    change: float


@dataclass(frozen=True)
class Measured:
    """One tensor's measure: per candidate (its squared error, its LoRA term: relative error times |ΔW|²); |W|²
    and the LoRAs' |ΔW|² in it."""

    errors: dict[str, tuple[float, float]]
    size: float
    change: float


def sample(rows: int, count: int = SAMPLE_ROWS) -> torch.Tensor:
    """Evenly spaced row indices (every row of a tensor of `count` rows or fewer)."""
    if rows <= count:
        return torch.arange(rows)
    return torch.linspace(0, rows - 1, count).round().long().unique()


def measure(
    name: str,
    weight: torch.Tensor,
    candidates: Iterable[Precision],
    lora: Iterable[LoraInputs] = (),
    made_from: torch.dtype = torch.float32,
    count: int = SAMPLE_ROWS,
) -> Measured:
    """Both terms of the measure (module docstring) of storing `weight` [m, n] at each candidate, estimated from
    sample rows. `made_from`: the dtype the output is made from (the error is taken against it); `count`: the rows."""
    m, n = weight.shape
    idx = sample(m, count)
    x = weight[idx.to(weight.device)].to(made_from).to(torch.float32)
    whole_made = weight.to(made_from)  # (a scale of the whole tensor is taken from it: fp8's, NVFP4's)
    step = max(1, (1 << 20) // n)  # every row's |w|², what the sample is scaled by: a chunk of rows at a time
    norms = torch.cat([weight[i : i + step].to(torch.float32).square().sum(1).cpu() for i in range(0, m, step)])

    def scale(rows: torch.Tensor, start: int, stop: int) -> float:
        """From the sampled rows to rows [start, stop): by their share of |W|² (a row's error follows its size),
        or by their number where the rows are all zero."""
        sampled = float(norms[rows].sum())
        return float(norms[start:stop].sum()) / sampled if sampled > 0 else (stop - start) / max(1, len(rows))

    parts, change = [], 0.0
    for part in lora:
        sel = ((idx >= part.start) & (idx < part.stop)).nonzero().squeeze(1)
        size = float(norms[part.start : part.stop].sum())
        if len(sel) and size > 0:
            basis = torch.linalg.qr(part.downs.to(x.device, torch.float32).T).Q  # [n, R]
            weight_of = n / basis.shape[1] * scale(idx[sel], part.start, part.stop) / size * part.change
            parts.append((sel, basis, weight_of))
            change += part.change
    whole = scale(idx, 0, m)
    errors = {}
    for c in candidates:
        stored = c.encode_rows(name, x, whole_made)
        e = c.rows(name, stored, tuple(x.shape))(0, len(idx)).to(x.device).sub_(x)
        lost = sum(w * float((e[sel] @ basis).square().sum()) for sel, basis, w in parts)
        errors[c.key] = (float(e.square().sum()) * whole, lost)
    return Measured(errors, float(norms.sum()), change)


def relative(measured: dict[str, Measured]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per tensor and candidate, its part of each term of the measure, relative to the whole (module docstring)."""
    size = sum(m.size for m in measured.values()) or 1.0
    change = sum(m.change for m in measured.values()) or 1.0
    return {
        name: {key: (layer / size, lost / change) for key, (layer, lost) in m.errors.items()}
        for name, m in measured.items()
    }


def choose_keeping(
    terms: dict[str, dict[str, tuple[float, float]]],
    nbytes: dict[str, dict[str, int]],
    budget: int,
    lora_at_most: float | None = None,
) -> tuple[dict[str, Choice], float]:
    """`choose` on the measure (both terms alike), or, where its LoRA term would exceed `lora_at_most`, on the LoRA
    term weighed up just enough (bisection) that it does not; with the weight used (as high as it goes where the
    budget cannot keep that much)."""

    def at(weight: float) -> dict[str, Choice]:
        options = {
            n: [Choice(k, nbytes[n][k], layer + weight * lost) for k, (layer, lost) in ts.items()]
            for n, ts in terms.items()
        }
        return choose(options, budget)

    def lost(mix: dict[str, Choice]) -> float:
        return sum(terms[n][c.key][1] for n, c in mix.items())

    mix = at(1.0)
    if lora_at_most is None or lost(mix) <= lora_at_most:
        return mix, 1.0
    lo, hi = 1.0, 4.0
    while lost(at(hi)) > lora_at_most and hi < MAX_LORA_WEIGHT:
        lo, hi = hi, hi * 4
    for _ in range(16):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if lost(at(mid)) <= lora_at_most else (mid, hi)
    return at(hi), hi


def hull(choices: list[Choice]) -> list[Choice]:
    """The choices on the lower convex hull of (bytes, error), smallest first: the others never pay."""
    points: list[Choice] = []
    for c in sorted(choices, key=lambda c: (c.nbytes, c.error)):
        if points and c.error >= points[-1].error:
            continue  # larger and no better
        while len(points) >= 2:
            a, b = points[-2], points[-1]  # drop b when it lies on or above the chord from a to c
            if (b.error - a.error) * (c.nbytes - a.nbytes) >= (c.error - a.error) * (b.nbytes - a.nbytes):
                points.pop()
            else:
                break
        points.append(c)
    return points


def smallest(options: dict[str, list[Choice]]) -> int:
    return sum(min(c.nbytes for c in cs) for cs in options.values())


def choose(options: dict[str, list[Choice]], budget: int) -> dict[str, Choice]:
    """Per tensor, the choice that makes the summed error least with the summed bytes within `budget`: every tensor
    starts at its smallest choice, then the step up with the largest error saved per byte is taken while it fits."""
    hulls = {name: hull(cs) for name, cs in options.items()}
    at = dict.fromkeys(hulls, 0)
    left = budget - sum(h[0].nbytes for h in hulls.values())
    if left < 0:
        raise ValueError("the budget is below the smallest choices")

    def step(name: str) -> tuple[float, str] | None:
        h, i = hulls[name], at[name]
        if i + 1 >= len(h):
            return None
        return -(h[i].error - h[i + 1].error) / (h[i + 1].nbytes - h[i].nbytes), name

    heap = [s for name in sorted(hulls) if (s := step(name))]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        cost = h[i + 1].nbytes - h[i].nbytes
        if cost > left:
            continue  # does not fit: a smaller step elsewhere still may
        at[name], left = i + 1, left - cost
        if s := step(name):
            heapq.heappush(heap, s)
    return {name: hulls[name][i] for name, i in at.items()}


def summary(
    mix: dict[str, Choice], params: dict[str, int], terms: dict[str, dict[str, tuple[float, float]]], top: int = 5
) -> dict:
    """What the result and the manifest say of a mix: per precision the tensors, parameters and bytes, the measure
    (both terms, and each), and the tensors kept at the highest precision (most bytes per parameter), largest first."""
    types: dict[str, dict[str, int]] = {}
    for name, c in mix.items():
        t = types.setdefault(c.key, {"tensors": 0, "params": 0, "bytes": 0})
        t["tensors"] += 1
        t["params"] += params[name]
        t["bytes"] += c.nbytes
    ranked = sorted(mix, key=lambda n: (-mix[n].nbytes / params[n], -params[n], n))
    model = sum(terms[n][c.key][0] for n, c in mix.items())
    lora = sum(terms[n][c.key][1] for n, c in mix.items())
    return {
        "types": dict(sorted(types.items(), key=lambda kv: -kv[1]["params"])),
        "error": model + lora,
        "model_error": model,
        "lora_error": lora,
        "kept_high": [{"tensor": n, "type": mix[n].key} for n in ranked[:top]],
    }


def describe(summary: dict) -> list[str]:
    """A fitted output's mix as the result says it (nothing for an output of one precision)."""
    if not summary:
        return []
    total = sum(t["params"] for t in summary["types"].values()) or 1
    types = ", ".join(
        f"{k} {100 * t['params'] / total:.0f}% ({t['tensors']} tensors, {units.human_bytes(t['bytes'])})"
        for k, t in summary["types"].items()
    )
    high = ", ".join(f"{h['tensor'].removesuffix('.weight')} {h['type']}" for h in summary["kept_high"])
    lines = [f"Fitted in {units.human_bytes(summary['budget_bytes'])}: {types}", f"Kept highest: {high}"]
    if up := summary.get("lora_as"):
        kept = summary["lora_error"] <= summary["presets"][up]["lora_error"]
        lines.append(
            f"The LoRA is kept as {up} would keep it"
            if kept
            else f"The LoRA is kept as well as this size allows ({up} keeps more)"
        )
    fitting = {k: p for k, p in summary.get("presets", {}).items() if p["bytes"] <= summary["budget_bytes"]}
    if fitting:  # the largest of llama.cpp's own types and mixes that fits the same budget, by the same measure
        key, one = max(fitting.items(), key=lambda kv: kv[1]["bytes"])
        lines.append(
            f"Measured error {summary['error'] / one['error']:.2f}× that of {key}, the largest GGUF preset that fits"
        )
    return lines
