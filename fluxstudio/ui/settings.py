"""Launch settings and what they imply for security."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fluxstudio.studio import paths

MAX_UPLOAD = "2gb"  # LoRAs are megabytes; anything this big is not one


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    inbrowser: bool = False
    output_dir: Path = field(default_factory=paths.outputs_dir)

    @property
    def local(self) -> bool:
        """Local mode: the person at this machine. Shared mode hides paths, tokens and deletion."""
        return not self.share


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth takes USER:PASSWORD")
    return user, password


def generated_auth() -> tuple[str, str]:
    return "fluxstudio", secrets.token_urlsafe(18)


def blocked_paths() -> list[str]:
    """Never served, whatever else is allowed: the Hub token and cache, the app's settings, SSH keys."""
    home = Path.home()
    hf_home = Path(os.environ.get("HF_HOME") or home / ".cache" / "huggingface")
    blocked = [hf_home, hf_home / "token", home / ".ssh", paths.home() / "settings.json", paths.logs_dir()]
    try:
        from huggingface_hub import constants

        blocked += [Path(constants.HF_TOKEN_PATH), Path(constants.HF_HUB_CACHE), Path(constants.HF_HOME)]
    except ImportError:
        pass
    return sorted({str(p.expanduser().resolve()) for p in blocked})
