"""The streaming engine: plan per base tensor (copy | fuse | widen | replace), then execute one tensor at a time.

W' = W + sum(scale * alpha/rank * B @ A), computed in fp32 and rounded once by the output format. Shapes follow
diffusers: a LoRA with fewer inputs than the base is zero-padded (Turbo-Alpha on Fill); one with more widens
the base with zeros and updates the config (Control LoRAs on x_embedder).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from typing_extensions import Self

from fluxstudio.engine.lora import LoadedLora
from fluxstudio.engine.models import BaseModel
from fluxstudio.engine.safefile import TensorInfo, read_tensor
from fluxstudio.errors import LoraMismatchError, NumericError
from fluxstudio.progress import ProgressEvent, Run, Stage, running

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class Delta:
    up: torch.Tensor
    down: torch.Tensor
    weight: float  # user scale * alpha / rank
    up_bias: torch.Tensor | None = None


@dataclass(frozen=True)
class TensorJob:
    name: str
    source: Path
    info: TensorInfo
    out_shape: tuple[int, ...]
    deltas: tuple[Delta, ...] = ()
    bias_deltas: tuple[tuple[torch.Tensor, float], ...] = ()
    replacement: torch.Tensor | None = None

    @property
    def touched(self) -> bool:
        return (
            bool(self.deltas or self.bias_deltas) or self.replacement is not None or self.out_shape != self.info.shape
        )


@dataclass
class FusePlan:
    jobs: list[TensorJob]
    config_updates: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    matched: dict[str, int] = field(default_factory=dict)  # LoRA name -> modules matched

    @property
    def fused_count(self) -> int:
        return sum(1 for j in self.jobs if j.touched)


def _list(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _fit(name: str, module: str, mod, shape: tuple[int, ...], expandable: dict[str, str], hint: str) -> int | None:
    """The width the base must take at `module` for this LoRA (None: as it is), or one sentence on the misfit."""
    out_f, in_f = mod.up.shape[0], mod.down.shape[1]
    if len(shape) != 2 or out_f != shape[0]:
        raise LoraMismatchError(
            f"{name} does not fit this base at {module}: the LoRA has {out_f} outputs, the base {shape[0]}.", hint
        )
    if in_f <= shape[1]:
        return None
    if module not in expandable:
        raise LoraMismatchError(
            f"{name} does not fit this base at {module}: the LoRA has {in_f} inputs, the base {shape[1]}.", hint
        )
    return in_f


def _unmatched(
    name: str, unmatched: list[str], total: int, ignore: bool, variant: str, hint: str, notes: list[str]
) -> None:
    """A LoRA's parts that match nothing: one sentence, unless asked to go on with the rest (a note then)."""
    if unmatched and (not ignore or len(unmatched) == total):
        raise LoraMismatchError(
            f"{len(unmatched)} of {total} parts of {name} match nothing in this {variant} base: {_list(unmatched)}.",
            hint + ("" if len(unmatched) == total else " To fuse the rest anyway, ignore unmatched modules."),
        )
    if unmatched:
        notes.append(f"{name}: ignored {len(unmatched)} unmatched modules ({_list(unmatched)})")


def _widen(base: BaseModel, widths: dict[str, int], expandable: dict[str, str], result: FusePlan) -> None:
    """The config attributes that size the widened modules, and a note for each."""
    for m, width in widths.items():
        attr = expandable[m]
        result.config_updates[attr] = width
        if attr == "in_channels" and base.config.get("out_channels") is None:
            # FLUX derives out_channels from in_channels when it is unset: pin it, or the output layer would widen too
            result.config_updates["out_channels"] = base.config.get("in_channels", 64)
        result.notes.append(f"{m} widened {base.tensors[m + '.weight'][1].shape[1]}→{width} ({attr} = {width})")


def plan_tensors(
    base: BaseModel,
    loras: list[tuple[LoadedLora, float]],
    ignore_unmatched: bool = False,
    component: str = "transformer",
) -> FusePlan:
    """Decide what happens to every tensor of one component (the transformer, or a text encoder). Pure apart from
    reading shapes; raises on any misfit."""
    tensors = base.tensors
    expandable = dict(base.family.expandable)
    deltas: dict[str, list[Delta]] = {}
    bias_deltas: dict[str, list[tuple[torch.Tensor, float]]] = {}
    replacements: dict[str, torch.Tensor] = {}
    widths: dict[str, int] = {}
    result = FusePlan(jobs=[])
    hint = f"Check that the LoRA was made for {base.variant} ({base.family.label})."
    for lora, scale in loras:
        unmatched: list[str] = []
        modules = lora.modules if component == "transformer" else lora.encoders.get(component, {})
        lora_replacements = lora.replacements if component == "transformer" else {}
        if not modules and not lora_replacements:
            continue
        for m, mod in modules.items():
            key = base.weight_key(m)
            if key not in tensors:
                unmatched.append(m)
                continue
            shape = tensors[key][1].shape
            if (wider := _fit(lora.name, m, mod, shape, expandable, hint)) is not None:
                widths[m] = max(widths.get(m, shape[1]), wider)
            elif mod.down.shape[1] < shape[1]:
                result.notes.append(f"{lora.name}: {m} LoRA inputs zero-padded {mod.down.shape[1]}→{shape[1]}")
            deltas.setdefault(key, []).append(Delta(mod.up, mod.down, scale * mod.factor))
            if mod.up_bias is not None:
                if f"{m}.bias" not in tensors:  # biases come only in transformer LoRAs
                    raise LoraMismatchError(f"{lora.name} adds a bias to {m}, which has none in this base.", hint)
                bias_deltas.setdefault(f"{m}.bias", []).append((mod.up_bias, scale * mod.factor))
        for pname, t in lora_replacements.items():
            if pname not in tensors:
                unmatched.append(pname)
            elif tuple(t.shape) != tensors[pname][1].shape:
                raise LoraMismatchError(f"{lora.name} replaces {pname} with a tensor of another shape.", hint)
            else:
                replacements[pname] = t
        total = len(modules) + len(lora_replacements)
        _unmatched(lora.name, unmatched, total, ignore_unmatched, base.variant, hint, result.notes)
        result.matched[lora.name] = total - len(unmatched)
    _widen(base, widths, expandable, result)
    for h in base.headers:
        for name, info in h.tensors.items():
            shape = info.shape
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module in widths:
                shape = (shape[0], widths[module])
            result.jobs.append(
                TensorJob(
                    name,
                    h.path,
                    info,
                    shape,
                    tuple(deltas.get(name, ())),
                    tuple(bias_deltas.get(name, ())),
                    replacements.get(name),
                )
            )
    return result


def fuse_tensor(job: TensorJob, tensor: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The fused value of one base tensor, in fp32 (or the base tensor itself when nothing changes)."""
    if job.replacement is not None:
        return job.replacement.to(torch.float32)
    if not job.touched:
        return tensor
    w = tensor.to(device=device, dtype=torch.float32)
    if job.out_shape != tuple(w.shape):
        wide = torch.zeros(job.out_shape, dtype=torch.float32, device=device)
        wide[:, : w.shape[1]] = w
        w = wide
    for d in job.deltas:
        down = d.down.to(device=device, dtype=torch.float32)
        if down.shape[1] < w.shape[1]:
            down = torch.nn.functional.pad(down, (0, w.shape[1] - down.shape[1]))
        w.addmm_(d.up.to(device=device, dtype=torch.float32), down, alpha=d.weight)
    for bias, weight in job.bias_deltas:
        w.add_(bias.to(device=device, dtype=torch.float32), alpha=weight)
    if not torch.isfinite(w.sum()):  # NaN/Inf propagate through a sum: one cheap pass instead of a mask
        raise NumericError(
            f"Fusing gave NaN or Inf values in {job.name}.", "A LoRA scale may be far too large: lower it."
        )
    return w


def execute(
    jobs: list[TensorJob],
    encode: Callable[[str, torch.Tensor], dict[str, torch.Tensor]],
    write: Callable[[str, torch.Tensor], None],
    device: str = "cpu",
    run: Run | None = None,
    message: str = "",
) -> None:
    """Stream every tensor, in the given order: read -> fuse -> encode (quantize) -> write. Memory stays at a few
    tensors (encode may hold back the parts of one output tensor until all of them are in).

    The next tensor is read and the last one written in background threads while this one is computed.
    """
    run = running(run)
    total = len(jobs)
    bytes_total = sum(j.info.nbytes for j in jobs)
    done_bytes = 0
    files: dict[Path, BinaryIO] = {}
    last = 0.0

    def read(job: TensorJob) -> torch.Tensor:
        if job.source not in files:
            files[job.source] = job.source.open("rb", buffering=0)
        return read_tensor(files[job.source], job.info)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="read") as reader, _WriteBehind(write) as writer:
            pending = reader.submit(read, jobs[0]) if jobs else None
            for i, job in enumerate(jobs, start=1):
                run.check()
                assert pending is not None
                tensor = pending.result().to(device)  # on a GPU, untouched tensors are quantized there too
                pending = reader.submit(read, jobs[i]) if i < total else None
                fused = fuse_tensor(job, tensor, device)
                del tensor
                for key, value in encode(job.name, fused).items():
                    writer.put(key, value)
                del fused
                done_bytes += job.info.nbytes
                now = time.monotonic()
                if now - last > 0.1 or i == total:
                    last = now
                    run.report(
                        ProgressEvent(Stage.FUSE, i, total, done_bytes, bytes_total, item=job.name, message=message)
                    )
    finally:
        for f in files.values():
            f.close()


class _WriteBehind:
    """Runs `write` in a background thread behind a short queue; re-raises its error in the caller."""

    def __init__(self, write: Callable[[str, torch.Tensor], None], depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="write", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc

    def put(self, key: str, value: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((key, value))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error
