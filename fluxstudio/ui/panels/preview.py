"""Try it: after a build, the same seed rendered with the LoRAs unfused on the base and with the fused output, side
by side with it/s, seconds per image and peak VRAM. Without a GPU it offers the demo only, and says why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from fluxstudio.studio import Status, human_bytes
from fluxstudio.ui.context import Context
from fluxstudio.ui.handlers import error_html, ok_html, user_message
from fluxstudio.ui.panels.run import memory_text, progress_text

INTRO = (
    "The same seed, twice: **(a)** the base at the output's precision with the LoRAs applied unfused, as people "
    "run them today, and **(b)** the fused model just built; **(c)** adds the bf16 base with the LoRAs when it fits "
    "the card."
)


@dataclass
class Handles:
    box: gr.Column
    why: gr.Markdown
    prompt: gr.Textbox
    seed: gr.Number
    steps: gr.Number
    size: gr.Number
    go: gr.Button
    cancel: gr.Button
    job_id: gr.State
    status: gr.HTML
    progress: gr.Markdown
    images: list[gr.Image]
    figures: gr.Markdown


def render() -> Handles:
    with gr.Column(visible=False, elem_id="try-it", elem_classes="fs-card") as box:
        gr.Markdown("### 5 · Try it", elem_classes="fs-step")
        gr.Markdown(INTRO)
        why = gr.Markdown(elem_id="preview-why")
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                "a red fox in fresh snow, detailed fur, golden hour", label="Prompt", scale=4, elem_id="preview-prompt"
            )
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, scale=1, elem_id="preview-seed")
            steps = gr.Number(20, label="Steps", precision=0, minimum=1, maximum=100, scale=1, elem_id="preview-steps")
            size = gr.Number(
                512,
                label="Size (px, square)",
                precision=0,
                minimum=32,
                maximum=2048,
                step=16,
                scale=1,
                elem_id="preview-size",
            )
        with gr.Row():
            go = gr.Button("Try it", variant="primary", scale=3, elem_id="try")
            cancel = gr.Button("Cancel", variant="stop", scale=1, interactive=False, elem_id="preview-cancel")
        status = gr.HTML(elem_id="preview-status")
        progress = gr.Markdown(elem_id="preview-progress")
        with gr.Row():
            images = [  # a short label, so that the toolbar never covers it: the figures are in the table below
                gr.Image(
                    label=f"({k})",
                    type="pil",
                    interactive=False,
                    visible=False,
                    buttons=["download", "fullscreen"],
                    elem_id=f"preview-{k}",
                )
                for k in "abc"
            ]
        figures = gr.Markdown(elem_id="preview-figures")
    return Handles(box, why, prompt, seed, steps, size, go, cancel, gr.State(None), status, progress, images, figures)


def vram_text(r) -> str:
    return human_bytes(r.peak_vram_bytes) if r.peak_vram_bytes is not None else "— (CPU)"


def caption(r) -> str:
    """An image's caption: which it is (its figures are in the table beside it, and in the library's row)."""
    return f"({r.key}) {r.label}"


def figures_table(result) -> str:
    rows = ["| | it/s | seconds per image | peak VRAM |", "| --- | --- | --- | --- |"]
    for r in result.renders:
        rows.append(f"| ({r.key}) {r.label} | {r.it_per_s:.2f} | {r.seconds:.2f} | {vram_text(r)} |")
    s = result.settings
    rows.append(
        f"\nSeed {s['seed']} · {s['steps']} steps · {s['width']}×{s['height']} · guidance {s['guidance']:g} "
        f"· {s['device']}. Saved beside the model (preview.json and the images); the library shows them."
    )
    return "\n".join(rows + [f"*{n}*" for n in result.notes])


SHOWN_PX = 384  # smaller images (the demo's 64²) are shown enlarged, pixel for pixel; the saved files are not


def pictures(result) -> dict[str, tuple]:
    """{key: (PIL image, caption)} of a preview's saved images (a missing or damaged one is left out)."""
    from PIL import Image

    shown = {}
    for r in result.renders:
        try:
            with Image.open(Path(result.folder) / r.image) as im:
                factor = max(1, SHOWN_PX // max(im.size))
                shown[r.key] = (im.resize((im.width * factor, im.height * factor), Image.NEAREST), caption(r))
        except OSError:
            continue
    return shown


def image_updates(result) -> list:
    shown = pictures(result)
    return [
        gr.update(value=shown[k][0], label=shown[k][1], visible=True)
        if k in shown
        else gr.update(value=None, visible=False)
        for k in "abc"
    ]


def on_build(ctx: Context, last) -> list:
    """Show the panel for the output just built, with its defaults; Try it only where it can run here, else why."""
    if not last:
        return [gr.update(visible=False), "", gr.update(), gr.update(), gr.update(interactive=False)]
    why = ctx.studio.preview_problem(last["request"])
    steps, size = ctx.studio.preview_defaults(last["request"], last["output"])
    return [gr.update(visible=True), f"⚠ {why}" if why else "", steps, size, gr.update(interactive=why is None)]


def wire(ctx: Context, h: Handles, last: gr.State, on_done: tuple) -> None:
    shared = not ctx.settings.local
    hidden = [gr.update(visible=False)] * 3

    def run(last, prompt, seed, steps, size):
        idle = gr.update(interactive=True), gr.update(interactive=False)
        if not last:
            yield (None, error_html("Build a model first."), "", *hidden, "", *idle)
            return
        job = ctx.studio.start_preview(last["request"], last["output"], prompt or "", seed or 0, steps or 0, size or 0)
        busy = gr.update(interactive=False), gr.update(interactive=True)
        while not job.finished:
            yield (job.id, "", f"{progress_text(job)}  \n{memory_text(job)}", *[gr.update()] * 4, *busy)
            job.wait(0.5)
        if job.status == Status.DONE:
            yield (None, ok_html("Done."), "", *image_updates(job.result), figures_table(job.result), *idle)
        elif job.status == Status.FAILED:
            yield (None, error_html(user_message(job.error, shared)), "", *hidden, "", *idle)
        else:
            yield (None, ok_html("Cancelled: nothing new was saved."), "", *hidden, "", *idle)

    outputs = [h.job_id, h.status, h.progress, *h.images, h.figures, h.go, h.cancel]
    h.go.click(
        run, [last, h.prompt, h.seed, h.steps, h.size], outputs, concurrency_limit=1, concurrency_id="build"
    ).then(*on_done)
    h.cancel.click(lambda job_id: ctx.studio.cancel(job_id), h.job_id, None, queue=False)
