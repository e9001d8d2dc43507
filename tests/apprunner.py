"""Start the real app (python app.py ...) in a subprocess for HTTP and browser tests."""

from __future__ import annotations

import http.cookiejar
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """The app on a free port. The port is free when chosen but could be taken before the app binds it: a start
    that fails for that reason is retried on another port."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None) -> None:
        self.home = Path((env or {}).get("FLUXSTUDIO_HOME", tmp / "fshome"))
        self.outputs = tmp / "outputs"
        self.log = tmp / "app.log"
        self.env = {
            **os.environ,
            "FLUXSTUDIO_HOME": str(self.home),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            **(env or {}),
        }
        for _attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [
                sys.executable,
                str(ROOT / "app.py"),
                "--port",
                str(self.port),
                "--output-dir",
                str(self.outputs),
                *args,
            ]
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT
            )
            if self._wait_until_up():
                return
            text = self.output()
            if "address already in use" not in text.lower() and "empty port" not in text.lower():
                break
        self.stop()
        raise RuntimeError(f"app did not answer:\n{self.output()}")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return True
            except urllib.error.HTTPError:
                return True  # answering (a login page or an error status)
            except OSError:
                time.sleep(0.5)
        return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 60) -> str:
        """The log once it contains `text` (the server answers before start-up messages are all printed)."""
        deadline = time.monotonic() + timeout
        while text not in self.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def get(url: str, opener=None, data: bytes | None = None, method: str | None = None, headers: dict | None = None):
    """(status, body) of one request; an HTTP error is a status like any other."""
    opener = opener or urllib.request.build_opener()
    try:
        with opener.open(urllib.request.Request(url, data=data, method=method, headers=headers or {}), timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def login(url: str, user: str, password: str):
    """(status, an opener that carries the session cookie) after Gradio's login form."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    status, _ = get(f"{url}/login", opener, urllib.parse.urlencode({"username": user, "password": password}).encode())
    return status, opener
