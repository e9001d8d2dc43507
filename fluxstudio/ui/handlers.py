"""Turning core results and errors into what the page shows: one sentence, never a traceback or a local path."""

from __future__ import annotations

import logging

from fluxstudio.errors import FluxStudioError

log = logging.getLogger("fluxstudio.ui")


def user_message(exc: BaseException, shared: bool) -> str:
    """One sentence and its hint. A shared session sees each local path the error names cut to its last part:
    the error carries those paths, so repo ids, URLs and numbers stay as they are."""
    if isinstance(exc, FluxStudioError):
        return exc.without_paths() if shared else str(exc)
    log.exception("unexpected error in the app", exc_info=exc)
    return f"Something unexpected went wrong ({type(exc).__name__}). Details are in the log."


def error_html(text: str) -> str:
    return f'<div class="fs-error" role="alert">⚠ {_escape(text)}</div>'


def ok_html(text: str) -> str:
    return f'<div class="fs-ok">{_escape(text)}</div>'


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
