"""Base models: family detection from config.json and a lazy index of the weights (headers only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fluxstudio.engine.safefile import Header, TensorInfo, read_header
from fluxstudio.errors import BadInputError


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    class_name: str  # diffusers transformer class
    lora_mixin: str  # diffusers LoRA loader mixin that converts this family's LoRA formats
    expandable: tuple[tuple[str, str], ...] = ()  # Linear module -> config attribute it sizes
    library: str = "diffusers"  # the package whose class loads it (text encoders: transformers)

    def model_class(self) -> type:
        import importlib

        return getattr(importlib.import_module(self.library), self.class_name)

    def empty_model(self, config: dict) -> torch.nn.Module:
        """An instance on the meta device: shapes and module types, no memory."""
        from accelerate import init_empty_weights

        cls = self.model_class()
        with init_empty_weights():
            if self.library != "transformers":
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))

    def mixin(self) -> type:
        from diffusers.loaders import lora_pipeline

        return getattr(lora_pipeline, self.lora_mixin)


FAMILIES: tuple[Family, ...] = (
    Family("flux1", "FLUX.1", "FluxTransformer2DModel", "FluxLoraLoaderMixin", (("x_embedder", "in_channels"),)),
    Family("flux2", "FLUX.2", "Flux2Transformer2DModel", "Flux2LoraLoaderMixin"),
)
# The text encoders a FLUX.1 LoRA may also train, by the pipeline's component name
ENCODERS: dict[str, Family] = {
    "text_encoder": Family("clip_l", "CLIP-L", "CLIPTextModel", "", library="transformers"),
    "text_encoder_2": Family("t5", "T5-XXL", "T5EncoderModel", "", library="transformers"),
}
FULL_PRECISION = (torch.bfloat16, torch.float16, torch.float32)
INDEX = "model_index.json"  # a diffusers pipeline's


def family_named(key: str) -> Family:
    return next(f for f in FAMILIES if f.key == key)


def family_for(class_name: str) -> Family:
    for fam in FAMILIES:
        if fam.class_name == class_name:
            return fam
    supported = ", ".join(f"{f.class_name} ({f.label})" for f in FAMILIES)
    raise BadInputError(
        f"This model is a {class_name or 'model of unknown class'}, which FluxStudio does not support.",
        f"Supported: {supported}.",
    )


def _find_model_folder(path: Path) -> Path:
    if not path.exists():
        raise BadInputError(f"The base model folder {path} does not exist.", "Check the path.", (path,))
    if path.is_file():
        raise BadInputError(
            f"The base model must be a folder with config.json, not the file {path.name}.",
            "Pick the model's folder (or its transformer/ subfolder).",
        )
    if (path / "transformer" / "config.json").exists():
        return path / "transformer"
    if (path / "config.json").exists():
        return path
    raise BadInputError(
        f"The folder {path.name} has no config.json (nor transformer/config.json).",
        "Pick a diffusers-format model folder.",
    )


def _weight_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise BadInputError(f"{indexes[0].name} is not a valid index file.", "Download the model again.") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")) or any(folder.glob("*.pt")):
        raise BadInputError(f"The model in {folder.name} is stored as pickle files.", "Use its .safetensors version.")
    raise BadInputError(
        f"No .safetensors weights in {folder}.", "The download may be incomplete: download it again.", (folder,)
    )


@dataclass
class BaseModel:
    """A diffusers-format transformer on disk. Weights are indexed from headers; nothing is loaded."""

    folder: Path
    config: dict
    family: Family
    headers: list[Header]

    @cached_property
    def tensors(self) -> dict[str, tuple[Path, TensorInfo]]:
        out: dict[str, tuple[Path, TensorInfo]] = {}
        for h in self.headers:
            for name, info in h.tensors.items():
                out[name] = (h.path, info)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        counts: dict[torch.dtype, int] = {}
        for _, info in self.tensors.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return max(counts, key=lambda dtype: counts[dtype])

    @property
    def variant(self) -> str:
        """A human name for the FLUX.1 variant, guessed from its shapes."""
        if self.family.key != "flux1":
            return self.family.label
        in_ch = self.config.get("in_channels", 64)
        if in_ch == 384:
            return "FLUX.1 Fill"
        if in_ch == 128:
            return "FLUX.1 Depth/Canny"
        return "FLUX.1 dev" if self.config.get("guidance_embeds", True) else "FLUX.1 schnell"

    @cached_property
    def linear_modules(self) -> frozenset[str]:
        """Names of the model's nn.Linear modules, from an empty (meta) instance of its diffusers class."""
        return frozenset(name for name, mod in self.meta_model.named_modules() if isinstance(mod, torch.nn.Linear))

    @cached_property
    def meta_model(self) -> torch.nn.Module:
        """An instance of the model's class on the meta device: shapes and module types, no memory."""
        return self.family.empty_model(self.config)

    def weight_key(self, module: str) -> str:
        """The stored name of a module's weight. CLIP files name modules `text_model.…`, as LoRAs do, while
        transformers 5 drops that prefix when it saves: accept either spelling."""
        key = f"{module}.weight"
        if key not in self.tensors:
            other = key.removeprefix("text_model.") if key.startswith("text_model.") else "text_model." + key
            key = other if other in self.tensors else key
        return key

    def canonical(self, name: str) -> str:
        """A stored tensor name as the model's class names it (transformers 5 CLIP: without `text_model.`)."""
        return name.removeprefix("text_model.") if self.family.key == "clip_l" else name


def pipeline_root(base_path: Path) -> Path:
    """The pipeline folder of a base given as the folder itself or as its transformer/ subfolder."""
    for folder in (base_path, base_path.parent):
        if (folder / INDEX).is_file():
            return folder
    raise BadInputError(
        f"{base_path.name} is a transformer alone, without the pipeline around it (model_index.json, text encoders, "
        "VAE, tokenizers).",
        "Pick the whole diffusers pipeline folder (or repo) of the base model.",
        (base_path,),
    )


def open_encoder(root: Path, component: str) -> BaseModel:
    """A pipeline's text encoder (`text_encoder`: CLIP-L, `text_encoder_2`: T5), checked like a base."""
    folder = Path(root) / component
    if not (folder / "config.json").exists():
        raise BadInputError(
            f"The base has no {component}/ folder with config.json, which the LoRA's {ENCODERS[component].label} part needs.",
            "Pick the whole diffusers pipeline folder (or repo) of the base model.",
            (folder,),
        )
    return _open(folder, ENCODERS[component])


def open_base(path: str | Path) -> BaseModel:
    """Open a model folder (or pipeline folder with transformer/) and check it is a usable full-precision base."""
    folder = _find_model_folder(Path(path).expanduser().resolve())
    config = _read_config(folder)
    return _open(folder, family_for(str(config.get("_class_name", ""))), config)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise TypeError("config.json is not an object")
    except (ValueError, TypeError, UnicodeDecodeError):
        raise BadInputError(
            f"{folder / 'config.json'} is not valid JSON.", "Download the model again.", (folder / "config.json",)
        ) from None
    return config


def _open(folder: Path, family: Family, config: dict | None = None) -> BaseModel:
    if config is None:
        config = _read_config(folder)
    headers = [read_header(p, "model file") for p in _weight_files(folder)]
    base = BaseModel(folder, config, family, headers)
    quantized = {info.dtype for _, info in base.tensors.values()} - set(FULL_PRECISION)
    if "quantization_config" in config or quantized:
        raise BadInputError(
            "This base model is already quantized; fusing into it would throw away most of a LoRA's effect.",
            "Use the full-precision (bf16/fp16/fp32) base model.",
        )
    _check_weights_match(base)
    return base


def _check_weights_match(base: BaseModel) -> None:
    try:
        expected = {k: tuple(v.shape) for k, v in base.meta_model.state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - a config diffusers cannot build
        raise BadInputError(
            f"config.json does not describe a valid {base.family.label} model ({exc}).",
            "Download the model again, or pick its diffusers-format folder.",
        ) from None
    for tied in getattr(base.meta_model, "_tied_weights_keys", None) or ():
        expected.pop(tied, None)  # transformers saves a tied weight once (T5: encoder.embed_tokens = shared)
    have = {base.canonical(k): info.shape for k, (_, info) in base.tensors.items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected))
    wrong = sorted(k for k in set(expected) & set(have) if expected[k] != have[k])
    if missing or extra or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise BadInputError(
            f"The weights in {base.folder.name} do not match its config ({'; '.join(parts)}).",
            "The model files may be from another model or incomplete: download it again.",
        )
