"""What every panel needs: the settings, the Hub, the job runner, the probed machine. No gradio here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxstudio import advice, demo
from fluxstudio.errors import BadInputError
from fluxstudio.hardware import HardwareInfo, probe
from fluxstudio.hub import PRESETS, Hub, Ref, parse_ref
from fluxstudio.jobs import JobRunner
from fluxstudio.ui.settings import Settings

THIS_MACHINE = "This machine"
CUSTOM = "custom"


@dataclass
class Context:
    settings: Settings
    hub: Hub = field(default_factory=Hub)
    runner: JobRunner | None = None
    hw: HardwareInfo | None = None

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner = JobRunner(hub=self.hub)
        if self.hw is None:
            self.hw = probe(self.settings.output_dir)

    # -- references typed by the person ------------------------------------------------------------------
    def ref(self, text: str) -> Ref:
        ref = parse_ref(text)
        if ref.kind == "local" and not self.settings.local:
            raise BadInputError("Local paths are not available in a shared session.", "Use a Hub repo id or upload a file.")
        return ref

    def base_ref_text(self, choice: str, custom: str) -> str:
        if choice == "demo":
            return "demo"
        if choice == CUSTOM:
            return self.ref(custom).text
        return next(p.repo_id for p in PRESETS if p.key == choice)

    def model_key(self, choice: str, family: str = "flux1") -> str:
        """Which size table entry advises for this base."""
        if choice in advice.MODELS:  # the klein presets have entries of their own
            return choice
        return "flux2-dev" if choice.startswith("flux2") or family == "flux2" else "flux1"

    def local_base(self, choice: str, custom: str) -> Path | None:
        """The base's folder when it is on this machine already (demo, a local folder, a cached Hub snapshot)."""
        text = self.base_ref_text(choice, custom)
        if text == "demo":
            return demo.ensure_base()
        ref = self.ref(text)
        if ref.kind == "local":
            return ref.path
        from huggingface_hub import try_to_load_from_cache

        config = "transformer/config.json" if not ref.subpath else f"{ref.subpath}/config.json"
        cached = try_to_load_from_cache(ref.repo_id, config, cache_dir=self.hub.cache_dir, revision=ref.revision)
        if isinstance(cached, str):
            folder = Path(cached).parent.parent if not ref.subpath else Path(cached).parent
            return folder if any(folder.rglob("*.safetensors")) else None
        return None

    def cached_preset(self) -> str | None:
        repos = set(self.hub.cached_repos())
        return next((p.key for p in PRESETS if p.repo_id in repos), None)
