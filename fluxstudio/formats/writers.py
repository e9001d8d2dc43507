"""The writers the formats share: a diffusers/transformers model folder (the diffusers format's, a pipeline's
components'), a fused text encoder as one file (beside a one-file output), and what every BFL-keyed one-file writer
does (groups streamed together, the LoRA-retention score per diffusers tensor of a group)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fluxstudio.engine.fuse import TensorJob
from fluxstudio.engine.models import BaseModel
from fluxstudio.engine.retention import Retention
from fluxstudio.engine.shards import ShardedWriter, header_bound
from fluxstudio.formats.bfl import Assembler, layout, swap_halves
from fluxstudio.quant import Precision, Rows
from fluxstudio.quant.plain import BF16, FP8

# The small input/output layers keep a high precision in every one-file format (city96's rule for GGUF).
KEEP_HIGH = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


class SafetensorsWriter:
    """Writing through a ShardedWriter (a diffusers folder, a single file, a text encoder beside it)."""

    def __init__(self) -> None:
        self.shards: ShardedWriter | None = None
        self.notes: list[str] = []
        self.filename = ""

    def write(self, key: str, value: torch.Tensor) -> None:
        assert self.shards is not None, "open() first"
        self.shards.add(key, value)

    def abort(self) -> None:
        if self.shards is not None:
            self.shards.abort()

    @property
    def total_bytes(self) -> int:
        return self.shards.total_bytes if self.shards else 0


def layerwise_skip_patterns(model_cls: type) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(
        getattr(model_cls, "_skip_layerwise_casting_patterns", None) or ()
    )


class DiffusersWriter(SafetensorsWriter):
    """A diffusers (or transformers) model folder: shards, config.json (+ quantization_config)."""

    def __init__(
        self,
        precision: Precision,
        base: BaseModel,
        jobs: list[TensorJob],
        config_updates: dict,
        shard_bytes: int,
        score: bool = True,
    ) -> None:
        super().__init__()
        self.codec, self.precision = precision, precision.key
        self.base, self.jobs, self.config_updates, self.shard_bytes = base, jobs, config_updates, shard_bytes
        self.prefix = "diffusion_pytorch_model" if base.family.library == "diffusers" else "model"
        model_cls = base.family.model_class()
        # transformers keeps some Linear layers out of quantization and in fp32 (T5: the feed-forward output `wo`)
        keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
        self.kept = frozenset(m for m in base.linear_modules if m.rsplit(".", 1)[-1] in keep)
        modules = base.linear_modules - self.kept
        if precision.runtime == "fp8":  # what layerwise casting would not cast stays bf16
            skip = layerwise_skip_patterns(model_cls)
            modules = frozenset(m for m in modules if not any(re.search(p, m) for p in skip))
        self.quantized_modules = modules
        self.retention = Retention.of(
            jobs if score else []
        )  # a text encoder's writer does not score (nothing reads it)
        self.folder: Path | None = None

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.quantized_modules

    def _codec(self, name: str) -> Precision:
        return self.codec if self.is_quantized(name) else BF16

    def need_bytes(self) -> int:
        return sum(self._codec(j.name).nbytes(j.out_shape) for j in self.jobs)

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        self.folder = folder
        keys = [k for j in self.jobs for k in self._codec(j.name).names(j.name)]
        self.shards = ShardedWriter(folder, self.shard_bytes, header_bound(keys), prefix=self.prefix)

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        codec = self._codec(name)
        out = codec.encode(name, fused)
        if name in self.retention.jobs:
            with self.retention.timed():
                self.retention.add(name, fused, codec.rows(name, out))
        return out

    def close(self, final: dict | None = None) -> list[Path]:
        assert self.shards is not None and self.folder is not None, "open() first"
        files = self.shards.close()
        config = dict(self.base.config) | self.config_updates
        if qconfig := self.codec.config():
            config["quantization_config"] = qconfig | (
                {"llm_int8_skip_modules": sorted(self.kept)} if self.base.family.library == "transformers" else {}
            )
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return files + [self.folder / "config.json"]


class EncoderFile(DiffusersWriter):
    """A fused text encoder as one file for ComfyUI and Forge, beside the transformer: CLIP-L in bf16 with the
    `text_model.` keys ComfyUI's CLIP loaders read, T5-XXL with fp8 Linear weights (the t5xxl_fp8_e4m3fn layout)."""

    def __init__(self, base: BaseModel, jobs: list[TensorJob], filename: str) -> None:
        super().__init__(
            FP8 if base.family.key == "t5" else BF16,
            base,
            [j for j in jobs if not j.name.endswith("position_ids")],
            {},
            0,
            score=False,
        )  # a buffer older files carry
        self.filename = filename

    def key(self, name: str) -> str:
        return "text_model." + self.base.canonical(name) if self.base.family.key == "clip_l" else name

    def open(self, folder: Path, metadata: dict[str, str]) -> None:
        self.shards = ShardedWriter(
            folder, 0, header_bound([self.key(j.name) for j in self.jobs]), single_name=self.filename
        )

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key(name): self._codec(name).encode(name, fused)[name]}

    def close(self, final: dict | None = None) -> list[Path]:
        assert self.shards is not None, "open() first"
        return self.shards.close()


class BflWriter:
    """One BFL-keyed file: the engine's diffusers tensors gathered into BFL groups (q|k|v and linear1 concatenated,
    the final modulation's halves swapped), each group encoded once it is whole."""

    def __init__(self, precision: str, from_fp32: bool, base: BaseModel, jobs: list[TensorJob], filename: str) -> None:
        self.precision, self.filename = precision, filename
        groups = layout(base.family.key, [j.name for j in jobs])
        self.groups = {g.name: g for g in groups}
        by_name = {j.name: j for j in jobs}
        self.jobs = [by_name[p] for g in groups for p in g.parts]
        self.shapes = {
            g.name: (sum(by_name[p].out_shape[0] for p in g.parts), *by_name[g.parts[0]].out_shape[1:]) for g in groups
        }
        self.rows = {p: [by_name[q].out_shape[0] for q in g.parts] for g in groups for p in g.parts}
        # fp8 is made from the fp32 sums (rounded once); everything else from their bf16 rounding
        self.assembler = Assembler(groups, torch.float32 if from_fp32 else torch.bfloat16)
        self.notes: list[str] = []
        self.retention = Retention.of(jobs)

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        done = self.assembler.add(name, fused, self.rows[name])
        if done is None:
            return {}
        out = self.encode_bfl(*done)
        group, t = self.groups[done[0]], done[1]
        if any(p in self.retention.jobs for p in group.parts):  # the score, per diffusers tensor of the group
            with self.retention.timed():
                self._score(group, t, out)
        return out

    def encode_bfl(self, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]) -> Rows:
        """Rows [start, stop) of what `encode_bfl` stored for a BFL tensor, in fp32, each call a new tensor."""
        raise NotImplementedError

    def _score(self, group, t: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        rows_of: Rows = self.stored_rows(group.name, out)
        if group.swapped:  # the final modulation (small): decoded whole and swapped back
            stored, t = swap_halves(rows_of(0, t.shape[0])), swap_halves(t)
            rows_of = lambda start, stop: stored[start:stop]

        start = 0
        for part, rows in zip(group.parts, self.rows[group.parts[0]], strict=False):
            self.retention.add(part, t[start : start + rows], lambda a, b, at=start: rows_of(at + a, at + b))
            start += rows

    def quantized(self, name: str) -> bool:
        """Whether a BFL tensor gets the output's precision: the Linear weights, but the small in/out layers."""
        return name.endswith(".weight") and len(self.shapes[name]) == 2 and not name.startswith(KEEP_HIGH)
