"""What FluxStudio can write: one table of output formats and the precisions each offers.

The CLI's choices, the app's options, the size estimate, the advice and the writers all read `FORMATS` and
`PRECISIONS`; nothing else lists them. A format is how the file(s) are laid out and who loads them; a precision is
how the transformer's Linear weights are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fluxstudio.errors import BadInputError, OutputError


@dataclass(frozen=True)
class Precision:
    key: str
    bytes_per_param: float  # for the weights it quantizes (others stay bf16, or F32/F16 in GGUF)
    note: str


@dataclass(frozen=True)
class Format:
    key: str
    label: str  # what the output is for, as the app asks it
    extension: str  # "" for a folder
    precisions: tuple[str, ...]
    default: str
    where: str  # where a user puts it and how it is loaded
    families: tuple[str, ...] = ("flux1", "flux2")


PRECISIONS: dict[str, Precision] = {
    p.key: p
    for p in (
        Precision("bf16", 2, "bf16 weights: full quality, the most VRAM."),
        Precision("fp8", 1, "Linear weights as float8_e4m3fn: half the VRAM of bf16."),
        Precision("fp8-scaled", 1, "Linear weights as float8_e4m3fn with a float32 scale per tensor (weight = fp8 × scale): "
                  "less error than a plain fp8 cast."),
        Precision("nf4", 0.5 + 4 / 64, "bitsandbytes NF4 (4-bit) weights; needs bitsandbytes and a CUDA GPU."),
        Precision("F16", 2, "GGUF F16: unquantized half precision."),
        Precision("BF16", 2, "GGUF BF16: unquantized, as the bf16 file."),
        Precision("Q8_0", 34 / 32, "GGUF Q8_0: 8.5 bits per weight, indistinguishable from bf16 for most uses."),
        Precision("Q6_K", 210 / 256, "GGUF Q6_K: 6.6 bits per weight."),
        Precision("Q5_K_S", 176 / 256, "GGUF Q5_K_S: 5.5 bits per weight."),
        Precision("Q5_0", 22 / 32, "GGUF Q5_0: 5.5 bits per weight."),
        Precision("Q4_K_S", 144 / 256, "GGUF Q4_K_S: 4.5 bits per weight, for 8–12 GB cards."),
        Precision("Q4_0", 18 / 32, "GGUF Q4_0: 4.5 bits per weight."),
    )
}

FORMATS: dict[str, Format] = {
    f.key: f
    for f in (
        Format("diffusers", "diffusers (Python)", "", ("bf16", "fp8", "nf4"), "bf16",
               "Load it with from_pretrained (snippet below)."),
        Format("pipeline", "pipeline (diffusers): transformer, text encoders, VAE, tokenizers", "", ("bf16", "fp8", "nf4"), "bf16",
               "Load the whole pipeline in one line (snippet below); it needs nothing else."),
        Format("single-file", "ComfyUI / Forge / SwarmUI, one file", ".safetensors", ("bf16", "fp8", "fp8-scaled", "nf4"), "fp8-scaled",
               "ComfyUI: put it in models/diffusion_models/ and use the Load Diffusion Model node. "
               "Forge: put it in models/Stable-diffusion/. SwarmUI: models/diffusion_models/."),
        Format("gguf", "GGUF (ComfyUI-GGUF, Forge, stable-diffusion.cpp, diffusers)", ".gguf",
               ("Q8_0", "Q6_K", "Q5_K_S", "Q5_0", "Q4_K_S", "Q4_0", "BF16", "F16"), "Q8_0",
               "ComfyUI: put it in models/unet/ and use the Unet Loader (GGUF) node from ComfyUI-GGUF. "
               "Forge: models/Stable-diffusion/. stable-diffusion.cpp: --diffusion-model FILE."),
    )
}


def get_format(key: str) -> Format:
    if key not in FORMATS:
        raise BadInputError(f"Unknown output format {key!r}.", f"Use one of {', '.join(FORMATS)}.")
    return FORMATS[key]


def check_precision(format_key: str, precision: str) -> Format:
    """The format, once sure it offers `precision`; one sentence otherwise."""
    fmt = get_format(format_key)
    if precision not in fmt.precisions:
        raise BadInputError(
            f"The {fmt.key} format has no precision {precision!r}.", f"It offers {', '.join(fmt.precisions)}."
        )
    return fmt


ENCODER_PRECISIONS = ("bf16", "fp8", "nf4")  # what the pipeline format offers for T5-XXL


def check_encoder_precision(format_key: str, precision: str) -> str:
    """The T5 precision of a pipeline export ("" for other formats); one sentence if it has no such precision."""
    if format_key != "pipeline":
        return ""
    if precision not in ENCODER_PRECISIONS:
        raise BadInputError(f"The T5 text encoder has no precision {precision!r}.", f"Use one of {', '.join(ENCODER_PRECISIONS)}.")
    return precision


def check(format_key: str, precision: str, family: str) -> Format:
    """The format, once sure it offers `precision` and its consumers load `family`; one sentence otherwise."""
    fmt = check_precision(format_key, precision)
    if family not in fmt.families:
        raise BadInputError(f"The {fmt.key} format cannot hold a {family} model.", "Use the diffusers format.")
    return fmt


def output_path(format_key: str, out: Path) -> Path:
    """The output's path: the folder for diffusers; for one-file formats the file, with its extension added. Only the
    parent is resolved: a name that is a symbolic link stays one (and is refused), never followed elsewhere."""
    fmt = get_format(format_key)
    out = Path(out).expanduser()
    out = out.resolve() if out.name in ("", ".", "..") else out.parent.resolve() / out.name
    if not fmt.extension:
        return out
    suffix = out.suffix.lower()
    if suffix == fmt.extension:
        return out
    if suffix in {f.extension for f in FORMATS.values() if f.extension} | {".ckpt", ".bin", ".pt", ".pth", ".sft"}:
        raise OutputError(
            f"The output name {out.name} ends in {out.suffix}, but a {fmt.key} output is a {fmt.extension} file.",
            f"Name it {out.stem}{fmt.extension}, or leave the extension out.",
        )
    return out.with_name(out.name + fmt.extension)
