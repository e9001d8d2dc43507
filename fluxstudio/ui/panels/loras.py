"""LoRAs: add by Hub repo id / URL / local path / upload; each row shows what will happen, with its scale."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from fluxstudio.errors import BadInputError, FluxStudioError
from fluxstudio.ui.context import Context
from fluxstudio.ui.handlers import error_html, user_message
from fluxstudio.ui.panels.base import reference


@dataclass
class Handles:
    items: gr.State  # list of {"id", "ref", "path", "name", "scale", "info"}: server-side, never sent to the page
    ref: gr.Textbox
    add: gr.Button
    upload: gr.File
    message: gr.HTML
    uploaded: gr.State  # bytes this session has kept from uploads (a shared session has a quota)


def render(ctx: Context) -> Handles:
    items = gr.State([])
    with gr.Column(elem_id="loras", elem_classes="fs-card"):
        with gr.Row(equal_height=True):
            ref = gr.Textbox(
                label="Add a LoRA",
                scale=4,
                elem_id="lora-ref",
                placeholder="owner/name, owner/name/file.safetensors, a Hub URL"
                + (", a local .safetensors path" if ctx.settings.local else "")
                + " or demo",
            )
            add = gr.Button("Add", scale=1, elem_id="lora-add")
            upload = gr.File(
                label="…or upload a .safetensors",
                file_types=[".safetensors"],
                scale=2,
                elem_id="lora-upload",
                height=120,
            )
        message = gr.HTML(elem_id="lora-message")

        @gr.render(inputs=items)
        def rows(current):
            if not current:
                gr.Markdown("*No LoRA yet: the base is only quantized.*", elem_classes="fs-muted")
            for item in current:
                with gr.Row(equal_height=True, elem_classes="fs-lora-row"):
                    gr.Markdown(f"**{item['name']}**  \n{item['info']}", elem_classes="fs-lora-info")
                    scale = gr.Slider(
                        -2,
                        2,
                        value=item["scale"],
                        step=0.05,
                        label="Scale",
                        scale=1,
                        interactive=True,
                        key=f"scale-{item['id']}",
                        elem_classes="fs-lora-scale",
                    )
                    remove = gr.Button("Remove", size="sm", scale=0, key=f"rm-{item['id']}")

                def set_scale(value, state, item_id=item["id"]):
                    for it in state:
                        if it["id"] == item_id:
                            it["scale"] = float(value)

                scale.change(set_scale, [scale, items], None)  # in place: no re-render while dragging
                remove.click(
                    lambda state, item_id=item["id"]: [it for it in state if it["id"] != item_id], items, items
                )

    return Handles(items, ref, add, upload, message, gr.State(0))


def wire(ctx: Context, h: Handles, base_choice, base_custom, model_key) -> None:
    shared = not ctx.settings.local

    def add_item(state, ref_text, name, path, info):
        if any(it["ref"] == ref_text for it in state):
            raise BadInputError(f"{name} is in the list already.", "Change its scale in the list instead.")
        return state + [
            {"id": uuid.uuid4().hex[:8], "ref": ref_text, "path": str(path), "name": name, "scale": 1.0, "info": info}
        ]

    def add_typed(state, text, choice, custom, key):
        try:
            ref_text, path = ctx.studio.resolve_lora(text or "")
            info = ctx.studio.describe_lora(path, reference(choice, custom), key)
            return add_item(state, ref_text, path.name, path, info), "", ""
        except FluxStudioError as exc:
            return state, text, error_html(user_message(exc, shared))

    def add_uploaded(state, file, choice, custom, key, kept_bytes):
        # unpreprocessed: gradio's File preprocessing leaves an empty temporary file behind at every upload, so the
        # path is checked here instead: only what the web server itself received is taken (and consumed)
        path = Path(file.get("path") or "") if isinstance(file, dict) else None
        if path is None or not path.resolve().is_relative_to(ctx.web_dir.resolve()):
            return state, None, "", kept_bytes
        try:
            kept, info = ctx.studio.add_upload(path, reference(choice, custom), key, kept_bytes)
            name = kept.name.split("-", 1)[1]
            return add_item(state, str(kept), name, kept, info), None, "", kept_bytes + kept.stat().st_size
        except FluxStudioError as exc:
            return state, None, error_html(user_message(exc, shared)), kept_bytes

    inputs = [h.items, h.ref, base_choice, base_custom, model_key]
    h.add.click(add_typed, inputs, [h.items, h.ref, h.message])
    h.ref.submit(add_typed, inputs, [h.items, h.ref, h.message])
    h.upload.upload(
        add_uploaded,
        [h.items, h.upload, base_choice, base_custom, model_key, h.uploaded],
        [h.items, h.upload, h.message, h.uploaded],
        preprocess=False,
    )
