"""Base model: a preset, the demo, or a custom Hub repo / URL / local folder; what it costs to get it."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from fluxstudio.errors import FluxStudioError
from fluxstudio.studio import PRESETS, human_bytes
from fluxstudio.ui.context import Context
from fluxstudio.ui.handlers import error_html, ok_html, user_message


@dataclass
class Handles:
    choice: gr.Dropdown
    custom: gr.Textbox
    status: gr.HTML
    model_key: gr.State
    token: gr.Textbox | None
    save_token: gr.Button | None
    discard: gr.Button


CUSTOM = "custom"  # the choice that shows the text box


def reference(choice: str, custom: str) -> str:
    """The base the widgets name: `demo`, a preset's repo id, or what the person typed."""
    if choice == CUSTOM:
        return (custom or "").strip()
    return next((p.repo_id for p in PRESETS if p.key == choice), "demo")


def choices() -> list[tuple[str, str]]:
    items = [("Demo — built in, tiny, no download", "demo")]
    items += [(f"{p.label} · {p.transformer_gb:.0f} GB" + (" · gated" if p.gated else ""), p.key) for p in PRESETS]
    return items + [("Custom…", CUSTOM)]


def describe(ctx: Context, choice: str, custom: str) -> tuple[str, str, bool, int]:
    """(status html, model key, whether a token is needed, bytes kept from an interrupted download). Never raises."""
    shared = not ctx.settings.local
    if choice == CUSTOM and not custom.strip():
        return (
            ok_html("Enter a Hub repo id (owner/name), a Hub URL" + ("" if shared else " or a local folder") + "."),
            "flux1",
            False,
            0,
        )
    base = reference(choice, custom)
    try:
        s = ctx.studio.describe_base(base)
        return ok_html(s.text), s.model_key, s.need_token, s.partial_bytes
    except FluxStudioError as exc:
        return error_html(user_message(exc, shared)), ctx.studio.model_key(base), False, 0


def render(ctx: Context) -> Handles:
    default = ctx.studio.cached_preset() or "demo"
    with gr.Column(elem_id="base", elem_classes="fs-card"):
        with gr.Row():
            choice = gr.Dropdown(choices(), value=default, label="Base model", scale=2, elem_id="base-choice")
            custom = gr.Textbox(
                label="Hub repo id, Hub URL" + ("" if not ctx.settings.local else " or local folder"),
                placeholder="owner/name",
                visible=False,
                scale=2,
                elem_id="base-custom",
            )
        with gr.Row(equal_height=True):
            status = gr.HTML(elem_id="base-status")
            discard = gr.Button(
                "Discard the partial download", visible=False, size="sm", scale=0, min_width=220, elem_id="base-discard"
            )
        token = save = None
        if ctx.settings.local:  # never in a shared session
            with gr.Row():
                token = gr.Textbox(
                    label="Hugging Face token (saved with huggingface_hub's login)",
                    type="password",
                    value="",
                    visible=False,
                    scale=3,
                    elem_id="hf-token",
                )
                save = gr.Button("Save token", visible=False, scale=1)
    return Handles(choice, custom, status, gr.State("flux1"), token, save, discard)


def wire(ctx: Context, h: Handles):
    """Wire the panel; returns (function, inputs, outputs) that refresh it (after a build: what it downloaded)."""

    def update(choice, custom, prefix=""):
        status, key, need_token, kept = describe(ctx, choice, custom or "")
        updates = [gr.update(visible=choice == CUSTOM), prefix + status, key, gr.update(visible=kept > 0)]
        if h.token is not None:
            updates += [gr.update(visible=need_token, value=""), gr.update(visible=need_token)]
        return updates

    def discard(choice, custom):
        try:
            freed = ctx.studio.discard_download(reference(choice, custom))
        except FluxStudioError as exc:
            return update(choice, custom, error_html(user_message(exc, not ctx.settings.local)))
        return update(choice, custom, ok_html(f"Discarded {human_bytes(freed)}."))

    outputs = [h.custom, h.status, h.model_key, h.discard] + ([h.token, h.save_token] if h.token is not None else [])
    h.choice.change(update, [h.choice, h.custom], outputs)
    h.custom.submit(update, [h.choice, h.custom], outputs)
    h.custom.blur(update, [h.choice, h.custom], outputs)
    h.discard.click(discard, [h.choice, h.custom], outputs)
    if h.token is not None:

        def store(token, choice, custom):
            try:
                user = ctx.studio.save_token(token or "")
            except FluxStudioError as exc:
                return gr.update(value=""), error_html(user_message(exc, False)), gr.update()
            status, _, need, _ = describe(ctx, choice, custom or "")
            return (
                gr.update(value="", visible=need),
                ok_html(f"Token saved for {user}.") + status,
                gr.update(visible=need),
            )

        h.save_token.click(store, [h.token, h.choice, h.custom], [h.token, h.status, h.save_token])
    return update, [h.choice, h.custom], outputs
