"""The LoRA-retention score: measured on real builds, checked against a direct computation, and shown to fail
where the LoRA is lost (a base that was quantized before)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FLUX1_TINY, linear_shapes, load_dir, peft_lora, write_model
from safetensors.torch import load_file, save_file

from fluxstudio.engine import manifest
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retention")
    write_model(tmp / "base", FLUX1_TINY)
    lora = peft_lora(tmp / "lora.safetensors", linear_shapes(tmp / "base"), strength=0.005)  # typical: |ΔW| ≈ 2% of |W|
    return tmp / "base", lora


def run(base: Path, lora: Path, out: Path, fmt: str, precision: str):
    return build(
        BuildRequest(base=str(base), loras=(LoraRef(str(lora), 1.0),), precision=precision, format=fmt, out_dir=out)
    )


@pytest.mark.parametrize(
    "fmt,precision,at_least",
    [
        ("diffusers", "bf16", 0.999),
        ("diffusers", "fp8", 0.98),
        ("diffusers", "nf4", 0.98),
        ("single-file", "fp8-scaled", 0.98),
        ("single-file", "nf4", 0.98),
        ("gguf", "Q4_K_S", 0.98),
    ],
)
def test_real_builds_keep_the_lora_and_say_so_everywhere(inputs, tmp_path, fmt, precision, at_least):
    base, lora = inputs
    result = run(base, lora, tmp_path / "out", fmt, precision)
    assert at_least <= result.lora_retained <= 1.01, result.lora_retained
    assert len(result.lora_retained_worst) == 5 and all(w["retained"] <= 1.01 for w in result.lora_retained_worst)
    assert not any(n.startswith("Warning") for n in result.notes)
    saved = manifest.read(Path(result.output_dir))  # the folder's json, or the one file's own metadata
    assert saved["lora_retained"] == result.lora_retained and saved["lora_retained_worst"] == result.lora_retained_worst


def test_the_score_equals_a_direct_computation_from_the_saved_weights(inputs, tmp_path):
    """<stored − W, ΔW> / |ΔW|² with ΔW = B·A materialized from the LoRA file and the fp8 weights as saved."""
    base, lora = inputs
    result = run(base, lora, tmp_path / "out", "diffusers", "fp8")
    stored, w, factors = load_dir(Path(result.output_dir)), load_dir(base), load_file(str(lora))
    num = den = 0.0
    for name in linear_shapes(base):
        dw = factors[f"transformer.{name}.lora_B.weight"].float() @ factors[f"transformer.{name}.lora_A.weight"].float()
        num += float(((stored[f"{name}.weight"].float() - w[f"{name}.weight"].float()) * dw).sum())
        den += float((dw * dw).sum())
    assert result.lora_retained == pytest.approx(num / den, abs=2e-4)


def test_a_base_quantized_before_loses_the_lora_and_the_score_says_so(inputs, tmp_path):
    """The trap users fall into: a base that went through NF4 once, fused and quantized again."""
    import bitsandbytes.functional as F

    base, lora = inputs
    requantized = tmp_path / "requantized"
    requantized.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (requantized / f.name).write_bytes(f.read_bytes())
    weights = load_dir(base)
    for name in linear_shapes(base):
        w = weights[f"{name}.weight"]
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        weights[f"{name}.weight"] = F.dequantize_4bit(packed, state).to(torch.bfloat16)
    save_file(weights, str(requantized / "diffusion_pytorch_model.safetensors"))
    fresh = run(base, lora, tmp_path / "fresh", "diffusers", "nf4").lora_retained
    result = run(requantized, lora, tmp_path / "again", "diffusers", "nf4")
    assert result.lora_retained < 0.6 and fresh >= 0.98
    [warning] = [n for n in result.notes if n.startswith("Warning")]
    assert f"only {100 * result.lora_retained:.1f}% of the LoRA effect was kept" in warning
    assert result.lora_retained_worst[0]["module"] in warning and "higher precision" in warning


@pytest.mark.slow
def test_cli_summary_and_report(inputs, tmp_path):
    base, lora = inputs
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLUXSTUDIO_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            str(base),
            "--lora",
            str(lora),
            "--format",
            "gguf",
            "--precision",
            "Q8_0",
            "--out",
            str(tmp_path / "q8"),
            "--report-json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lora_retained"] >= 0.98 and report["lora_retained_worst"][0]["module"]
    assert f"LoRA effect kept: {100 * report['lora_retained']:.1f}%" in proc.stdout
