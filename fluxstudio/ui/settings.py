"""Launch settings and what they imply for security."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fluxstudio.studio import paths

MAX_UPLOAD = 2 * 10**9  # bytes: LoRAs are megabytes (a Control LoRA about 1.2 GB); anything bigger is not one


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: tuple[str, str] | None = None
    inbrowser: bool = False
    output_dir: Path = field(default_factory=paths.outputs_dir)

    @property
    def exposed(self) -> bool:
        """Whether other machines can reach the page: a public link, or a bind that is not loopback."""
        return self.share or not is_loopback(self.host)

    @property
    def local(self) -> bool:
        """Local mode: only the person at this machine can reach the page. Anything else is a shared session:
        it needs a login and hides paths, tokens and deletion."""
        return not self.exposed


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the page on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an interface address: reachable from elsewhere


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
