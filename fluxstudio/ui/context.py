"""What every panel needs: the launch settings and the front door. No gradio here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxstudio.studio import Studio
from fluxstudio.ui.settings import Settings


@dataclass
class Context:
    settings: Settings
    studio: Studio = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.studio is None:
            self.studio = Studio(self.settings.output_dir, local=self.settings.local)

    @property
    def web_dir(self) -> Path:
        """Where the web server keeps what it receives and serves (this process's own folder)."""
        return self.studio.scratch() / "web"
