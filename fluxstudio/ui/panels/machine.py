"""Machine: what is here, and the precision advice for the chosen target card."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from fluxstudio import advice
from fluxstudio.hardware import HardwareInfo
from fluxstudio.ui.context import THIS_MACHINE, Context
from fluxstudio.units import human_bytes


@dataclass
class Handles:
    target: gr.Dropdown
    advice: gr.Markdown


def summary(hw: HardwareInfo, shared: bool) -> str:
    gpus = [
        f"**{a.name}** · {a.kind}" + (f" · compute {a.capability[0]}.{a.capability[1]}" if a.capability else "")
        + f" · {human_bytes(a.vram_total_bytes)} VRAM" + ("" if a.usable_by_torch else " · *not usable by this PyTorch*")
        for a in hw.accelerators
    ]
    lines = gpus or ["**No GPU** — FluxStudio builds on the CPU; the result is meant for a GPU machine."]
    lines.append(f"RAM {human_bytes(hw.ram_total_bytes)} ({human_bytes(hw.ram_available_bytes)} free) · "
                 f"disk {human_bytes(hw.disk_free_bytes)} free" + ("" if shared else f" at `{hw.disk_path}`"))
    lines += [f"*{n}*" for n in hw.notes if gpus]
    return "  \n".join(lines)


def advice_text(ctx: Context, target: str, model_key: str) -> tuple[str, str]:
    """(markdown, recommended precision) for the target card and model."""
    model = advice.MODELS[model_key]
    rec = advice.recommend_here(ctx.hw, model) if target == THIS_MACHINE else advice.recommend(advice.CARDS[target], model)
    alts = "  \n".join(f"· **{a.precision}**: {a.why}" for a in rec.alternatives)
    return f"**Recommended: {rec.precision}** — {rec.reason}  \n{alts}", rec.precision


def render(ctx: Context) -> Handles:
    with gr.Column(elem_id="machine", elem_classes="fs-card"):
        gr.Markdown(summary(ctx.hw, not ctx.settings.local), elem_id="machine-summary")
        with gr.Row():
            target = gr.Dropdown([THIS_MACHINE, *advice.CARDS], value=THIS_MACHINE, label="I will run it on",
                                 scale=1, elem_id="target")
            text = gr.Markdown(elem_id="advice")
    return Handles(target, text)
