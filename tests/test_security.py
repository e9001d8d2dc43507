"""What a hostile visitor of a shared link and a busy machine must not break: the bind, the routes, uploads, numbers,
output names, headers, and what messages give away."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from apprunner import ROOT, App, free_port, get, login
from fakehub import FakeHub
from helpers import FLUX1_TINY, linear_shapes, peft_lora, write_model
from safetensors.torch import save_file

from fluxstudio.cli import main as cli
from fluxstudio.engine import partials
from fluxstudio.engine.safefile import MAX_HEADER, read_header
from fluxstudio.errors import BadInputError, HubError, OutputError
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.studio import Studio
from fluxstudio.ui.handlers import user_message

CANARY = "hf_CANARY0123456789abcdefghijklmnopqrst"


# -- the bind and the routes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bind_beyond_loopback_is_a_shared_session_with_a_login(tmp_path):
    app = App(tmp_path, "--host", "0.0.0.0", env={"HF_TOKEN": CANARY})
    try:
        text = app.wait_for_output("Password:")
        m = re.search(
            r"Serving on 0\.0\.0\.0 \(reachable from other machines\) needs a login\. User: (\S+)  Password: (\S+)",
            text,
        )
        assert m, text
        assert get(app.url + "/config")[0] == 401
        assert get(app.url + "/gradio_api/info")[0] == 401
        status, opener = login(app.url, m[1], m[2])
        assert status == 200
        status, config = get(app.url + "/config", opener)
        assert status == 200
        for local_only in (
            "hf-token",
            "library-delete",
            "local folder",
            "local .safetensors",
            str(app.outputs),
            CANARY,
        ):
            assert local_only not in config
        endpoints = get(app.url + "/gradio_api/info", opener)[1]
        assert "remove" not in json.loads(endpoints)["named_endpoints"]  # no Delete endpoint to call
    finally:
        app.stop()


def _walk(routes, prefix=""):
    for r in routes:
        if hasattr(r, "path"):
            yield (
                (r.path if r.path.startswith(prefix) else prefix + r.path),
                sorted(getattr(r, "methods", None) or ["GET"]),
            )
        else:  # an included router (Gradio's /gradio_api)
            yield from _walk(r.original_router.routes, r.original_router.prefix or prefix)


def test_every_route_but_the_login_page_needs_the_login(tmp_path, monkeypatch):
    """List the running app's routes and call each without a login: only the login page and its static files answer."""
    from fluxstudio.ui.app import launch
    from fluxstudio.ui.server import public
    from fluxstudio.ui.settings import Settings

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # launch sets it; restored afterwards
    port = free_port()
    blocks = launch(Settings(host="0.0.0.0", port=port, auth=("alice", "pw-123456"), output_dir=tmp_path / "outputs"))
    try:
        routes = list(_walk(blocks.server_app.routes))
        assert len(routes) > 40 and not [p for p, _ in routes if "run-history" in p or p == "/openapi.json"]
        open_routes = []
        for path, methods in routes:
            url = f"http://127.0.0.1:{port}" + re.sub(r"\{[^}]+\}", "x", path)
            for method in methods:
                if method == "HEAD":
                    continue
                status, _ = get(
                    url,
                    method=method,
                    data=b"{}" if method == "POST" else None,
                    headers={"Content-Type": "application/json"},
                )
                if status not in (401, 403) and not public(path):
                    open_routes.append((method, path, status))
        assert open_routes == []
        assert sorted({p for p, _ in routes if public(p)}) == [
            "/",
            "/assets/{path:path}",
            "/favicon.ico",
            "/gradio_api/startup-events",
            "/gradio_api/theme.css",
            "/login",
            "/login/",
            "/logout",
            "/manifest.json",
            "/pwa_icon",
            "/pwa_icon/{size}",
            "/robots.txt",
            "/static/{path:path}",
            "/svelte/{path:path}",
            "/theme.css",
        ]
    finally:
        blocks.close()


@pytest.mark.slow
def test_run_history_is_off_and_never_spends_the_owners_token(tmp_path):
    hub = FakeHub().start()
    app = App(tmp_path, "--share", "--auth", "alice:s3cret-pass", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": CANARY})
    try:
        body = json.dumps({"bucket_id": "attacker/bucket"}).encode()
        headers = {"Content-Type": "application/json"}
        assert get(app.url + "/gradio_api/run-history/connect", data=body, headers=headers)[0] == 401
        _, opener = login(app.url, "alice", "s3cret-pass")
        assert get(app.url + "/gradio_api/run-history/connect", opener, data=body, headers=headers)[0] in (404, 405)
        assert get(app.url + "/gradio_api/runs", opener)[0] == 404
        assert hub.requests == []  # nothing ever asked the Hub to make a bucket with the owner's token
    finally:
        app.stop()
        hub.stop()


CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(
    not CPUINFO.exists() or "avx512_bf16" not in CPUINFO.read_text(),
    reason="bitsandbytes asks the Hub for a kernel only on CPUs with AVX512-BF16",
)
def test_importing_the_model_libraries_asks_the_hub_nothing():
    """bitsandbytes (imported by peft and diffusers) would fetch a kernel from the Hub with the user's token."""
    hub = FakeHub().start()
    code = "import fluxstudio, diffusers, peft, bitsandbytes; from diffusers import FluxTransformer2DModel"
    try:
        env = os.environ | {"HF_ENDPOINT": hub.url, "HF_TOKEN": CANARY}
        done = subprocess.run(
            [sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert hub.requests == [] and "kernels" not in done.stderr
    finally:
        hub.stop()


@pytest.mark.slow
def test_orphans_of_a_killed_app_are_reclaimed_at_start(tmp_path):
    dead = tmp_path / "fshome" / "sessions" / "0badf00d0bad"
    (dead / "web").mkdir(parents=True)
    (dead / "uploads").mkdir()
    (dead / partials.OWNER).write_text("999999 12.0")  # no such process
    (dead / "web" / "tmpk1ll3d").write_bytes(b"\0" * 2_000_000)  # a web-server upload cut off by the kill
    (dead / "uploads" / ".9f8e.part").write_bytes(b"\0" * 1_000_000)
    app = App(tmp_path)
    try:
        assert "Reclaimed 3.0 MB left by interrupted builds, downloads and uploads." in app.wait_for_output("Reclaimed")
        assert not dead.exists()
        (mine,) = (tmp_path / "fshome" / "sessions").iterdir()  # the running app's own folder
        assert partials.owned(mine)
    finally:
        app.stop()
    assert not mine.exists()  # removed when the app exits


# -- uploads --------------------------------------------------------------------------------------------------


def _not_a_lora(path: Path) -> Path:
    save_file({"something.else": torch.zeros(64, 64)}, str(path))  # a valid safetensors file, but no LoRA
    return path


def test_a_rejected_upload_leaves_nothing_behind(tmp_path, isolated_home):
    studio = Studio(tmp_path / "outputs")
    web = studio.scratch() / "web" / "0a1b2c"  # as the web server keeps an upload: its own folder
    for bad in (b"not a safetensors file" * 100, None):
        web.mkdir(parents=True, exist_ok=True)
        upload = web / "rejected.safetensors"
        if bad is None:
            _not_a_lora(upload)
        else:
            upload.write_bytes(bad)
        with pytest.raises(BadInputError):
            studio.add_upload(str(upload), "demo", "flux1")
        assert [p for p in isolated_home.rglob("*") if p.is_file() and p.name != partials.OWNER] == []
    lora = web / "good.safetensors"
    web.mkdir()
    peft_lora(lora, linear_shapes(write_model(tmp_path / "tiny", FLUX1_TINY)))
    kept, info = Studio(tmp_path / "outputs").add_upload(str(lora), str(tmp_path / "tiny"), "flux1")
    assert kept.parent.name == "uploads" and kept.name.endswith("-good.safetensors") and "matched" in info
    assert not lora.exists() and not web.exists()  # moved, not copied: one copy on disk


def test_a_shared_session_has_an_upload_quota(tmp_path, isolated_home):
    studio = Studio(tmp_path / "outputs", local=False)
    upload = _not_a_lora(tmp_path / "x.safetensors")
    with pytest.raises(BadInputError, match="uploaded 4.0 GB already"):
        studio.add_upload(str(upload), "demo", "flux1", kept_bytes=4 * 10**9)
    assert not upload.exists()


def _guard_app(tmp_path, free, downstream=None):
    from fluxstudio.ui.server import UploadGuard

    async def gradio_like(scope, receive, send):  # writes its temporary file, then the disk fills
        (tmp_path / "tmpab12cd").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    return UploadGuard(downstream or gradio_like, tmp_path, limit=10**9, free=free)


def _call(app, length: int) -> tuple[int, str]:
    import asyncio

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/gradio_api/upload",
        "headers": [(b"content-length", str(length).encode())],
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], sent[1]["body"].decode()


def test_upload_guard_refuses_what_the_disk_cannot_hold_and_cleans_a_write_that_ran_out(tmp_path):
    status, text = _call(_guard_app(tmp_path, free=lambda p: 100 << 20), 80 << 20)
    assert status == 507 and text.startswith("Not enough free disk for this 83.9 MB upload")
    assert list(tmp_path.iterdir()) == []
    status, text = _call(_guard_app(tmp_path, free=lambda p: 10**12), 3 * 10**9)
    assert status == 413 and "uploads are limited to 1.0 GB" in text
    status, text = _call(_guard_app(tmp_path, free=lambda p: 10**12), 1000)  # the disk fills while it writes
    assert status == 507 and text == "The disk ran full during the upload. Free some space and try again."
    assert list(tmp_path.iterdir()) == []


# -- numbers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e38])
def test_a_lora_scale_that_is_not_a_usable_number_is_refused(scale):
    with pytest.raises(BadInputError, match="The LoRA scale .* is not a usable number"):
        LoraRef("demo", scale)
    with pytest.raises(BadInputError, match="is not a usable number"):
        Studio().request("demo", [("demo", scale)], "diffusers", "bf16", "x")


def test_the_cli_refuses_a_nan_scale_with_one_sentence(tmp_path, capsys):
    code = cli(["fuse", "--base", "demo", "--lora", "demo", "--lora-scale", "nan", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "Error: The LoRA scale nan is not a usable number." in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_manifests_are_strict_json(tmp_path):
    from fluxstudio.engine import manifest

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))

    out = tmp_path / "demo-bf16"
    build(BuildRequest("demo", (LoraRef("demo", -0.5),), "bf16", out))
    assert strict((out / "fluxstudio.json").read_text())["loras"][0]["scale"] == -0.5
    one = tmp_path / "demo.gguf"
    build(BuildRequest("demo", (LoraRef("demo", 1.0),), "Q8_0", one, format="gguf"))
    assert strict(json.dumps(manifest.read(one)))["lora_retained"] > 0.9
    with pytest.raises(ValueError):
        manifest.dumps({"scale": math.nan})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("seed", math.nan, "The seed nan does not work"),
        ("seed", 1e300, "does not work"),
        ("seed", -1, "from 0 to"),
        ("steps", math.nan, "number of steps"),
        ("steps", 10**9, "from 0 to 100"),
        ("size", math.inf, "image size"),
        ("size", 4096, "from 0 to 2048"),
        ("seed", "abc", "The seed 'abc' does not work"),
    ],
)
def test_preview_numbers_are_checked_in_the_core(tmp_path, field, value, match):
    from fluxstudio.flows import preview

    args = {"seed": 0, "steps": 0, "size": 0} | {field: value}
    with pytest.raises(BadInputError, match=match):
        preview.make_request(BuildRequest("demo", (), "bf16", tmp_path / "x"), tmp_path / "x", "", **args)


def test_a_shared_session_has_lower_preview_limits(tmp_path):
    from fluxstudio.flows import preview

    req = BuildRequest("demo", (), "bf16", tmp_path / "x")
    assert preview.make_request(req, tmp_path / "x", "", 0, 100, 2048).steps == 100
    with pytest.raises(BadInputError, match="from 0 to 50"):
        preview.make_request(req, tmp_path / "x", "", 0, 100, 0, shared=True)
    with pytest.raises(BadInputError, match="from 0 to 1024"):
        preview.make_request(req, tmp_path / "x", "", 0, 0, 2048, shared=True)
    stop = preview.Stop(None, 0.05)
    stop()
    time.sleep(0.1)
    with pytest.raises(BadInputError, match="ran past the"):
        stop()


# -- one owner per output name -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_name_another_build_holds_is_refused_and_nothing_is_written(tmp_path, tiny_base):
    out = tmp_path / "outputs" / "race"
    out.parent.mkdir()
    with partials.claim(out):  # as another process's build holds it
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fluxstudio",
                "fuse",
                "--base",
                str(tiny_base),
                "--precision",
                "bf16",
                "--out",
                str(out),
                "--quiet",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 3, proc.stderr
        assert f"Error: Another build is writing race right now (process {os.getpid()})." in proc.stderr
        assert [p.name for p in out.parent.iterdir()] == [".race.lock"]
    assert list(out.parent.iterdir()) == []  # the lock goes with its holder
    build(BuildRequest(str(tiny_base), (), "bf16", out))
    assert (out / "fluxstudio.json").exists()


@pytest.mark.slow
def test_two_processes_building_one_name_one_wins_and_keeps_its_folder(tmp_path, tiny_base):
    lora = peft_lora(tmp_path / "l.safetensors", linear_shapes(tiny_base))
    out = tmp_path / "outputs" / "race"
    cmd = [
        sys.executable,
        "-m",
        "fluxstudio",
        "fuse",
        "--base",
        str(tiny_base),
        "--lora",
        str(lora),
        "--precision",
        "bf16",
        "--out",
        str(out),
        "--quiet",
        "--lora-scale",
    ]
    procs = [
        subprocess.Popen(cmd + [s], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in ("0.25", "0.75")
    ]
    results = [(p.wait(300), p.stderr.read(), s) for p, s in zip(procs, ("0.25", "0.75"), strict=False)]
    winners = [r for r in results if r[0] == 0]
    losers = [r for r in results if r[0] != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0][0] == 3 and re.search(r"Another build is writing race right now|race already exists", losers[0][1])
    saved = json.loads((out / "fluxstudio.json").read_text())
    assert saved["loras"][0]["scale"] == float(winners[0][2])
    assert sorted(p.name for p in out.parent.iterdir()) == ["race"]


def test_move_into_place_needs_the_claim_of_the_name(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    with partials.claim(tmp_path / "mine") as held, pytest.raises(OutputError, match="is not this build's to write"):
        partials.move_into_place(src, tmp_path / "theirs", held)
    assert src.exists() and not (tmp_path / "theirs").exists()


def test_a_dangling_symlink_as_output_name_writes_nothing_outside(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    target = tmp_path / "elsewhere" / "dangling"
    (outputs / "dangling").symlink_to(target)
    for fmt, precision in (("diffusers", "bf16"), ("gguf", "Q8_0")):
        name = "dangling" + (".gguf" if fmt == "gguf" else "")
        if fmt == "gguf":
            (outputs / name).symlink_to(target)
        with pytest.raises(OutputError, match="is a symbolic link"):
            build(Studio(outputs).request("demo", [], fmt, precision, "dangling"))
    assert not target.parent.exists()


def test_a_read_only_output_folder_is_one_sentence(tmp_path):
    if os.geteuid() == 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1g", "tmpfs", str(folder)], check=False, capture_output=True
        )
        if not os.path.ismount(folder):
            pytest.skip("root ignores permissions and no read-only mount is possible here")
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputError, match="FluxStudio may not write in"):
            build(BuildRequest("demo", (), "bf16", folder / "out"))
    finally:
        if os.path.ismount(folder):
            subprocess.run(["umount", "-l", str(folder)], check=False)


# -- headers ------------------------------------------------------------------------------------------------


def _file_with_header(path: Path, header: bytes) -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    return path


def _bounded(fn, seconds=2.0, mb=200):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(BadInputError) as info:
            fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < seconds and peak < mb << 20, (time.perf_counter() - t0, peak)
    return str(info.value)


def test_a_deeply_nested_header_is_one_sentence(tmp_path):
    deep = _file_with_header(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert "nests too deeply" in _bounded(lambda: read_header(deep))


def test_a_huge_header_is_refused_without_reading_it(tmp_path):
    huge = tmp_path / "huge.safetensors"
    with huge.open("wb") as f:
        f.write((85 << 20).to_bytes(8, "little") + b"{")
        f.truncate((85 << 20) + 100)  # sparse: no 85 MB written
    assert "far more than any model's" in _bounded(lambda: read_header(huge), seconds=0.5, mb=5)


def test_a_header_with_a_million_entries_is_refused_in_bounded_time(tmp_path):
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    body = ("{" + ",".join(entry.format(i) for i in range(200_000)) + "}").encode()
    assert len(body) < MAX_HEADER
    many = _file_with_header(tmp_path / "many.safetensors", body)
    assert "more than any model has" in _bounded(lambda: read_header(many), seconds=5, mb=400)


def test_mutated_headers_give_one_sentence_or_a_valid_header(tmp_path):
    """A fuzz of a real LoRA's header: each mutation is refused with one sentence (BadInputError) or read, never
    anything else."""
    import random

    good = peft_lora(tmp_path / "good.safetensors", {"x.to_q": (64, 64), "x.to_k": (64, 64)})
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    rng = random.Random(0)
    for i in range(300):
        header = bytearray(raw[8 : 8 + n])
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(header))
            header[at] = rng.choice(b'{}[]":,0123456789-eE.x\\ \x00\xff')
        length = n if i % 3 else rng.choice([0, 1, n - 1, n + 1, 2**63, MAX_HEADER + 1])
        bad = tmp_path / f"m{i}.safetensors"
        bad.write_bytes(length.to_bytes(8, "little", signed=False) if length < 2**64 else b"\xff" * 8)
        with bad.open("ab") as f:
            f.write(bytes(header) + raw[8 + n :])
        try:
            read_header(bad)
        except BadInputError as exc:
            assert "Traceback" not in str(exc) and exc.hint
        bad.unlink()


# -- what messages give away ----------------------------------------------------------------------------------


def test_shared_messages_never_tell_which_paths_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "flux").mkdir(parents=True)
    shared = Studio(tmp_path / "outputs", local=False)

    def said(text):
        try:
            return shared.describe_base(text).text
        except (BadInputError, HubError) as exc:
            return user_message(exc, shared=True)

    for existing, missing in (("./models/flux", "./models/nothing"), ("/etc", "/no-such-dir"), ("~", "~/no-such-dir")):
        assert (
            said(existing)
            == said(missing)
            == "Local paths are not available in a shared session. Use a Hub repo id or upload a file."
        )
    with pytest.raises(BadInputError, match="Local paths are not available"):
        shared.resolve_lora(str(tmp_path / "models"))
    assert shared.ref("models/flux").kind == "hub"  # a relative name is a repo id in a shared session, existing or not


def test_a_hub_reference_that_steps_out_of_its_repo_is_one_sentence():
    from fluxstudio.sources.refs import parse_ref

    for text in (
        "acme/lora/../../etc/passwd",
        "acme/../x",
        "acme/lora@../main/a.safetensors",
        "acme/lora/./a",
        "https://huggingface.co/acme/lora/resolve/main/../x.safetensors",
        "acme--x/lora",
    ):
        with pytest.raises(BadInputError, match="is not a valid Hub reference|is not a Hub repo id"):
            parse_ref(text, local=False)
    assert parse_ref("acme/lora@v1.0/sub/a.safetensors").subpath == "sub/a.safetensors"


def test_the_offline_hint_names_the_cache_only_to_the_owner():
    exc = HubError(
        "Cannot reach the Hugging Face Hub. acme/x is not in the local cache.",
        "Check the connection.",
        detail="Already downloaded: owner/private-model.",
    )
    assert "owner/private-model" in user_message(exc, shared=False)
    assert "owner/private-model" not in user_message(exc, shared=True)


def test_local_mode_still_reads_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_model(tmp_path / "models" / "tiny", FLUX1_TINY)
    assert Studio(tmp_path / "outputs").ref("models/tiny").kind == "local"
    assert "local folder" in Studio(tmp_path / "outputs").describe_base("models/tiny").text
