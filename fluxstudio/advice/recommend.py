"""Precision advice: which output format to build for a model and the card it will run on.

Pure and table-driven. The rule: fp8 on cards that compute it natively (compute capability 8.9+: RTX 40/50, L4,
L40S, H100 and newer) wherever it fits; otherwise the highest precision whose weights plus working headroom fit
the card, within what it computes well (bf16 needs 8.0, so A100-class cards get bf16); NF4 on small cards.

The one-file pick, for ComfyUI and Forge users, follows what each card multiplies fastest in ComfyUI: its native
fp8 on RTX 40 and H100-class cards, NVFP4 on RTX 50 and B200 (fp8 beside it), bf16 on A100 with INT8 offered
beside it (RTX 30 too), else a GGUF file fitted to the card: its VRAM less the model's headroom (activations at
1024², the VAE, the CUDA context and the text encoders' share while they are on the card: the catalogue's figure,
3 GB for FLUX.1), with the largest one-type GGUF that fits offered beside it; where even the fitted types' least
does not fit, that one-type GGUF alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxstudio import units
from fluxstudio.advice.catalogue import MODELS, ModelSpec  # noqa: F401 - the advice reads the catalogue
from fluxstudio.advice.hardware import (
    BF16_CAPABILITY,
    FP8_CAPABILITY,
    GB,
    NVFP4_CAPABILITY,
    Accelerator,
    HardwareInfo,
)

ORDER = ("bf16", "fp8", "nf4")  # best quality first
FIT_LEAST = 1.01  # a fitted GGUF needs at least Q3_K for every weight, and its small layers in F16/F32
FIT_ROOM = 1.1  # a fitted ComfyUI file is offered where the room holds a tenth more than the uniform file


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

    def computes(self, capability: tuple[int, int]) -> bool:
        """Whether this is an NVIDIA card of at least this compute capability."""
        return self.kind == "NVIDIA CUDA" and bool(self.capability and self.capability >= capability)

    @property
    def fp8(self) -> bool:
        return self.computes(FP8_CAPABILITY)

    @property
    def nvfp4(self) -> bool:
        return self.computes(NVFP4_CAPABILITY)

    @property
    def int8(self) -> bool:
        """Ampere (RTX 30, A100): ComfyUI's INT8 matmul is its fast path there, fp8 is not native."""
        return self.computes(BF16_CAPABILITY) and not self.fp8


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
        Card("RTX 5060 8 GB", "NVIDIA CUDA", (12, 0), 8),
        Card("RTX 5070 12 GB", "NVIDIA CUDA", (12, 0), 12),
        Card("RTX 5080 16 GB", "NVIDIA CUDA", (12, 0), 16),
        Card("RTX 5090 32 GB", "NVIDIA CUDA", (12, 0), 32),
        Card("RTX PRO 6000 96 GB", "NVIDIA CUDA", (12, 0), 96),
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
class Pick:
    """An output to build: a format and one of its precisions."""

    format: str
    precision: str
    fit_bytes: int = 0  # precision "fit": the size the file is fitted to

    def __str__(self) -> str:
        fitted = f" in {units.gb(self.fit_bytes)}" if self.fit_bytes else ""
        return f"{self.format} {self.precision}{fitted}"


@dataclass(frozen=True)
class Recommendation:
    precision: str
    reason: str
    alternatives: tuple[Alternative, ...] = ()
    target: str = ""
    one_file: Pick | None = None  # the one-file pick for ComfyUI and Forge users
    text_encoder: str = "bf16"  # T5-XXL's precision in a pipeline export
    one_file_why: str = ""
    one_file_also: tuple[Pick, ...] = ()  # offered beside it

    @property
    def one_file_picks(self) -> tuple[Pick, ...]:
        return ((self.one_file,) if self.one_file else ()) + self.one_file_also


# T5-XXL's weights (4.76 B parameters) at each precision a pipeline export offers
T5_BYTES = {"bf16": int(9.52e9), "fp8": int(4.8e9), "nf4": int(2.8e9)}


def _text_encoder(pick: str, card: Card, model: ModelSpec) -> str:
    """T5-XXL's precision: the highest that fits beside the transformer on the card (NF4 where nothing else does)."""
    room = card.vram_gb * GB - model.need_bytes(pick)
    usable = [p for p in ORDER if p != "nf4" or card.bitsandbytes]
    return next((p for p in usable if T5_BYTES[p] <= room), usable[-1])


def _need(model: ModelSpec, precision: str) -> str:
    return units.gb(model.need_bytes(precision), approx=True)


def _cap(c: Card) -> str:
    return f"{c.capability[0]}.{c.capability[1]}" if c.capability else "n/a"


def _why_not(p: str, card: Card, model: ModelSpec) -> str | None:
    """Why the card cannot run `p` well (said after the precision's name), or None when it can."""
    if p == "bf16" and not card.bf16:
        return f"needs compute capability 8.0 (RTX 30 and newer); the {card.name} is {_cap(card)}"
    if p == "fp8" and not card.fp8:
        return f"runs natively only on compute capability 8.9+ (RTX 40/50, L4, L40S, H100); the {card.name} is {_cap(card)}"
    if p == "nf4" and not card.bitsandbytes:
        return f"needs bitsandbytes, which does not run on {card.kind}"
    need = model.need_bytes(p)
    if need > card.vram_gb * GB:
        return f"needs {units.gb(need, approx=True)}; the {card.name} has {card.vram_gb:.0f} GB"
    return None


def recommend(card: Card | None, model: ModelSpec) -> Recommendation:
    """The precision to build for `model` on `card` (None: no GPU here and no target chosen)."""
    if card is None or card.kind == "CPU":
        return Recommendation(
            "bf16",
            "No NVIDIA or AMD GPU here: the output is meant for a GPU machine. Pick the card you will run it on "
            "for advice; until then bf16 keeps full quality.",
            tuple(Alternative(p, True, f"needs {_need(model, p)} on the GPU") for p in ORDER[1:]),
        )
    blocked = {p: _why_not(p, card, model) for p in ORDER}
    usable = [p for p in ORDER if blocked[p] is None]
    if "fp8" in usable and card.fp8:
        pick = "fp8"  # the rule: fp8 wherever the card computes it natively and it fits
        reason = (
            f"fp8 ({_need(model, 'fp8')}) fits the {card.name}, which computes fp8 natively (compute "
            f"{_cap(card)}): half the VRAM of bf16, leaving room for the text encoders and larger batches, and "
            "fp8 matmul in ComfyUI and torchao."
        )
        if blocked["bf16"] is None:
            reason += " bf16 fits too, for full quality."
    elif usable:
        pick = usable[0]
        need = model.need_bytes(pick)
        if pick == "bf16":
            reason = (
                f"bf16 fits: {model.label} needs {units.gb(need, approx=True)} and the {card.name} has {card.vram_gb:.0f} GB — "
                f"full quality{'' if card.fp8 else f'; fp8 would not compute natively (compute {_cap(card)})'}."
            )
        else:  # the lines on the other precisions say why not those
            reason = (
                f"{pick} ({units.gb(need, approx=True)}) is the highest precision that fits the {card.name} "
                f"({card.vram_gb:.0f} GB, compute {_cap(card)}) and runs well there."
            )
    else:
        pick = "nf4" if card.bitsandbytes else ("fp8" if card.bf16 else "bf16")
        reason = (
            f"Even {pick} needs {_need(model, pick)}, more than the {card.name}'s {card.vram_gb:.0f} GB: "
            "it will run with CPU offload (pipe.enable_model_cpu_offload()), slowly."
        )
    alternatives = tuple(
        Alternative(
            p,
            blocked[p] is None,
            blocked[p]
            or (
                "also fits, at lower quality"
                if ORDER.index(p) > ORDER.index(pick)
                else "also fits: full quality, twice the VRAM of fp8"
            ),
        )
        for p in ORDER
        if p != pick
    )
    one_file, why, also = _one_file(pick, card, model)
    return Recommendation(pick, reason, alternatives, card.name, one_file, _text_encoder(pick, card, model), why, also)


def _room(card: Card, model: ModelSpec) -> int:
    """What the card holds of the transformer's weights: its VRAM less the model's headroom."""
    return int(card.vram_gb * GB - model.headroom_gb * GB)


def _comfy_fit(card: Card, model: ModelSpec, uniform: str, kinds: str) -> tuple[tuple[Pick, ...], str]:
    """A ComfyUI file fitted to the card's room for its generation (`fit-<uniform>`), offered beside the uniform
    file where the room holds a tenth more than it but not bf16 throughout: the most sensitive layers in bf16."""
    budget = _room(card, model)
    if not FIT_ROOM * model.weight_bytes(uniform) <= budget < model.weight_bytes("bf16"):
        return (), ""
    return (Pick("comfyui", f"fit-{uniform}", budget),), (
        f" A ComfyUI file fitted to {units.gb(budget)} is offered beside it: each Linear weight in {kinds}, "
        "whichever keeps the most of the model and the LoRA in the room the card has."
    )


def _one_file(pick: str, card: Card, model: ModelSpec) -> tuple[Pick, str, tuple[Pick, ...]]:
    """The one-file output for ComfyUI / Forge users of this card, why, and what is offered beside it."""
    fits = [p for p in ("nvfp4", "int8", "Q8_0", "Q6_K", "Q5_K_S") if model.need_bytes(p) <= card.vram_gb * GB]
    if card.nvfp4 and "nvfp4" in fits:
        also = (Pick("comfyui", "fp8"),) if pick == "fp8" else ()
        fitted, fit_why = _comfy_fit(card, model, "nvfp4", "NVFP4, fp8, MXFP8 or bf16")
        why = (
            f"NVFP4 ({_need(model, 'nvfp4')}): about a quarter of bf16's size, and the {card.name} multiplies it "
            f"natively (compute {_cap(card)}), near twice fp8's speed in ComfyUI. It needs a PyTorch built for "
            "CUDA 13 (cu130): with an older one ComfyUI runs NVFP4 slower than fp8"
        )
        why += ", so ComfyUI's fp8 file is offered beside it." if also else "."
        return Pick("comfyui", "nvfp4"), why + fit_why, also + fitted
    if pick == "fp8" and card.fp8:
        fitted, fit_why = _comfy_fit(card, model, "fp8", "fp8 or bf16")
        why = (
            f"ComfyUI's own fp8 (comfy_quant): ComfyUI multiplies it in fp8 on the {card.name} (compute "
            f"{_cap(card)}). The older scaled-fp8 single file is for Forge and older ComfyUI, which compute it in bf16."
        )
        return Pick("comfyui", "fp8"), why + fit_why, (Pick("single-file", "fp8-scaled"), *fitted)
    int8 = (Pick("comfyui", "int8"),) if card.int8 and "int8" in fits else ()
    why = (
        f" INT8 for ComfyUI ({_need(model, 'int8')}) is offered beside it: fp8's size, and the {card.name} "
        f"multiplies INT8 natively (compute {_cap(card)}), about 30% faster than bf16 in ComfyUI."
        if int8
        else ""
    )
    if int8 and pick != "bf16":
        fitted, fit_why = _comfy_fit(card, model, "int8", "INT8 or bf16")
        int8, why = int8 + fitted, why + fit_why
    if pick == "bf16":
        return Pick("single-file", "bf16"), "bf16 in one file: full quality." + why, int8
    gguf = [p for p in fits if p.startswith("Q")]
    q = gguf[0] if gguf and pick != "nf4" else ("Q5_K_S" if "Q5_K_S" in gguf else "Q4_K_S")
    budget = min(_room(card, model), model.weight_bytes("Q8_0"))  # past Q8_0, a fitted file gains next to nothing
    if budget >= FIT_LEAST * model.weight_bytes("Q3_K_S"):
        fitted = (
            f"GGUF fitted to {units.gb(budget)}: the {card.name}'s {card.vram_gb:.0f} GB less {model.headroom_gb:g} GB "
            "for activations, the VAE and the text encoders; each weight gets the type (Q8_0 to Q3_K) that keeps "
            f"the most of the model and the LoRA in that size. GGUF {q}, one type throughout, is offered beside it."
        )
        return Pick("gguf", "fit", budget), fitted + why, (Pick("gguf", q), *int8)
    return Pick("gguf", q), f"GGUF {q}: the largest type that fits the {card.name} with its headroom." + why, int8


def recommend_here(hw: HardwareInfo, model: ModelSpec) -> Recommendation:
    """Advice for the best GPU this machine has. An Apple or CPU-only machine builds for another one: the advice
    then asks for the target card (the table has Apple M-series entries for running it on a Mac)."""
    gpus = [a for a in hw.accelerators if a.kind in ("NVIDIA CUDA", "AMD ROCm")]
    best = max(gpus, key=lambda a: a.vram_total_bytes, default=None)
    return recommend(card_from(best) if best else None, model)
