"""Downloads that survive a killed process: the real huggingface_hub client and the CLI against the local fake Hub.

A process is SIGKILLed at about 80% of a file; the rerun must ask only for the missing range, finish with the
source's sha256 and leave no partial file anywhere. Also: inside a build, a damaged partial file, Xet-backed files,
the disk check, the progress figures, and what is reclaimed at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakehub import FakeHub, folder_files
from helpers import FLUX1_TINY, linear_shapes, peft_lora, write_model

from fluxstudio.errors import CancelledError, DiskSpaceError
from fluxstudio.flows.jobs import Job
from fluxstudio.flows.request import BuildRequest
from fluxstudio.progress import CancelToken, ProgressEvent, Run, Stage
from fluxstudio.sources import resume
from fluxstudio.sources.hub import Hub
from fluxstudio.sources.refs import parse_ref
from fluxstudio.units import human_bytes

ROOT = Path(__file__).resolve().parent.parent
BIG = 160 << 20  # a file of 150 MB or more, as a LoRA or a shard would be
MB = 1 << 20


@pytest.fixture(scope="module")
def big_file():
    return os.urandom(BIG)


@pytest.fixture
def fake(big_file):
    hub = FakeHub().start()
    hub.add_repo("acme/big-lora", {"big.safetensors": big_file, "README.md": b"# big"})
    hub.add_repo("acme/big-xet", {"big.safetensors": big_file}, xet=True)
    yield hub
    hub.stop()


def leftovers(*folders: Path) -> list[str]:
    return sorted(
        str(p)
        for f in folders
        for p in f.rglob("*")
        if p.name.endswith((".incomplete", resume.PARTIAL)) or ".partial-" in p.name
    )


def env_for(fake: FakeHub, tmp: Path) -> dict:
    return dict(
        os.environ,
        HF_HOME=str(tmp / "hf"),
        HF_ENDPOINT=fake.url,
        PYTHONPATH=str(ROOT),
        FLUXSTUDIO_HOME=str(tmp / "fshome"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )


def kill_when(proc: subprocess.Popen, path_glob, at: int, timeout: float = 120) -> int:
    """SIGKILL `proc` once the partial file matching `path_glob()` holds `at` bytes; the bytes it held then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        sizes = [p.stat().st_size for p in path_glob()]
        if sizes and sizes[0] >= at:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            return sizes[0]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the download never got there")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("repo", ["acme/big-lora", "acme/big-xet"])
def test_cli_download_killed_at_80_percent_resumes_with_only_the_missing_range(fake, big_file, tmp_path, repo, capsys):
    env = env_for(fake, tmp_path)
    cache = tmp_path / "hf" / "hub"
    cmd = [sys.executable, "-m", "fluxstudio", "download", "--lora", repo]
    fake.faults["big.safetensors"] = {"throttle": 40 * MB}  # about 4 s for the file
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kept = kill_when(first, lambda: list(cache.glob(f"models--*/blobs/*{resume.PARTIAL}")), int(0.8 * BIG))
    assert kept < BIG and not list(cache.glob("models--*/snapshots/*/big.safetensors"))

    fake.faults.clear()
    fake.requests.clear()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    gets = fake.file_gets()
    on_disk = int(gets[0]["range"].removeprefix("bytes=").rstrip("-"))
    assert len(gets) == 1 and on_disk >= kept >= 0.8 * BIG  # only the missing range was asked for
    sent = fake.bytes_sent()
    with capsys.disabled():  # the measurement, in every test run's output
        print(
            f"\n{repo}: resumed at {on_disk / MB:.1f} MB of {BIG / MB:.0f} MB; the rerun transferred {sent / MB:.2f} MB "
            f"for {(BIG - on_disk) / MB:.2f} MB missing (+{(sent - (BIG - on_disk)) / MB:.3f} MB)"
        )
    assert sent <= BIG - on_disk + MB
    assert f"Resuming {repo} at {human_bytes(on_disk)} of {human_bytes(BIG)}." in rerun.stderr
    final = Path(rerun.stdout.strip().splitlines()[1])
    assert sha(final.read_bytes()) == sha(big_file) and final.is_symlink()  # the HF cache's own layout
    assert leftovers(tmp_path) == []
    if repo == "acme/big-xet":  # the Xet bytes came from the other host, which never saw the token (none is set)
        assert all("/xet-bridge/" in r["path"] for r in gets)


@pytest.mark.slow
def test_a_build_killed_mid_download_resumes(tmp_path):
    base = tmp_path / "repo"
    write_model(base / "transformer", FLUX1_TINY)
    files = folder_files(base)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    lora = peft_lora(tmp_path / "lora.safetensors", linear_shapes(base / "transformer"))
    fake = FakeHub().start()
    try:
        fake.add_repo("acme/flux-slow", files)
        fake.faults[weights] = {"throttle": len(files[weights]) // 4}  # about 4 s
        env = env_for(fake, tmp_path)
        cache = tmp_path / "hf" / "hub"
        cmd = [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            "acme/flux-slow",
            "--lora",
            str(lora),
            "--precision",
            "bf16",
            "--out",
            str(tmp_path / "out"),
            "--report-json",
            str(tmp_path / "r.json"),
        ]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        kept = kill_when(
            first, lambda: list(cache.glob(f"models--*/blobs/*{resume.PARTIAL}")), len(files[weights]) // 2
        )
        fake.faults.clear()
        fake.requests.clear()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert rerun.returncode == 0, rerun.stderr
        ranges = [r["range"] for r in fake.file_gets() if r["path"].endswith(weights)]
        assert len(ranges) == 1 and int(ranges[0][6:-1]) >= kept
        assert json.loads((tmp_path / "r.json").read_text())["precision"] == "bf16"
        assert leftovers(tmp_path) == []
    finally:
        fake.stop()


def cancel_at(fraction: float, total: int):
    """A progress callback and token that cancel the download once `fraction` of it is on disk."""
    token = CancelToken()

    def progress(ev: ProgressEvent) -> None:
        if ev.bytes_done >= fraction * total:
            token.cancel()

    return progress, token


def test_damaged_partial_is_caught_downloaded_again_and_the_user_told(fake, big_file, tmp_path):
    cache = tmp_path / "hf" / "hub"
    hub = Hub(endpoint=fake.url, cache_dir=str(cache))
    ref = parse_ref("acme/big-lora/big.safetensors")
    progress, token = cancel_at(0.5, BIG)
    with pytest.raises(CancelledError, match=r"Download cancelled: \d+(\.\d)? MB kept; starting again resumes") as info:
        hub.fetch_lora(ref, Run(progress, token))
    assert "discard" in info.value.hint
    [partial] = cache.glob(f"models--*/blobs/*{resume.PARTIAL}")
    with partial.open("r+b") as f:  # a bit flipped on disk
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 1]))
    fake.requests.clear()
    got = hub.fetch_lora(ref)
    assert sha(got.path.read_bytes()) == sha(big_file)
    assert [r["range"] is not None for r in fake.file_gets()] == [True, False]  # resumed, failed the check, from zero
    assert len(got.notes) == 1 and "damaged" in got.notes[0] and "from the start" in got.notes[0]
    assert leftovers(tmp_path) == []


def test_progress_after_a_resume_starts_at_what_is_there_and_the_eta_counts_only_new_bytes(fake, tmp_path):
    cache = tmp_path / "hf" / "hub"
    hub = Hub(endpoint=fake.url, cache_dir=str(cache))
    progress, token = cancel_at(0.6, BIG)
    with pytest.raises(CancelledError):
        hub.fetch_lora(parse_ref("acme/big-lora"), Run(progress, token))
    here = next(cache.glob(f"models--*/blobs/*{resume.PARTIAL}")).stat().st_size
    events: list[ProgressEvent] = []
    hub.fetch_lora(parse_ref("acme/big-lora"), Run(events.append))
    first = events[0]
    assert first.bytes_done == first.bytes_start == here and first.bytes_total == BIG
    assert first.message == f"Resuming acme/big-lora at {human_bytes(here)} of {human_bytes(BIG)}"

    job = Job("j", BuildRequest(base="demo", loras=(), precision="bf16", out_dir=tmp_path / "x"))
    job.on_progress(first)
    job.stage_started -= 10  # ten seconds in, with 10% of the file new: 40% left takes about 40 s more
    job.on_progress(ProgressEvent(Stage.DOWNLOAD, 0, 1, here + BIG // 10, BIG, bytes_start=here))
    left = BIG - here - BIG // 10
    assert job.eta_seconds() == pytest.approx(10 * left / (BIG // 10), rel=0.05)


def test_the_disk_check_counts_what_is_already_here(fake, tmp_path):
    cache = tmp_path / "hf" / "hub"
    progress, token = cancel_at(0.5, BIG)
    with pytest.raises(CancelledError):
        Hub(endpoint=fake.url, cache_dir=str(cache)).fetch_lora(parse_ref("acme/big-lora"), Run(progress, token))
    here = next(cache.glob(f"models--*/blobs/*{resume.PARTIAL}")).stat().st_size
    with pytest.raises(DiskSpaceError, match="needs .* more"):
        Hub(endpoint=fake.url, cache_dir=str(cache), free_bytes=lambda p: BIG - here - 1).fetch_lora(
            parse_ref("acme/big-lora")
        )
    got = Hub(endpoint=fake.url, cache_dir=str(cache), free_bytes=lambda p: BIG - here).fetch_lora(
        parse_ref("acme/big-lora")
    )
    assert got.downloaded_bytes == BIG - here


def test_plan_and_discard_see_the_partial_download(fake, tmp_path):
    cache = tmp_path / "hf" / "hub"
    hub = Hub(endpoint=fake.url, cache_dir=str(cache))
    fake.add_repo(
        "acme/flux-big",
        {
            "transformer/diffusion_pytorch_model.safetensors": fake.repos["acme/big-lora"].files["big.safetensors"],
            "transformer/config.json": b"{}",
        },
    )
    progress, token = cancel_at(0.3, BIG)
    with pytest.raises(CancelledError):
        hub.fetch_base(parse_ref("acme/flux-big"), Run(progress, token))
    plan = hub.download_plan(parse_ref("acme/flux-big"))
    assert plan.partial_bytes >= 0.3 * BIG and plan.todo_bytes == BIG - plan.partial_bytes and plan.cached_bytes == 2
    assert hub.discard(parse_ref("acme/flux-big")) == plan.partial_bytes
    assert hub.download_plan(parse_ref("acme/flux-big")).partial_bytes == 0 and leftovers(tmp_path) == []


def test_what_is_reclaimed_at_start_and_what_is_kept(tmp_path):
    cache = tmp_path / "hub"
    blobs = cache / "models--acme--x" / "blobs"
    blobs.mkdir(parents=True)
    orphan = blobs / ("a" * 64 + ".1b2c3d4e.incomplete")  # huggingface_hub's, from a killed process
    mine = blobs / ("b" * 64 + resume.PARTIAL)  # FluxStudio's: resumable
    stale = blobs / ("c" * 64 + resume.PARTIAL)  # FluxStudio's, untouched for weeks
    done = blobs / ("d" * 64 + resume.PARTIAL)  # its file was completed by someone else since
    live = blobs / ("e" * 64 + ".5f6a7b8c.incomplete")  # another process is downloading it now
    for p in (orphan, mine, stale, done, live):
        p.write_bytes(b"x" * 1000)
    (blobs / ("d" * 64)).write_bytes(b"complete")
    old = time.time() - (resume.STALE_DAYS + 1) * 86400
    os.utime(stale, (old, old))
    lock = cache / ".locks" / "models--acme--x" / ("e" * 64 + ".lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); "
                "l.acquire(); print('locked', flush=True); time.sleep(60)"
            ),
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert resume.reclaim(cache) == 3000
    finally:
        holder.kill()
        holder.wait(30)
    assert sorted(p.name for p in blobs.iterdir()) == sorted([mine.name, live.name, "d" * 64])
    assert resume.reclaim(cache) == 1000 and not live.exists()  # its process is gone now


def test_an_app_cancel_keeps_the_partial_download_and_says_so(fake, tmp_path):
    from fluxstudio.studio import Studio

    cache = tmp_path / "hf" / "hub"
    fake.add_repo(
        "acme/flux-big",
        {
            "transformer/diffusion_pytorch_model.safetensors": fake.repos["acme/big-lora"].files["big.safetensors"],
            "transformer/config.json": b"{}",
        },
    )
    fake.faults["transformer/diffusion_pytorch_model.safetensors"] = {"throttle": 80 * MB}
    studio = Studio(output_dir=tmp_path / "out", hub=Hub(endpoint=fake.url, cache_dir=str(cache)))
    job = studio.start(studio.request("acme/flux-big", [], "diffusers", "bf16", "x", "5GB"))
    while not (job.event and job.event.bytes_done > 20 * MB):
        time.sleep(0.05)
    studio.cancel(job.id)
    job.wait(30)
    assert job.status == "cancelled" and "MB kept; starting again resumes from there" in str(job.error)
    status = studio.describe_base("acme/flux-big")
    assert status.partial_bytes >= 20 * MB and "already here, and the download resumes from there" in status.text
    assert studio.discard_download("acme/flux-big") == status.partial_bytes
    assert leftovers(tmp_path) == []
