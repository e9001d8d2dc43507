"""A Radio whose choices follow another control, without Gradio's error toast for a value in flight."""

from __future__ import annotations

import gradio as gr


class Choice(gr.Radio):
    """A Radio whose choices follow another control (the precisions follow the format): a value picked under the old
    choices may still be in flight when the new ones arrive, and must not end in Gradio's error toast. The handlers
    check the precision against the format themselves (the front door says one sentence when it does not fit)."""

    is_template = True  # drawn by Gradio's own Radio

    def preprocess(self, payload):
        return payload
