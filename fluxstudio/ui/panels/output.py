"""Output: what the model is for (the format), its precision (the advice by default), a name (never a path; a
taken one gets -2, -3… unless Replace is ticked and confirmed), the shard size, and what it will take on disk."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import gradio as gr

from fluxstudio.studio import FORMATS, Pick, human_bytes, safe_name
from fluxstudio.ui.choice import Choice
from fluxstudio.ui.context import Context
from fluxstudio.ui.panels.base import reference

SHARD_SIZES = ["1GB", "2GB", "5GB", "10GB"]
ENCODER_PRECISIONS = sorted({p for f in FORMATS.values() for p in f.encoder_options})


@dataclass
class Handles:
    format: gr.Radio
    precision: gr.Radio
    name: gr.Textbox
    replace: gr.Checkbox | None  # local only: replace an output of the same name (confirmed when ticked)
    shard: gr.Dropdown
    estimate: gr.Markdown
    t5: gr.Radio  # T5-XXL's precision, for pipeline exports


def default_name() -> str:
    return f"flux-fused-{datetime.now():%Y%m%d-%H%M}"


def precision_choices(ctx: Context, base: str, format: str, model_key: str) -> list[tuple[str, str]]:
    """The format's precisions, each with its size: from the base's own size when it is here, else the model
    table's."""
    return [(f"{p} · ~{human_bytes(n)}", p) for p, n in ctx.studio.sizes(base, format, model_key).items()]


def default_precision(format: str, advised: str, one_file: tuple[Pick, ...]) -> str:
    """The advice's pick where the format offers it (for the Python formats), else the advice for one-file users
    (its pick, then what it offers beside it), else the format's default."""
    fmt = FORMATS[format]
    if advised in fmt.precisions and not fmt.one_file:
        return advised
    return next((p.precision for p in one_file if p.format == format), fmt.default)


def precision_update(ctx: Context, base: str, format: str, model_key: str, rec) -> dict:
    """The precision choices for a format, with the advice's pick (`rec`, a Recommendation) selected."""
    value = default_precision(format, rec.precision, rec.one_file_picks)
    return gr.update(choices=precision_choices(ctx, base, format, model_key), value=value)


def sizes_update(ctx: Context, base: str, format: str, model_key: str, precision: str) -> dict:
    """The same precisions with the sizes of another base, the pick kept (the advice's own updates choose it)."""
    fmt = FORMATS[format]
    value = precision if precision in fmt.precisions else fmt.default
    return gr.update(choices=precision_choices(ctx, base, format, model_key), value=value)


def estimate(
    ctx: Context, choice: str, custom: str, items: list, format: str, precision: str, model_key: str, t5: str = ""
) -> str:
    """The size the build will check the disk against (exact once the base is here), and the free disk."""
    fmt = FORMATS[format]
    if precision not in fmt.precisions:
        return ""
    est = ctx.studio.estimate(
        reference(choice, custom), [it["path"] for it in items or []], format, precision, model_key, t5
    )
    warn = " — **not enough space**" if not est.fits else ""
    size = human_bytes(est.bytes) if est.exact else f"~{human_bytes(est.bytes)}"
    return f"Output about **{size}** · {human_bytes(est.free)} free{warn}  \n{fmt.option(precision).note}"


def render(ctx: Context) -> Handles:
    with gr.Column(elem_id="output", elem_classes="fs-card"):
        fmt = gr.Radio(
            [(f.label, f.key) for f in FORMATS.values()],
            value="diffusers",
            label="What is the model for?",
            elem_id="format",
        )
        with gr.Row():
            precision = Choice(
                precision_choices(ctx, "demo", "diffusers", "flux1"),
                value="bf16",
                label="Precision",
                elem_id="precision",
                scale=3,
            )
            with gr.Column(scale=2, min_width=220):
                name = gr.Textbox(value=default_name(), label="Output name", max_lines=1, elem_id="out-name")
                replace = (
                    gr.Checkbox(False, label="Replace an output of this name", elem_id="out-replace")
                    if ctx.settings.local
                    else None
                )
            shard = gr.Dropdown(SHARD_SIZES, value="5GB", label="Shard size", scale=1, elem_id="shard")
        t5 = gr.Radio(
            ENCODER_PRECISIONS,
            value="bf16",
            label="T5-XXL text encoder precision",
            visible=False,
            elem_id="t5-precision",
        )
        text = gr.Markdown(elem_id="estimate")
    return Handles(fmt, precision, name, replace, shard, text, t5)


def wire(ctx: Context, h: Handles, base_choice, base_custom, model_key, loras, target) -> None:
    inputs = [base_choice, base_custom, loras, h.format, h.precision, model_key, h.t5]

    def refresh(choice, custom, items, format, precision, key, t5):
        return estimate(ctx, choice, custom, items, format, precision, key, t5)

    def on_format(choice, custom, format, key, target_card):
        rec = ctx.studio.advise(target_card, key)
        fmt = FORMATS[format]
        return (
            precision_update(ctx, reference(choice, custom), format, key, rec),
            gr.update(visible=not fmt.one_file),
            gr.update(visible=bool(fmt.encoder_options), value=rec.text_encoder),
        )

    h.format.change(on_format, [base_choice, base_custom, h.format, model_key, target], [h.precision, h.shard, h.t5])
    for trigger in (h.precision.change, model_key.change, loras.change, h.t5.change):
        trigger(refresh, inputs, h.estimate)
    h.name.blur(lambda name: safe_name(name or ""), h.name, h.name)
    if h.replace is not None:  # asked once, when ticked: unticked again unless confirmed
        h.replace.input(
            None,
            [h.replace, h.name],
            h.replace,
            js="(on, name) => on && confirm(`Replace the output named ${name} if it exists? The old one is deleted "
            + "once the new one is complete.`)",
        )
