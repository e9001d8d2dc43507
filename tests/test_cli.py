"""The headless CLI: help, the demo flow end to end, the JSON report. In-process through `cli.main(argv)`, but for
the one test that runs `python -m fluxstudio` as a person does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluxstudio.cli import main

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    def run(*args) -> Done:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


def test_python_m_fluxstudio_runs_as_a_command():
    proc = subprocess.run(
        [sys.executable, "-m", "fluxstudio", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "fuse" in proc.stdout


def test_help(cli):
    proc = cli("--help")
    assert proc.returncode == 0 and "fuse" in proc.stdout
    proc = cli("fuse", "--help")
    assert proc.returncode == 0
    for flag in (
        "--base",
        "--lora",
        "--lora-scale",
        "--precision",
        "--out",
        "--shard-size",
        "--device",
        "--overwrite",
        "--report-json",
    ):
        assert flag in proc.stdout


def test_demo_fuse_with_report(cli, tmp_path, isolated_home):
    report = tmp_path / "report.json"
    out = tmp_path / "demo-nf4"
    proc = cli(
        "fuse",
        "--base",
        "demo",
        "--lora",
        "demo",
        "--lora-scale",
        "0.8",
        "--precision",
        "nf4",
        "--out",
        out,
        "--shard-size",
        "10MB",
        "--report-json",
        report,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Fusing" in proc.stderr and "tensors" in proc.stderr  # the progress bar
    assert "peak RAM" in proc.stdout and "Load it in diffusers with" in proc.stdout and "from_pretrained" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("output_dir", "precision", "seconds", "peak_ram_bytes", "output_bytes", "stage_seconds"):
        assert key in data
    assert data["precision"] == "nf4" and Path(data["output_dir"]) == out and data["output_bytes"] > 0
    assert len(data["files"]) > 1 and (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    manifest = json.loads((out / "fluxstudio.json").read_text())
    assert manifest["loras"][0]["scale"] == 0.8 and len(manifest["loras"][0]["sha256"]) == 64
    assert manifest["libraries"]["bitsandbytes"] and manifest["timings"]
    assert "FluxTransformer2DModel.from_pretrained" in (out / "README.md").read_text()
    assert (isolated_home / "demo" / "pipeline" / "transformer" / "config.json").exists()
    assert "Traceback" not in proc.stderr


def test_more_scales_than_loras_is_an_error(cli, tmp_path):
    proc = cli("fuse", "--base", "demo", "--lora-scale", "0.5", "--precision", "bf16", "--out", tmp_path / "o")
    assert proc.returncode != 0 and "more --lora-scale values" in proc.stderr


def test_bad_shard_size_is_a_usage_error(cli, tmp_path):
    proc = cli("fuse", "--base", "demo", "--precision", "bf16", "--out", tmp_path / "o", "--shard-size", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr


def test_cuda_requested_without_gpu(cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = cli("fuse", "--base", "demo", "--precision", "bf16", "--out", tmp_path / "o", "--device", "cuda")
    assert proc.returncode != 0 and "No CUDA GPU" in proc.stderr


def test_env_json(cli, isolated_home):
    proc = cli("env", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert isinstance(data["accelerators"], list)
    assert data["ram_total_bytes"] > 1e9 and data["disk_free_bytes"] > 0
    assert data["recommendation"]["precision"] in ("bf16", "fp8", "nf4") and data["recommendation"]["reason"]
    assert data["libraries"]["torch"] and data["libraries"]["diffusers"]
    assert data["folders"]["home"] == str(isolated_home)
    comfy = {"format": "comfyui", "fit_bytes": 0}
    for card, precision, fact, one_file, also in (
        ("H100 80 GB", "fp8", "compute 9.0", comfy | {"precision": "fp8"}, ["fp8-scaled"]),
        ("RTX 4090 24 GB", "fp8", "compute 8.9", comfy | {"precision": "fp8"}, ["fp8-scaled", "fit-fp8"]),
        ("RTX 5090 32 GB", "fp8", "compute 12.0", comfy | {"precision": "nvfp4"}, ["fp8"]),
        ("A100 80 GB", "bf16", "compute 8.0", {"format": "single-file", "precision": "bf16", "fit_bytes": 0}, ["int8"]),
        ("RTX 3080 10 GB", "nf4", "10 GB", {"format": "gguf", "precision": "fit", "fit_bytes": 7 * 10**9}, ["Q4_K_S"]),
        ("RTX 4070 12 GB", "nf4", "12 GB", {"format": "gguf", "precision": "fit", "fit_bytes": 9 * 10**9}, ["Q5_K_S"]),
    ):
        proc = cli("env", "--json", "--target", card)
        rec = json.loads(proc.stdout)["recommendation"]
        assert (rec["precision"], rec["target"]) == (precision, card) and fact in rec["reason"], rec
        assert rec["model"].startswith("FLUX.1") and rec["one_file"] == one_file and rec["one_file_why"], rec
        assert [p["precision"] for p in rec["one_file_also"]] == also


def test_env_text(cli):
    proc = cli("env")
    assert proc.returncode == 0 and "Advice for FLUX.1" in proc.stdout and "Libraries" in proc.stdout
    text = cli("env", "--target", "RTX 5090 32 GB").stdout
    assert "For ComfyUI / Forge: comfyui nvfp4 — NVFP4" in text and "CUDA 13" in text
    assert "Also offered: comfyui fp8" in text


@pytest.mark.parametrize(
    "fmt,precision,suffix", [("gguf", "Q4_K_S", ".gguf"), ("single-file", "fp8-scaled", ".safetensors")]
)
def test_one_file_formats_from_the_cli(cli, tmp_path, fmt, precision, suffix):
    report = tmp_path / "r.json"
    proc = cli(
        "fuse",
        "--base",
        "demo",
        "--lora",
        "demo",
        "--format",
        fmt,
        "--precision",
        precision,
        "--out",
        tmp_path / "demo-out",
        "--report-json",
        report,
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / f"demo-out{suffix}"
    assert out.is_file() and json.loads(report.read_text())["format"] == fmt
    assert f"Saved {precision} {fmt} model to {out}" in proc.stdout
    assert ("models/unet/" if fmt == "gguf" else "models/diffusion_models/") in proc.stdout
    from fluxstudio.library import list_outputs

    entry = list_outputs(tmp_path)[0]
    assert (entry.name, entry.format, entry.precision, entry.loras[0][0]) == (out.name, fmt, precision, "demo")


def test_format_errors_are_one_sentence(cli, tmp_path):
    proc = cli("fuse", "--base", "demo", "--format", "gguf", "--precision", "fp8", "--out", tmp_path / "o")
    assert (
        proc.returncode == 2
        and "The gguf format has no precision 'fp8'" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    proc = cli("fuse", "--base", "demo", "--format", "gguf", "--out", tmp_path / "o.safetensors")
    assert proc.returncode == 3 and "a gguf output is a .gguf file" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["fshome"]  # logs only: no output, nothing partial


def test_a_pipeline_export_prints_its_one_line_load_with_t5_in_fp8(cli, tmp_path, isolated_home):
    out = tmp_path / "pipe"
    proc = cli(
        "fuse",
        "--base",
        "demo",
        "--lora",
        "demo",
        "--format",
        "pipeline",
        "--precision",
        "bf16",
        "--t5-precision",
        "fp8",
        "--out",
        str(out),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert f'FluxPipeline.from_pretrained(r"{out}"' in proc.stdout
    assert "apply_layerwise_casting(pipe.text_encoder_2, storage_dtype=torch.float8_e4m3fn" in proc.stdout
    assert "pipe.transformer.enable_layerwise_casting" not in proc.stdout  # the transformer is bf16
    config = json.loads((out / "text_encoder_2" / "config.json").read_text())
    assert "quantization_config" not in config and (out / "vae").is_dir()


def test_fuse_then_preview_prints_the_figures_of_each_image_and_no_library_noise(tmp_path):
    """As a person runs it (`python -m fluxstudio`): the figures of each image, one progress line per image, and
    none of diffusers' own warnings (such as "No LoRA keys associated to NoneType")."""
    out = tmp_path / "demo-fp8"
    proc = subprocess.run(
        [sys.executable, "-m", "fluxstudio", "fuse", "--base", "demo", "--lora", "demo", "--precision", "fp8"]
        + ["--out", str(out), "--preview", "--seed", "3", "--preview-steps", "2", "--prompt", "a lighthouse"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
        env={**os.environ, "FLUXSTUDIO_HOME": str(tmp_path / "home")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Try it: seed 3, 2 steps, 64x64 on cpu:" in proc.stdout
    for line in ("(a) base fp8 + LoRA (unfused)", "(b) fused fp8 (FluxStudio)", "(c) base bf16 + LoRA (unfused)"):
        assert line in proc.stdout and "it/s" in proc.stdout.split(line)[1].splitlines()[0]
    assert "Rendering fused fp8 (FluxStudio)..." in proc.stderr  # one progress line per image
    assert "No LoRA keys" not in proc.stderr + proc.stdout and "NoneType" not in proc.stderr
    saved = json.loads((tmp_path / "demo-fp8.preview" / "preview.json").read_text())
    assert saved["settings"]["prompt"] == "a lighthouse" and len(saved["renders"]) == 3


def test_a_preview_that_cannot_run_is_said_before_the_build_in_one_sentence(cli, tmp_path, isolated_home):
    out = tmp_path / "demo-nf4"
    proc = cli(
        "fuse", "--base", "demo", "--lora", "demo", "--precision", "nf4", "--out", str(out), "--preview", "--quiet"
    )
    if proc.returncode == 0:
        pytest.skip("this machine has a CUDA GPU: NF4 previews run")
    assert proc.returncode == 2 and not out.exists()  # nothing built: the person can drop --preview or change it
    assert "NF4 models run on a CUDA GPU only" in proc.stderr and "Traceback" not in proc.stderr


def test_precisions_in_any_case_a_clash_that_names_overwrite_and_a_preview_refused_before_building(cli, tmp_path):
    out = tmp_path / "demo-q8"
    proc = cli("fuse", "--base", "demo", "--format", "gguf", "--precision", "q8_0", "--out", out, "--quiet")
    assert proc.returncode == 0 and "Saved Q8_0 gguf model" in proc.stdout, proc.stderr  # llama.cpp users type both
    again = cli("fuse", "--base", "demo", "--format", "gguf", "--precision", "Q8_0", "--out", out, "--quiet")
    assert again.returncode == 3 and "demo-q8.gguf already exists" in again.stderr
    assert "--overwrite" in again.stderr and "--out" in again.stderr
    refused = cli("fuse", "--base", "demo", "--lora", "demo", "--format", "gguf", "--out", tmp_path / "p", "--preview")
    assert refused.returncode == 2 and "--preview cannot run for this output" in refused.stderr, refused.stderr
    assert "diffusers or pipeline format at bf16 or fp8" in refused.stderr
    assert not (tmp_path / "p.gguf").exists()  # said before anything was built


def test_env_names_each_other_precision_once(cli):
    text = cli("env", "--target", "RTX 3060 12 GB").stdout
    assert "bf16: needs ~27 GB" in text and "fp8: runs natively only" in text
    assert "fp8: fp8" not in text and "bf16: bf16" not in text
