"""Hub downloads through the real huggingface_hub client against a local fake Hub (HF_ENDPOINT on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakehub import FakeHub, folder_files
from helpers import FLUX1_TINY, linear_shapes, peft_lora, write_model

from fluxstudio.errors import BadInputError, CancelledError, DiskSpaceError, HubError
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.progress import CancelToken, Run
from fluxstudio.sources.hub import Hub
from fluxstudio.sources.refs import DemoRef, HubRef, LocalRef, parse_ref

ROOT = Path(__file__).resolve().parent.parent
BASE = "acme/flux-tiny"
LORA = "acme/tiny-lora"
CANARY = "hf_CANARY0123456789abcdefghijklmnopqrst"


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("repos")
    root = tmp / "pipe"
    write_model(root / "transformer", FLUX1_TINY)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "model.safetensors").write_bytes(b"not needed" * 100)
    lora = peft_lora(tmp / "lora.safetensors", linear_shapes(root / "transformer"))
    return folder_files(root), lora.read_bytes()


@pytest.fixture
def fake(repo_files):
    base, lora = repo_files
    hub = FakeHub(valid_tokens=(CANARY, "hf_other")).start()
    hub.add_repo(BASE, base)
    hub.add_repo(LORA, {"flux_tiny_lora.safetensors": lora, "README.md": b"# a LoRA"})
    hub.add_repo("acme/gated-flux", base, gated=True, grant=(CANARY,))
    hub.add_repo("acme/many-loras", {"a.safetensors": lora, "b.safetensors": lora})
    hub.add_repo("acme/diffusers-lora", {"a.safetensors": lora, "pytorch_lora_weights.safetensors": lora})
    hub.add_repo("acme/big", {"big.safetensors": os.urandom(24 << 20)})
    yield hub
    hub.stop()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf" / "hub"


def make_hub(fake, cache, **kw):
    return Hub(endpoint=fake.url, cache_dir=str(cache), **kw)


def untrusted_partials(cache: Path) -> list[str]:
    """Files the cache would trust (snapshots) that are incomplete, and leftover .incomplete blobs."""
    return sorted(str(p) for p in cache.rglob("*") if p.name.endswith(".incomplete"))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("demo", DemoRef()),
        ("black-forest-labs/FLUX.1-dev", HubRef("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev")),
        ("acme/x@v1.0", HubRef("acme/x@v1.0", "acme/x", "v1.0")),
        (
            "acme/x@abc/sub/file.safetensors",
            HubRef("acme/x@abc/sub/file.safetensors", "acme/x", "abc", "sub/file.safetensors"),
        ),
        (
            "https://huggingface.co/acme/x/blob/main/lora.safetensors",
            HubRef("https://huggingface.co/acme/x/blob/main/lora.safetensors", "acme/x", "main", "lora.safetensors"),
        ),
        (
            "https://huggingface.co/acme/x/resolve/dev/a/b.safetensors",
            HubRef("https://huggingface.co/acme/x/resolve/dev/a/b.safetensors", "acme/x", "dev", "a/b.safetensors"),
        ),
        ("https://huggingface.co/acme/x", HubRef("https://huggingface.co/acme/x", "acme/x")),
        ("./local/folder", LocalRef("./local/folder", Path("./local/folder").resolve())),
        ("/abs/path.safetensors", LocalRef("/abs/path.safetensors", Path("/abs/path.safetensors"))),
    ],
)
def test_parse_ref(text, expected):
    assert parse_ref(text) == expected


def test_parse_ref_rejects_nonsense():
    with pytest.raises(BadInputError, match="neither an existing path nor a Hub repo id"):
        parse_ref("not a ref at all")


@pytest.mark.slow
def test_fuse_from_the_hub_then_from_the_cache_then_offline(fake, cache, tmp_path):
    hub = make_hub(fake, cache)
    events = []
    result = build(BuildRequest(BASE, (LoraRef(LORA, 0.8),), "nf4", tmp_path / "out"), Run(events.append), hub=hub)
    manifest = json.loads((Path(result.output_dir) / "fluxstudio.json").read_text())
    assert manifest["base"]["repo_id"] == BASE and len(manifest["base"]["revision"]) == 40
    assert manifest["loras"][0]["ref"] == LORA
    got = {r["path"].split("/resolve/")[1].split("/", 1)[1] for r in fake.file_gets()}
    assert "text_encoder/model.safetensors" not in got  # only what the job needs
    assert {
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "flux_tiny_lora.safetensors",
    } <= got and "README.md" not in got
    downloads = [e for e in events if e.stage == "download"]
    assert downloads and downloads[-1].bytes_done == downloads[-1].bytes_total > 0

    fake.requests.clear()
    build(BuildRequest(BASE, (LoraRef(LORA, 0.8),), "nf4", tmp_path / "out2"), hub=hub)
    assert fake.file_gets() == []  # the cache is reused: no file is downloaded again

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_ENDPOINT=fake.url, PYTHONPATH=str(ROOT))
    fake.stop()  # and the Hub is gone too
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            BASE,
            "--lora",
            LORA,
            "--precision",
            "bf16",
            "--out",
            str(tmp_path / "offline"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "offline" / "fluxstudio.json").exists()


def test_a_dropped_connection_resumes_within_the_download(fake, cache):
    fake.faults["big.safetensors"] = {"cut_at": 5 << 20, "times": 1}
    got = make_hub(fake, cache).fetch_lora(parse_ref("acme/big"))
    assert got.path.read_bytes() == fake.repos["acme/big"].files["big.safetensors"]
    ranges = [r["range"] for r in fake.file_gets()]
    assert ranges == [None, f"bytes={5 << 20}-"]  # the client picked up where the connection dropped


@pytest.mark.slow
def test_connection_lost_for_good_then_a_rerun_completes(fake, cache):
    hub = make_hub(fake, cache)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    fake.faults[weights] = {"cut_at": 1_500_000}
    with pytest.raises(HubError, match="cut short") as info:
        hub.fetch_base(parse_ref(BASE))
    assert "Run it again" in info.value.hint
    assert not list(cache.rglob(f"snapshots/*/{weights}"))  # nothing the cache would trust
    assert untrusted_partials(cache) == []
    fake.faults.clear()
    fake.requests.clear()
    got = hub.fetch_base(parse_ref(BASE))
    assert (got.path / weights).read_bytes() == fake.repos[BASE].files[weights]
    assert [r["path"].rsplit("/", 2)[-2:] for r in fake.file_gets()] == [weights.split("/")]  # finished files kept
    assert [r["range"] for r in fake.file_gets()] == [
        f"bytes={1 << 20}-"
    ]  # the cut file resumed after its whole chunks


def test_body_shorter_than_announced(fake, cache):
    fake.faults["big.safetensors"] = {"short": 1000}
    with pytest.raises(HubError, match="cut short"):
        make_hub(fake, cache).fetch_lora(parse_ref("acme/big"))
    assert not list(cache.rglob("snapshots/*/big.safetensors"))


@pytest.mark.parametrize(
    "fault,ref,token,match,hint",
    [
        (None, "acme/flux-tiny", "hf_invalid", "token was refused \\(401\\)", "new token"),
        (
            None,
            "acme/gated-flux",
            "hf_other",
            "acme/gated-flux is gated",
            "Accept the licence at https://huggingface.co/acme/gated-flux",
        ),
        (None, "acme/gated-flux", None, "acme/gated-flux is gated", "token with access"),
        (None, "acme/no-such-repo", None, "acme/no-such-repo was not found", "Check the name"),
        (None, "acme/flux-tiny@no-such-branch", None, "revision 'no-such-branch' does not exist", "branch"),
        (
            {"transformer/config.json": {"status": 404, "code": "EntryNotFound"}},
            "acme/flux-tiny",
            None,
            "is not in acme/flux-tiny",
            "file name",
        ),
        (
            {"*": {"status": 403, "message": "forbidden"}},
            "acme/flux-tiny",
            None,
            "forbidden with this token \\(403\\)",
            "read access",
        ),
        (
            {"api": {"status": 429, "message": "slow down"}},
            "acme/flux-tiny",
            None,
            "rate-limiting downloads \\(429\\)",
            "Wait",
        ),
    ],
)
def test_hub_errors_become_one_sentence(fake, cache, fault, ref, token, match, hint):
    fake.faults.update(fault or {})
    hub = make_hub(fake, cache, token=token or False)
    with pytest.raises(HubError, match=match) as info:
        hub.fetch_base(parse_ref(ref))
    assert hint in info.value.hint
    assert "Traceback" not in str(info.value) and (token is None or token not in str(info.value))
    assert untrusted_partials(cache) == [] and not list(cache.rglob("snapshots/*/transformer/*.safetensors"))


def test_missing_lora_file_and_several_lora_files(fake, cache):
    hub = make_hub(fake, cache)
    with pytest.raises(HubError, match="nope.safetensors is not in acme/tiny-lora"):
        hub.fetch_lora(parse_ref("acme/tiny-lora/nope.safetensors"))
    with pytest.raises(BadInputError, match="has 2 LoRA files") as info:
        hub.fetch_lora(parse_ref("acme/many-loras"))
    assert "acme/many-loras/a.safetensors" in info.value.hint
    assert hub.fetch_lora(parse_ref("acme/many-loras/b.safetensors")).path.name == "b.safetensors"
    assert hub.fetch_lora(parse_ref("acme/diffusers-lora")).path.name == "pytorch_lora_weights.safetensors"


def test_unreachable_hub_names_what_is_cached(fake, cache):
    make_hub(fake, cache).fetch_lora(parse_ref(LORA))
    down = Hub(endpoint="http://127.0.0.1:9", cache_dir=str(cache))
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub") as info:
        down.fetch_base(parse_ref(BASE))
    assert "Already downloaded: acme/tiny-lora" in str(info.value)
    assert "acme/tiny-lora" not in info.value.without_paths()  # a shared session never sees the owner's cache
    assert down.fetch_lora(parse_ref(LORA)).path.exists()  # what is cached still works


def test_not_enough_disk_is_checked_before_downloading(fake, cache):
    hub = make_hub(fake, cache, free_bytes=lambda p: 1000)
    with pytest.raises(DiskSpaceError, match="Not enough free disk to download acme/big"):
        hub.fetch_lora(parse_ref("acme/big"))
    assert fake.file_gets() == [] and untrusted_partials(cache) == []


def test_progress_is_monotonic_and_cancel_stops_within_a_second(fake, cache):
    hub = make_hub(fake, cache)
    events = []
    hub.fetch_lora(parse_ref("acme/big"), Run(events.append))
    done = [e.bytes_done for e in events]
    assert done == sorted(done) and done[-1] == events[-1].bytes_total == 24 << 20

    fake.faults["big.safetensors"] = {"throttle": 4 << 20}  # 4 MB/s: six seconds for the file
    import shutil

    shutil.rmtree(cache)
    token = CancelToken()
    started = threading.Event()
    cancelled_at = []

    def progress(ev):
        if ev.bytes_done > 0:
            started.set()

    def cancel_soon():
        started.wait(10)
        time.sleep(0.3)
        cancelled_at.append(time.monotonic())
        token.cancel()

    threading.Thread(target=cancel_soon, daemon=True).start()
    with pytest.raises(CancelledError):
        hub.fetch_lora(parse_ref("acme/big"), Run(progress, token))
    assert time.monotonic() - cancelled_at[0] < 1.0
    assert not list(cache.rglob("snapshots/*/big.safetensors"))


@pytest.mark.slow
def test_token_canary_never_leaks(fake, cache, tmp_path):
    home = tmp_path / "home"
    env = dict(
        os.environ,
        HF_TOKEN=CANARY,
        HF_HUB_CACHE=str(cache),
        HF_ENDPOINT=fake.url,
        PYTHONPATH=str(ROOT),
        FLUXSTUDIO_HOME=str(home),
    )
    outputs = []
    for base, out in (("acme/gated-flux", "ok"), ("acme/no-such-repo", "fails")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fluxstudio",
                "fuse",
                "--base",
                base,
                "--lora",
                LORA,
                "--precision",
                "nf4",
                "--out",
                str(tmp_path / out),
                "--report-json",
                str(tmp_path / f"{out}.json"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        outputs += [proc.stdout, proc.stderr]
    assert (tmp_path / "ok" / "fluxstudio.json").exists() and not (tmp_path / "fails").exists()
    assert any(r["auth"] for r in fake.requests)  # the token was used...
    texts = outputs + [
        p.read_text(errors="replace")
        for p in [*home.rglob("*"), *tmp_path.glob("*.json"), *(tmp_path / "ok").rglob("*")]
        if p.is_file() and p.stat().st_size < 50_000_000
    ]
    assert not any(CANARY in t for t in texts)  # ...and never written anywhere
    # nor in the binary output files
    assert not any(CANARY.encode() in p.read_bytes() for p in (tmp_path / "ok").rglob("*.safetensors"))


@pytest.mark.slow
def test_cli_download(fake, cache):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_ENDPOINT=fake.url, PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "fluxstudio", "download", *a],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    first = run(BASE)
    assert first.returncode == 0, first.stderr
    assert "downloaded" in first.stdout and "Downloading" in first.stderr
    assert run(BASE).stdout.count("already in the cache") == 1
    lora = run(f"{fake.url}/{LORA}/blob/main/flux_tiny_lora.safetensors", "--lora")
    assert lora.returncode == 0 and lora.stdout.strip().endswith("flux_tiny_lora.safetensors")
    bad = run("acme/nothing-here")
    assert bad.returncode == 5 and "Error: The repository acme/nothing-here was not found" in bad.stderr


def test_token_is_stored_by_huggingface_hub_login(fake, tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hfhome"), HF_ENDPOINT=fake.url, PYTHONPATH=str(ROOT))
    code = "import sys; from fluxstudio.sources.hub import save_token, has_token; print(save_token(sys.argv[1]), has_token())"
    ok = subprocess.run(
        [sys.executable, "-c", code, CANARY], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == ["tester", "True"] and CANARY not in ok.stdout + ok.stderr
    assert (tmp_path / "hfhome" / "token").read_text().strip() == CANARY
    bad = subprocess.run(
        [sys.executable, "-c", code, "hf_wrong"], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert bad.returncode != 0 and "token was refused (401)" in bad.stderr and "hf_wrong" not in bad.stderr
