"""A GGUF file fitted to uniform Q4_K_S's size (`--fit`) against Q4_K_S, Q4_K_M and Q5_K_S, side by side in one run:
the measure (engine/fit.py) of each, its LoRA retention, file size, wall time and peak anonymous memory.

Model: FLUX.1's width (3072), 2 double + 4 single blocks (1.3 B params), with a rank-16 LoRA on the attention
layers; once with every layer's weights at one scale (0.02) and once with scales spread over 0.01-0.04 per tensor,
as a trained model's layers differ. Builds run in this process, one after another.

    python bench/fit.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import FLUX1_WIDE, linear_shapes, peft_lora, write_model

PRESETS = ("Q4_K_S", "Q4_K_M", "Q5_K_S")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from fluxstudio.engine.fit import describe
    from fluxstudio.flows.build import build, plan_build
    from fluxstudio.flows.request import BuildRequest, LoraRef
    from fluxstudio.formats import FORMATS, Settings

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fit-bench-"))
    try:
        for spread in (0.0, 1.0):
            folder = work / f"spread{spread:g}"
            base = write_model(folder / "base", dict(FLUX1_WIDE, num_layers=2, num_single_layers=4), spread=spread)
            lora = peft_lora(folder / "attn.safetensors", linear_shapes(base, ("attn.",)), rank=16, strength=0.03)
            budget = plan_build(base, [(lora, 1.0)], FORMATS["gguf"], "Q4_K_S", Settings()).need_bytes(folder)
            results = {}
            for precision in (*PRESETS, "fit"):
                out = folder / f"{precision}.gguf"
                req = BuildRequest(
                    str(base), (LoraRef(str(lora)),), precision, out, format="gguf", overwrite=True,
                    fit_bytes=budget if precision == "fit" else 0,
                )  # fmt: skip
                results[precision] = build(req)
                out.unlink()
            mix = results["fit"].fit
            errors = {k: mix["presets"][k]["error"] for k in PRESETS} | {"fit": mix["error"]}
            print(f"\n1.3 B model, layer scales {'0.02 throughout' if not spread else 'spread over 0.01-0.04'}:")
            print(
                f"{'file':<8} {'size MB':>8} {'error':>9} {'/ Q4_K_S':>9} {'LoRA kept':>10} {'wall s':>7} {'peak anon GB':>13}"
            )
            for key, r in results.items():
                print(
                    f"{key:<8} {r.output_bytes / 1e6:8.1f} {errors[key]:9.5f} {errors[key] / errors['Q4_K_S']:9.3f} "
                    f"{r.lora_retained:10.4f} {r.seconds:7.1f} {r.peak_anon_bytes / 1e9:13.2f}"
                )
            print("fit:", "; ".join(describe(mix)))
            print(f"fit: measuring pass {results['fit'].stage_seconds['measure']:.1f} s")
            shutil.rmtree(folder)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
