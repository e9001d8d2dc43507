"""Library: outputs made before (folders and single files), from their manifests; delete in local mode."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from fluxstudio.errors import FluxStudioError
from fluxstudio.studio import human_bytes
from fluxstudio.ui.context import Context
from fluxstudio.ui.handlers import error_html, ok_html, user_message

HEADERS = ["Name", "Base", "LoRAs (scale)", "Format", "Precision", "Size", "Created", "Preview"]


@dataclass
class Handles:
    table: gr.Dataframe
    refresh: gr.Button
    pick: gr.Dropdown | None
    delete: gr.Button | None
    message: gr.HTML
    gallery: gr.Gallery | None  # the picked output's saved preview


def rows(ctx: Context) -> list[list[str]]:
    return [
        [
            e.name,
            e.base,
            ", ".join(f"{n} ({s:g})" for n, s in e.loras) or "—",
            e.format,
            e.precision,
            human_bytes(e.size_bytes),
            e.created.replace("T", " ")[:16],
            e.preview or "—",
        ]
        for e in ctx.studio.outputs()
    ]


def render(ctx: Context) -> Handles:
    with gr.Column(elem_id="library", elem_classes="fs-card"):
        table = gr.Dataframe(
            rows(ctx) or None,
            headers=HEADERS,
            interactive=False,
            wrap=True,
            column_widths=["19%", "8%", "11%", "9%", "9%", "8%", "12%", "24%"],
            elem_id="library-table",
        )
        with gr.Row(elem_classes="fs-bottom"):
            pick = delete = None
            if ctx.settings.local:
                names = [r[0] for r in rows(ctx)]
                pick = gr.Dropdown(names, label="Saved output", scale=3, elem_id="library-pick")
                delete = gr.Button("Delete", variant="stop", scale=1, min_width=100, elem_id="library-delete")
            refresh = gr.Button("Refresh", scale=1, min_width=100)
        gallery = (
            gr.Gallery(label="Saved preview", columns=3, height="auto", visible=False, elem_id="library-preview")
            if ctx.settings.local
            else None
        )
        freed = ctx.studio.reclaimed_bytes
        message = gr.HTML(
            ok_html(f"Reclaimed {human_bytes(freed)} left by interrupted builds, downloads and uploads.")
            if freed
            else "",
            elem_id="library-message",
        )
        if ctx.settings.local:
            gr.Markdown(f"Outputs are saved in `{ctx.settings.output_dir}`.", elem_classes="fs-muted")
    return Handles(table, refresh, pick, delete, message, gallery)


def updates(ctx: Context, h: Handles):
    """Fresh table (and choice list) values."""
    data = rows(ctx)
    out = [gr.update(value=data or None)]
    if h.pick is not None:
        out.append(gr.update(choices=[r[0] for r in data], value=None))
    return out


def outputs(h: Handles) -> list:
    return [h.table] + ([h.pick] if h.pick is not None else [])


def saved_preview(ctx: Context, name: str | None):
    """The picked output's preview images with their figures, or a hidden gallery."""
    from fluxstudio.ui.panels.preview import pictures

    result = ctx.studio.saved_preview(name) if name else None
    items = list(pictures(result).values()) if result else []
    if not items:
        return gr.update(value=None, visible=False)
    s = result.settings
    return gr.update(
        value=items, visible=True, label=f"Saved preview · seed {s['seed']} · {s['steps']} steps · {s['prompt']}"
    )


def wire(ctx: Context, h: Handles) -> None:
    h.refresh.click(lambda: updates(ctx, h), None, outputs(h))
    if h.pick is not None:
        h.pick.change(lambda name: saved_preview(ctx, name), h.pick, h.gallery)
    if h.delete is not None:

        def remove(name):
            if not name:  # none picked, or the question was declined
                return [*[gr.update()] * len(outputs(h)), ok_html("Nothing was deleted.")]
            try:
                ctx.studio.delete(name)
                message = ok_html(f"Deleted {name}.")
            except FluxStudioError as exc:
                message = error_html(user_message(exc, False))
            return [*updates(ctx, h), message]

        h.delete.click(
            remove,
            h.pick,
            [*outputs(h), h.message],
            js="(name) => name && confirm(`Delete ${name}? Its files are removed from the disk.`) ? name : null",
        )
