"""The page as a person sees it after a demo build and Try it, at 1280 and 1920 px wide, in headless Chromium:
docs/screenshots/fluxstudio-1280.png and -1920.png (what the README shows).

    python tools/screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from apprunner import App  # the tests' own app runner

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluxstudio-shots-"))
    app = App(work)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app.url)
            page.wait_for_selector("#base-status:has-text('Built-in demo')", timeout=120_000)
            page.fill("#lora-ref textarea, #lora-ref input", "demo")
            page.click("#lora-add")
            page.wait_for_selector(".fs-lora-info:has-text('demo_lora.safetensors')", timeout=60_000)
            page.locator("#precision label:has-text('fp8 ·')").click()
            page.fill("#out-name textarea, #out-name input", "demo-fp8")
            page.click("#fuse")
            page.wait_for_selector("#result:has-text('Saved')", timeout=120_000)
            page.fill("#preview-steps input", "8")
            page.click("#try")
            page.wait_for_selector("#preview-figures:has-text('it/s')", timeout=600_000)
            page.locator("#library-pick input").click()
            page.get_by_role("option", name="demo-fp8").click()
            page.wait_for_selector("#library-preview img", timeout=30_000)
            for width in (1280, 1920):
                page.set_viewport_size({"width": width, "height": 900})
                page.wait_for_timeout(500)
                page.screenshot(path=str(args.out / f"fluxstudio-{width}.png"), full_page=True)
                print(args.out / f"fluxstudio-{width}.png")
            browser.close()
    finally:
        app.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
