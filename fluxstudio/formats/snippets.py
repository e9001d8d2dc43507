"""The exact code to load an output, per format and precision (shown in the output's README, the CLI and the UI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluxstudio.formats import FORMATS, PRECISIONS

if TYPE_CHECKING:
    from fluxstudio.engine.models import Family

PIPELINES = {"flux1": ("FluxPipeline", "black-forest-labs/FLUX.1-dev"), "flux2": ("Flux2Pipeline", "black-forest-labs/FLUX.2-dev")}


def load_snippet(path: str, precision: str, family: Family, format: str = "diffusers", t5_precision: str = "") -> str:
    """Python that loads the output with diffusers, or a sentence saying why diffusers cannot."""
    cls = family.class_name
    pipe_cls, repo = PIPELINES[family.key]
    if format == "single-file" and precision in ("nf4", "fp8-scaled"):
        readers = "Forge reads" if precision == "nf4" else "ComfyUI and Forge read"
        return (f"# diffusers does not read {precision} single files ({readers} them).\n"
                "# For diffusers, build the diffusers format or a GGUF file instead.")
    imports = f"from diffusers import {cls}, {pipe_cls}"
    if format == "pipeline":
        lines = ["import torch", f"from diffusers import {pipe_cls}", "",
                 f'pipe = {pipe_cls}.from_pretrained(r"{path}", torch_dtype=torch.bfloat16)']
        fp8 = [c for c, p in (("transformer", precision), ("text_encoder_2", t5_precision)) if p == "fp8"]
        lines += [f"pipe.{c}.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)"
                  if c == "transformer" else
                  f"apply_layerwise_casting(pipe.{c}, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)" for c in fp8]
        if "text_encoder_2" in fp8:
            lines.insert(2, "from diffusers.hooks import apply_layerwise_casting")
        return "\n".join(lines + ["pipe.enable_model_cpu_offload()  # or pipe.to(\"cuda\") on a large card"])
    if format == "diffusers":
        load = f'transformer = {cls}.from_pretrained(r"{path}", torch_dtype=torch.bfloat16)'
    elif format == "gguf":
        imports = f"from diffusers import {cls}, {pipe_cls}, GGUFQuantizationConfig"
        load = (f'transformer = {cls}.from_single_file(\n    r"{path}", config="{repo}", subfolder="transformer",\n'
                "    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16), torch_dtype=torch.bfloat16,\n)")
    else:
        load = f'transformer = {cls}.from_single_file(\n    r"{path}", config="{repo}", subfolder="transformer", torch_dtype=torch.bfloat16,\n)'
    lines = ["import torch", imports, "", load]
    if precision == "fp8":
        lines.append("transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)")
    lines += [
        f'pipe = {pipe_cls}.from_pretrained("{repo}", transformer=transformer, torch_dtype=torch.bfloat16)',
        "pipe.enable_model_cpu_offload()  # or pipe.to(\"cuda\") on a large card",
    ]
    return "\n".join(lines)


ENCODER_PLACES = {"clip_l": "CLIP-L", "t5xxl_fp8_e4m3fn": "T5-XXL"}


def placement(format: str, files: list[str] = ()) -> str:
    """Where a user puts the output (and the fused text encoders written beside it) and which loader reads it."""
    where = FORMATS[format].where
    encoders = [f for f in files if f.rsplit(".", 2)[-2] in ENCODER_PLACES] if FORMATS[format].extension else []
    if encoders:
        where += (" The fused text encoders (" + ", ".join(encoders) + ") go to ComfyUI's models/text_encoders/ "
                  "(DualCLIPLoader, type flux) or Forge's models/text_encoder/.")
    return where


def readme(name: str, precision: str, family: Family, manifest: dict) -> str:
    loras = "\n".join(f"- {entry['name']} (scale {entry['scale']}, sha256 {entry['sha256'][:12]}…)" for entry in manifest["loras"])
    format = manifest.get("format", "diffusers")
    t5 = manifest.get("text_encoder_precision", {}).get("text_encoder_2", "")
    what = "pipeline" if format == "pipeline" else "transformer"
    return (
        f"# {name}\n\n"
        f"{manifest['base']['variant']} {what} with these LoRAs fused at full precision, then saved as {precision}"
        f"{f' (T5-XXL: {t5})' if t5 else ''}:\n\n"
        f"{loras or '- (no LoRA)'}\n\n{PRECISIONS[precision].note}\n\n"
        f"## Load it\n\n```python\n{load_snippet('path/to/' + name, precision, family, format, t5)}\n```\n\n"
        "Made with FluxStudio; `fluxstudio.json` records the inputs, versions and timings.\n"
    )
