"""The front door: the edges import only it, its estimate is the build's, jobs run / report / cancel, and
deleting an output can never reach anything but an output."""

from __future__ import annotations

import ast
import runpy
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import linear_shapes, peft_lora

from fluxstudio.errors import BadInputError, CancelledError, DiskSpaceError, FluxStudioError
from fluxstudio.flows.build import build
from fluxstudio.flows.jobs import JobRunner
from fluxstudio.flows.request import DISK_MARGIN, BuildRequest
from fluxstudio.library import delete_output, list_outputs
from fluxstudio.progress import ProgressEvent, Stage
from fluxstudio.studio import Studio

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {"fluxstudio.studio", "fluxstudio.errors", "fluxstudio.progress"}


def core_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxstudio"):
            found.add(node.module if node.module != "fluxstudio" else f"fluxstudio.{node.names[0].name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fluxstudio")}
    return {m for m in found if not m.startswith("fluxstudio.ui")}


def test_the_edges_import_the_core_only_through_the_front_door():
    edges = sorted((ROOT / "fluxstudio" / "ui").rglob("*.py")) + [ROOT / "fluxstudio" / "cli.py"]
    assert len(edges) > 8
    for path in edges:
        assert core_imports(path) <= ALLOWED, (path.name, core_imports(path) - ALLOWED)


def studio_for(tmp_path, **kw):
    return Studio(output_dir=tmp_path / "outputs", local=True, **kw)


def test_estimate_equals_what_the_build_checks_on_a_widened_control_base(wide_base, tmp_path):
    shapes = dict(linear_shapes(wide_base), x_embedder=(3072, 128))  # a Control LoRA widens x_embedder 64 -> 128
    lora = peft_lora(tmp_path / "control.safetensors", shapes)
    studio = studio_for(tmp_path)
    for fmt, precision in (("diffusers", "nf4"), ("gguf", "Q4_K_S"), ("single-file", "fp8-scaled")):
        est = studio.estimate(str(wide_base), [lora], fmt, precision)
        plain = studio.estimate(str(wide_base), [], fmt, precision)
        assert est.exact and est.bytes > plain.bytes  # the widening counts
        seen = {}

        def free_bytes(path, seen=seen, est=est):  # the build's disk check, with the need it compares
            seen["free_called"] = True
            return est.need - 1  # one byte short of what the app said it needs: the build must refuse

        req = studio.request(str(wide_base), [(str(lora), 1.0)], fmt, precision, f"c-{precision}")
        with pytest.raises(DiskSpaceError) as err:
            build(req, free_bytes=free_bytes)
        assert seen and f"{est.need / 1e9:.2f} GB" in err.value.message
        assert est.need == est.bytes + DISK_MARGIN


def test_estimate_without_the_base_uses_the_model_table(tmp_path):
    est = studio_for(tmp_path).estimate("black-forest-labs/FLUX.1-dev", [], "gguf", "Q4_K_S", "flux1")
    assert not est.exact and 6.5e9 < est.bytes < 7e9


def fake_build(events, gate, fail=None):
    def run(request, job_run):
        for i in range(1000):
            job_run.report(ProgressEvent(Stage.FUSE, i, 1000, i, 1000))
            if job_run.cancelled:
                raise CancelledError("Cancelled.", "Nothing was saved.")
            if i == 3:
                events.append("working")
                gate.wait(10)
                if fail:
                    raise fail
        return "result"

    return run


def test_job_runner_reports_progress_and_finishes(tmp_path):
    events, gate = [], threading.Event()
    runner = JobRunner(fake_build(events, gate))
    job = runner.start(BuildRequest("demo", (), "bf16", tmp_path / "x"))
    while not events:
        time.sleep(0.01)
    assert job.status == "running" and job.event.stage == Stage.FUSE and runner.get(job.id) is job
    gate.set()
    job.wait(10)
    assert job.status == "done" and job.result == "result" and job.finished


def test_job_runner_cancels_and_turns_errors_into_sentences(tmp_path):
    events, gate = [], threading.Event()
    runner = JobRunner(fake_build(events, gate))
    job = runner.start(BuildRequest("demo", (), "bf16", tmp_path / "x"))
    while not events:
        time.sleep(0.01)
    assert runner.cancel(job.id)
    gate.set()
    job.wait(10)
    assert job.status == "cancelled" and isinstance(job.error, CancelledError)
    assert not runner.cancel(job.id) and not runner.cancel("no-such-job")

    open_gate = threading.Event()
    open_gate.set()
    for fail, status in ((BadInputError("Bad.", "Fix it."), "failed"), (KeyError("boom"), "failed")):
        events.clear()
        job = JobRunner(fake_build(events, open_gate, fail)).start(BuildRequest("demo", (), "bf16", tmp_path / "y"))
        job.wait(20)
        assert job.status == status and isinstance(job.error, FluxStudioError)
        assert "KeyError" in job.error.message or job.error.message == "Bad."


def test_job_runner_runs_one_build_at_a_time(tmp_path):
    events, gate = [], threading.Event()
    runner = JobRunner(fake_build(events, gate))
    first = runner.start(BuildRequest("demo", (), "bf16", tmp_path / "a"))
    second = runner.start(BuildRequest("demo", (), "bf16", tmp_path / "b"))
    time.sleep(0.5)
    assert events == ["working"] and second.event is None  # the second waits for the first
    gate.set()
    first.wait(10)
    second.wait(10)
    assert first.status == second.status == "done"


def test_deletion_reaches_only_outputs(tmp_path, tiny_base):
    outputs = tmp_path / "outputs"
    build(BuildRequest(str(tiny_base), (), "bf16", outputs / "keep"))
    build(BuildRequest(str(tiny_base), (), "Q8_0", outputs / "one", format="gguf"))
    (outputs / "notes.txt").write_text("mine")
    (outputs / "foreign").mkdir()
    (outputs / "foreign" / "model.safetensors").write_bytes(b"x")
    (outputs / "link").symlink_to(outputs / "keep")
    outside = tmp_path / "outside"
    build(BuildRequest(str(tiny_base), (), "bf16", outside))
    for name in ("../outside", str(outside), "notes.txt", "foreign", "link", ".", "", "keep/config.json", "missing"):
        with pytest.raises(BadInputError):
            delete_output(outputs, name)
    assert outside.exists() and (outputs / "keep").exists() and (outputs / "notes.txt").exists()
    assert (outputs / "foreign").exists() and (outputs / "link").is_symlink()
    delete_output(outputs, "one.gguf")
    delete_output(outputs, "keep")
    assert [e.name for e in list_outputs(outputs)] == [] and (outputs / "notes.txt").exists()
    with pytest.raises(BadInputError, match="shared session"):
        Studio(output_dir=outputs, local=False).delete("anything")


def test_a_second_build_of_a_name_keeps_both_and_the_sizes_are_the_bases_own(tmp_path):
    studio = studio_for(tmp_path)
    names = []
    for _ in range(2):
        name = studio.free_name("demo-q8", "gguf")
        studio.build(studio.request("demo", [("demo", 1.0)], "gguf", "Q8_0", name))
        names.append(name)
    assert names == ["demo-q8", "demo-q8-2"]
    assert sorted(e.name for e in studio.outputs()) == ["demo-q8-2.gguf", "demo-q8.gguf"]
    assert studio.free_name("demo-q8", "diffusers") == "demo-q8"  # a folder of that name is still free
    demo = studio.sizes("demo", "gguf")
    table = studio.sizes("black-forest-labs/FLUX.1-dev", "gguf")  # not here: the model table's figures
    assert set(demo) == set(table) == set(studio.sizes("demo", "gguf"))
    assert 1e6 < demo["Q8_0"] < 2e8 and 1e10 < table["Q8_0"] < 2e10
    made = next(p for p in (tmp_path / "outputs").iterdir() if p.name == "demo-q8.gguf").stat().st_size
    assert 0.7 < demo["Q8_0"] / made < 1.3  # what the page shows next to the precision is about what it makes
    from fluxstudio.engine.models import open_base
    from fluxstudio.sources import demo as built

    counted = sum(info.numel for _, info in open_base(built.ensure_base()).tensors.values())
    assert built.DEMO_PARAMS == counted  # the figure the page uses before the demo is built


def test_the_demo_snippet_loads_the_demo_pipeline_and_says_its_images_are_noise(tmp_path):
    studio = studio_for(tmp_path)
    req = studio.request("demo", [("demo", 1.0)], "diffusers", "bf16", "snip")
    code = studio.snippet(studio.build(req), req)
    assert "black-forest-labs" not in code and "noise" in code
    script = tmp_path / "snippet.py"  # as a person runs it, but on the CPU (offloading needs a GPU)
    script.write_text("\n".join(line for line in code.splitlines() if "cpu_offload" not in line), encoding="utf-8")
    scope = runpy.run_path(str(script))
    assert scope["pipe"].transformer.config.num_layers == 2  # the demo's own, not FLUX.1-dev's 19
    assert "path/to/the-demo-pipeline" in studio.snippet(studio.build(replace(req, overwrite=True)), req, "path/to")


def test_the_retention_figure_says_what_over_100_percent_means():
    from fluxstudio.studio import describe_retention

    assert describe_retention(None) == ""
    assert describe_retention(0.996) == "LoRA effect kept: 99.6%"
    over = describe_retention(1.03)
    assert over.startswith("LoRA effect kept: 103.0% (over 100%") and "all of its effect is there" in over


def test_the_machine_figures_are_read_again(tmp_path):
    """The outputs folder on a 64 MB tmpfs: 16 MB written after the probe show in the figures read again."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        studio = Studio(output_dir=small, local=True)
        first = studio.hw
        (small / "filler").write_bytes(b"\0" * (16 << 20))
        again = first.now()
        assert again.accelerators == first.accelerators and again.disk_path == first.disk_path
        assert abs(first.disk_free_bytes - again.disk_free_bytes - (16 << 20)) < 1 << 20
        assert again.ram_available_bytes > 0
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
