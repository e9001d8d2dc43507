"""What the LoRA-retention score costs: the same NF4 build with and without it, side by side in one run.

Model: FLUX.1 width (3072), 2 double + 4 single blocks (1.3 B params, the mid model of fuse_vs_diffusers.py),
rank-16 LoRA on attention + MLP. Both builds stream the same plan through the same writer; the only difference is
whether the writer measures what it stored against the LoRA. Runs alternate and the best of each is kept.
Goal: at most 15% more wall time.

    python bench/retention_cost.py [--workdir DIR] [--rounds N] [--format diffusers --precision nf4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def one_build(
    base: Path, lora: Path, out: Path, fmt: str, precision: str, measure: bool
) -> tuple[float, float | None, float]:
    from fluxstudio.engine.fuse import execute
    from fluxstudio.engine.retention import Retention
    from fluxstudio.flows.build import plan_build
    from fluxstudio.formats import Settings, get_format

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    output = plan_build(base, [(lora, 1.0)], get_format(fmt), precision, Settings("bench.out")).writer
    if not measure:
        output.retention = Retention({})  # a writer with nothing to measure
    output.open(out, {})
    execute(output.jobs, output.encode, output.write, "cpu")
    output.close()
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds, output.retention.score, output.retention.seconds


def main() -> None:
    from fuse_vs_diffusers import make_lora, make_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fluxstudio-bench")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--format", default="diffusers")
    ap.add_argument("--precision", default="nf4")
    ap.add_argument("--keep", action="store_true", help="keep the generated model for the next run")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("preparing the model (once)...", flush=True)
    base = make_model(args.workdir / "model-2x4", 2, 4)
    lora = make_lora(args.workdir / "lora-r16.safetensors", base)
    times: dict[bool, list[float]] = {False: [], True: []}
    inside: list[float] = []
    score = None
    for _ in range(args.rounds):
        for measure in (False, True):
            seconds, s, scoring = one_build(base, lora, args.workdir / "out", args.format, args.precision, measure)
            times[measure].append(seconds)
            if measure:
                score = s
                inside.append(scoring)
            print(
                f"  {'with' if measure else 'without'} the score: {seconds:.1f} s"
                + (f" (of which scoring {scoring:.2f} s)" if measure else ""),
                flush=True,
            )
    off, on = min(times[False]), min(times[True])
    print(
        f"\n{args.format} {args.precision}, 1.3B: without {off:.1f} s, with {on:.1f} s -> x{on / off:.3f} "
        f"({100 * (on / off - 1):+.1f}%; goal at most +15%); LoRA effect kept: {100 * score:.2f}%"
    )
    # the score runs on the build's own thread, so its time adds to the wall time as it is: the steadier figure
    print(
        f"time inside the builds spent scoring: best {min(inside):.2f} s = {100 * min(inside) / off:+.1f}% of the "
        f"build without it (median {100 * statistics.median(inside) / statistics.median(times[False]):+.1f}%)"
    )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
        lora.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
