"""The app over HTTP: binding, shared-mode security, secrets, and the core/UI boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from apprunner import ROOT, App, get
from apprunner import login as login_at

CANARY = "hf_CANARY0123456789abcdefghijklmnopqrst"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shared")
    home = tmp / "userhome"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE-KEY-CANARY")
    hf = tmp / "hf"
    hf.mkdir()
    (hf / "token").write_text(CANARY)
    app = App(
        tmp, "--share", "--auth", "alice:s3cret-pass", env={"HOME": str(home), "HF_HOME": str(hf), "HF_TOKEN": CANARY}
    )
    yield app, home, hf
    app.stop()


def login(app, user="alice", password="s3cret-pass"):
    return login_at(app.url, user, password)


@pytest.mark.slow
def test_binds_localhost_only_by_default_and_reclaims_what_killed_builds_left(tmp_path):
    stale = tmp_path / "outputs" / ".killed-run.partial-0badf00d"  # as a SIGKILLed build leaves it: no live owner
    stale.mkdir(parents=True)
    (stale / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 3_000_000)
    orphan = (
        tmp_path / "hf" / "hub" / "models--acme--x" / "blobs" / ("a" * 64 + ".0badf00d.incomplete")
    )  # a killed download's
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"\0" * 1_000_000)
    app = App(tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    try:
        assert "Running on local URL:  http://127.0.0.1:" in app.wait_for_output("--share")
        assert "start FluxStudio with --share" in app.output() and "share=True" not in app.output()  # our flags
        assert "Reclaimed 4.0 MB left by interrupted builds, downloads and uploads." in app.output()
        assert not stale.exists() and not orphan.exists()
        import psutil

        addrs = {c.laddr.ip for c in psutil.Process(app.proc.pid).net_connections() if c.status == "LISTEN"}
        assert addrs == {"127.0.0.1"}
    finally:
        app.stop()


@pytest.mark.slow
def test_shared_without_tunnel_keeps_working_locally(shared):
    app, _, _ = shared
    assert "Could not create a public share link" in app.wait_for_output("Could not create a public share link")
    assert get(app.url)[0] == 200  # the login page answers


@pytest.mark.slow
def test_shared_requires_login(shared):
    app, _home, hf = shared
    _status, page = get(app.url)
    assert "Fuse &amp; save" not in page and "Fuse & save" not in page
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={hf / 'token'}", "/gradio_api/file=/etc/passwd"):
        assert get(app.url + path)[0] in (401, 403), path
    assert login(app, password="wrong")[0] in (400, 401)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        "{hf}/token",
        "{hf}",
        "{home}/.ssh/id_ed25519",
        "/etc/passwd",
        "../../../../etc/passwd",
        "%2Fetc%2Fpasswd",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "{home}/.ssh/../.ssh/id_ed25519",
    ],
)
def test_file_route_refuses_secrets_and_traversal(shared, target):
    app, home, hf = shared
    status, opener = login(app)
    assert status == 200
    path = target.format(hf=hf, home=home)
    for prefix in ("/gradio_api/file=", "/file="):
        code, body = get(app.url + prefix + path, opener)
        assert code in (400, 403, 404), (prefix + path, code)
        assert CANARY not in body and "PRIVATE-KEY-CANARY" not in body and "root:x:" not in body


@pytest.mark.slow
def test_shared_page_has_no_paths_no_token_entry_no_delete(shared):
    app, home, _hf = shared
    _, opener = login(app)
    status, config = get(f"{app.url}/config", opener)
    assert status == 200
    assert "hf-token" not in config and "library-delete" not in config and "Save token" not in config
    assert "local folder" not in config and "local .safetensors" not in config
    assert str(app.outputs) not in config and str(home) not in config and str(app.home) not in config
    assert CANARY not in config
    assert "Delete" not in json.dumps([c.get("props", {}).get("value") for c in json.loads(config)["components"]])


@pytest.mark.slow
def test_token_canary_never_reaches_the_page_or_logs(shared):
    app, _, _ = shared
    _, opener = login(app)
    for path in ("/", "/config", "/gradio_api/info"):
        assert CANARY not in get(app.url + path, opener)[1]
    assert CANARY not in app.output()
    assert not any(CANARY in p.read_text(errors="replace") for p in app.home.rglob("*") if p.is_file())


@pytest.mark.slow
def test_local_mode_offers_token_entry_but_never_prefills_it(tmp_path):
    app = App(tmp_path, env={"HF_TOKEN": CANARY})
    try:
        status, config = get(f"{app.url}/config")
        assert status == 200 and "hf-token" in config and CANARY not in config
        token_box = next(c for c in json.loads(config)["components"] if c.get("props", {}).get("elem_id") == "hf-token")
        assert token_box["props"]["value"] == "" and token_box["props"]["type"] == "password"
    finally:
        app.stop()


def test_core_never_imports_gradio():
    code = (
        "import importlib, pkgutil, sys, fluxstudio\n"
        "for m in pkgutil.walk_packages(fluxstudio.__path__, 'fluxstudio.'):\n"
        "    if not m.name.startswith(('fluxstudio.ui', 'fluxstudio.__main__')): importlib.import_module(m.name)\n"
        "assert 'gradio' not in sys.modules, 'gradio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    core = [p for p in (ROOT / "fluxstudio").rglob("*.py") if "ui" not in p.relative_to(ROOT / "fluxstudio").parts]
    assert len(core) > 30 and [p.name for p in core if "import gradio" in p.read_text()] == []


def test_shared_messages_drop_only_local_paths(tmp_path):
    """A shared session hides exactly the paths an error names: repo ids, URLs and numbers stay intact."""
    from fluxstudio.engine.models import open_base
    from fluxstudio.errors import FluxStudioError
    from fluxstudio.sources.hub import hub_error
    from fluxstudio.ui.handlers import user_message

    class NotFound(Exception):
        response = type("R", (), {"status_code": 404})()

    repo = user_message(hub_error(NotFound(), "acme/nothing-here"), shared=True)
    assert (
        repo
        == "The repository acme/nothing-here was not found. Check the name; a private repo needs a token with access."
    )
    from huggingface_hub.errors import GatedRepoError

    gated_exc = GatedRepoError.__new__(GatedRepoError)  # as the client raises it, minus the HTTP response
    Exception.__init__(gated_exc, "gated")
    gated = user_message(hub_error(gated_exc, "acme/gated-1.0"), shared=True)
    assert "https://huggingface.co/acme/gated-1.0" in gated and "acme/gated-1.0 is gated" in gated

    missing = tmp_path / "models" / "flux-dev"
    with pytest.raises(FluxStudioError) as err:
        open_base(missing)
    assert str(tmp_path) in user_message(err.value, shared=False)
    shared = user_message(err.value, shared=True)
    assert shared == "The base model folder flux-dev does not exist. Check the path." and str(tmp_path) not in shared

    win = "C:\\Users\\Zoë Müller\\FluxStudio\\outputs"
    exc = FluxStudioError(
        f"Not enough free disk: 3/4 done, 12.5 GB needed and {win} has 1.2 GB free.",
        "See https://huggingface.co/docs or acme/flux-lora.",
        (win,),
    )
    assert user_message(exc, shared=True) == (
        "Not enough free disk: 3/4 done, 12.5 GB needed and outputs has 1.2 GB free. "
        "See https://huggingface.co/docs or acme/flux-lora."
    )
