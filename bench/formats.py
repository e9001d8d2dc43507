"""Every output format and precision, side by side in one run: wall time, peak memory and output size, plus the
speed of the GGUF quantizers against ggml's own reference C code.

Model: FLUX.1 width (3072), 2 double + 4 single blocks (1.3 B params) with a rank-16 LoRA on attention + MLP;
`--full` adds FLUX.1-dev's real shapes (19 + 38 blocks, 11.9 B params, 24 GB of disk for the base) for the
precisions given with `--full-precisions` (`gguf:fit=7GB`: a GGUF fitted to 7 GB). Peak memory does not grow with the number of blocks: it is set by the
largest fused group (a single block's linear1), which both models share. Each build runs in its own process;
peak anonymous memory is sampled every 10 ms from /proc. Linux only.

The quantizer speed compares FluxStudio's quantizers (on the CPU, ggml's C as numba-compiled loops) with ggml's `ggml_quantize_chunk` (its reference
quantizers, no importance matrix) on the same 2 threads, when `--ggml` names a libggml-base built from llama.cpp's
sources (see tools/ggml_reference.py); without it, only FluxStudio's speed is printed.

    python bench/formats.py [--workdir DIR] [--keep] [--ggml path/to/libggml-base.so] [--full]
        [--only FORMAT:PRECISION,...] [--full-precisions FORMAT:PRECISION,...] [--skip-builds]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fuse_vs_diffusers import make_lora, make_model, measure

SPEED_ROUNDS = 7  # runs of each side, taken in turns; the best of each counts
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS")  # the types of 256-value super-blocks


def quantizer_speed(
    ggml_lib: Path | None, threads: int = 2, rounds: int = SPEED_ROUNDS, types: tuple[str, ...] = ()
) -> list[tuple[str, float, float | None]]:
    """(type, FluxStudio Mparam/s, ggml Mparam/s or None) on a 2048 x 3072 fused-like tensor, for every type made
    here (or `types`)."""
    import gguf
    import torch

    from fluxstudio.quant import ggml

    torch.set_num_threads(threads)
    x = (torch.randn(2048, 3072, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    fn = None
    if ggml_lib:
        fn = ctypes.CDLL(str(ggml_lib)).ggml_quantize_chunk
        fn.restype = ctypes.c_size_t
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
    src = x.float().contiguous()
    rows = []
    for name in types or ggml.quantized():
        type_id = int(gguf.GGMLQuantizationType[name])
        ggml.quantize(x[:64], name)  # warm up
        runs = {"ours": lambda name=name: ggml.quantize(x, name)}
        if fn is not None:
            row_bytes = ggml.row_bytes(name, 3072)
            dst = torch.empty(2048 * row_bytes, dtype=torch.uint8)
            half = 2048 // threads

            def part(i: int, type_id=type_id, half=half, dst=dst, row_bytes=row_bytes) -> None:
                # ctypes releases the GIL: the threads run side by side
                fn(type_id, src[i * half].data_ptr(), dst[i * half * row_bytes].data_ptr(), 0, half, 3072, None)

            def run_ggml(part=part) -> None:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(part, range(threads)))

            runs["ggml"] = run_ggml
        best = {key: float("inf") for key in runs}
        for _ in range(rounds):  # taken in turns, so that a slow spell of this shared machine hits both
            for key, run in runs.items():
                best[key] = min(best[key], _timed(run))
        theirs = x.numel() / best["ggml"] / 1e6 if "ggml" in best else None
        rows.append((name, x.numel() / best["ours"] / 1e6, theirs))
    return rows


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def run_builds(label: str, base: Path, lora: Path, jobs: list[tuple[str, str]], work: Path, env: dict) -> list[dict]:
    rows = []
    for fmt, precision in jobs:
        out = work / f"out-{label}-{fmt}-{precision}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "fluxstudio",
            "fuse",
            "--base",
            str(base),
            "--lora",
            str(lora),
            "--format",
            fmt,
            *(["--fit", precision[4:]] if precision.startswith("fit=") else ["--precision", precision]),
            "--out",
            str(out),
            "--quiet",
            "--device",
            "cpu",
        ]
        r = measure(cmd, env)
        made = [p for p in work.glob(f"out-{label}-{fmt}-{precision}*") if not p.name.startswith(".")]
        size = sum(p.stat().st_size for m in made for p in ([m] if m.is_file() else m.rglob("*")) if p.is_file())
        rows.append({"model": label, "format": fmt, "precision": precision, "output_bytes": size, **r})
        print(
            f"  {label:5} {fmt:12} {precision:10} {r['seconds']:7.1f} s  peak anon {r['peak_anon_bytes'] / 1e9:5.2f} GB  "
            f"output {size / 1e9:6.2f} GB",
            flush=True,
        )
        for m in made:
            shutil.rmtree(m) if m.is_dir() else m.unlink()
    return rows


def _thread_scaling(ggml_lib: Path | None, two: dict[str, tuple[float, float | None]]) -> None:
    """The K-quants on 1 thread beside the 2-thread figures above: how each side's speed grows with a second core."""
    one = {name: (ours, theirs) for name, ours, theirs in quantizer_speed(ggml_lib, 1, types=K_QUANTS)}
    print("\nK-quants, 1 and 2 threads (Mparam/s; the 2-thread / 1-thread ratio of each):", flush=True)
    for name in K_QUANTS:
        (o1, t1), (o2, t2) = one[name], two[name]
        line = f"  {name:6} FluxStudio {o1:6.1f} -> {o2:6.1f} (x{o2 / o1:.2f})"
        if t1 and t2:
            line += f"   ggml {t1:6.1f} -> {t2:6.1f} (x{t2 / t1:.2f})"
        print(line, flush=True)


def _beside_fp8_scaled(rows: list[dict]) -> None:
    """Each ComfyUI-native build's wall time over the scaled-fp8 single file's, from the same model in this run."""
    for model in dict.fromkeys(r["model"] for r in rows):
        ref = next((r for r in rows if r["model"] == model and r["precision"] == "fp8-scaled"), None)
        native = [r for r in rows if r["model"] == model and r["format"] == "comfyui"]
        if ref and native:
            ratios = ", ".join(f"{r['precision']} x{r['seconds'] / ref['seconds']:.2f}" for r in native)
            print(f"{model}: ComfyUI-native wall time / scaled-fp8 single file ({ref['seconds']:.1f} s): {ratios}")


def main() -> None:
    from fluxstudio.formats import FORMATS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fluxstudio-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated models for the next run")
    ap.add_argument("--ggml", type=Path, help="libggml-base.so built from llama.cpp's sources, for the speed ratio")
    ap.add_argument("--full", action="store_true", help="also build from full FLUX.1-dev shapes (24 GB of disk)")
    ap.add_argument(
        "--full-precisions",
        default="single-file:fp8-scaled,comfyui:fp8,comfyui:nvfp4,comfyui:mxfp8,comfyui:int8,comfyui:int8-convrot",
        help="FORMAT:PRECISION pairs built from the full shapes",
    )
    ap.add_argument(
        "--only",
        help="FORMAT:PRECISION pairs built from the 1.3 B model (default: every one); gguf:fit=7GB fits a size",
    )
    ap.add_argument("--skip-builds", action="store_true", help="only the quantizer speed")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLUXSTUDIO_HOME=str(work / "home"), PYTHONPATH=str(ROOT))

    print(f"GGUF quantizers (2 threads, 6.3 M values, best of {SPEED_ROUNDS} runs each, taken in turns):", flush=True)
    speed = quantizer_speed(args.ggml)
    for name, ours, theirs in speed:
        ratio = f"  ggml {theirs:6.1f} Mparam/s  FluxStudio / ggml x{ours / theirs:.2f}" if theirs else ""
        print(f"  {name:6} FluxStudio {ours:6.1f} Mparam/s{ratio}", flush=True)
    _thread_scaling(args.ggml, {name: (ours, theirs) for name, ours, theirs in speed})

    rows = []
    if not args.skip_builds:
        print("\npreparing models (once)...", flush=True)
        mid = make_model(work / "model-2x4", 2, 4)
        lora = make_lora(work / "lora-r16.safetensors", mid)
        # pipeline: its transformer is the diffusers writer's; it needs a whole pipeline base (bench/pipeline_memory.py)
        jobs = [(f, p) for f in FORMATS if f != "pipeline" for p in FORMATS[f].precisions]
        if args.only:
            jobs = [tuple(j.split(":")) for j in args.only.split(",")]
        print(f"\nbuilds from the 1.3 B model ({len(jobs)} formats x precisions):", flush=True)
        rows += run_builds("1.3B", mid, lora, jobs, work, env)
        if args.full:
            full = make_model(work / "model-19x38", 19, 38)
            lora_full = make_lora(work / "lora-r16-full.safetensors", full)
            jobs = [tuple(j.split(":")) for j in args.full_precisions.split(",")]
            print("\nbuilds from full FLUX.1-dev shapes (11.9 B params):", flush=True)
            rows += run_builds("11.9B", full, lora_full, jobs, work, env)

    if rows:
        print(f"\n{'model':6} {'format':12} {'precision':10} {'wall':>8} {'peak anon':>10} {'output':>9}")
        for r in rows:
            print(
                f"{r['model']:6} {r['format']:12} {r['precision']:10} {r['seconds']:7.1f}s "
                f"{r['peak_anon_bytes'] / 1e9:8.2f} GB {r['output_bytes'] / 1e9:6.2f} GB"
            )
        _beside_fp8_scaled(rows)
        worst = max(rows, key=lambda r: r["peak_anon_bytes"])
        print(
            f"\nhighest peak anonymous memory: {worst['peak_anon_bytes'] / 1e9:.2f} GB "
            f"({worst['model']} {worst['format']} {worst['precision']}); target <= 1.5 GB on the full model"
        )
    if not args.keep:
        for name in ("model-2x4", "lora-r16.safetensors", "model-19x38", "lora-r16-full.safetensors"):
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
