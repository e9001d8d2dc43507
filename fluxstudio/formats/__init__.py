"""What FluxStudio can write: one registry of output formats, each an object that owns its precisions.

A format is how the file(s) are laid out and who loads them (`base.Format`); a precision is how the weights are
stored (`fluxstudio.quant`, or a format's own presets such as GGUF's). The CLI's choices, the app's options, the
size estimate, the advice, the build and the preview all ask these objects. Adding a format is one module with one
`Format` subclass and one line below.
"""

from __future__ import annotations

from pathlib import Path

from fluxstudio.errors import BadInputError
from fluxstudio.formats.base import BuildPlan, Format, Option, Part, Settings, Why, Writer
from fluxstudio.formats.comfyui import ComfyFormat
from fluxstudio.formats.diffusers import DiffusersFormat
from fluxstudio.formats.gguf import GgufFormat
from fluxstudio.formats.pipeline import PipelineFormat
from fluxstudio.formats.single_file import SingleFileFormat

__all__ = [
    "FORMATS",
    "BuildPlan",
    "Format",
    "Option",
    "Part",
    "Settings",
    "Why",
    "Writer",
    "get_format",
    "option",
    "output_path",
]

FORMATS: dict[str, Format] = {
    f.key: f for f in (DiffusersFormat(), PipelineFormat(), SingleFileFormat(), ComfyFormat(), GgufFormat())
}
EXTENSIONS = tuple(f.extension for f in FORMATS.values() if f.extension)


def get_format(key: str) -> Format:
    if key not in FORMATS:
        raise BadInputError(f"Unknown output format {key!r}.", f"Use one of {', '.join(FORMATS)}.")
    return FORMATS[key]


def option(key: str) -> Option:
    """A precision by its key, whichever format offers it first (a key means the same bytes per weight everywhere:
    ComfyUI's fp8 and the plain cast share one)."""
    for fmt in FORMATS.values():
        for o in fmt.options:
            if o.key == key:
                return o
    raise BadInputError(f"There is no precision {key!r}.", "Pick one the output format offers.")


def output_path(key: str, out: Path) -> Path:
    """Where a build of this format writes for `out` (a one-file format adds its extension)."""
    return get_format(key).output_path(out, EXTENSIONS)
