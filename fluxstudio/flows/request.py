"""What a build is asked for and what it reports: plain data, importable without torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fluxstudio.errors import BadInputError

DEFAULT_SHARD_BYTES = 5 * 10**9
DISK_MARGIN = 64 << 20  # headers, config and manifest: what the disk check adds to the writer's estimate
MAX_SCALE = 10.0  # a LoRA's strength: 1 is as trained; beyond a few it is noise, beyond 10 a typo


@dataclass(frozen=True)
class LoraRef:
    ref: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or abs(self.scale) > MAX_SCALE:
            raise BadInputError(
                f"The LoRA scale {self.scale!r} is not a usable number.",
                f"Use a scale from {-MAX_SCALE:g} to {MAX_SCALE:g} (1.0 is the LoRA as trained).",
            )


@dataclass(frozen=True)
class BuildRequest:
    base: str
    loras: tuple[LoraRef, ...]
    precision: str
    out_dir: Path
    format: str = "diffusers"
    shard_bytes: int = DEFAULT_SHARD_BYTES
    device: str = "auto"
    overwrite: bool = False
    ignore_unmatched: bool = False
    double_quant: bool = False
    t5_precision: str = ""  # T5-XXL's, where the format writes it on its own (a pipeline): "" as the transformer
    fit_bytes: int = 0  # fit the output in this many bytes, each weight's precision chosen (0: the one precision)


@dataclass(frozen=True)
class BuildResult:
    output_dir: str
    precision: str
    format: str
    seconds: float
    stage_seconds: dict[str, float]
    peak_ram_bytes: int
    peak_anon_bytes: int
    peak_vram_bytes: int
    output_bytes: int
    files: list[str]
    tensors_fused: int
    fused_per_component: dict[str, int] = field(default_factory=dict)
    family: str = "flux1"
    lora_retained: float | None = None  # share of the LoRAs' effect the stored weights keep (None: no LoRA)
    lora_retained_worst: list[dict] = field(default_factory=list)  # the modules that kept least
    fit: dict = field(default_factory=dict)  # a fitted output's mix (engine.fit.summary), else empty
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)
