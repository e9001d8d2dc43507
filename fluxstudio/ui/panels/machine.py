"""Machine: what is here, and the advice (format and precision) for the chosen target card."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from fluxstudio.studio import THIS_MACHINE, advice, human_bytes
from fluxstudio.ui.context import Context


@dataclass
class Handles:
    summary: gr.Markdown  # this machine, its free RAM and disk read again every few seconds
    target: gr.Dropdown
    advice: gr.Markdown


def summary(hw, shared: bool) -> str:
    gpus = [
        f"**{a.name}** · {a.kind}"
        + (f" · compute {a.capability[0]}.{a.capability[1]}" if a.capability else "")
        + f" · {human_bytes(a.vram_total_bytes)} VRAM"
        + ("" if a.usable_by_torch else " · *not usable by this PyTorch*")
        for a in hw.accelerators
    ]
    lines = gpus or ["**No GPU** — FluxStudio builds on the CPU; the result is meant for a GPU machine."]
    lines.append(
        f"RAM {human_bytes(hw.ram_total_bytes)} ({human_bytes(hw.ram_available_bytes)} free) · "
        f"disk {human_bytes(hw.disk_free_bytes)} free" + ("" if shared else f" at `{hw.disk_path}`")
    )
    lines += [f"*{n}*" for n in hw.notes if gpus]
    return "  \n".join(lines)


def advice_text(ctx: Context, target: str, model_key: str) -> tuple[str, advice.Recommendation]:
    """(markdown, the recommendation) for the target card and model."""
    rec = ctx.studio.advise(target, model_key)
    alts = "  \n".join(f"· **{a.precision}**: {a.why}" for a in rec.alternatives)
    one_file = ""
    if rec.one_file:
        also = "".join(f" Also offered: **{p}**." for p in rec.one_file_also)
        one_file = f"  \nFor ComfyUI / Forge: **{rec.one_file}** — {rec.one_file_why}{also}"
    return f"**Recommended: {rec.precision}** — {rec.reason}  \n{alts}{one_file}", rec


def render(ctx: Context) -> Handles:
    with gr.Column(elem_id="machine", elem_classes="fs-card"):
        figures = gr.Markdown(summary(ctx.studio.hw, not ctx.settings.local), elem_id="machine-summary")
        with gr.Row():
            target = gr.Dropdown(
                [THIS_MACHINE, *advice.CARDS], value=THIS_MACHINE, label="I will run it on", scale=1, elem_id="target"
            )
            text = gr.Markdown(elem_id="advice")
    return Handles(figures, target, text)


def live(ctx: Context, h: Handles) -> None:
    """Read the free RAM and disk again every 10 s while the page is open."""
    gr.Timer(10).tick(
        lambda: summary(ctx.studio.hw.now(), not ctx.settings.local), None, h.summary, show_progress="hidden"
    )
