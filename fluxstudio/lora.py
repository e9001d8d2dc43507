"""LoRA files: load, normalize to diffusers keys with diffusers' own converters, and validate.

Every format diffusers' family LoRA loader understands (peft/diffusers, kohya, xlabs, BFL control,
fal-kontext, ai-toolkit, ...) comes out as per-module (down, up, factor) triples plus plain tensors that
replace base weights (BFL control LoRAs carry norm scales).
"""

from __future__ import annotations

import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxstudio.errors import BadInputError, LoraMismatchError, NumericError
from fluxstudio.models import Family
from fluxstudio.safefile import load_all, read_header, sha256

PREFIX = "transformer."
UNSUPPORTED_KINDS = {"lokr_": "LoKr", "hada_": "LoHa", "lora_magnitude_vector": "DoRA"}


@dataclass(frozen=True)
class LoraModule:
    module: str
    down: torch.Tensor  # lora_A: (rank, in_features)
    up: torch.Tensor  # lora_B: (out_features, rank)
    factor: float  # alpha / rank
    up_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoadedLora:
    path: Path
    sha256: str
    format: str
    modules: dict[str, LoraModule]
    replacements: dict[str, torch.Tensor]  # full parameter name -> tensor that replaces the base's
    skipped: list[str] = field(default_factory=list)  # parts not fused (text encoders)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})


def detect_format(keys: list[str]) -> str:
    rules = (
        (".lora_down.weight", "kohya"),
        ("processor", "xlabs"),
        ("query_norm.scale", "bfl-control"),
        ("base_model", "fal-kontext/peft"),
        ("diffusion_model.", "ai-toolkit"),
        ("lycoris_", "lycoris"),
    )
    for needle, label in rules:
        if any(needle in k for k in keys):
            return label
    return "diffusers/peft"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().split("\n")[0][:300])


@contextmanager
def _diffusers_warnings():
    """Collect diffusers' warnings (e.g. dropped DoRA keys) as notes instead of letting them print."""
    handler = _Collect()
    logger = logging.getLogger("diffusers")
    old = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def _convert(sd: dict[str, torch.Tensor], family: Family, name: str) -> tuple[dict, dict, list[str]]:
    mixin = family.mixin()
    with _diffusers_warnings() as notes:
        try:
            if family.key == "flux1":
                out, alphas = mixin.lora_state_dict(dict(sd), return_alphas=True)
            else:
                out, alphas = mixin.lora_state_dict(dict(sd)), {}
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise asserts, KeyErrors, ValueErrors
            raise LoraMismatchError(
                f"{name} could not be read as a {family.label} LoRA ({type(exc).__name__}: {str(exc)[:200]}).",
                f"Check that it was made for {family.label}.",
            ) from None
    return dict(out), dict(alphas or {}), list(notes)


def _alpha_from_metadata(meta: dict, module: str, rank: int) -> float:
    alpha = meta.get("lora_alpha", rank)
    for pattern, value in (meta.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return float(alpha) / (math.sqrt(rank) if meta.get("use_rslora") else rank)


def _adapter_metadata(metadata: dict[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    return {k.removeprefix(PREFIX): v for k, v in meta.items() if k.startswith(PREFIX)}


def load_lora(path: str | Path, family: Family) -> LoadedLora:
    """Read one LoRA file and normalize it for `family`. Raises BadInputError subclasses on any problem."""
    path = Path(path).expanduser().resolve()
    header = read_header(path, "LoRA file")
    if not header.tensors:
        raise BadInputError(f"The LoRA file {path.name} holds no tensors.", "Pick another file.")
    raw = load_all(path)
    for key, t in raw.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericError(f"The LoRA {path.name} contains NaN or Inf values (in {key}).", "The file is broken: get it again.")
    for needle, kind in UNSUPPORTED_KINDS.items():
        if any(needle in k for k in raw):
            raise LoraMismatchError(f"{path.name} is a {kind} adapter, which FluxStudio cannot fuse yet.", "Use a plain LoRA.")
    fmt = detect_format(list(raw))
    if not any(k.startswith(("transformer.", "text_encoder")) for k in raw) and all(
        ".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in raw
    ):
        raw = {PREFIX + k: v for k, v in raw.items()}  # bare peft keys: a transformer-only adapter
    sd, alphas, notes = _convert(raw, family, path.name)
    meta = _adapter_metadata(header.metadata)

    skipped = sorted({k.split(".")[0] for k in sd if not k.startswith(PREFIX)})
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith(PREFIX):
            continue
        k = key[len(PREFIX):]
        if k.endswith(".lora_A.weight"):
            downs[k[: -len(".lora_A.weight")]] = t
        elif k.endswith(".lora_B.weight"):
            ups[k[: -len(".lora_B.weight")]] = t
        elif k.endswith(".lora_B.bias"):
            biases[k[: -len(".lora_B.bias")]] = t
        elif k.endswith(".alpha"):
            alphas[key] = t
        elif ".lora_A." in k or ".lora_B." in k:
            raise LoraMismatchError(f"{path.name} has a LoRA key FluxStudio does not understand: {key}.",
                                    "It may be a LoRA variant FluxStudio cannot fuse yet; use a plain LoRA.")
        else:
            replacements[k] = t
    if set(ups) != set(downs):
        odd = sorted(set(ups) ^ set(downs))
        raise LoraMismatchError(f"{path.name} is incomplete: {odd[0]} has only one of its two LoRA matrices.", "Get the file again.")
    if not downs and not replacements:
        raise LoraMismatchError(f"{path.name} has no weights for the {family.label} transformer.", f"Check that it is a {family.label} LoRA.")

    modules: dict[str, LoraModule] = {}
    for name in sorted(downs):
        down, up = downs[name], ups[name]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoraMismatchError(
                f"{path.name} is broken at {name}: its two matrices do not fit together "
                f"({tuple(up.shape)} x {tuple(down.shape)}).",
                "Get the file again.",
            )
        rank = int(down.shape[0])
        alpha = alphas.get(f"{PREFIX}{name}.alpha")
        if alpha is not None:
            factor = float(alpha) / rank
        elif meta:
            factor = _alpha_from_metadata(meta, name, rank)
        else:
            factor = 1.0
        modules[name] = LoraModule(name, down, up, factor, biases.get(name))
    return LoadedLora(path, sha256(path), fmt, modules, replacements, skipped, notes)
