"""Try it: the same-seed A/B preview, on the CPU with the demo pipeline and with a FLUX-width one (device=cpu)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FLUX1_WIDE, linear_shapes, peft_lora
from PIL import Image

from fluxstudio.errors import BadInputError
from fluxstudio.flows import preview
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.library import delete_output, list_outputs
from fluxstudio.sources import demo

# encoders as wide as FLUX1_WIDE's text inputs (joint attention and pooled projection: 64)
SMALL_CLIP = dict(
    demo.DEMO_CLIP, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, projection_dim=64
)
SMALL_T5 = dict(demo.DEMO_T5, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2)


def demo_build(out, precision="fp8", fmt="diffusers") -> BuildRequest:
    req = BuildRequest("demo", (LoraRef("demo", 1.0),), precision, out, format=fmt)
    build(req)
    return req


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_demo_preview_on_the_cpu_renders_same_seed_images_with_figures_and_saves_them(tmp_path):
    out = tmp_path / "outputs" / "demo-fp8"
    req = demo_build(out)
    result = preview.run(preview.PreviewRequest(req, out, seed=7, steps=3))
    assert [r.key for r in result.renders] == ["a", "b", "c"]
    assert [r.label for r in result.renders] == [
        "base fp8 + LoRA (unfused)",
        "fused fp8 (FluxStudio)",
        "base bf16 + LoRA (unfused)",
    ]
    for r in result.renders:
        assert r.it_per_s > 0 and r.seconds > 0 and r.peak_vram_bytes is None  # the CPU has no VRAM to report
    folder = out.parent / "demo-fp8.preview"
    saved = json.loads((folder / "preview.json").read_text())
    assert saved["settings"] | {"prompt": ""} == {
        "prompt": "",
        "seed": 7,
        "steps": 3,
        "width": 64,
        "height": 64,
        "guidance": 3.5,
        "device": "cpu",
        "format": "diffusers",
        "precision": "fp8",
        "output": "demo-fp8",
    }
    assert [r["image"] for r in saved["renders"]] == ["a.png", "b.png", "c.png"]
    first = {k: pixels(folder / f"{k}.png") for k in "abc"}
    assert all(im.shape == (64, 64, 3) for im in first.values())
    # unfused and fused fp8 draw the same LoRA from the same noise: close, but not the same arithmetic
    assert 0 < np.abs(first["a"] - first["b"]).mean() < 0.1 * first["a"].std()

    again = preview.run(preview.PreviewRequest(req, out, seed=7, steps=3))
    assert all(np.array_equal(first[k], pixels(folder / f"{k}.png")) for k in "abc")  # same seed, same images
    assert again.settings == result.settings
    other = preview.run(preview.PreviewRequest(req, out, seed=8, steps=3))
    assert np.abs(pixels(folder / "b.png") - first["b"]).mean() > 1 and other.settings["seed"] == 8

    entry = next(e for e in list_outputs(out.parent) if e.name == "demo-fp8")
    assert entry.preview.startswith("(a) ") and entry.preview.count("it/s") == 3
    assert preview.read(out).renders == other.renders
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no work folder left
    delete_output(out.parent, "demo-fp8")
    assert not folder.exists() and not out.exists()


def test_a_bf16_pipeline_export_previews_a_and_b_only(tmp_path):
    out = tmp_path / "demo-pipe"
    req = demo_build(out, "bf16", "pipeline")
    result = preview.run(preview.PreviewRequest(req, out, steps=2))
    assert [r.key for r in result.renders] == ["a", "b"]  # (c) would be (a) again


@pytest.fixture(scope="module")
def wide_pipeline(wide_base, tmp_path_factory):
    """The FLUX-width transformer in a pipeline with small encoders, VAE and tokenizers, and a LoRA for it."""
    root = demo.make_flux1_pipeline(
        tmp_path_factory.mktemp("widepipe") / "pipe", FLUX1_WIDE, clip=SMALL_CLIP, t5=SMALL_T5, transformer=wide_base
    )
    lora = peft_lora(root.parent / "lora.safetensors", linear_shapes(wide_base), rank=4, strength=0.2)
    return root, lora


@pytest.mark.parametrize(
    "fmt,precision,keys",
    [("single-file", "fp8", "abc"), ("gguf", "Q8_0", "abc"), ("comfyui", "fp8", "abc")],
)
def test_one_file_outputs_preview_through_diffusers_single_file_loaders(wide_pipeline, tmp_path, fmt, precision, keys):
    root, lora = wide_pipeline
    out = tmp_path / ("wide" + (".gguf" if fmt == "gguf" else ".safetensors"))
    req = BuildRequest(str(root), (LoraRef(str(lora), 1.0),), precision, out, format=fmt)
    build(req)
    result = preview.run(preview.PreviewRequest(req, out, steps=2, size=32, device="cpu"))
    assert "".join(r.key for r in result.renders) == keys
    a, b = (pixels(tmp_path / f"{out.name}.preview" / f"{k}.png") for k in "ab")
    assert a.shape == (32, 32, 3) and np.abs(a - b).mean() < 0.1 * a.std()
    if fmt in ("gguf", "comfyui"):  # (a) is the base alone in the same format and type, built once and kept
        kept = list((tmp_path / "fshome" / "preview-bases").glob(f"*-{precision}{out.suffix}"))
        assert len(kept) == 1


def test_what_cannot_preview_says_why_in_one_sentence(tmp_path, wide_pipeline):
    root, lora = wide_pipeline
    out = tmp_path / "w-nf4.safetensors"
    req = BuildRequest(str(root), (LoraRef(str(lora), 1.0),), "nf4", out, format="single-file")
    build(req)
    with pytest.raises(BadInputError, match="diffusers cannot load a nf4 single file"):
        preview.run(preview.PreviewRequest(req, out, device="cpu"))

    folder = tmp_path / "w-bf16"
    req = BuildRequest(str(root), (LoraRef(str(lora), 1.0),), "bf16", folder)
    build(req)
    if not torch.cuda.is_available():  # the app offers only the demo without a GPU, and says why
        assert preview.why_not("diffusers", "bf16", str(root)).message.startswith("This machine has no CUDA GPU")
        assert preview.why_not("diffusers", "bf16", "demo") is None
        with pytest.raises(BadInputError, match="no CUDA GPU"):
            preview.run(preview.PreviewRequest(req, folder))
    with pytest.raises(BadInputError, match="out of range"):
        preview.run(preview.PreviewRequest(req, folder, steps=500, device="cpu"))

    nf4 = tmp_path / "demo-nf4"
    nf4_req = demo_build(nf4, "nf4")
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="NF4 models run on a CUDA GPU only"):
            preview.run(preview.PreviewRequest(nf4_req, nf4))
    gguf = tmp_path / "demo.gguf"
    gguf_req = demo_build(gguf, "Q8_0", "gguf")
    with pytest.raises(BadInputError, match="only at FLUX.1's real width"):
        preview.run(preview.PreviewRequest(gguf_req, gguf))
    assert not list(tmp_path.glob("*.preview")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "vram_gb,transformer_gb,plan",
    [
        (8, 6.7, (True, True)),  # an 8 GB card with NF4: T5 in NF4, the transformer offloaded
        (10, 6.7, (True, False)),
        (12, 6.7, (False, False)),  # T5 encodes alone, before the transformer loads: in bf16 it fits a 12 GB card
        (24, 11.9, (False, False)),  # a 4090 with fp8
        (24, 23.8, (False, True)),  # bf16 does not fit beside the headroom
        (80, 23.8, (False, False)),
    ],
)
def test_vram_plan_quantizes_t5_and_offloads_on_small_cards(vram_gb, transformer_gb, plan):
    assert preview.vram_plan(int(vram_gb * 2**30), int(transformer_gb * 1e9)) == plan


@pytest.mark.gpu
def test_preview_on_cuda_with_a_flux_width_model_within_a_vram_cap(wide_pipeline, tmp_path):
    root, lora = wide_pipeline
    cap = 6 << 30
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
    try:
        for fmt, precision, name in (
            ("diffusers", "nf4", "w-nf4"),
            ("gguf", "Q4_K_S", "w.gguf"),
            ("diffusers", "fp8", "w-fp8"),
        ):
            out = tmp_path / name
            req = BuildRequest(str(root), (LoraRef(str(lora), 1.0),), precision, out, format=fmt)
            build(req)
            result = preview.run(preview.PreviewRequest(req, out, steps=4, size=256))
            assert [r.key for r in result.renders] == ["a", "b", "c"]
            for r in result.renders:
                assert r.it_per_s > 0 and 0 < r.peak_vram_bytes < cap, r
            assert result.settings["device"] == "cuda"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_comfyui_native_files_preview_on_cuda(wide_pipeline, tmp_path, precision):
    """ComfyUI's fp8 file runs in diffusers' BFL fp8r layers (an fp8 matmul on compute 8.9+), NVFP4 dequantized."""
    root, lora = wide_pipeline
    out = tmp_path / f"w-{precision}.safetensors"
    req = BuildRequest(str(root), (LoraRef(str(lora), 1.0),), precision, out, format="comfyui")
    build(req)
    result = preview.run(preview.PreviewRequest(req, out, steps=4, size=256))
    assert [r.key for r in result.renders] == ["a", "b", "c"] and result.settings["device"] == "cuda"
    for r in result.renders:
        assert r.it_per_s > 0 and r.peak_vram_bytes, r
    a, b = (pixels(tmp_path / f"{out.name}.preview" / f"{k}.png") for k in "ab")
    assert np.abs(a - b).mean() < (0.15 if precision == "nvfp4" else 0.1) * a.std()


@pytest.mark.slow
def test_a_hub_base_brings_its_encoders_vae_and_scheduler_with_progress_once(tmp_path):
    from fakehub import FakeHub, folder_files

    from fluxstudio.progress import Run, Stage
    from fluxstudio.sources.hub import Hub

    pipe = demo.ensure_base()
    files = folder_files(pipe)
    files["flux1-dev.safetensors"] = b"BFL's own single file, which the preview does not need" * 1000
    fake = FakeHub().start()
    fake.add_repo("acme/flux-demo", files)
    cache = tmp_path / "hf"
    try:
        hub = Hub(endpoint=fake.url, cache_dir=str(cache))
        out = tmp_path / "hub-fp8"
        req = BuildRequest("acme/flux-demo", (LoraRef("demo", 1.0),), "fp8", out)
        build(req, hub=hub)
        built = len(fake.file_gets())
        events = []
        result = preview.run(
            preview.PreviewRequest(req, out, steps=2, size=64, device="cpu"), Run(events.append), hub=hub
        )
        assert [r.key for r in result.renders] == ["a", "b", "c"]
        fetched = {r["path"].split("/resolve/")[1].split("/", 1)[1].split("/")[0] for r in fake.file_gets()[built:]}
        assert fetched == {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"}
        assert any(e.stage == Stage.DOWNLOAD and e.total for e in events)
        again = len(fake.file_gets())
        preview.run(preview.PreviewRequest(req, out, steps=2, size=64, device="cpu"), hub=hub)
        assert len(fake.file_gets()) == again  # reused from the HF cache
    finally:
        fake.stop()


def test_a_cancelled_preview_leaves_nothing_and_keeps_the_last_one(tmp_path):
    from fluxstudio.errors import CancelledError
    from fluxstudio.progress import CancelToken, Run, Stage

    out = tmp_path / "demo-bf16"
    req = demo_build(out, "bf16")
    kept = preview.run(preview.PreviewRequest(req, out, seed=1, steps=2))
    token = CancelToken()

    def cancel_midway(event):
        if event.stage == Stage.PREVIEW and event.done == 1 and event.item.startswith("fused"):
            token.cancel()

    with pytest.raises(CancelledError):
        preview.run(preview.PreviewRequest(req, out, seed=2, steps=3), Run(cancel_midway, token))
    assert preview.read(out) == kept  # the preview saved before is still there, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_cancel_takes_effect_inside_a_long_step(wide_pipeline, tmp_path):
    """At 256² one denoising step of the FLUX-width model takes well over 5 s on two cores; a cancel 1 s into the
    first step stops the preview within 5 s (it is checked before every Linear layer), with no step finished."""
    import threading
    import time

    from fluxstudio.flows.jobs import JobRunner
    from fluxstudio.progress import Run, Stage

    root, _ = wide_pipeline
    out = tmp_path / "wide-bf16"
    req = BuildRequest(str(root), (), "bf16", out)
    build(req)
    rendering = threading.Event()
    steps_done = []

    def run(request, job_run):
        def watch(event):
            job_run.progress(event)
            if event.stage == Stage.PREVIEW and event.message.startswith("Rendering"):
                steps_done.append(event.done)
                rendering.set()

        return preview.run(request, Run(watch, job_run.cancel))

    job = JobRunner(run=run).start(preview.PreviewRequest(req, out, steps=4, size=256, device="cpu"))
    assert rendering.wait(300), job.error
    time.sleep(1.0)
    cancelled_at = time.monotonic()
    job.cancel.cancel()
    job.wait(60)
    assert job.status == "cancelled" and time.monotonic() - cancelled_at < 5, (
        job.status,
        time.monotonic() - cancelled_at,
    )
    assert steps_done == [0]  # stopped inside the first step
    assert not list(tmp_path.glob("*.preview")) and not list(tmp_path.glob(".*"))


def test_what_the_demo_previews_on_the_cpu_is_said_one_way_everywhere():
    """Every format and precision of the demo either previews on the CPU or says why with the one hint that names
    exactly the choices that do (the page disables Try it with it, the CLI says it before building)."""
    from fluxstudio.formats import FORMATS
    from fluxstudio.formats.base import DEMO_PREVIEWS

    previews = set()
    for fmt in FORMATS.values():
        for precision in fmt.precisions:
            why = preview.why_not(fmt.key, precision, "demo", "cpu")
            if why is None:
                previews.add((fmt.key, precision))
            else:
                assert why.hint == DEMO_PREVIEWS and why.message, (fmt.key, precision)
    assert previews == {(f, p) for f in ("diffusers", "pipeline") for p in ("bf16", "fp8")}
    assert "diffusers or pipeline format at bf16 or fp8" in DEMO_PREVIEWS
