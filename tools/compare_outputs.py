"""Build every format and precision with this checkout and with another commit, and compare what they wrote.

    python tools/compare_outputs.py [--base REV] [--models demo,wide] [--workdir DIR] [--keep]

Each build runs the command line (`python -m fluxstudio fuse ...`) of its own tree, from a `git worktree` of REV and
from this checkout, on the same inputs: the built-in demo (a whole pipeline, with its LoRA) and a width-3072 FLUX.1
model (1 double + 1 single block, in a pipeline with small text encoders) with a rank-8 LoRA. Then, file by file:
tensor names, dtypes, shapes and bytes; config files; metadata; and the manifest, less what differs from run to run
(creation time, timings, memory, versions). Prints one line per output and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BUILDS = (
    [("diffusers", p) for p in ("bf16", "fp8", "nf4")]
    + [("pipeline", p) for p in ("bf16", "fp8", "nf4")]
    + [("single-file", p) for p in ("bf16", "fp8", "fp8-scaled", "nf4")]
    + [("gguf", p) for p in ("Q8_0", "Q6_K", "Q5_K_S", "Q5_0", "Q4_K_S", "Q4_0", "BF16", "F16")]
)
# manifest fields that differ from one run to the next
VOLATILE = {"created", "timings", "seconds", "peak_ram_bytes", "libraries", "fluxstudio_version"}


def inputs(work: Path) -> dict[str, tuple[str, str]]:
    """{model: (base, lora)}: the demo, and a width-3072 pipeline with its LoRA."""
    from helpers import FLUX1_WIDE, linear_shapes, peft_lora, write_model

    from fluxstudio.sources import demo

    wide = work / "wide"
    if not (wide / "model_index.json").exists():
        transformer = write_model(work / "wide-transformer", FLUX1_WIDE)
        clip = dict(
            demo.DEMO_CLIP,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=64,
        )
        t5 = dict(demo.DEMO_T5, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2)
        demo.make_flux1_pipeline(wide, FLUX1_WIDE, clip=clip, t5=t5, transformer=transformer)
        peft_lora(work / "wide-lora.safetensors", linear_shapes(transformer), rank=8, strength=0.2)
    return {"demo": ("demo", "demo"), "wide": (str(wide), str(work / "wide-lora.safetensors"))}


def run_build(tree: Path, home: Path, base: str, lora: str, fmt: str, precision: str, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree), FLUXSTUDIO_HOME=str(home), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "fluxstudio",
        "fuse",
        "--base",
        base,
        "--lora",
        lora,
        "--lora-scale",
        "0.8",
        "--format",
        fmt,
        "--precision",
        precision,
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)


def stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def describe(path: Path) -> dict:
    """What a file holds, as comparable values: tensors by name (dtype, shape, sha256 of the bytes) and metadata."""
    import hashlib

    if path.suffix == ".safetensors":
        from fluxstudio.engine.safefile import read_header  # this checkout's reader for both trees' files

        header = read_header(path)
        with path.open("rb") as f:
            tensors = {}
            for name, info in header.tensors.items():
                f.seek(info.offset)
                tensors[name] = (str(info.dtype), info.shape, hashlib.sha256(f.read(info.nbytes)).hexdigest())
        meta = dict(header.metadata)
        if "fluxstudio" in meta:
            meta["fluxstudio"] = stable(json.loads(meta["fluxstudio"]))
        return {"tensors": tensors, "metadata": meta}
    if path.suffix == ".gguf":
        import gguf

        reader = gguf.GGUFReader(str(path))
        tensors = {
            t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), hashlib.sha256(bytes(t.data)).hexdigest())
            for t in reader.tensors
        }
        fields = {}
        for name, field in reader.fields.items():
            value = (
                bytes(field.parts[-1]).decode("utf-8", "replace")
                if field.types and field.types[0] == gguf.GGUFValueType.STRING
                else [int(x) for x in field.parts[-1]]
            )
            fields[name] = stable(json.loads(value)) if name == "fluxstudio" else value
        return {"tensors": tensors, "fields": fields}
    if path.name == "fluxstudio.json":
        return stable(json.loads(path.read_text()))
    return {"bytes": hashlib.sha256(path.read_bytes()).hexdigest()}


def files(out: Path) -> dict[str, Path]:
    if out.is_file():
        return {out.name: out}
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="HEAD", help="the commit to compare with (default HEAD: the last commit)")
    p.add_argument("--models", default="demo,wide")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fs-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    old = work / "old-tree"
    if not old.exists():
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.base], cwd=ROOT, check=True)
    different = 0
    try:
        models = inputs(work)
        for model in args.models.split(","):
            base, lora = models[model]
            for fmt, precision in BUILDS:
                if fmt == "pipeline" and model == "wide" and precision == "nf4":
                    continue  # T5 in NF4 is covered by the demo; the wide pipeline's tiny T5 is the same code
                name = f"{model}-{fmt}-{precision}" + {"single-file": ".safetensors", "gguf": ".gguf"}.get(fmt, "")
                outs = {}
                for label, tree in (("old", old), ("new", ROOT)):
                    out = work / label / name
                    if not out.exists():
                        run_build(tree, work / f"home-{label}", base, lora, fmt, precision, out)
                    outs[label] = out
                a, b = files(outs["old"]), files(outs["new"])
                diffs = sorted(set(a) ^ set(b)) + [
                    n for n in sorted(set(a) & set(b)) if describe(a[n]) != describe(b[n])
                ]
                print(
                    f"{'same' if not diffs else 'DIFFERENT'}  {name}"
                    + (f"  ({', '.join(diffs[:4])})" if diffs else ""),
                    flush=True,
                )
                different += bool(diffs)
                for label in ("old", "new"):
                    if not args.keep:
                        shutil.rmtree(outs[label], ignore_errors=True) if outs[label].is_dir() else outs[label].unlink()
    finally:
        if not args.keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
            shutil.rmtree(work, ignore_errors=True)
    print(f"{different} output(s) differ" if different else "every output is the same")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
