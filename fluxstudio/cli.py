"""Command-line front end: `python -m fluxstudio fuse|env|...`. Errors become one line and an exit code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fluxstudio import studio
from fluxstudio.errors import (
    BadInputError,
    CancelledError,
    DiskSpaceError,
    FluxStudioError,
    HubError,
    OutputError,
    OutputExistsError,
)
from fluxstudio.progress import CancelToken, ProgressEvent, Stage
from fluxstudio.studio import FORMATS, Run, __version__, advice, human_bytes, paths

ENCODER_PRECISIONS = sorted({p for f in FORMATS.values() for p in f.encoder_options})

log = logging.getLogger("fluxstudio")
# What the CLI says instead of the core's hint, where a flag is the answer
CLI_HINTS: dict[type[FluxStudioError], str] = {
    OutputExistsError: "Choose another --out, or add --overwrite to replace it once the new one is complete.",
}
# Exit codes by error class, most specific first; 1 for anything else.
EXIT_CODES: tuple[tuple[type[FluxStudioError], int], ...] = (
    (CancelledError, 130),
    (BadInputError, 2),
    (OutputError, 3),
    (DiskSpaceError, 4),
    (HubError, 5),
    (FluxStudioError, 1),
)


def exit_code(exc: FluxStudioError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def parse_size(text: str) -> int:
    try:
        return studio.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxstudio", description="Fuse LoRAs into FLUX models at full precision, then quantize and save."
    )
    p.add_argument("--version", action="version", version=f"FluxStudio {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fuse", help="fuse LoRAs into a base model and save it quantized")
    f.add_argument(
        "--base", required=True, help="base model: Hub repo id (owner/name[@rev]), Hub URL, local folder, or 'demo'"
    )
    f.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA: Hub repo id (owner/name[/file.safetensors]), Hub URL, local .safetensors, or 'demo' (repeatable)",
    )
    f.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        help="scale of the matching --lora (default 1.0; negative allowed)",
    )
    f.add_argument(
        "--format",
        choices=list(FORMATS),
        default="diffusers",
        help="diffusers: a folder for Python; pipeline: the whole diffusers pipeline (text encoders, VAE, "
        "tokenizers) that loads in one line; single-file: one BFL-keyed .safetensors for ComfyUI/Forge/SwarmUI; "
        "gguf: one .gguf for ComfyUI-GGUF/Forge/stable-diffusion.cpp (default diffusers)",
    )
    f.add_argument(
        "--precision",
        metavar="PRECISION",
        help="; ".join(f"{k}: {', '.join(v.precisions)}" for k, v in FORMATS.items())
        + " (default: "
        + ", ".join(f.default for f in FORMATS.values())
        + " respectively; in any case)",
    )
    f.add_argument(
        "--fit",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="gguf, comfyui: make the file fit in SIZE (e.g. 12GB), each weight's precision chosen from its "
        "measured error (comfyui: among what --precision fit-fp8, fit-nvfp4 or fit-int8 names; fit-fp8 by default)",
    )
    f.add_argument(
        "--t5-precision",
        choices=ENCODER_PRECISIONS,
        default="",
        type=str.lower,
        help="pipeline: T5-XXL's precision (default: the same as --precision)",
    )
    f.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (diffusers) or file (the extension is added when missing); must not exist unless --overwrite",
    )
    f.add_argument("--shard-size", type=parse_size, default="5GB", help="largest shard file (default 5GB)")
    f.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    f.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (only once the new one is complete)"
    )
    f.add_argument(
        "--ignore-unmatched",
        action="store_true",
        help="fuse a LoRA even if some of its modules match nothing in the base",
    )
    f.add_argument(
        "--double-quant", action="store_true", help="nf4: also quantize the scales (smaller, slightly slower)"
    )
    f.add_argument("--report-json", type=Path, help="also write the final report as JSON to this file")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument(
        "--preview",
        action="store_true",
        help="then render one seed with the LoRAs unfused on the base and with the fused output, with it/s "
        "and peak VRAM (needs a CUDA GPU; the demo runs on the CPU); saved in OUT.preview/",
    )
    f.add_argument("--prompt", default="", help="--preview: the prompt")
    f.add_argument("--seed", type=int, default=0, help="--preview: the seed (default 0)")
    f.add_argument(
        "--preview-steps", type=int, default=0, help="--preview: steps (default 4 for schnell, 20 otherwise)"
    )
    f.add_argument("--preview-size", type=int, default=0, help="--preview: square image size (default 512; demo 64)")
    f.set_defaults(func=cmd_fuse)

    d = sub.add_parser("download", help="download a base model (or a LoRA) from the Hub into the HF cache")
    d.add_argument("ref", help="Hub repo id (owner/name[@rev][/path]) or Hub URL")
    d.add_argument("--lora", action="store_true", help="REF is a LoRA (one .safetensors file)")
    d.set_defaults(func=cmd_download)

    e = sub.add_parser("env", help="this machine, the precision advice and library versions (for bug reports)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.add_argument(
        "--model", choices=sorted(advice.MODELS), default="flux1", help="the model to advise for (default flux1)"
    )
    e.add_argument(
        "--target", choices=sorted(advice.CARDS), metavar="CARD", help="advise for this card instead of the one here"
    )
    e.set_defaults(func=cmd_env)
    return p


def cmd_download(args: argparse.Namespace) -> int:
    bar = _ProgressBar(quiet=False)
    try:
        ref, got = studio.Studio(local=True).download(args.ref, args.lora, Run(bar, CancelToken()))
    finally:
        bar.close()
    note = f"downloaded {human_bytes(got.downloaded_bytes)}" if got.downloaded_bytes else "already in the cache"
    print(f"{ref.display()} @ {got.revision[:12]}: {note}\n{got.path}")
    for line in got.notes:
        print(f"Note: {line}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    import platform
    from dataclasses import asdict

    s = studio.Studio(local=True)
    hw = s.hw
    model = advice.MODELS[args.model]
    rec = s.advise(args.target or studio.THIS_MACHINE, args.model)
    folders = {"home": str(paths.home()), "outputs": str(paths.outputs_dir()), "logs": str(paths.logs_dir())}
    try:
        from huggingface_hub import constants

        folders["hf_cache"] = constants.HF_HUB_CACHE
    except ImportError:
        pass
    data = {
        "fluxstudio": __version__,
        "python": platform.python_version(),
        **hw.to_json(),
        "recommendation": {"model": model.label, **asdict(rec)},
        "libraries": studio.library_versions(),
        "folders": folders,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"FluxStudio {__version__} on {hw.os}, Python {data['python']}")
    print(f"CPU   {hw.cpu} ({hw.cpu_cores} cores)")
    print(f"RAM   {human_bytes(hw.ram_total_bytes)} ({human_bytes(hw.ram_available_bytes)} available)")
    print(f"Disk  {human_bytes(hw.disk_free_bytes)} free at {hw.disk_path}")
    for a in hw.accelerators:
        cap = f", compute {a.capability[0]}.{a.capability[1]}" if a.capability else ""
        print(
            f"GPU   {a.name} ({a.kind}{cap}, {human_bytes(a.vram_total_bytes)}; driver {a.driver or '?'}, runtime {a.runtime or '?'})"
        )
    for note in hw.notes:
        print(f"note  {note}")
    print(f"\nAdvice for {model.label}{' on ' + rec.target if rec.target else ''}: {rec.precision}\n  {rec.reason}")
    if rec.one_file:
        print(f"  For ComfyUI / Forge: {rec.one_file} — {rec.one_file_why}")
        for also in rec.one_file_also:
            print(f"  Also offered: {also}")
    for alt in rec.alternatives:
        print(f"  {alt.precision}: {alt.why}")
    print("\nLibraries  " + ", ".join(f"{k} {v}" for k, v in data["libraries"].items()))
    for k, v in folders.items():
        print(f"{k:10} {v}")
    return 0


class _ProgressBar:
    """A tqdm bar over bytes for the fuse stage, and one line per other stage."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.stage = None
        self.message = ""

    def __call__(self, ev: ProgressEvent) -> None:
        if self.quiet:
            return
        if ev.stage not in (Stage.FUSE, Stage.DOWNLOAD):
            if ev.message and ev.message != self.message:
                self.close()
                print(f"{ev.message}...", file=sys.stderr)
            self.stage, self.message = ev.stage, ev.message
            return
        if self.bar is None or ev.stage != self.stage or ev.bytes_total != self.bar.total:
            from tqdm import tqdm

            self.close()
            desc = "Fusing" if ev.stage == Stage.FUSE else "Downloading"
            if ev.bytes_start:
                print(f"{ev.message}.", file=sys.stderr)
            self.bar = tqdm(
                total=ev.bytes_total,
                initial=ev.bytes_start,
                unit="B",
                unit_scale=True,
                desc=desc,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.stage = ev.stage
        unit = "tensors" if ev.stage == Stage.FUSE else "files"
        self.bar.set_postfix_str(f"{ev.done}/{ev.total} {unit}", refresh=False)
        self.bar.update(ev.bytes_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_fuse(args: argparse.Namespace) -> int:
    if len(args.lora_scale) > len(args.lora):
        raise FluxStudioError(
            "There are more --lora-scale values than --lora files.", "Give one scale per LoRA, in order."
        )
    scales = args.lora_scale + [1.0] * (len(args.lora) - len(args.lora_scale))

    req = studio.BuildRequest(
        base=args.base,
        loras=tuple(studio.LoraRef(r, s) for r, s in zip(args.lora, scales, strict=False)),
        precision=args.precision or ("fit" if args.fit else FORMATS[args.format].default),
        fit_bytes=args.fit,
        format=args.format,
        t5_precision=args.t5_precision,
        out_dir=args.out,
        shard_bytes=args.shard_size if isinstance(args.shard_size, int) else parse_size(args.shard_size),
        device=args.device,
        overwrite=args.overwrite,
        ignore_unmatched=args.ignore_unmatched,
        double_quant=args.double_quant,
    )
    front = studio.Studio(local=True)
    if args.preview and (why := front.preview_problem(req)):
        raise BadInputError(f"--preview cannot run for this output: {why}", "Leave out --preview, or change the above.")
    bar = _ProgressBar(args.quiet)
    try:
        result = front.build(req, Run(bar, CancelToken()))
    finally:
        bar.close()
    print(f"Saved {result.precision} {result.format} model to {result.output_dir}")
    print(f"  size       {human_bytes(result.output_bytes)} in {len(result.files)} file(s)")
    print(
        f"  time       {result.seconds:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_seconds.items())
        + ")"
    )
    print(f"  peak RAM   {human_bytes(result.peak_ram_bytes)} (anonymous {human_bytes(result.peak_anon_bytes)})")
    if result.peak_vram_bytes:
        print(f"  peak VRAM  {human_bytes(result.peak_vram_bytes)}")
    print(
        f"  fused      {result.tensors_fused} tensors"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in result.fused_per_component.items()) + ")"
            if len(result.fused_per_component) > 1
            else ""
        )
    )
    if result.lora_retained is not None:
        print(f"  {studio.describe_retention(result.lora_retained)}")
    for line in studio.describe_fit(result.fit):
        print(f"  {line}")
    for note in result.notes:
        print(f"  note       {note}")
    if place := front.placement(result):
        print(f"\n{place}")
    print("\nLoad it in diffusers with:\n" + front.snippet(result, req))
    if args.report_json:
        args.report_json.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    if args.preview:
        bar = _ProgressBar(args.quiet)
        try:
            shown = front.preview(
                req,
                Path(result.output_dir),
                args.prompt,
                args.seed,
                args.preview_steps,
                args.preview_size,
                Run(bar, CancelToken()),
            )
        finally:
            bar.close()
        s = shown.settings
        print(f"\nTry it: seed {s['seed']}, {s['steps']} steps, {s['width']}x{s['height']} on {s['device']}:")
        for r in shown.renders:
            vram = human_bytes(r.peak_vram_bytes) if r.peak_vram_bytes is not None else "-"
            print(f"  ({r.key}) {r.label:<30} {r.it_per_s:7.2f} it/s {r.seconds:7.1f} s/image  peak VRAM {vram}")
        for note in shown.notes:
            print(f"  note {note}")
        print(f"  images and preview.json in {shown.folder}")
    return 0


class _LogFile(logging.FileHandler):
    """The log file of the data folder (one per process, whatever calls set it up)."""


def setup_logging() -> None:
    """Log to the data folder's fluxstudio.log (again after FLUXSTUDIO_HOME changed), and keep libraries quiet."""
    root = logging.getLogger()
    path = paths.logs_dir() / "fluxstudio.log"
    for old in [h for h in root.handlers if isinstance(h, _LogFile)]:
        if Path(old.baseFilename) == path:
            return
        root.removeHandler(old)
        old.close()
    try:
        paths.logs_dir().mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = _LogFile(path, encoding="utf-8")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("diffusers", "transformers", "bitsandbytes", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # diffusers and transformers set their own loggers' level when first imported: they read these instead
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except FluxStudioError as exc:
        log.info("error: %s", exc)
        print(f"Error: {exc.message}", file=sys.stderr)
        hint = next((h for cls, h in CLI_HINTS.items() if isinstance(exc, cls)), exc.hint)
        if hint:
            print(f"       {hint}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("Cancelled. Nothing was saved.", file=sys.stderr)
        return 130
    except Exception as exc:
        log.exception("unexpected error")
        print(f"Error: something unexpected went wrong ({type(exc).__name__}: {exc}).", file=sys.stderr)
        print(f"       Details are in {paths.logs_dir() / 'fluxstudio.log'}.", file=sys.stderr)
        return 1
