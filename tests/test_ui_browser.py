"""The real app in headless Chromium: the demo flow, cancel, a bad upload. Screenshots land in each test's tmp dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import torch
from apprunner import App
from fakehub import FakeHub, folder_files
from helpers import FLUX1_TINY, write_model

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("Debian's chromium is not installed (tests/run.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

RECORDER = """
(ids) => {
  window.__seen = {};
  for (const id of ids) {
    window.__seen[id] = [];
    const el = document.getElementById(id);
    const note = () => { const t = el.innerText.trim(); const s = window.__seen[id];
                         if (t && s[s.length - 1] !== t) s.push(t); };
    new MutationObserver(note).observe(el, {subtree: true, childList: true, characterData: true});
  }
}
"""


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def hub(tmp_path):
    base = tmp_path / "hubbase"
    write_model(base / "transformer", FLUX1_TINY)
    files = folder_files(base)
    fake = FakeHub().start()
    fake.add_repo("acme/flux-slow", files)
    fake.faults["transformer/diffusion_pytorch_model.safetensors"] = {"throttle": 200_000}  # ~10 s to download
    yield fake
    fake.stop()


@pytest.fixture
def app(tmp_path, hub):
    a = App(tmp_path, env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")})
    yield a
    a.stop()


def open_page(browser, app):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.goto(app.url)
    page.wait_for_selector("#base-status:has-text('Built-in demo')", timeout=120_000)
    return page


def add_demo_lora(page) -> None:
    page.fill("#lora-ref textarea, #lora-ref input", "demo")
    page.click("#lora-add")
    page.wait_for_selector(".fs-lora-info:has-text('demo_lora.safetensors')", timeout=60_000)


def test_demo_flow_progress_memory_result_library(browser, app, tmp_path):
    page = open_page(browser, app)
    add_demo_lora(page)
    assert "matched" in page.inner_text(".fs-lora-info")
    scale = page.locator(".fs-lora-scale input[type=number]")
    scale.fill("0.8")
    scale.press("Enter")
    page.get_by_label("nf4").check()
    page.fill("#out-name textarea, #out-name input", "demo-nf4")
    page.evaluate(RECORDER, ["progress", "memory"])
    page.click("#fuse")
    page.wait_for_selector("#result:has-text('Saved')", timeout=120_000)
    seen = page.evaluate("window.__seen")
    page.screenshot(path=str(tmp_path / "demo-result.png"), full_page=True)
    assert any("Fusing" in t or "Writing" in t or "Checking" in t for t in seen["progress"]), seen
    readouts = [t for t in seen["memory"] if t.startswith("RAM")]
    assert len(readouts) >= 2 and "peak" in readouts[-1], seen  # the readout changed while it ran
    result = page.inner_text("#result")
    assert "Peak RAM" in result and "demo-nf4" in result
    kept = float(result.split("LoRA effect kept: ")[1].split("%")[0])
    assert 90 <= kept <= 110  # the demo model is tiny: the estimate is noisy around 100
    assert "from_pretrained" in page.inner_text("#snippet")
    page.wait_for_selector("#library-table:has-text('demo-nf4')", timeout=30_000)
    manifest = json.loads((app.outputs / "demo-nf4" / "fluxstudio.json").read_text())
    assert manifest["precision"] == "nf4" and manifest["loras"][0]["scale"] == 0.8


def pick_base(page, repo: str, wait_for: str = "to download") -> None:
    page.locator("#base-choice input").click()
    page.get_by_role("option", name="Custom…").click()
    page.fill("#base-custom textarea, #base-custom input", repo)
    page.press("#base-custom textarea, #base-custom input", "Enter")
    page.wait_for_selector(f"#base-status:has-text('{wait_for}')", timeout=60_000)


def test_cancel_midway_keeps_the_download_and_saves_nothing(browser, app, tmp_path):
    page = open_page(browser, app)
    pick_base(page, "acme/flux-slow")
    page.fill("#out-name textarea, #out-name input", "cancelled-run")
    page.click("#fuse")
    page.wait_for_selector("#progress:has-text('Downloading')", timeout=60_000)
    page.screenshot(path=str(tmp_path / "downloading.png"), full_page=True)
    page.click("#cancel")
    page.wait_for_selector("#run-status:has-text('cancelled')", timeout=15_000)
    page.screenshot(path=str(tmp_path / "cancelled.png"), full_page=True)
    assert "kept; starting again resumes from there" in page.inner_text("#run-status")
    assert not (app.outputs / "cancelled-run").exists()
    assert not [p for p in app.outputs.iterdir() if "cancelled-run" in p.name] if app.outputs.exists() else True
    page.wait_for_selector("#base-status:has-text('the download resumes from there')", timeout=30_000)
    page.click("#base-discard")
    page.wait_for_selector("#base-status:has-text('Discarded')", timeout=30_000)
    assert not list((tmp_path / "hf").rglob("*.partial")) and not page.locator("#base-discard").is_visible()


def test_a_download_resumes_after_the_app_was_closed(browser, hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    weights = "transformer/diffusion_pytorch_model.safetensors"
    size = len(hub.repos["acme/flux-slow"].files[weights])
    first = App(tmp_path, env=env)
    try:
        page = open_page(browser, first)
        pick_base(page, "acme/flux-slow")
        page.fill("#out-name textarea, #out-name input", "resumed")
        page.click("#fuse")
        deadline = time.monotonic() + 60
        while not [p for p in (tmp_path / "hf").rglob("*.partial") if p.stat().st_size >= size // 3]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        first.stop()  # the app's process is closed mid-download
    page.close()
    [partial] = (tmp_path / "hf").rglob("*.partial")
    kept = partial.stat().st_size
    hub.faults.clear()
    hub.requests.clear()
    again = App(tmp_path, env=env)
    try:
        page = open_page(browser, again)
        pick_base(page, "acme/flux-slow", "already here, and the download resumes from there")
        assert page.locator("#base-discard").is_visible()
        page.screenshot(path=str(tmp_path / "resumable.png"), full_page=True)
        page.fill("#out-name textarea, #out-name input", "resumed")
        page.click("#fuse")
        page.wait_for_selector("#result:has-text('Saved')", timeout=120_000)
        ranges = [r["range"] for r in hub.file_gets() if r["path"].endswith(weights)]
        assert len(ranges) == 1 and int(ranges[0].removeprefix("bytes=").rstrip("-")) >= kept
        assert (again.outputs / "resumed" / "fluxstudio.json").exists() and not list(
            (tmp_path / "hf").rglob("*.partial")
        )
    finally:
        again.stop()


def kept_files(home, needle: str) -> list:
    return [p for p in home.rglob("*") if p.is_file() and (needle in p.name or p.parent.name == "web")]


def test_bad_lora_uploads_show_one_sentence_and_leave_nothing(browser, app, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"definitely not a safetensors file" * 10)
    page = open_page(browser, app)
    page.set_input_files("#lora-upload input[type=file]", str(bad))
    page.wait_for_selector("#lora-message .fs-error", timeout=60_000)
    text = page.inner_text("#lora-message")
    page.screenshot(path=str(tmp_path / "bad-upload.png"), full_page=True)
    assert "not a valid safetensors file" in text and "Traceback" not in text
    assert kept_files(app.home, "broken") == []  # neither the web server's copy nor one of ours
    from safetensors.torch import save_file

    other = tmp_path / "not-a-lora.safetensors"  # valid safetensors, but no LoRA in it
    save_file({"something.else": torch.zeros(256, 256)}, str(other))
    page.set_input_files("#lora-upload input[type=file]", str(other))
    page.wait_for_selector("#lora-message:has-text('not-a-lora')", timeout=60_000)
    assert "no weights for the FLUX.1 transformer" in page.inner_text("#lora-message")
    assert kept_files(app.home, "not-a-lora") == []
    good = tmp_path / "my-lora.safetensors"  # the demo LoRA, as a person would upload one
    from fluxstudio.sources import demo

    shutil.copyfile(demo.ensure_lora(), good)
    page.set_input_files("#lora-upload input[type=file]", str(good))
    page.wait_for_selector(".fs-lora-info:has-text('my-lora.safetensors')", timeout=60_000)
    assert "matched" in page.inner_text(".fs-lora-info")
    (kept,) = kept_files(app.home, "my-lora")  # moved once into the app's own uploads, nothing else
    assert kept.parent.name == "uploads"


def test_an_upload_the_disk_cannot_hold_is_refused_before_it_is_written(browser, tmp_path):
    """The app's folder on a 120 MB tmpfs (the demo takes 85 MB of it): an 80 MB upload is refused with the
    disk-full sentence before a byte of it is written there."""
    home = tmp_path / "small"
    home.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(home)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); tests/test_security.py checks the guard itself")
    try:
        app = App(tmp_path, env={"FLUXSTUDIO_HOME": str(home)})
        try:
            big = tmp_path / "big.safetensors"
            big.write_bytes(b"\0" * (80 << 20))
            page = open_page(browser, app)
            page.set_input_files("#lora-upload input[type=file]", str(big))
            toast = page.wait_for_selector(".toast-body:has-text('free disk')", timeout=60_000)
            page.screenshot(path=str(tmp_path / "disk-full-upload.png"))
            assert "Not enough free disk for this 83.9 MB upload" in toast.inner_text()
            assert [
                p for p in home.rglob("*") if p.is_file() and p.stat().st_size > 60 << 20 and "demo" not in p.parts
            ] == []
        finally:
            app.stop()
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def build_one_file(page, format_label: str, precision: str, name: str) -> str:
    """Pick a one-file format and one of its precisions, build the demo under `name`; the result's text."""
    page.get_by_label(format_label, exact=False).check()
    choice = page.locator(f"#precision label:has-text('{precision} ·')")
    choice.wait_for(timeout=30_000)
    choice.click()
    page.wait_for_function(
        f"() => document.querySelector('#precision input:checked')?.value === '{precision}'", timeout=30_000
    )
    page.fill("#out-name textarea, #out-name input", name)
    page.click("#fuse")
    page.wait_for_selector("#result:has-text('Saved')", timeout=180_000)
    return page.inner_text("#result")


def test_gguf_for_comfyui_with_placement_hint_and_library_file(browser, app, tmp_path):
    page = open_page(browser, app)
    result = build_one_file(page, "GGUF (ComfyUI-GGUF", "Q4_K_S", "demo-q4")
    page.screenshot(path=str(tmp_path / "gguf-result.png"), full_page=True)
    assert "gguf · Q4_K_S" in result and "models/unet/" in result and "Unet Loader (GGUF)" in result
    assert "GGUFQuantizationConfig" in page.inner_text("#snippet")
    page.wait_for_selector("#library-table:has-text('demo-q4.gguf')", timeout=30_000)
    assert (app.outputs / "demo-q4.gguf").is_file()
    assert not [p for p in app.outputs.iterdir() if p.name.startswith(".")]


def test_gguf_fitted_to_the_cards_size_then_to_a_size_typed_with_the_mix_in_the_result(browser, app, tmp_path):
    """The advice for a 12 GB card fits GGUF to its 9 GB left; a size typed for the demo builds a mix, shown."""
    page = open_page(browser, app)
    add_demo_lora(page)
    pick_card(page, "RTX 3060 12 GB")
    pick_format(page, "GGUF (ComfyUI-GGUF", "Fit a size")
    page.wait_for_function(
        "() => document.querySelector('#precision input:checked')?.value === 'fit'", timeout=30_000
    )  # the advice's pick for this card
    size = page.locator("#fit-size input")
    size.wait_for(timeout=30_000)
    page.wait_for_function(  # the advice's size, with the format's own update (they come together)
        "() => parseFloat(document.querySelector('#fit-size input')?.value) === 9", timeout=30_000
    )  # 12 GB less FLUX.1's 3 GB of headroom
    size.fill("0.03")  # the demo: 37 M weights, 39 MB in Q8_0, 16 MB in Q3_K
    size.press("Tab")
    page.wait_for_selector("#estimate:has-text('at most 30.0 MB')", timeout=30_000)  # the newest size's estimate
    page.fill("#out-name textarea, #out-name input", "demo-fit")
    page.click("#fuse")
    page.wait_for_selector("#result:has-text('Saved')", timeout=180_000)
    page.screenshot(path=str(tmp_path / "gguf-fit-result.png"), full_page=True)
    result = page.inner_text("#result")
    assert "gguf · fit" in result and "Fitted in 30.0 MB" in result and "Kept highest" in result, result
    assert "Measured error" in result and "LoRA effect kept" in result
    page.wait_for_selector("#library-table:has-text('demo-fit.gguf')", timeout=30_000)
    path = app.outputs / "demo-fit.gguf"
    assert path.stat().st_size <= 30 * 10**6
    import gguf

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert len(kinds & {"Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K"}) >= 2, kinds


def test_comfyui_native_nvfp4_with_placement_hint_retention_and_library_entry(browser, app, tmp_path):
    page = open_page(browser, app)
    add_demo_lora(page)
    result = build_one_file(page, "ComfyUI native (comfy_quant)", "nvfp4", "demo-comfy")
    page.screenshot(path=str(tmp_path / "comfyui-result.png"), full_page=True)
    assert "comfyui · nvfp4" in result and "models/diffusion_models/" in result and "Load Diffusion Model" in result
    kept = float(result.split("LoRA effect kept: ")[1].split("%")[0])
    assert 90 <= kept <= 110
    page.wait_for_selector("#library-table:has-text('demo-comfy.safetensors')", timeout=30_000)
    from safetensors import safe_open

    with safe_open(str(app.outputs / "demo-comfy.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert layers and all(conf == {"format": "nvfp4"} for conf in layers.values())


def test_try_it_renders_both_demo_images_with_figures_and_the_library_shows_them(browser, app, tmp_path):
    page = open_page(browser, app)
    add_demo_lora(page)
    page.locator("#precision label:has-text('fp8 ·')").click()
    page.fill("#out-name textarea, #out-name input", "demo-try")
    page.click("#fuse")
    page.wait_for_selector("#try-it #try", timeout=120_000)
    assert page.input_value("#preview-size input") == "64" and page.input_value("#preview-steps input") == "20"
    page.fill("#preview-seed input", "5")
    page.fill("#preview-steps input", "4")
    page.click("#try")
    page.wait_for_selector("#preview-figures:has-text('it/s')", timeout=120_000)
    page.screenshot(path=str(tmp_path / "try-it.png"), full_page=True)
    figures = page.inner_text("#preview-figures")
    assert (
        "(a) base fp8 + LoRA (unfused)" in figures and "(b) fused fp8 (FluxStudio)" in figures and "Seed 5" in figures
    )
    for key in "ab":
        assert page.locator(f"#preview-{key} img").count() == 1
        assert f"({key})" in page.inner_text(f"#preview-{key}")
        row = figures.split(f"({key})")[1].split("\n")[0].split("\t")  # its row of the figures: it/s, seconds
        assert float(row[1]) > 0 and float(row[2]) > 0, row
    folder = app.outputs / "demo-try.preview"
    saved = json.loads((folder / "preview.json").read_text())
    assert saved["settings"]["seed"] == 5 and [r["key"] for r in saved["renders"]] == ["a", "b", "c"]
    first = (folder / "b.png").read_bytes()

    page.click("#try")  # the same seed again: the same image
    page.wait_for_selector("#preview-status:has-text('Done')", timeout=120_000)
    page.wait_for_function("() => !document.querySelector('#try').disabled", timeout=120_000)
    assert (folder / "b.png").read_bytes() == first

    page.wait_for_selector("#library-table:has-text('(a) ')", timeout=30_000)
    page.locator("#library-pick input").click()
    page.get_by_role("option", name="demo-try").click()
    page.wait_for_selector("#library-preview img", timeout=30_000)
    assert page.locator("#library-preview img").count() == 3
    page.screenshot(path=str(tmp_path / "library-preview.png"), full_page=True)
    assert "Traceback" not in app.output()  # no handler failed on the way (the page would show an Error badge)


def test_try_it_without_a_gpu_offers_only_the_demo_and_says_why(browser, app, tmp_path):
    local = write_model(tmp_path / "localbase" / "transformer", FLUX1_TINY).parent
    page = open_page(browser, app)
    page.locator("#precision label:has-text('fp8 ·')").click()
    pick_base(page, str(local), wait_for="local folder")
    # another base of the same model: the sizes are its own (a few MB), the pick stays
    page.wait_for_function(
        "() => [...document.querySelectorAll('#precision label')].every(l => / (KB|MB)/.test(l.innerText))",
        timeout=30_000,
    )
    assert page.locator("#precision input:checked").get_attribute("value") == "fp8"
    page.locator("#precision label:has-text('bf16 ·')").click()
    page.fill("#out-name textarea, #out-name input", "local-bf16")
    page.click("#fuse")
    page.wait_for_selector("#preview-why:has-text('no CUDA GPU')", timeout=120_000)
    assert "demo" in page.inner_text("#preview-why")
    assert page.locator("#try").is_disabled()


def pick_card(page, card: str) -> None:
    page.locator("#target input").click()
    page.get_by_role("option", name=card).click()
    page.wait_for_selector(f"#advice:has-text('{card}')", timeout=30_000)


def pick_format(page, label: str, precision: str) -> None:
    page.get_by_label(label, exact=False).check()
    page.wait_for_selector(f"#precision label:has-text('{precision}')", timeout=30_000)


def test_two_builds_without_renaming_a_library_there_on_reload_and_a_delete_that_asks(browser, app, tmp_path):
    page = open_page(browser, app)
    name = page.input_value("#out-name textarea, #out-name input")
    page.click("#fuse")
    page.wait_for_selector(f"#result:has-text('{name}')", timeout=120_000)
    page.wait_for_function("() => !document.querySelector('#fuse').disabled", timeout=30_000)
    page.click("#fuse")  # the same name, untouched
    page.wait_for_selector(f"#run-status:has-text('{name} was taken, so this one is {name}-2')", timeout=120_000)
    assert sorted(p.name for p in app.outputs.iterdir() if not p.name.startswith(".")) == [name, f"{name}-2"]
    page.wait_for_selector(f"#library-table:has-text('{name}-2')", timeout=30_000)

    page.reload()  # the library is there without Refresh
    page.wait_for_selector(f"#library-table:has-text('{name}-2')", timeout=60_000)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(tmp_path / "reloaded-1280.png"), full_page=True)
    table = page.inner_text("#library-table")
    assert table.count(name) == 2

    page.locator("#library-pick input").click()
    page.get_by_role("option", name=f"{name}-2").click()
    asked = []
    page.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.click("#library-delete")
    page.wait_for_selector("#library-message:has-text('Nothing was deleted')", timeout=30_000)
    assert asked and f"Delete {name}-2?" in asked[0] and (app.outputs / f"{name}-2").exists()
    page.once("dialog", lambda d: d.accept())
    page.click("#library-delete")
    page.wait_for_selector(f"#library-message:has-text('Deleted {name}-2')", timeout=30_000)
    assert not (app.outputs / f"{name}-2").exists() and (app.outputs / name).exists()


def test_cards_and_formats_in_any_order_raise_no_error_and_try_it_says_what_it_cannot_load(browser, app, tmp_path):
    page = open_page(browser, app)
    for step in (
        lambda: pick_card(page, "RTX 3060 12 GB"),
        lambda: pick_format(page, "ComfyUI / Forge / SwarmUI, one file", "fp8-scaled"),
        lambda: pick_format(page, "GGUF (ComfyUI-GGUF", "Q8_0"),
        lambda: pick_format(page, "diffusers (Python)", "nf4"),
        lambda: pick_format(page, "GGUF (ComfyUI-GGUF", "Q8_0"),
        lambda: pick_card(page, "RTX 4090 24 GB"),
        lambda: pick_format(page, "diffusers (Python)", "nf4"),
        lambda: pick_card(page, "RTX 3060 12 GB"),
    ):
        step()
    page.wait_for_timeout(2000)  # any late answer of the server would show by now
    assert page.locator(".toast-body").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert "Traceback" not in app.output() and "is not in the list of choices" not in app.output()
    choices = page.locator("#precision label").all_inner_texts()
    assert [c.split(" ·")[0] for c in choices] == ["bf16", "fp8", "nf4"]
    assert page.locator("#precision input:checked").get_attribute("value") == "nf4"  # the RTX 3060's pick

    pick_format(page, "GGUF (ComfyUI-GGUF", "Q8_0")  # the demo is too narrow for diffusers' GGUF loader
    page.click("#fuse")
    page.wait_for_selector("#result:has-text('Saved')", timeout=120_000)
    page.wait_for_selector("#preview-why:has-text('diffusers or pipeline format at bf16 or fp8')", timeout=30_000)
    assert page.locator("#try").is_disabled()
    page.screenshot(path=str(tmp_path / "try-it-disabled.png"), full_page=True)
