"""Fuse & save: the job, its live progress and memory readout, Cancel, and the result with its loading snippet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from fluxstudio.progress import Stage
from fluxstudio.studio import Job, Status, describe_fit, describe_retention, human_bytes, safe_name
from fluxstudio.ui.context import Context
from fluxstudio.ui.handlers import error_html, ok_html, user_message
from fluxstudio.ui.panels.base import reference

STAGES = {
    Stage.PREPARE: "Preparing",
    Stage.DOWNLOAD: "Downloading",
    Stage.INSPECT: "Checking inputs",
    Stage.FUSE: "Fusing and quantizing",
    Stage.FINALIZE: "Writing",
}


@dataclass
class Handles:
    go: gr.Button
    cancel: gr.Button
    job_id: gr.State
    status: gr.HTML
    progress: gr.Markdown
    memory: gr.Markdown
    result: gr.Markdown
    snippet: gr.Code
    last: gr.State  # the last finished build: {"request", "output"} for Try it (None when the last one failed)


def progress_text(job: Job) -> str:
    ev = job.event
    if ev is None:
        return "Starting…"
    line = f"**{ev.message if ev.stage == Stage.PREVIEW else STAGES.get(ev.stage, ev.stage)}**"
    if ev.total:
        unit = {Stage.DOWNLOAD: "files", Stage.PREVIEW: "steps"}.get(ev.stage, "tensors")
        line += f" · {ev.done}/{ev.total} {unit}"
    if ev.bytes_total:
        line += f" · {human_bytes(ev.bytes_done)} of {human_bytes(ev.bytes_total)} ({100 * ev.bytes_done / ev.bytes_total:.0f}%)"
    eta = job.eta_seconds()
    if eta is not None and ev.bytes_done < ev.bytes_total:
        line += f" · about {eta:.0f} s left"
    return line + f" · {time.monotonic() - job.started:.0f} s"


def memory_text(job: Job) -> str:
    now, s = job.memory, job.sampler
    text = f"RAM **{human_bytes(now.anon_bytes)}** now · {human_bytes(max(s.peak_anon_bytes, now.anon_bytes))} peak"
    if now.vram_total_bytes:
        peak = max(s.peak_vram_bytes, now.vram_allocated_bytes)
        text += f" · VRAM **{human_bytes(now.vram_allocated_bytes)}** now · {human_bytes(peak)} peak"
    return text


def result_text(ctx: Context, job: Job, shared: bool) -> str:
    r = job.result
    where = r.output_dir.replace("\\", "/").rsplit("/", 1)[-1] if shared else r.output_dir
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in r.stage_seconds.items())
    lines = [
        f"### Saved `{where}`",
        f"{r.format} · {r.precision} · **{human_bytes(r.output_bytes)}** in {len(r.files)} file(s) · "
        f"{r.tensors_fused} tensors fused"
        + (f" · {describe_retention(r.lora_retained)}" if r.lora_retained is not None else ""),
        f"Time **{r.seconds:.1f} s** ({stages})",
        f"Peak RAM **{human_bytes(r.peak_anon_bytes)}** (RSS {human_bytes(r.peak_ram_bytes)})"
        + (f" · peak VRAM **{human_bytes(r.peak_vram_bytes)}**" if r.peak_vram_bytes else ""),
    ]
    lines += describe_fit(r.fit)
    if place := ctx.studio.placement(r):
        lines.append(f"**Where it goes:** {place}")
    if len(r.fused_per_component) > 1:
        lines.append("Fused: " + ", ".join(f"{k} {v} tensors" for k, v in r.fused_per_component.items()))
    lines += [f"**{n}**" if n.startswith("Warning:") else f"*{n}*" for n in r.notes]
    return "  \n".join(lines)


def render() -> Handles:
    with gr.Row():
        go = gr.Button("Fuse & save", variant="primary", size="lg", elem_id="fuse", scale=3)
        cancel = gr.Button("Cancel", variant="stop", size="lg", elem_id="cancel", scale=1, interactive=False)
    status = gr.HTML(elem_id="run-status")
    with gr.Row():
        progress = gr.Markdown(elem_id="progress")
        memory = gr.Markdown(elem_id="memory")
    result = gr.Markdown(elem_id="result")
    snippet = gr.Code(language="python", label="Load it in diffusers", visible=False, elem_id="snippet")
    return Handles(go, cancel, gr.State(None), status, progress, memory, result, snippet, gr.State(None))


def wire(
    ctx: Context,
    h: Handles,
    base_choice,
    base_custom,
    loras,
    format,
    precision,
    name,
    replace,
    shard,
    t5,
    fit,
    on_done,
) -> None:
    shared = not ctx.settings.local

    def run(choice, custom, items, fmt, prec, out_name, shard_size, t5_precision, fit_gb, replace_it=False):
        idle = gr.update(interactive=True), gr.update(interactive=False)
        try:
            wanted = safe_name(out_name or "")
            out_name = wanted if replace_it else ctx.studio.free_name(wanted, fmt)  # a second build keeps both
            req = ctx.studio.request(
                reference(choice, custom),
                [(it["ref"], it["scale"]) for it in items],
                fmt,
                prec,
                out_name,
                shard_size,
                t5_precision,
                overwrite=bool(replace_it),
                fit_gb=fit_gb or 0.0,
            )
        except Exception as exc:  # noqa: BLE001 - shown as one sentence
            yield (None, error_html(user_message(exc, shared)), "", "", "", gr.update(visible=False), *idle, None)
            return
        job = ctx.studio.start(req)
        busy = gr.update(interactive=False), gr.update(interactive=True)
        while not job.finished:
            yield (job.id, "", progress_text(job), memory_text(job), "", gr.update(visible=False), *busy, None)
            job.wait(0.5)
        if job.status == Status.DONE:
            r = job.result
            snippet = ctx.studio.snippet(r, req, None if not shared else f"path/to/{req.out_dir.name}")
            taken = f" {wanted} was taken, so this one is {out_name}." if out_name != wanted else ""
            yield (
                None,
                ok_html("Done." + taken),
                f"**Done** · {r.seconds:.0f} s",
                memory_text(job),
                result_text(ctx, job, shared),
                gr.update(value=snippet, visible=True),
                *idle,
                {"request": req, "output": Path(r.output_dir)},
            )
        else:
            if job.status == Status.FAILED:
                status = error_html(user_message(job.error, shared))
            else:  # a cancelled download says what it kept
                status = ok_html(user_message(job.error, shared) if job.error else "Cancelled: nothing was saved.")
            yield (None, status, "", memory_text(job), "", gr.update(visible=False), *idle, None)

    outputs = [h.job_id, h.status, h.progress, h.memory, h.result, h.snippet, h.go, h.cancel, h.last]
    event = h.go.click(
        run,
        [base_choice, base_custom, loras, format, precision, name, shard, t5, fit] + ([replace] if replace else []),
        outputs,
        concurrency_limit=1,
        concurrency_id="build",
    )
    for then in on_done:
        event = event.then(*then)

    def cancel(job_id):
        ctx.studio.cancel(job_id)

    h.cancel.click(cancel, h.job_id, None, queue=False)
