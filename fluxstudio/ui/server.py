"""Two guards in front of the web server, as ASGI middleware: they act before Gradio's own routes run.

- `LoginGuard`: with a login (a shared session), every route but the login page and its static files needs it.
  Gradio leaves some of its own routes open (cancel, reset, heartbeat, streams, user and token, startup events), and
  a route a later Gradio adds would be open too; this closes them all, whatever their name.
- `UploadGuard`: Gradio writes an upload to its temporary folder before any handler of ours sees it, and a write that
  fails there (a full disk) leaves its partial file behind. So, on the upload route: a size limit from the request's
  Content-Length, a free-disk check against it, one upload at a time, and the temporary files an upload left
  removed as soon as it returns (one at a time, so that nothing another upload is writing is touched).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

from starlette.requests import HTTPConnection

from fluxstudio.studio import free_bytes, human_bytes

MARGIN = 64 << 20  # what the disk keeps free beside an upload
# What the login page itself needs before anyone has logged in, and the call Gradio's launch makes to itself (it
# runs the app's start-up events once, and answers true or false)
PUBLIC = {
    "/",
    "/login",
    "/login/",
    "/logout",
    "/favicon.ico",
    "/manifest.json",
    "/robots.txt",
    "/theme.css",
    "/gradio_api/theme.css",
    "/gradio_api/startup-events",
}
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")


def public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


class LoginGuard:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and not public(scope["path"]) and not _logged_in(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _refuse(send, 401, "Log in first.")
        return await self.app(scope, receive, send)


def _logged_in(scope) -> bool:
    """Whether the request carries the session cookie Gradio's login set (the server app keeps the tokens)."""
    server = scope.get("app")
    tokens, cookie_id = getattr(server, "tokens", None), getattr(server, "cookie_id", None)
    if not isinstance(tokens, dict) or cookie_id is None:
        return False  # not the Gradio app we know: refuse rather than guess
    cookies = HTTPConnection(scope).cookies
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
    return token is not None and token in tokens


class UploadGuard:
    def __init__(self, app, folder: Path, limit: int, free: Callable[[Path], int] = free_bytes) -> None:
        self.app, self.folder, self.limit, self.free = app, folder, limit, free
        self._one_at_a_time = asyncio.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        length = next((int(v) for k, v in scope["headers"] if k == b"content-length" and v.isdigit()), None)
        if length is None:
            return await _refuse(send, 411, "An upload needs its size (Content-Length).")
        if length > self.limit:
            return await _refuse(
                send,
                413,
                f"This file is {human_bytes(length)}; uploads are limited to "
                f"{human_bytes(self.limit)} (a LoRA is a few hundred MB at most).",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.free(self.folder) < length + MARGIN:
            return await _refuse(
                send,
                507,
                f"Not enough free disk for this {human_bytes(length)} upload: "
                f"{human_bytes(self.free(self.folder))} free. Free some space and try again.",
            )
        async with self._one_at_a_time:
            before = set(self.folder.iterdir())
            try:
                await self.app(scope, receive, send)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return await _refuse(send, 507, "The disk ran full during the upload. Free some space and try again.")
            finally:
                self._remove_new(before)

    def _remove_new(self, before: set[Path]) -> None:
        """Gradio writes an upload to a temporary file in the folder itself, then renames it into a subfolder (its
        background copy, where a rename fails, is done when the request returns): any new file left in the folder
        after the request is a failed upload's, or an empty spare the browser's upload made."""
        for p in set(self.folder.iterdir()) - before:
            if p.is_file():
                p.unlink(missing_ok=True)


async def _refuse(send, status: int, text: str) -> None:
    body = text.encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
