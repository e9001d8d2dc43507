"""What unfused LoRAs cost on quantized FLUX, against the fused output: it/s and peak VRAM, side by side in one run.

FLUX.1-dev shapes (19 double + 38 single blocks; random weights, which speed does not depend on), a rank-16 LoRA on
attention and MLP, 1024², 20 steps, through the preview's own code (the app's Try it: the same loaders, unfused
LoRA application, fp8 layerwise casting and timing). For each precision: the base alone, the base + LoRA unfused,
and the output FluxStudio fused. Goal: fused runs at the base's speed; unfused shows the drop people see.
Needs a CUDA GPU and about 45 GB of disk (the bf16 model and the fused outputs).

    python bench/preview_speed.py [--workdir DIR] [--double 19 --single 38] [--size 1024 --steps 20]
        [--precisions diffusers:nf4,diffusers:fp8,comfyui:fp8,comfyui:nvfp4]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CLIP = {
    "hidden_size": 768,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
T5 = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 256,
    "num_layers": 1,
    "num_heads": 2,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}


def main() -> None:
    import torch
    from fuse_vs_diffusers import WIDTH_CONFIG, make_lora, make_model

    from fluxstudio.flows import preview
    from fluxstudio.flows.build import build
    from fluxstudio.flows.request import BuildRequest, LoraRef
    from fluxstudio.formats import get_format
    from fluxstudio.progress import Run
    from fluxstudio.sources import demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fluxstudio-bench")
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--precisions",
        default="diffusers:nf4,diffusers:fp8,comfyui:fp8,comfyui:nvfp4",
        help="FORMAT:PRECISION pairs (a bare precision is the diffusers format's)",
    )
    ap.add_argument("--device", default="cuda", help="cuda (cpu only to check the script on small shapes)")
    args = ap.parse_args()
    os.environ.setdefault("FLUXSTUDIO_HOME", str(args.workdir / "home"))  # the unfused bases' own files go there
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("This benchmark measures GPU speed: no CUDA GPU here.")
    tag = f"{args.double}x{args.single}"
    print(f"preparing FLUX.1 shapes {tag} (once)...", flush=True)
    base = make_model(args.workdir / f"model-{tag}", args.double, args.single)
    lora = make_lora(args.workdir / f"lora-{tag}-r16.safetensors", base)
    root = args.workdir / f"pipe-{tag}"
    if not (root / "model_index.json").exists():
        demo.make_flux1_pipeline(
            root,
            dict(WIDTH_CONFIG, num_layers=args.double, num_single_layers=args.single),
            clip=CLIP,
            t5=T5,
            transformer=base,
            vae=demo.FLUX1_VAE,
        )
    g = torch.Generator().manual_seed(0)
    embeds = (torch.randn(1, 512, 4096, generator=g).bfloat16(), torch.randn(1, 768, generator=g).bfloat16())
    settings = {
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "guidance": 3.5,
        "seed": 0,
        "device": args.device,
    }
    total_vram = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 0
    shared = preview._shared(root)
    images = args.workdir / f"preview-speed-{tag}"
    images.mkdir(exist_ok=True)
    rows: dict[str, dict[str, preview.Render]] = {}
    run, stop = Run(), preview.Stop(None, math.inf)
    for pair in args.precisions.split(","):
        fmt_key, precision = pair.split(":") if ":" in pair else ("diffusers", pair)
        fmt = get_format(fmt_key)
        out = fmt.output_path(args.workdir / f"fused-{tag}-{fmt_key}-{precision}")
        if not out.exists():
            print(f"fusing {pair}...", flush=True)
            loras = (LoraRef(str(lora), 1.0),)
            build(BuildRequest(str(root), loras, precision, out, format=fmt_key, device=args.device))
        how = fmt.preview_runtime(precision)
        rows[pair] = {}
        for key, source, with_lora in (
            ("base", "base", False),
            ("base + LoRA unfused", "base", True),
            ("fused (FluxStudio)", "output", False),
        ):
            if source == "output":
                model = fmt.load_transformer(out, root / "transformer")
            else:
                model = preview._base(how, fmt, precision, root, run, None, str(root))
            loras = [(lora, 1.0)] if with_lora else []
            r = preview._render(key, key, model, loras, how, shared, embeds, settings, total_vram, images, run, stop)
            del model
            preview._free(args.device)
            rows[pair][key] = r
            vram = f"{r.peak_vram_bytes / 2**30:.2f} GiB" if r.peak_vram_bytes is not None else "-"
            print(
                f"  {pair:>14} {key:<22} {r.it_per_s:6.3f} it/s  {r.seconds:7.1f} s/image  peak VRAM {vram}",
                flush=True,
            )
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"\n{device}, FLUX.1 {tag}, {args.size}², {args.steps} steps, rank-16 LoRA:")
    for precision, r in rows.items():
        base_speed = r["base"].it_per_s
        print(
            f"  {precision}: base {base_speed:.3f} it/s · unfused LoRA {r['base + LoRA unfused'].it_per_s:.3f} it/s "
            f"(x{r['base + LoRA unfused'].it_per_s / base_speed:.2f}) · fused {r['fused (FluxStudio)'].it_per_s:.3f} it/s "
            f"(x{r['fused (FluxStudio)'].it_per_s / base_speed:.2f}; goal x1.00) · fused / unfused "
            f"x{r['fused (FluxStudio)'].it_per_s / r['base + LoRA unfused'].it_per_s:.2f}"
        )


if __name__ == "__main__":
    main()
