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

from fluxstudio.engine.models import ENCODERS, Family
from fluxstudio.engine.safefile import load_all, read_header, sha256
from fluxstudio.errors import BadInputError, LoraMismatchError, NumericError

PREFIX = "transformer."
# Where a LoRA keeps its text-encoder parts: kohya (sd-scripts, fluxgym: te1 = CLIP-L, te3 = T5-XXL) and diffusers/peft
ENCODER_PREFIXES = {
    "lora_te1_": "text_encoder",
    "lora_te_": "text_encoder",
    "lora_te3_": "text_encoder_2",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
# kohya's names are module paths with "_" for "."; these are the Linear modules sd-scripts trains in each encoder
KOHYA_MODULES = {
    "text_encoder": (
        re.compile(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"),
        "text_model.encoder.layers.{}.{}.{}",
    ),
    "text_encoder_2": (
        re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)"),
        "encoder.block.{}.layer.{}.{}.{}",
    ),
}
LORA_SUFFIXES = {
    ".lora_down.weight": "A",
    ".lora_A.weight": "A",
    ".lora_up.weight": "B",
    ".lora_B.weight": "B",
    ".alpha": "alpha",
}
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
    encoders: dict[str, dict[str, LoraModule]] = field(default_factory=dict)  # text_encoder(_2) -> its modules
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for mods in (self.modules, *self.encoders.values()) for m in mods.values()})

    @property
    def components(self) -> list[str]:
        """The pipeline components this LoRA changes."""
        return (["transformer"] if self.modules or self.replacements else []) + sorted(self.encoders)


def encoder_component(key: str) -> str | None:
    return next((c for prefix, c in ENCODER_PREFIXES.items() if key.startswith(prefix)), None)


def components(path: str | Path) -> list[str]:
    """The components a LoRA file touches, from its header alone (to know what to download before reading it)."""
    keys = read_header(Path(path), "LoRA file").tensors
    found = {encoder_component(k) or "transformer" for k in keys}
    return [c for c in ("transformer", "text_encoder", "text_encoder_2") if c in found]


def _encoder_modules(sd: dict[str, torch.Tensor], meta: dict, name: str) -> dict[str, dict[str, LoraModule]]:
    """The text-encoder parts of a LoRA (kohya or peft keys) as modules named like the encoders' own."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        prefix = next(p for p in ENCODER_PREFIXES if key.startswith(p))
        component, rest = ENCODER_PREFIXES[prefix], key[len(prefix) :]
        suffix = next((s for s in LORA_SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            raise LoraMismatchError(
                f"{name} has a text-encoder key FluxStudio does not understand: {key}.",
                "It may be a LoRA variant FluxStudio cannot fuse yet; use a plain LoRA.",
            )
        module = rest[: -len(suffix)]
        if prefix.endswith("_"):  # kohya: the module path with "_" for "."
            pattern, template = KOHYA_MODULES[component]
            match = pattern.fullmatch(module)
            if match is None:
                raise LoraMismatchError(
                    f"{name} has a {ENCODERS[component].label} part in a layout FluxStudio does not know: {key}.",
                    "Use a LoRA made for FLUX.1's CLIP-L and T5-XXL, or one without text-encoder parts.",
                )
            module = template.format(*match.groups())
        parts.setdefault((component, module), {})[LORA_SUFFIXES[suffix]] = t
    out: dict[str, dict[str, LoraModule]] = {}
    for (component, module), p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise LoraMismatchError(
                f"{name} is incomplete: {component}.{module} has only one of its two LoRA matrices.",
                "Get the file again.",
            )
        _check_fits(name, f"{component}.{module}", p["A"], p["B"])
        rank = int(p["A"].shape[0])
        factor = (
            float(p["alpha"]) / rank if "alpha" in p else _alpha_from_metadata(meta.get(component, {}), module, rank)
        )
        out.setdefault(component, {})[module] = LoraModule(module, p["A"], p["B"], factor)
    return out


def _check_fits(file: str, where: str, down: torch.Tensor, up: torch.Tensor) -> None:
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
        raise LoraMismatchError(
            f"{file} is broken at {where}: its two matrices do not fit together ({tuple(up.shape)} x {tuple(down.shape)}).",
            "Get the file again.",
        )


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


def _adapter_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    """peft's adapter config per component (`transformer`, `text_encoder`, ...), as diffusers saves it."""
    raw = metadata.get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for key, value in meta.items() if isinstance(meta, dict) else ():
        component, _, field_name = key.partition(".")
        if field_name:
            out.setdefault(component, {})[field_name] = value
    return out


def _refuse_unusable(raw: dict[str, torch.Tensor], name: str) -> None:
    for key, t in raw.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericError(
                f"The LoRA {name} contains NaN or Inf values (in {key}).", "The file is broken: get it again."
            )
    for needle, kind in UNSUPPORTED_KINDS.items():
        if any(needle in k for k in raw):
            raise LoraMismatchError(
                f"{name} is a {kind} adapter, which FluxStudio cannot fuse yet.", "Use a plain LoRA."
            )


def _by_kind(sd: dict[str, torch.Tensor], alphas: dict, name: str) -> tuple[dict, dict, dict, dict]:
    """diffusers-keyed transformer tensors as (lora_B, lora_A, lora_B biases, plain replacements) by module; the
    alphas found go into `alphas`."""
    ups: dict[str, torch.Tensor] = {}
    downs: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if not key.startswith(PREFIX):
            continue
        k = key[len(PREFIX) :]
        if k.endswith(".lora_A.weight"):
            downs[k[: -len(".lora_A.weight")]] = t
        elif k.endswith(".lora_B.weight"):
            ups[k[: -len(".lora_B.weight")]] = t
        elif k.endswith(".lora_B.bias"):
            biases[k[: -len(".lora_B.bias")]] = t
        elif k.endswith(".alpha"):
            alphas[key] = t
        elif ".lora_A." in k or ".lora_B." in k:
            raise LoraMismatchError(
                f"{name} has a LoRA key FluxStudio does not understand: {key}.",
                "It may be a LoRA variant FluxStudio cannot fuse yet; use a plain LoRA.",
            )
        else:
            replacements[k] = t
    return ups, downs, biases, replacements


def load_lora(path: str | Path, family: Family) -> LoadedLora:
    """Read one LoRA file and normalize it for `family`. Raises BadInputError subclasses on any problem."""
    path = Path(path).expanduser().resolve()
    header = read_header(path, "LoRA file")
    if not header.tensors:
        raise BadInputError(f"The LoRA file {path.name} holds no tensors.", "Pick another file.")
    raw = load_all(path)
    _refuse_unusable(raw, path.name)
    fmt = detect_format(list(raw))
    meta = _adapter_metadata(header.metadata)
    encoders = _encoder_modules({k: v for k, v in raw.items() if encoder_component(k)}, meta, path.name)
    raw = {k: v for k, v in raw.items() if not encoder_component(k)}
    if not any(k.startswith("transformer.") for k in raw) and all(
        ".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in raw
    ):
        raw = {PREFIX + k: v for k, v in raw.items()}  # bare peft keys: a transformer-only adapter
    sd, alphas, notes = _convert(raw, family, path.name) if raw else ({}, {}, [])
    meta = meta.get("transformer", {})

    ups, downs, biases, replacements = _by_kind(sd, alphas, path.name)
    if set(ups) != set(downs):
        odd = sorted(set(ups) ^ set(downs))
        raise LoraMismatchError(
            f"{path.name} is incomplete: {odd[0]} has only one of its two LoRA matrices.", "Get the file again."
        )
    if not downs and not replacements and not encoders:
        raise LoraMismatchError(
            f"{path.name} has no weights for the {family.label} transformer.",
            f"Check that it is a {family.label} LoRA.",
        )
    if encoders and family.key != "flux1":
        raise LoraMismatchError(
            f"{path.name} has text-encoder parts, which FluxStudio fuses only for FLUX.1 (CLIP-L and T5-XXL).",
            "Use a FLUX.1 base, or a LoRA without text-encoder parts.",
        )

    modules: dict[str, LoraModule] = {}
    for name in sorted(downs):
        down, up = downs[name], ups[name]
        _check_fits(path.name, name, down, up)
        rank = int(down.shape[0])
        alpha = alphas.get(f"{PREFIX}{name}.alpha")
        if alpha is not None:
            factor = float(alpha) / rank
        elif meta:
            factor = _alpha_from_metadata(meta, name, rank)
        else:
            factor = 1.0
        modules[name] = LoraModule(name, down, up, factor, biases.get(name))
    return LoadedLora(path, sha256(path), fmt, modules, replacements, encoders, notes)
