"""FluxStudio nf4 vs. the usual diffusers recipe, side by side in one run.

The recipe (FACTS §8): load the bf16 base, load_lora_adapter + fuse_lora + unload_lora, save a bf16 copy,
reload it with BitsAndBytesConfig(nf4), save again. FluxStudio streams one tensor at a time instead.

Model: FLUX.1 width (3072), 2 double + 4 single blocks (1.3 B params), rank-16 LoRA on attention + MLP.
A second FluxStudio run on twice the blocks shows that peak memory does not grow with the model.
Each job runs in its own process; peak anonymous memory is sampled every 10 ms from /proc, peak RSS is
the kernel's own maximum (ru_maxrss). Linux only.

    python bench/fuse_vs_diffusers.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTH_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)


def make_model(folder: Path, double: int, single: int) -> Path:
    """Random bf16 FLUX.1-width model, streamed to disk with FluxStudio's own writer (never all in RAM)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from fluxstudio.engine.shards import ShardedWriter, header_bound

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = dict(WIDTH_CONFIG, num_layers=double, num_single_layers=single)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    model.save_config(tmp)
    writer = ShardedWriter(tmp, 5 * 10**9, header_bound(list(model.state_dict())))
    g = torch.Generator().manual_seed(0)
    for name, p in model.state_dict().items():
        writer.add(name, (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()
    tmp.rename(folder)
    return folder


def make_lora(path: Path, base: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import peft_lora

    from fluxstudio.engine.models import open_base

    if path.exists():
        return path
    shapes = {
        n[: -len(".weight")]: info.shape
        for n, (_, info) in open_base(base).tensors.items()
        if n.endswith(".weight") and n[: -len(".weight")].endswith(LORA_TARGETS)
    }
    return peft_lora(path, shapes, rank=16, seed=1, strength=0.03)


RECIPE = r"""
import sys, torch
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer
BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None  # let it run on CPU (FACTS §3)
base, lora, tmp, out = sys.argv[1:5]
model = FluxTransformer2DModel.from_pretrained(base, torch_dtype=torch.bfloat16)
model.load_lora_adapter(lora, prefix="transformer")
model.fuse_lora(lora_scale=1.0)
model.unload_lora()
model.save_pretrained(tmp)
del model
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
model = FluxTransformer2DModel.from_pretrained(tmp, quantization_config=q, torch_dtype=torch.bfloat16, device_map="cpu")
model.save_pretrained(out)
"""


def measure(cmd: list[str], env: dict) -> dict:
    """Run a command; return wall seconds, peak anonymous memory and peak RSS (the kernel's VmHWM), sampled
    every 10 ms from /proc while it runs."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"RssAnon:": 0, "VmHWM:": 0}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key = line.split(maxsplit=1)[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)
    wall = time.monotonic() - start
    output = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"seconds": wall, "peak_anon_bytes": peak["RssAnon:"], "peak_rss_bytes": peak["VmHWM:"], "output": output}


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fluxstudio-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated models for the next run")
    ap.add_argument("--skip-recipe", action="store_true")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLUXSTUDIO_HOME=str(work / "home"), PYTHONPATH=str(ROOT))

    print("preparing models (once)...", flush=True)
    small = make_model(work / "model-2x4", 2, 4)
    large = make_model(work / "model-4x8", 4, 8)
    lora = make_lora(work / "lora-r16.safetensors", small)
    lora_large = make_lora(work / "lora-r16-large.safetensors", large)

    rows = {}
    for label, base, lora_path in (
        ("fluxstudio nf4 (1.3B)", small, lora),
        ("fluxstudio nf4 (2.5B)", large, lora_large),
    ):
        out = work / ("out-" + label.split("(")[1].rstrip(")"))
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            str(base),
            "--lora",
            str(lora_path),
            "--precision",
            "nf4",
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ]
        rows[label] = measure(cmd, env) | {"output_bytes": dir_bytes(out), "temp_disk_bytes": 0}
        shutil.rmtree(out, ignore_errors=True)
    if not args.skip_recipe:
        tmp, out = work / "recipe-bf16", work / "recipe-nf4"
        for d in (tmp, out):
            shutil.rmtree(d, ignore_errors=True)
        cmd = [sys.executable, "-c", RECIPE, str(small), str(lora), str(tmp), str(out)]
        rows["diffusers recipe (1.3B)"] = measure(cmd, env) | {
            "output_bytes": dir_bytes(out),
            "temp_disk_bytes": dir_bytes(tmp),
        }
        for d in (tmp, out):
            shutil.rmtree(d, ignore_errors=True)

    gb = lambda n: f"{n / 1e9:6.2f} GB" if n else "    n/a"
    print(f"\n{'job':26} {'wall':>8} {'peak anon':>10} {'peak RSS':>10} {'output':>10} {'temp disk':>10}")
    for label, r in rows.items():
        print(
            f"{label:26} {r['seconds']:7.1f}s {gb(r['peak_anon_bytes'])} {gb(r['peak_rss_bytes'])} "
            f"{gb(r['output_bytes'])} {gb(r['temp_disk_bytes'])}"
        )
    ours, bigger = rows["fluxstudio nf4 (1.3B)"], rows["fluxstudio nf4 (2.5B)"]
    print(f"\nmodel size x2 -> FluxStudio peak anon x{bigger['peak_anon_bytes'] / ours['peak_anon_bytes']:.2f}")
    if "diffusers recipe (1.3B)" in rows:
        rec = rows["diffusers recipe (1.3B)"]
        print(
            f"FluxStudio / recipe: wall x{ours['seconds'] / rec['seconds']:.2f}, "
            f"peak anon x{ours['peak_anon_bytes'] / rec['peak_anon_bytes']:.2f}"
            + (
                f", peak RSS x{ours['peak_rss_bytes'] / rec['peak_rss_bytes']:.2f}"
                if ours["peak_rss_bytes"] and rec["peak_rss_bytes"]
                else ""
            )
        )
    (work / "results.json").write_text(
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "output"} for k, v in rows.items()}, indent=2)
    )
    if not args.keep:
        for p in (small, large, lora, lora_large):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
