"""The exact code to load an output, per precision (shown in the output's README, the CLI and the UI)."""

from __future__ import annotations

from fluxstudio.models import Family

PIPELINES = {"flux1": ("FluxPipeline", "black-forest-labs/FLUX.1-dev"), "flux2": ("Flux2Pipeline", "black-forest-labs/FLUX.2-dev")}


def load_snippet(folder: str, precision: str, family: Family) -> str:
    cls = family.class_name
    pipe_cls, repo = PIPELINES[family.key]
    lines = ["import torch", f"from diffusers import {cls}, {pipe_cls}", ""]
    lines.append(f'transformer = {cls}.from_pretrained(r"{folder}", torch_dtype=torch.bfloat16)')
    if precision == "fp8":
        lines.append("transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)")
    lines += [
        f'pipe = {pipe_cls}.from_pretrained("{repo}", transformer=transformer, torch_dtype=torch.bfloat16)',
        "pipe.enable_model_cpu_offload()  # or pipe.to(\"cuda\") on a large card",
    ]
    return "\n".join(lines)


PRECISION_NOTES = {
    "bf16": "bf16 weights: full quality, the most VRAM.",
    "fp8": "Linear weights stored as float8_e4m3fn and computed in bf16 (layerwise casting): half the VRAM of bf16.",
    "nf4": "bitsandbytes NF4 (4-bit) weights, loaded by diffusers as Linear4bit layers; needs bitsandbytes and a CUDA GPU.",
}


def readme(name: str, precision: str, family: Family, manifest: dict) -> str:
    loras = "\n".join(f"- {entry['name']} (scale {entry['scale']}, sha256 {entry['sha256'][:12]}…)" for entry in manifest["loras"])
    return (
        f"# {name}\n\n"
        f"{manifest['base']['variant']} transformer with these LoRAs fused at full precision, then saved as {precision}:\n\n"
        f"{loras or '- (no LoRA)'}\n\n{PRECISION_NOTES[precision]}\n\n"
        f"## Load it\n\n```python\n{load_snippet('path/to/' + name, precision, family)}\n```\n\n"
        "Made with FluxStudio; `fluxstudio.json` records the inputs, versions and timings.\n"
    )
