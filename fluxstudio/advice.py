"""Precision advice: which output format to build for a model and the card it will run on.

Pure and table-driven. The rule: the highest precision whose weights plus working headroom fit the card, within
what the card computes well (bf16 needs compute capability 8.0, fp8 8.9; NF4 needs bitsandbytes on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxstudio.hardware import BF16_CAPABILITY, FP8_CAPABILITY, GB, Accelerator, HardwareInfo

ORDER = ("bf16", "fp8", "nf4")  # best quality first


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    params: float  # transformer parameters
    fp8_bf16_share: float  # share of parameters fp8 keeps in bf16 (modules layerwise casting skips)
    headroom_gb: float  # activations, VAE, CUDA context and the text encoder's share while it is on the card

    def weight_bytes(self, precision: str) -> int:
        per_param = {"bf16": 2.0, "fp8": 1.0 + self.fp8_bf16_share, "nf4": 0.5 + 4 / 64}[precision]
        return int(self.params * per_param)

    def need_bytes(self, precision: str) -> int:
        return self.weight_bytes(precision) + int(self.headroom_gb * GB)


MODELS: dict[str, ModelSpec] = {
    m.key: m
    for m in (
        ModelSpec("flux1", "FLUX.1 (dev, schnell, Fill, Kontext, Depth, Canny)", 11.9e9, 0.18, 3),
        ModelSpec("flux2-dev", "FLUX.2 dev", 32.2e9, 0.02, 16),  # its 24 B Mistral text encoder shares the card
        ModelSpec("flux2-klein-9b", "FLUX.2 klein 9B", 9.1e9, 0.02, 5),
        ModelSpec("flux2-klein-4b", "FLUX.2 klein 4B", 4.0e9, 0.02, 4),
    )
}


@dataclass(frozen=True)
class Card:
    name: str
    kind: str  # "NVIDIA CUDA", "AMD ROCm", "Apple MPS", "CPU"
    capability: tuple[int, int] | None
    vram_gb: float
    bitsandbytes: bool = True

    @property
    def bf16(self) -> bool:
        return self.kind in ("Apple MPS", "AMD ROCm") or bool(self.capability and self.capability >= BF16_CAPABILITY)

    @property
    def fp8(self) -> bool:
        return self.kind == "NVIDIA CUDA" and bool(self.capability and self.capability >= FP8_CAPABILITY)


CARDS: dict[str, Card] = {
    c.name: c
    for c in (
        Card("RTX 2080 Ti 11 GB", "NVIDIA CUDA", (7, 5), 11),
        Card("RTX 3060 12 GB", "NVIDIA CUDA", (8, 6), 12),
        Card("RTX 3080 10 GB", "NVIDIA CUDA", (8, 6), 10),
        Card("RTX 3090 24 GB", "NVIDIA CUDA", (8, 6), 24),
        Card("RTX 4060 Ti 16 GB", "NVIDIA CUDA", (8, 9), 16),
        Card("RTX 4070 12 GB", "NVIDIA CUDA", (8, 9), 12),
        Card("RTX 4080 16 GB", "NVIDIA CUDA", (8, 9), 16),
        Card("RTX 4090 24 GB", "NVIDIA CUDA", (8, 9), 24),
        Card("RTX 5080 16 GB", "NVIDIA CUDA", (12, 0), 16),
        Card("RTX 5090 32 GB", "NVIDIA CUDA", (12, 0), 32),
        Card("T4 16 GB", "NVIDIA CUDA", (7, 5), 16),
        Card("L4 24 GB", "NVIDIA CUDA", (8, 9), 24),
        Card("A10G 24 GB", "NVIDIA CUDA", (8, 6), 24),
        Card("A100 40 GB", "NVIDIA CUDA", (8, 0), 40),
        Card("A100 80 GB", "NVIDIA CUDA", (8, 0), 80),
        Card("L40S 48 GB", "NVIDIA CUDA", (8, 9), 48),
        Card("H100 80 GB", "NVIDIA CUDA", (9, 0), 80),
        Card("H200 141 GB", "NVIDIA CUDA", (9, 0), 141),
        Card("B200 180 GB", "NVIDIA CUDA", (10, 0), 180),
        Card("Apple M-series 32 GB", "Apple MPS", None, 32, bitsandbytes=False),
        Card("Apple M-series 64 GB", "Apple MPS", None, 64, bitsandbytes=False),
        Card("Apple M-series 128 GB", "Apple MPS", None, 128, bitsandbytes=False),
    )
}


def card_from(acc: Accelerator) -> Card:
    return Card(acc.name, acc.kind, acc.capability, acc.vram_total_bytes / GB, acc.bitsandbytes)


@dataclass(frozen=True)
class Alternative:
    precision: str
    fits: bool
    why: str


@dataclass(frozen=True)
class Recommendation:
    precision: str
    reason: str
    alternatives: tuple[Alternative, ...] = ()
    target: str = ""


def _gb(n: float) -> str:
    return f"~{n / GB:.0f} GB" if n >= 10 * GB else f"~{n / GB:.1f} GB"


def _cap(c: Card) -> str:
    return f"{c.capability[0]}.{c.capability[1]}" if c.capability else "n/a"


def _why_not(p: str, card: Card, model: ModelSpec) -> str | None:
    """Why the card cannot run `p` well, or None when it can."""
    if p == "bf16" and not card.bf16:
        return f"bf16 needs compute capability 8.0 (RTX 30 and newer); the {card.name} is {_cap(card)}"
    if p == "fp8" and not card.fp8:
        return f"fp8 runs natively only on compute capability 8.9+ (RTX 40/50, L4, L40S, H100); the {card.name} is {_cap(card)}"
    if p == "nf4" and not card.bitsandbytes:
        return f"NF4 needs bitsandbytes, which does not run on {card.kind}"
    need = model.need_bytes(p)
    if need > card.vram_gb * GB:
        return f"{p} needs {_gb(need)}; the {card.name} has {card.vram_gb:.0f} GB"
    return None


def recommend(card: Card | None, model: ModelSpec) -> Recommendation:
    """The precision to build for `model` on `card` (None: no GPU here and no target chosen)."""
    if card is None or card.kind == "CPU":
        return Recommendation(
            "bf16",
            "No NVIDIA or AMD GPU here: the output is meant for a GPU machine. Pick the card you will run it on "
            "for advice; until then bf16 keeps full quality.",
            tuple(Alternative(p, True, f"{p} needs {_gb(model.need_bytes(p))} on the GPU") for p in ORDER[1:]),
        )
    blocked = {p: _why_not(p, card, model) for p in ORDER}
    usable = [p for p in ORDER if blocked[p] is None]
    if usable:
        pick = usable[0]
        need = model.need_bytes(pick)
        if pick == "bf16":
            reason = f"bf16 fits: {model.label} needs {_gb(need)} and the {card.name} has {card.vram_gb:.0f} GB — full quality."
        else:
            better = "; ".join(blocked[p] for p in ORDER[: ORDER.index(pick)])
            reason = f"{pick} ({_gb(need)}) fits the {card.name}: {better}."
    else:
        pick = "nf4" if card.bitsandbytes else ("fp8" if card.bf16 else "bf16")
        reason = (f"Even {pick} needs {_gb(model.need_bytes(pick))}, more than the {card.name}'s {card.vram_gb:.0f} GB: "
                  "it will run with CPU offload (pipe.enable_model_cpu_offload()), slowly.")
    alternatives = tuple(
        Alternative(p, blocked[p] is None, blocked[p] or (
            "also fits, at lower quality" if ORDER.index(p) > ORDER.index(pick) else "fits"))
        for p in ORDER if p != pick
    )
    return Recommendation(pick, reason, alternatives, card.name)


def recommend_here(hw: HardwareInfo, model: ModelSpec) -> Recommendation:
    """Advice for the best GPU this machine has. An Apple or CPU-only machine builds for another one: the advice
    then asks for the target card (the table has Apple M-series entries for running it on a Mac)."""
    gpus = [a for a in hw.accelerators if a.kind in ("NVIDIA CUDA", "AMD ROCm")]
    best = max(gpus, key=lambda a: a.vram_total_bytes, default=None)
    return recommend(card_from(best) if best else None, model)
