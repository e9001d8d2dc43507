"""Try it: the same seed through the model as people run it today and through the fused output, side by side.

(a) the base at the output's precision with the LoRAs applied unfused (peft adapters, as diffusers, ComfyUI and
    Forge run them), (b) the fused output FluxStudio built, and (c) the bf16 base with the LoRAs, when it fits the
    card. Each render reports it/s (the denoising steps after the first), seconds per image and peak VRAM.
The prompt is encoded once with the base's text encoders (T5 in NF4 when VRAM is short), then freed, so the
transformers have the card to themselves; on a card with too little room beside one, it moves to the GPU only while
it runs (diffusers' model CPU offload).
Images and preview.json go into `NAME.preview/` beside the output.

It runs on CUDA. Without a GPU only the demo base runs (on the CPU, in seconds): its images are noise, and what
it shows is the plumbing, the determinism and the figures.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fluxstudio import paths
from fluxstudio.engine import manifest, partials
from fluxstudio.errors import BadInputError, FluxStudioError
from fluxstudio.flows.request import BuildRequest
from fluxstudio.formats import Format, get_format
from fluxstudio.formats.base import DEMO_PREVIEWS, Runtime, Why
from fluxstudio.progress import CancelToken, ProgressEvent, Run, Stage, check, running

SUFFIX = ".preview"
FILE = "preview.json"
PARTS = ["transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler"]
HEADROOM = 3 << 30  # activations at 1024², the VAE decode and CUDA's own: what a card needs beyond the weights
NO_GPU = (
    "This machine has no CUDA GPU, and the preview renders FLUX models on an NVIDIA GPU "
    "(on the CPU one image would take hours)."
)
DEMO_ONLY = "The demo previews on the CPU in a minute or two: build from the built-in demo base to try it."


@dataclass(frozen=True)
class Limits:
    """What one preview may ask for: a shared session's are lower, so that one visitor cannot hold the only job slot."""

    steps: int = 100
    size: int = 2048
    demo_size: int = 256  # the demo renders on the CPU: its images are noise, and 2048² would take hours there
    seconds: float = math.inf  # the whole preview, after which it stops with a sentence


LOCAL = Limits()
SHARED = Limits(steps=50, size=1024, demo_size=128, seconds=600)
MAX_SEED = 2**63 - 1
DEFAULT_PROMPT = "a red fox in fresh snow, detailed fur, golden hour"


@dataclass(frozen=True)
class PreviewRequest:
    build: BuildRequest  # the build that made the output: its base and LoRAs
    output: Path  # the saved output (folder or file)
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    steps: int = 0  # 0: the base's default (4 for schnell, 20 otherwise)
    size: int = 0  # 0: 512 (64 for the demo)
    device: str = "auto"  # auto: CUDA, or the CPU for the demo base; "cpu" renders any base there (slowly)
    limits: Limits = LOCAL


def whole(value: object, what: str, low: int, high: int) -> int:
    """A whole number from `low` to `high` out of what a widget or a command line gave (NaN and 1e300 included),
    or one sentence saying what would work."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise BadInputError(f"The {what} {value!r} does not work.", f"Use a whole number from {low} to {high}.")
    return int(number)


def make_request(
    build: BuildRequest, output: Path, prompt: str, seed: object, steps: object, size: object, shared: bool = False
) -> PreviewRequest:
    """A checked preview request; 0 steps or size take the base's defaults."""
    limits = SHARED if shared else LOCAL
    return PreviewRequest(
        build,
        output,
        prompt.strip() or DEFAULT_PROMPT,
        whole(seed, "seed", 0, MAX_SEED),
        whole(steps, "number of steps", 0, limits.steps),
        whole(size, "image size", 0, limits.size),
        limits=limits,
    )


@dataclass(frozen=True)
class Render:
    key: str  # a, b, c
    label: str
    image: str  # file name in the preview folder
    seconds: float  # one image, start to decoded
    it_per_s: float
    peak_vram_bytes: int | None  # None on the CPU


@dataclass(frozen=True)
class PreviewResult:
    folder: str
    settings: dict
    renders: list[Render]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def folder_for(output: Path) -> Path:
    return output.parent / (output.name + SUFFIX)


def read(output: Path) -> PreviewResult | None:
    """The saved preview of an output, or None (none, or damaged)."""
    try:
        data = json.loads((folder_for(output) / FILE).read_text(encoding="utf-8"))
        renders = [Render(**r) for r in data["renders"]]
        return PreviewResult(str(folder_for(output)), dict(data["settings"]), renders, list(data.get("notes", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def why_not(format: str, precision: str, base: str, device: str = "auto") -> Why | None:
    """Why Try it cannot render an output of this format and precision, built from `base`, on this machine (what, and
    what to do instead), or None. The page asks before it offers Try it, the CLI before it builds, and the preview
    before it starts: all three say the same sentence."""
    import torch

    fmt = get_format(format)
    precision = fmt.check(precision)
    demo = base == "demo"
    cuda = torch.cuda.is_available() and device != "cpu"
    why = fmt.preview_problem(precision)
    if why is None and device == "auto" and not cuda and not demo:
        return Why(NO_GPU, DEMO_ONLY)
    if why is None and not cuda and fmt.preview_runtime(precision) == "nf4":
        why = Why(
            "NF4 models run on a CUDA GPU only (diffusers' bitsandbytes layers need one).",
            "Preview it on a machine with an NVIDIA GPU.",
        )
    if why is None and demo:
        from fluxstudio.sources.demo import DEMO_CONFIG

        why = fmt.width_problem(DEMO_CONFIG["num_attention_heads"] * DEMO_CONFIG["attention_head_dim"])
    return why._replace(hint=DEMO_PREVIEWS) if why and demo else why


def defaults(variant: str, demo: bool) -> tuple[int, int]:
    """(steps, size) for a base: 4 steps for schnell, 20 otherwise; 512² (64² for the demo's tiny VAE)."""
    return (4 if "schnell" in variant else 20), (64 if demo else 512)


def vram_plan(total_vram: int, transformer_bytes: int) -> tuple[bool, bool]:
    """(T5 in NF4, offload the transformer) for a card: T5 is quantized when it would not fit beside headroom, and
    the transformer offloads when it and the headroom do not fit (8-12 GB cards)."""
    from fluxstudio.advice.recommend import T5_BYTES

    return total_vram < T5_BYTES["bf16"] + HEADROOM, total_vram < transformer_bytes + HEADROOM


def _check(req: PreviewRequest, data: dict | None) -> tuple[Format, str, str, str]:
    """(format, precision, variant, device) of an output this machine can preview, else one sentence why not."""
    import torch

    if data is None:
        raise BadInputError(
            f"{req.output.name} is not a FluxStudio output.", "Pick an output from the library.", (req.output,)
        )
    fmt, precision, variant = (
        get_format(data.get("format", "diffusers")),
        data["precision"],
        data["base"].get("variant", ""),
    )
    if not variant.startswith("FLUX.1"):
        raise BadInputError(
            f"The preview renders FLUX.1 models; {req.output.name} is {variant or 'another family'}.",
            "Load it with the snippet shown with the result.",
        )
    if why := why_not(fmt.key, precision, req.build.base, req.device):
        raise BadInputError(why.message, why.hint)
    device = "cuda" if req.device == "auto" and torch.cuda.is_available() else "cpu"
    return fmt, precision, variant, device


def _settings(req: PreviewRequest, fmt: Format, precision: str, variant: str, device: str) -> dict:
    demo = req.build.base == "demo"
    steps, size = defaults(variant, demo)
    steps, size = req.steps or steps, req.size or size
    top = req.limits.demo_size if demo else req.limits.size
    if not 1 <= steps <= req.limits.steps:
        raise BadInputError(
            f"{steps} steps is out of range.", f"Use 1 to {req.limits.steps} steps (4 for schnell, 20-30 for dev)."
        )
    if not 32 <= size <= top or size % 16:
        raise BadInputError(
            f"An image size of {size} does not work{' for the demo' if demo else ''}.",
            f"Use a multiple of 16 from 32 to {top} ({64 if demo else 512} is quick).",
        )
    return {
        "prompt": req.prompt,
        "seed": req.seed,
        "steps": steps,
        "width": size,
        "height": size,
        "guidance": 0.0 if "schnell" in variant else 3.5,
        "device": device,
        "format": fmt.key,
        "precision": precision,
        "output": req.output.name,
    }


def _check_width(root: Path, fmt: Format) -> None:
    config = json.loads((root / "transformer" / "config.json").read_text(encoding="utf-8"))
    if why := fmt.width_problem(config["num_attention_heads"] * config["attention_head_dim"]):
        raise BadInputError(why.message, why.hint)


def run(req: PreviewRequest, run: Run | None = None, hub=None) -> PreviewResult:
    import torch

    from fluxstudio.engine.models import pipeline_root
    from fluxstudio.sources.hub import Hub
    from fluxstudio.sources.resolve import resolve

    run = running(run)
    data = manifest.read(req.output)
    fmt, precision, variant, device = _check(req, data)
    assert data is not None  # _check says why not otherwise
    settings = _settings(req, fmt, precision, variant, device)
    stop = Stop(run.cancel, req.limits.seconds)
    hub = hub or Hub()
    run.report(ProgressEvent(Stage.PREPARE, message="Getting the base's text encoders, VAE and scheduler"))
    fetching = Run(run.progress, run.cancel)
    root = pipeline_root(resolve(req.build.base, "base", hub, fetching, PARTS)[0])
    _check_width(root, fmt)
    loras = [(resolve(r.ref, "lora", hub, fetching)[0], r.scale) for r in req.build.loras]
    notes = []
    if any(c != "transformer" for lr in data.get("loras", []) for c in lr.get("components", [])):
        notes.append("The LoRAs' text-encoder parts are not in the preview: every image uses the base's text encoders.")
    total_vram = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    stop()
    run.report(ProgressEvent(Stage.PREVIEW, message="Encoding the prompt"))
    max_len = 32 if req.build.base == "demo" else (256 if "schnell" in variant else 512)
    embeds = _encode(root, req.prompt, device, device == "cuda" and vram_plan(total_vram, 0)[0], max_len)
    shared = _shared(root)

    runtime = fmt.preview_runtime(precision)
    variants: list[tuple[str, str, str, Runtime, bool]] = [
        ("a", f"base {precision} + LoRA (unfused)", "base", runtime, True),
        ("b", f"fused {precision} (FluxStudio)", "output", runtime, False),
    ]
    bf16_bytes = sum(p.stat().st_size for p in (root / "transformer").glob("*.safetensors"))
    if precision != "bf16" and (device == "cpu" or bf16_bytes + HEADROOM <= total_vram):
        variants.append(("c", "base bf16 + LoRA (unfused)", "base", "bf16", True))
    elif precision != "bf16":
        notes.append("The bf16 base + LoRA image is left out: the bf16 transformer does not fit this card.")
    folder = folder_for(req.output)
    with partials.claim(folder, "preview") as held:
        tmp = partials.work_folder(folder)
        try:
            renders = []
            for key, label, source, how, with_loras in variants:
                stop()
                run.report(ProgressEvent(Stage.PREVIEW, 0, settings["steps"], item=label, message=f"Loading {label}"))
                if source == "output":
                    model = fmt.load_transformer(req.output, root / "transformer")
                else:
                    model = _base(how, fmt, precision, root, run, hub, req.build)
                renders.append(
                    _render(
                        key,
                        label,
                        model,
                        loras if with_loras else [],
                        how,
                        shared,
                        embeds,
                        settings,
                        total_vram,
                        tmp,
                        run,
                        stop,
                    )
                )
                del model
                _free(device)
            result = PreviewResult(str(folder), settings, renders, notes)
            (tmp / FILE).write_text(
                manifest.dumps(result.to_json() | {"created": _now()}, indent=2) + "\n", encoding="utf-8"
            )
            partials.move_into_place(tmp, folder, held)
            return result
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            _free(device)


class Stop:
    """Cancel and the time limit, checked between the steps and inside each one (before every Linear layer's forward,
    so that a cancel takes effect within a second or so even when one step takes minutes)."""

    def __init__(self, cancel: CancelToken | None, seconds: float) -> None:
        self.cancel, self.seconds = cancel, seconds
        self.deadline = time.monotonic() + seconds

    def __call__(self, *_: object) -> None:
        check(self.cancel)
        if time.monotonic() > self.deadline:
            raise BadInputError(
                f"The preview ran past the {self.seconds / 60:g} minutes a shared session allows.",
                "Try fewer steps or a smaller image.",
            )

    @contextmanager
    def inside(self, model):
        """Check before the forward of every Linear layer of `model` while the block runs."""
        import torch

        hooks = [m.register_forward_pre_hook(self) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _encode(root: Path, prompt: str, device: str, t5_nf4: bool, max_len: int) -> tuple:
    """(prompt_embeds, pooled_prompt_embeds) from the base's CLIP-L and T5, which are freed afterwards."""
    import torch
    from diffusers import FluxPipeline

    extra = {}
    if t5_nf4:
        from transformers import BitsAndBytesConfig, T5EncoderModel

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        extra["text_encoder_2"] = T5EncoderModel.from_pretrained(
            root / "text_encoder_2", quantization_config=q, dtype=torch.bfloat16, device_map=device
        )
    pipe = FluxPipeline.from_pretrained(root, transformer=None, vae=None, dtype=torch.bfloat16, **extra)
    if device == "cuda" and t5_nf4:
        pipe.text_encoder.to(device)
    else:
        pipe.to(device)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=device, max_sequence_length=max_len)  # type: ignore[arg-type] - a device name works
    del pipe, extra
    _free(device)
    return embeds, pooled


def _shared(root: Path) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    return {
        "vae": AutoencoderKL.from_pretrained(root / "vae", dtype=torch.bfloat16),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
    }


def _base(how: Runtime, fmt: Format, precision: str, root: Path, run: Run, hub, made: BuildRequest):
    """The base's transformer as (a) and (c) render it: at the output's precision the way people run it unfused, or
    in bf16."""
    import torch
    from diffusers import FluxTransformer2DModel

    config = root / "transformer"
    if how == "own-file":  # the base alone in the output's format (a GGUF type), as people download it
        return fmt.load_transformer(_base_file(made, fmt, precision, run, hub), config)
    if how == "nf4":
        from diffusers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return FluxTransformer2DModel.from_pretrained(config, quantization_config=q, dtype=torch.bfloat16)
    return FluxTransformer2DModel.from_pretrained(
        config, dtype=torch.bfloat16
    )  # fp8 is cast layer by layer once the LoRAs are in


def _base_file(made: BuildRequest, fmt: Format, precision: str, run: Run, hub) -> Path:
    """The base alone at a precision of a format (a fitted file: fitted to the same size), built once by
    FluxStudio's own writer and kept for later previews."""
    from fluxstudio.flows.build import build

    folder = paths.home() / "preview-bases"
    key = f"{precision}-{made.fit_bytes}" if made.fit_bytes else precision
    path = folder / f"{hashlib.sha256(made.base.encode()).hexdigest()[:12]}-{key}{fmt.extension}"
    if not path.is_file():
        build(BuildRequest(made.base, (), precision, path, format=fmt.key, fit_bytes=made.fit_bytes), run, hub=hub)
    return path


@contextmanager
def _enough_vram(label: str, settings: dict):
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise FluxStudioError(
            f"The GPU ran out of memory rendering {label} at {settings['width']}x{settings['height']}.",
            "Try a smaller size, or a lower precision for this card.",
        ) from None


def _render(
    key: str,
    label: str,
    model,
    loras: list[tuple[Path, float]],
    how: Runtime,
    shared: dict,
    embeds: tuple,
    settings: dict,
    total_vram: int,
    folder: Path,
    run: Run,
    stop: Stop,
) -> Render:
    import torch
    from diffusers import FluxPipeline

    device = settings["device"]
    none = {
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
    }  # the prompt comes encoded
    pipe = FluxPipeline(transformer=model, **none, **shared)
    try:
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        if loras:
            pipe.set_adapters([f"lora{i}" for i in range(len(loras))], [s for _, s in loras])
    except (ValueError, KeyError, RuntimeError) as exc:
        logging.getLogger(__name__).exception("unfused LoRAs failed to load")
        raise FluxStudioError(
            f"diffusers could not apply the LoRAs unfused to the base ({type(exc).__name__}; details in the log).",
            "The fused output is unaffected; the preview needs the unfused LoRAs for its comparison.",
        ) from None
    if how == "fp8":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    with _enough_vram(label, settings):
        if device == "cuda" and vram_plan(total_vram, sum(p.numel() * p.element_size() for p in model.parameters()))[1]:
            pipe.enable_model_cpu_offload()
        else:
            pipe.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps = settings["steps"]
    marks: list[float] = []

    def on_step(_pipe, i, _t, kwargs):
        stop()
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        run.report(ProgressEvent(Stage.PREVIEW, i + 1, steps, item=label, message=f"Rendering {label}"))
        return kwargs

    embeds_, pooled = (t.to(device) for t in embeds)
    run.report(ProgressEvent(Stage.PREVIEW, 0, steps, item=label, message=f"Rendering {label}"))
    t0 = time.perf_counter()
    with torch.no_grad(), _enough_vram(label, settings), stop.inside(model):
        image = pipe(  # type: ignore[call-arg] - diffusers' hints miss its own step-end callback's signature
            prompt_embeds=embeds_,
            pooled_prompt_embeds=pooled,
            num_inference_steps=steps,
            width=settings["width"],
            height=settings["height"],
            guidance_scale=settings["guidance"],
            generator=torch.Generator("cpu").manual_seed(settings["seed"]),
            callback_on_step_end=on_step,  # type: ignore[arg-type]
        ).images[0]  # type: ignore[attr-defined] - a pipeline output, not a tuple, without return_dict=False
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    it_s = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else steps / seconds
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    name = f"{key}.png"
    image.save(folder / name)
    pipe.remove_all_hooks()
    del pipe
    return Render(key, label, name, round(seconds, 3), round(it_s, 3), peak)
