"""Output: precision (the advice by default), a name (never a path), shard size, and what it will take."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import gradio as gr

from fluxstudio import advice
from fluxstudio.errors import FluxStudioError
from fluxstudio.hardware import existing_parent
from fluxstudio.library import safe_name
from fluxstudio.models import open_base
from fluxstudio.quantize import make_quantizer
from fluxstudio.ui.context import Context
from fluxstudio.units import human_bytes

SHARD_SIZES = ["1GB", "2GB", "5GB", "10GB"]


@dataclass
class Handles:
    precision: gr.Radio
    name: gr.Textbox
    shard: gr.Dropdown
    estimate: gr.Markdown


def estimate(ctx: Context, precision: str, choice: str, custom: str, model_key: str) -> str:
    """Estimated output size (exact from the weights when the base is here) and the free disk."""
    import shutil

    size = advice.MODELS[model_key].weight_bytes(precision)
    try:
        base_dir = ctx.local_base(choice, custom)
        if base_dir is not None:
            base = open_base(base_dir)
            q = make_quantizer(precision, base.linear_modules, base.family.model_class())
            size = sum(q.estimate_bytes(n, info.numel) for n, (_, info) in base.tensors.items())
    except FluxStudioError:
        pass  # not usable yet: the table's estimate stands
    free = shutil.disk_usage(existing_parent(ctx.settings.output_dir)).free
    warn = " — **not enough space**" if size > free else ""
    return f"Output about **{human_bytes(size)}** · {human_bytes(free)} free{warn}"


def render(ctx: Context) -> Handles:
    with gr.Column(elem_id="output", elem_classes="fs-card"):
        with gr.Row():
            precision = gr.Radio(["bf16", "fp8", "nf4"], value="bf16", label="Precision", elem_id="precision", scale=2)
            name = gr.Textbox(value=f"flux-fused-{datetime.now():%Y%m%d-%H%M}", label="Output name", max_lines=1,
                              elem_id="out-name", scale=2)
            shard = gr.Dropdown(SHARD_SIZES, value="5GB", label="Shard size", scale=1, elem_id="shard")
        text = gr.Markdown(elem_id="estimate")
    return Handles(precision, name, shard, text)


def wire(ctx: Context, h: Handles, base_choice, base_custom, model_key) -> None:
    def refresh(precision, choice, custom, key):
        return estimate(ctx, precision, choice, custom or "", key)

    for trigger in (h.precision.change, model_key.change):
        trigger(refresh, [h.precision, base_choice, base_custom, model_key], h.estimate)
    h.name.blur(lambda name: safe_name(name or ""), h.name, h.name)
