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
    fit: gr.Number  # the size a fitted file must fit in, in GB (a format's `fitted` precisions)


def default_name() -> str:
    return f"flux-fused-{datetime.now():%Y%m%d-%H%M}"


FIT_LABEL = "Fit a size · each weight's type chosen to fit the size below"


def precision_choices(ctx: Context, base: str, format: str, model_key: str) -> list[tuple[str, str]]:
    """The format's precisions, each with its size: from the base's own size when it is here, else the model
    table's; for a format that fits sizes, fitting one first."""
    sizes = [(f"{p} · ~{human_bytes(n)}", p) for p, n in ctx.studio.sizes(base, format, model_key).items()]
    fitted = [(getattr(o, "label", FIT_LABEL), o.key) for o in FORMATS[format].fitted]
    return fitted + sizes


def default_precision(format: str, advised: str, one_file: tuple[Pick, ...]) -> str:
    """The advice's pick where the format offers it (for the Python formats), else the advice for one-file users
    (its pick, then what it offers beside it), else the format's default."""
    fmt = FORMATS[format]
    if advised in fmt.precisions and not fmt.one_file:
        return advised
    return next((p.precision for p in one_file if p.format == format), fmt.default)


def offered(format: str, precision: str) -> bool:
    return precision in FORMATS[format].precisions + FORMATS[format].fit_keys


def precision_update(ctx: Context, base: str, format: str, model_key: str, rec) -> dict:
    """The precision choices for a format, with the advice's pick (`rec`, a Recommendation) selected."""
    value = default_precision(format, rec.precision, rec.one_file_picks)
    return gr.update(choices=precision_choices(ctx, base, format, model_key), value=value)


def fit_update(format: str, precision: str, rec=None) -> dict:
    """The size field: shown while a size is fitted; the advice's size for the card (`rec`), where it fits one."""
    shown = gr.update(visible=precision in FORMATS[format].fit_keys)
    picks = rec.one_file_picks if rec is not None else ()
    fitted = next((p for p in picks if p.fit_bytes and p.format == format), None)
    return shown | ({"value": round(fitted.fit_bytes / 1e9, 2)} if fitted else {})


def sizes_update(ctx: Context, base: str, format: str, model_key: str, precision: str) -> dict:
    """The same precisions with the sizes of another base, the pick kept (the advice's own updates choose it)."""
    value = precision if offered(format, precision) else FORMATS[format].default
    return gr.update(choices=precision_choices(ctx, base, format, model_key), value=value)


def estimate(
    ctx: Context,
    choice: str,
    custom: str,
    items: list,
    format: str,
    precision: str,
    model_key: str,
    t5: str = "",
    fit_gb: float | None = None,
) -> str:
    """The size the build will check the disk against (exact once the base is here), and the free disk."""
    fmt = FORMATS[format]
    if not offered(format, precision):
        return ""
    fit_bytes = int((fit_gb or 0) * 1e9)
    if precision in fmt.fit_keys and fit_bytes <= 0:
        return f"Give the size the file must fit in.  \n{fmt.option(precision).note}"
    est = ctx.studio.estimate(
        reference(choice, custom), [it["path"] for it in items or []], format, precision, model_key, t5, fit_bytes
    )
    warn = " — **not enough space**" if not est.fits else ""
    if precision in fmt.fit_keys:
        size = f"at most **{human_bytes(est.bytes)}**"
    else:
        size = "about **" + (human_bytes(est.bytes) if est.exact else f"~{human_bytes(est.bytes)}") + "**"
    return f"Output {size} · {human_bytes(est.free)} free{warn}  \n{fmt.option(precision).note}"


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
        fit = gr.Number(
            label="The file must fit in (GB)",
            value=None,
            minimum=0.01,
            step=0.5,
            visible=False,
            elem_id="fit-size",
            info="Defaults to the card's VRAM less room for activations, the VAE and the text encoders.",
        )
        text = gr.Markdown(elem_id="estimate")
    return Handles(fmt, precision, name, replace, shard, text, t5, fit)


def wire(ctx: Context, h: Handles, base_choice, base_custom, model_key, loras, target) -> None:
    inputs = [base_choice, base_custom, loras, h.format, h.precision, model_key, h.t5, h.fit]

    def refresh(choice, custom, items, format, precision, key, t5, fit_gb):
        return estimate(ctx, choice, custom, items, format, precision, key, t5, fit_gb)

    def on_format(choice, custom, format, key, target_card):
        rec = ctx.studio.advise(target_card, key)
        fmt = FORMATS[format]
        precision = precision_update(ctx, reference(choice, custom), format, key, rec)
        return (
            precision,
            gr.update(visible=not fmt.one_file),
            gr.update(visible=bool(fmt.encoder_options), value=rec.text_encoder),
            fit_update(format, precision["value"], rec),
        )

    h.format.change(
        on_format, [base_choice, base_custom, h.format, model_key, target], [h.precision, h.shard, h.t5, h.fit]
    )
    gr.on(  # one listener, one run at a time, the newest pending one last: the line shows the latest inputs
        [h.precision.change, model_key.change, loras.change, h.t5.change, h.fit.change],
        refresh,
        inputs,
        h.estimate,
        trigger_mode="always_last",
        concurrency_limit=1,
    )
    h.precision.change(fit_update, [h.format, h.precision], h.fit)
    h.name.blur(lambda name: safe_name(name or ""), h.name, h.name)
    if h.replace is not None:  # asked once, when ticked: unticked again unless confirmed
        h.replace.input(
            None,
            [h.replace, h.name],
            h.replace,
            js="(on, name) => on && confirm(`Replace the output named ${name} if it exists? The old one is deleted "
            + "once the new one is complete.`)",
        )
