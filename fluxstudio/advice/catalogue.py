"""The model catalogue: the presets a user can pick, the model family each belongs to, and the figures the advice
and the size estimates use. One table; the Hub, the advice, the estimate and the app's base list all read it."""

from __future__ import annotations

from dataclasses import dataclass

from fluxstudio import formats

GB = 10**9


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # models.FAMILIES key
    params: float  # transformer parameters
    fp8_bf16_share: float  # share of parameters fp8 keeps in bf16 (modules layerwise casting skips)
    headroom_gb: float  # activations, VAE, CUDA context and the text encoder's share while it is on the card

    def weight_bytes(self, precision: str) -> int:
        """The transformer's weights at any precision of the format table (fp8 keeps some modules in bf16)."""
        per_param = formats.option(precision).bytes_per_param
        if precision.startswith("fp8"):
            per_param += self.fp8_bf16_share
        return int(self.params * per_param)

    def need_bytes(self, precision: str) -> int:
        return self.weight_bytes(precision) + int(self.headroom_gb * GB)


MODELS: dict[str, ModelSpec] = {
    m.key: m
    for m in (
        ModelSpec("flux1", "FLUX.1 (dev, schnell, Fill, Kontext, Depth, Canny)", "flux1", 11.9e9, 0.18, 3),
        ModelSpec(
            "flux2-dev", "FLUX.2 dev", "flux2", 32.2e9, 0.02, 16
        ),  # its 24 B Mistral text encoder shares the card
        ModelSpec("flux2-klein-9b", "FLUX.2 klein 9B", "flux2", 9.1e9, 0.02, 5),
        ModelSpec("flux2-klein-4b", "FLUX.2 klein 4B", "flux2", 3.9e9, 0.02, 4),
    )
}


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    repo_id: str
    model: str  # MODELS key
    gated: bool

    @property
    def family(self) -> str:
        return MODELS[self.model].family

    @property
    def transformer_gb(self) -> float:
        """The download: the transformer in bf16."""
        return MODELS[self.model].weight_bytes("bf16") / GB


PRESETS: tuple[Preset, ...] = (
    Preset("flux1-dev", "FLUX.1 [dev]", "black-forest-labs/FLUX.1-dev", "flux1", True),
    Preset("flux1-schnell", "FLUX.1 [schnell]", "black-forest-labs/FLUX.1-schnell", "flux1", False),
    Preset("flux1-fill-dev", "FLUX.1 Fill [dev]", "black-forest-labs/FLUX.1-Fill-dev", "flux1", True),
    Preset("flux1-kontext-dev", "FLUX.1 Kontext [dev]", "black-forest-labs/FLUX.1-Kontext-dev", "flux1", True),
    Preset("flux1-canny-dev", "FLUX.1 Canny [dev]", "black-forest-labs/FLUX.1-Canny-dev", "flux1", True),
    Preset("flux1-depth-dev", "FLUX.1 Depth [dev]", "black-forest-labs/FLUX.1-Depth-dev", "flux1", True),
    Preset("flux2-dev", "FLUX.2 [dev]", "black-forest-labs/FLUX.2-dev", "flux2-dev", True),
    Preset("flux2-klein-4b", "FLUX.2 [klein] 4B", "black-forest-labs/FLUX.2-klein-4B", "flux2-klein-4b", False),
    Preset("flux2-klein-9b", "FLUX.2 [klein] 9B", "black-forest-labs/FLUX.2-klein-9B", "flux2-klein-9b", True),
)


def model_key(preset: str | None = None, family: str = "flux1") -> str:
    """The catalogue entry for a preset, or for any other base of a family (its flagship's figures)."""
    match = next((p for p in PRESETS if p.key == preset), None)
    if match is not None:
        return match.model
    return "flux2-dev" if family == "flux2" else "flux1"
