"""build_ui(settings) -> gr.Blocks, and launch(settings): the page top to bottom, and how it is served."""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import sys
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from fluxstudio.studio import __version__, human_bytes
from fluxstudio.ui.context import Context
from fluxstudio.ui.panels import base, library, loras, machine, output, preview, run
from fluxstudio.ui.server import LoginGuard, UploadGuard
from fluxstudio.ui.settings import MAX_UPLOAD, Settings, blocked_paths, generated_auth

ASSETS = Path(__file__).resolve().parent / "assets"


def _header() -> str:
    icon = base64.b64encode((ASSETS / "icon.png").read_bytes()).decode()
    return (
        f'<div id="fs-header"><img src="data:image/png;base64,{icon}" alt="">'
        f"<div><h1>FluxStudio</h1><p>Fuse LoRAs into FLUX at full precision, then quantize — "
        f"one tensor at a time. v{__version__}</p></div></div>"
    )


def _step(title: str) -> None:
    gr.Markdown(f"### {title}", elem_classes="fs-step")


def build_ui(settings: Settings, ctx: Context | None = None) -> gr.Blocks:
    ctx = ctx or Context(settings)
    with gr.Blocks(title="FluxStudio", analytics_enabled=False) as blocks:
        gr.HTML(_header())
        _step("1 · Machine")
        m = machine.render(ctx)
        _step("2 · Base model")
        b = base.render(ctx)
        _step("3 · LoRAs")
        lo = loras.render(ctx)
        _step("4 · Output")
        o = output.render(ctx)
        r = run.render()
        p = preview.render()
        _step("Library")
        lib = library.render(ctx)

        refresh_base = base.wire(ctx, b)
        loras.wire(ctx, lo, b.choice, b.custom, b.model_key)
        output.wire(ctx, o, b.choice, b.custom, b.model_key, lo.items, m.target)

        def advise(target, key, format, choice, custom):
            text, rec = machine.advice_text(ctx, target, key)
            precision = output.precision_update(ctx, base.reference(choice, custom), format, key, rec)
            return text, precision, output.fit_update(format, precision["value"], rec)

        for trigger in (m.target.change, b.model_key.change):
            trigger(advise, [m.target, b.model_key, o.format, b.choice, b.custom], [m.advice, o.precision, o.fit])
        b.status.change(  # another base of the same model, or the base once downloaded: its own sizes, the pick kept
            lambda choice, custom, format, key, precision: output.sizes_update(
                ctx, base.reference(choice, custom), format, key, precision
            ),
            [b.choice, b.custom, o.format, b.model_key, o.precision],
            o.precision,
        )
        machine.live(ctx, m)
        run.wire(
            ctx,
            r,
            b.choice,
            b.custom,
            lo.items,
            o.format,
            o.precision,
            o.name,
            o.replace,
            o.shard,
            o.t5,
            o.fit,
            on_done=[
                (lambda: library.updates(ctx, lib), None, library.outputs(lib)),
                (lambda: machine.summary(ctx.studio.hw.now(), not ctx.settings.local), None, m.summary),
                refresh_base,
                (lambda last: preview.on_build(ctx, last), r.last, [p.box, p.why, p.steps, p.size, p.go]),
            ],
        )
        preview.wire(ctx, p, r.last, on_done=(lambda: library.updates(ctx, lib), None, library.outputs(lib)))
        library.wire(ctx, lib)

        def first_load(choice, custom, target, format):
            """What a (re)loaded page shows now: the base, the advice, the library, a fresh output name, this
            machine's free RAM and disk."""
            status, key, need_token, kept = base.describe(ctx, choice, custom or "")
            text, precision, fit = advise(target, key, format, choice, custom)
            est = output.estimate(ctx, choice, custom, [], format, precision["value"], key, "", fit.get("value"))
            extra = [gr.update(visible=need_token), gr.update(visible=need_token)] if b.token is not None else []
            now = machine.summary(ctx.studio.hw.now(), not ctx.settings.local)
            fresh = [status, key, text, precision, fit, est, gr.update(visible=kept > 0), output.default_name(), now]
            return [*fresh, *library.updates(ctx, lib), *extra]

        blocks.load(
            first_load,
            [b.choice, b.custom, m.target, o.format],
            [b.status, b.model_key, m.advice, o.precision, o.fit, o.estimate, b.discard, o.name, m.summary]
            + library.outputs(lib)
            + ([b.token, b.save_token] if b.token is not None else []),
        )
    return blocks


def launch(settings: Settings) -> gr.Blocks:
    auth = settings.auth
    if settings.exposed and auth is None:
        auth = generated_auth()
        why = "Sharing" if settings.share else f"Serving on {settings.host} (reachable from other machines)"
        print(f"{why} needs a login. User: {auth[0]}  Password: {auth[1]}", flush=True)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings)
    if freed := ctx.studio.reclaim():
        print(f"Reclaimed {human_bytes(freed)} left by interrupted builds, downloads and uploads.", flush=True)
    atexit.register(shutil.rmtree, ctx.studio.scratch(), ignore_errors=True)
    web_tmp = ctx.web_dir  # gradio's uploads and served images: this process's, reclaimed when it is gone
    os.environ["GRADIO_TEMP_DIR"] = str(web_tmp)  # read when components and the server are made, below
    blocks = build_ui(settings, ctx)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=auth,
        inbrowser=settings.inbrowser,
        max_file_size=MAX_UPLOAD,
        allowed_paths=[],
        blocked_paths=blocked_paths(),
        favicon_path=str(ASSETS / "favicon.png"),
        footer_links=[],
        show_error=False,
        quiet=True,  # its own lines name launch(share=True); ours name the flags
        css_paths=[str(ASSETS / "style.css")],
        theme=gr.themes.Soft(primary_hue="violet"),
        prevent_thread_lock=True,
        auth_message="FluxStudio is shared with a login: ask its owner for the user and password.",
        # Gradio features FluxStudio does not use are off: run history (its routes skip the login and act with the
        # owner's Hugging Face token), monitoring, the MCP server
        run_history=False,
        enable_monitoring=False,
        mcp_server=False,
        app_kwargs={
            "openapi_url": None,
            "docs_url": None,
            "redoc_url": None,
            "middleware": [Middleware(UploadGuard, folder=web_tmp, limit=MAX_UPLOAD)]
            + ([Middleware(LoginGuard)] if auth else []),
        },
    )
    print(f"Running on local URL:  {blocks.local_url}", flush=True)
    if settings.share and blocks.share_url:
        print(f"Running on public URL: {blocks.share_url} (temporary; it ends when FluxStudio stops)", flush=True)
    elif settings.share:
        print(
            "Could not create a public share link (no internet, or the tunnel is blocked). "
            f"FluxStudio still runs locally at {blocks.local_url}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print("To share it for a while through a temporary public link, start FluxStudio with --share.", flush=True)
    return blocks
