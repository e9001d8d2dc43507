"""A small local stand-in for the Hugging Face Hub, driven by the real huggingface_hub client via HF_ENDPOINT.

It answers what the client asks (FACTS §6): model info with file sizes, HEAD/GET on resolve URLs with the Hub's
headers, byte ranges, whoami; and injects faults per file: HTTP errors with the Hub's X-Error-Code, a connection
dropped mid-file, a body shorter than announced, and throttling. A repo added with `xet=True` serves its LFS files as
the Hub serves Xet-backed ones: the resolve URL answers with X-Xet-Hash and a redirect to another host (here
`localhost`) that streams the bytes with ranges and refuses a request that carries the token, like a signed CDN URL.
Each request records the bytes of file data it was sent (`sent`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 1000  # larger files are served like LFS files (X-Linked-Etag / X-Linked-Size)


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    xet: bool = False


def folder_files(folder: Path) -> dict[str, bytes]:
    """A local folder as a repo's files: {path in the repo: bytes}."""
    return {str(p.relative_to(folder)).replace(os.sep, "/"): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def git_blob_id(data: bytes) -> str:
    """A file's git blob id: what the Hub gives as a regular file's ETag and blobId."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, valid_tokens: tuple[str, ...] = ()) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, dict] = {}  # file path (or "*") -> fault
        self.requests: list[dict] = []
        self.valid_tokens = set(valid_tokens)
        self.granted: dict[str, set[str]] = {}  # gated repo -> tokens with access
        self._server: ThreadingHTTPServer | None = None

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], gated: bool = False, grant: tuple[str, ...] = (), xet: bool = False
    ) -> str:
        sha = hashlib.sha1(repo_id.encode() + b"".join(k.encode() + files[k] for k in sorted(files))).hexdigest()
        self.repos[repo_id] = Repo(dict(files), sha, {"main": sha}, gated, xet)
        self.granted[repo_id] = set(grant)
        return sha

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def file_gets(self) -> list[dict]:
        return [
            r
            for r in self.requests
            if r["method"] == "GET" and ("/resolve/" in r["path"] or "/xet-bridge/" in r["path"])
        ]

    def bytes_sent(self) -> int:
        return sum(r["sent"] for r in self.requests)

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # -- request handling -------------------------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str | None, message: str, head: bool) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head)

    def _token(self, h) -> str | None:
        auth = h.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _handle(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        token = self._token(h)
        record = {
            "method": "HEAD" if head else "GET",
            "path": path,
            "range": h.headers.get("Range"),
            "auth": token is not None,
            "sent": 0,
        }
        self.requests.append(record)
        if token is not None and self.valid_tokens and token not in self.valid_tokens:
            return self._error(h, 401, None, "Invalid credentials in Authorization header", head)
        if path == "/api/whoami-v2":
            if token is None:
                return self._error(h, 401, None, "Unauthorized", head)
            return self._send(
                h,
                200,
                json.dumps({"type": "user", "name": "tester", "auth": {}}).encode(),
                {"Content-Type": "application/json"},
                head,
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
        if m:
            return self._info(h, m.group(1), m.group(2) or "main", head)
        m = re.fullmatch(r"/(xet-bridge/)?([^/]+/[^/]+)/(?:resolve/)?([^/]+)/(.+)", path)
        if m:
            return self._file(h, m.group(2), m.group(3), m.group(4), token, head, record, bridge=bool(m.group(1)))
        return self._error(h, 404, None, "Not found", head)

    def _lookup(self, h, repo_id: str, revision: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found", head)
            return None
        if revision not in repo.refs and revision != repo.sha:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None
        return repo

    def _info(self, h, repo_id: str, revision: str, head: bool) -> None:
        fault = self.faults.get("api")
        if fault and "status" in fault:
            return self._error(h, fault["status"], fault.get("code"), fault.get("message", "error"), head)
        repo = self._lookup(h, repo_id, revision, head)
        if repo is None:
            return
        siblings = []
        for name, data in sorted(repo.files.items()):
            entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if len(data) > LFS_THRESHOLD:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        body = {
            "_id": repo.sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "siblings": siblings,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "lastModified": "2026-01-01T00:00:00.000Z",
        }
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _file(
        self,
        h,
        repo_id: str,
        revision: str,
        name: str,
        token: str | None,
        head: bool,
        record: dict,
        bridge: bool = False,
    ) -> None:
        fault = self.faults.get(name) or self.faults.get("*") or {}
        if "status" in fault:
            return self._error(h, fault["status"], fault.get("code"), fault.get("message", "error"), head)
        repo = self._lookup(h, repo_id, revision, head)
        if repo is None:
            return
        if repo.gated and token not in self.granted.get(repo_id, set()):
            return self._error(
                h,
                403 if token else 401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                head,
            )
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", head)
        data = repo.files[name]
        lfs = len(data) > LFS_THRESHOLD
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if repo.xet and lfs and not bridge:  # the Hub's answer for a Xet-backed file: go elsewhere for the bytes
            headers.update(
                {
                    "X-Xet-Hash": hashlib.sha256(b"xet" + data).hexdigest(),
                    "X-Xet-Refresh-Route": f"/api/models/{repo_id}/xet-read-token/{repo.sha}",
                    "Location": f"http://localhost:{self._server.server_address[1]}/xet-bridge/{repo_id}/{repo.sha}/{name}",
                    "Content-Length": "0",
                }
            )
            return self._send(h, 302, b"", headers, head)
        if bridge and token is not None:
            return self._error(h, 400, None, "Only one auth mechanism allowed", head)
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if head:
            headers["Content-Length"] = str(len(data))
            return self._send(h, 200, b"", headers, head=True)
        if "short" in fault:  # announce (and send) fewer bytes than the file has
            body = body[: fault["short"]]
        status = 206 if start else 200
        headers["Content-Length"] = str(len(body))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if "cut_at" in fault and fault.get("times", 1) > 0:  # the connection drops at this byte of the file
            if "times" in fault:  # only so many times (else: however often it is retried)
                fault["times"] -= 1
            h.wfile.write(body[: max(0, fault["cut_at"] - start)])
            record["sent"] += max(0, fault["cut_at"] - start)
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        rate = fault.get("throttle")
        step = 64 * 1024
        for i in range(0, len(body), step):
            try:
                h.wfile.write(body[i : i + step])
            except (BrokenPipeError, ConnectionResetError):
                return
            record["sent"] += len(body[i : i + step])
            if rate:
                time.sleep(step / rate)
