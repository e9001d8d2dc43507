"""Turning core results and errors into what the page shows: one sentence, never a traceback or a local path."""

from __future__ import annotations

import logging
import re

from fluxstudio.errors import FluxStudioError

log = logging.getLogger("fluxstudio.ui")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][^\s\\/:,;'\"()]+)+[\\/]?")


def scrub(text: str) -> str:
    """Replace absolute paths by their last part (shared sessions must not learn the host's layout)."""
    return _PATH.sub(lambda m: m.group(0).rstrip("\\/").replace("\\", "/").rsplit("/", 1)[-1], text)


def user_message(exc: BaseException, shared: bool) -> str:
    if isinstance(exc, FluxStudioError):
        text = f"{exc.message} {exc.hint}".strip()
    else:
        log.exception("unexpected error in the app", exc_info=exc)
        text = f"Something unexpected went wrong ({type(exc).__name__}). Details are in the log."
    return scrub(text) if shared else text


def error_html(text: str) -> str:
    return f'<div class="fs-error" role="alert">⚠ {_escape(text)}</div>'


def ok_html(text: str) -> str:
    return f'<div class="fs-ok">{_escape(text)}</div>'


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
