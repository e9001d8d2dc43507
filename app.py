"""FluxStudio: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth USER:PASS] [--inbrowser] [--output-dir DIR]"""

import argparse
import signal
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description="FluxStudio: fuse LoRAs into FLUX models, then quantize and save.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--share", action="store_true", help="also share through a temporary public Gradio link (login required)"
    )
    p.add_argument(
        "--auth", metavar="USER:PASS", help="login for the page (generated and printed with --share if omitted)"
    )
    p.add_argument("--inbrowser", action="store_true", help="open the page in the browser")
    p.add_argument("--output-dir", type=Path, help="where outputs are saved (default: the app's data folder)")
    args = p.parse_args()

    from fluxstudio.cli import setup_logging
    from fluxstudio.studio import paths
    from fluxstudio.ui.app import launch
    from fluxstudio.ui.settings import Settings, parse_auth

    try:
        auth = parse_auth(args.auth)
    except ValueError as exc:
        p.error(str(exc))
    setup_logging()
    settings = Settings(
        args.host,
        args.port,
        args.share,
        auth,
        args.inbrowser,
        (args.output_dir or paths.outputs_dir()).expanduser().resolve(),
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stop from the system ends cleanly, as Ctrl+C does
    try:
        launch(settings).block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
