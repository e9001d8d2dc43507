"""What every output format is made of: the `Format` a format module subclasses, the `Writer` protocol its writers
implement (the seam the engine streams into), and the plan of one build (a `Part` per component written).

A format owns what is particular to it: the precisions it offers, what of a base it needs, its writers, its side
files and how it moves into place, its loading snippet and where a user puts it, and whether (and how) the preview
loads it. The build, the preview, the CLI and the app ask the format; none of them tests which format it is.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import torch

from fluxstudio.engine import partials
from fluxstudio.engine.fuse import FusePlan, TensorJob
from fluxstudio.engine.models import ENCODERS, BaseModel, Family, open_encoder, pipeline_root
from fluxstudio.engine.retention import Retention
from fluxstudio.errors import BadInputError, OutputError

if TYPE_CHECKING:
    from fluxstudio.engine.lora import LoadedLora

PIPELINES = {
    "flux1": ("FluxPipeline", "black-forest-labs/FLUX.1-dev"),
    "flux2": ("Flux2Pipeline", "black-forest-labs/FLUX.2-dev"),
}
# What previews on a machine without a GPU, where another choice cannot
DEMO_PREVIEWS = "Build the demo in the diffusers or pipeline format at bf16 or fp8 to preview it on the CPU."
# How the preview runs a base at an output's precision, beside the fused output: as diffusers loads it, or from a
# file of the same kind built from the base alone ("own-file": GGUF, where the type is the point)
Runtime = Literal["bf16", "fp8", "nf4", "own-file"]


class Why(NamedTuple):
    """Why something cannot be done, as an error says it: what, and what to do instead."""

    message: str
    hint: str


class Option(Protocol):
    """A precision as a format offers it: what the person picks, and how the preview runs a base at it."""

    @property
    def key(self) -> str: ...
    @property
    def note(self) -> str: ...
    @property
    def runtime(self) -> Runtime: ...
    @property
    def double_quant(self) -> bool | None: ...  # NF4's option (None where it does not apply)
    @property
    def bytes_per_param(self) -> float: ...


class Writer(Protocol):
    """One component's output, as the engine feeds it. All of its state is made in `__init__`; `open` starts the
    files, `encode` turns one fused tensor into what is stored (holding back the parts of a group until all are in),
    `write` appends it (in a background thread), `close` finishes the files and returns them, `abort` lets go of a
    failed one."""

    jobs: list[TensorJob]  # the plan's tensors in the order this writer needs them
    notes: list[str]
    retention: Retention  # the LoRA-retention score of what it stored
    precision: str  # the key of what its quantized weights are stored as
    filename: str  # a one-file writer's file name ("" for a folder)

    def need_bytes(self) -> int: ...
    def open(self, folder: Path, metadata: dict[str, str]) -> None: ...
    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]: ...
    def write(self, key: str, value: torch.Tensor) -> None: ...
    def close(self, final: dict | None = None) -> list[Path]: ...
    def abort(self) -> None: ...

    @property
    def total_bytes(self) -> int: ...


@dataclass(frozen=True)
class Settings:
    """What a build asks of its format beyond the precision."""

    filename: str = "output"
    shard_bytes: int = 5 * 10**9
    double_quant: bool = False
    t5_precision: str = ""  # T5-XXL's precision where the format writes it on its own ("" as the transformer)
    fit_bytes: int = 0  # the size a fitted output must fit in (a format's `fitted` precisions)


@dataclass
class Part:
    """One component's stream: its model, plan and writer, and the subfolder it goes to ("" for the top)."""

    component: str
    model: BaseModel
    plan: FusePlan
    writer: Writer
    where: str = ""


@dataclass
class BuildPlan:
    """Everything one build will write, decided before the first byte: the parts (the transformer first), and for a
    pipeline the base's folder and the components linked from it unchanged."""

    format: Format
    base: BaseModel
    loras: list[tuple[LoadedLora, float]]
    parts: list[Part]
    root: Path | None = None
    linked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plan(self) -> FusePlan:
        return self.parts[0].plan

    @property
    def writer(self) -> Writer:
        return self.parts[0].writer

    def need_bytes(self, target: Path) -> int:
        return sum(p.writer.need_bytes() for p in self.parts) + self.format.linked_bytes(self, target)

    def fused(self) -> dict[str, int]:
        """Tensors fused per component (the manifest and the report list them)."""
        return {p.component: p.plan.fused_count for p in self.parts if p.plan.fused_count}

    def companions(self, out: Path) -> list[Path]:
        """The files written beside a one-file output (the fused text encoders)."""
        return [out.parent / p.writer.filename for p in self.parts[1:] if p.writer.filename]


class Format(ABC):
    key: str
    label: str  # what the output is for, as the app asks it
    extension: str = ""  # "" for a folder
    options: tuple[Option, ...]
    default: str
    where: str = ""  # where a user puts it and how it is loaded ("" for a Python folder: the snippet says it)
    families: tuple[str, ...] = ("flux1", "flux2")
    encoder_options: tuple[str, ...] = ()  # T5-XXL's precisions, where the format writes T5 on its own
    writes_encoders: bool = True  # the fused text encoders of a LoRA that trains them (beside, or in the pipeline)
    links_base: bool = False  # takes the rest of the base's pipeline unchanged
    fitted: tuple[Option, ...] = ()  # its precisions that fit a size: each weight's precision chosen to fit it

    # -- precisions ---------------------------------------------------------------------------------------------
    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.options)

    @property
    def fits(self) -> bool:
        return bool(self.fitted)

    @property
    def fit_keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.fitted)

    def option(self, key: str) -> Option:
        """The precision called `key` (in any case: Q8_0 and q8_0 alike), or one sentence naming what there is."""
        for o in self.options + self.fitted:
            if o.key.lower() == key.strip().lower():
                return o
        raise BadInputError(
            f"The {self.key} format has no precision {key!r}.", f"It offers {', '.join(self.precisions)}."
        )

    def check(self, precision: str, family: str | None = None) -> str:
        """The precision's own spelling, once sure this format offers it and its consumers load `family`."""
        key = self.option(precision).key
        if family is not None and family not in self.families:
            raise BadInputError(f"The {self.key} format cannot hold a {family} model.", "Use the diffusers format.")
        return key

    def encoder_precision(self, t5: str, precision: str) -> str:
        """T5-XXL's precision in this format's output ("" where the format does not write T5 on its own)."""
        if not self.encoder_options:
            return ""
        t5 = (t5 or precision).strip()
        if t5.lower() not in self.encoder_options:
            raise BadInputError(
                f"The T5 text encoder has no precision {t5!r}.", f"Use one of {', '.join(self.encoder_options)}."
            )
        return t5.lower()

    # -- where it goes ------------------------------------------------------------------------------------------
    @property
    def one_file(self) -> bool:
        return bool(self.extension)

    def output_path(self, out: Path, others: tuple[str, ...] = ()) -> Path:
        """The output's path: a folder as named; for a one-file format the file, with its extension added. Only the
        parent is resolved: a name that is a symbolic link stays one (and is refused), never followed elsewhere.
        `others`: the extensions of the other formats, refused on this one's file."""
        out = Path(out).expanduser()
        out = out.resolve() if out.name in ("", ".", "..") else out.parent.resolve() / out.name
        if not self.extension:
            return out
        suffix = out.suffix.lower()
        if suffix == self.extension:
            return out
        if suffix in {*others, ".ckpt", ".bin", ".pt", ".pth", ".sft"}:
            raise OutputError(
                f"The output name {out.name} ends in {out.suffix}, but a {self.key} output is a {self.extension} file.",
                f"Name it {out.stem}{self.extension}, or leave the extension out.",
            )
        return out.with_name(out.name + self.extension)

    def placement(self, files: list[str]) -> str:
        """Where a user puts the output (and the fused text encoders beside it), and which loader reads it."""
        encoders = [f for f in files if f.rsplit(".", 2)[-2] in ENCODER_PLACES] if self.one_file else []
        if not encoders:
            return self.where
        return self.where + (
            " The fused text encoders (" + ", ".join(encoders) + ") go to ComfyUI's "
            "models/text_encoders/ (DualCLIPLoader, type flux) or Forge's models/text_encoder/."
        )

    @abstractmethod
    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        """Python that loads the output with diffusers, or comment lines saying what reads it instead. `pipeline`: the
        base pipeline it goes into ("" for the family's repo on the Hub)."""

    # -- what a build needs and writes --------------------------------------------------------------------------
    def base_parts(self, lora_components: set[str]) -> list[str] | None:
        """What of a base repo to download: None for everything, else the components."""
        return ["transformer"] + sorted(lora_components - {"transformer"})

    @abstractmethod
    def main_writer(self, precision: str, base: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        """The transformer's writer."""

    def encoder_writer(self, component: str, encoder: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        """A fused text encoder's writer (formats that write them)."""
        raise NotImplementedError(f"the {self.key} format writes no text encoder")

    def subfolder(self, component: str) -> str:
        return ""

    def forced_encoders(self, settings: Settings) -> set[str]:
        """Text encoders written even when no LoRA changes them (a pipeline's T5 at its own precision)."""
        return set()

    def plan(
        self,
        base_path: Path,
        base: BaseModel,
        loras: list[tuple[LoadedLora, float]],
        precision: str,
        settings: Settings,
        ignore_unmatched: bool = False,
    ) -> BuildPlan:
        """Every part this format writes for a base and its LoRAs, with their writers."""
        from fluxstudio.engine.fuse import plan_tensors

        fplan = plan_tensors(base, loras, ignore_unmatched)
        main = Part(
            "transformer",
            base,
            fplan,
            self.main_writer(precision, base, fplan, settings),
            self.subfolder("transformer"),
        )
        planned = BuildPlan(self, base, loras, [main])
        touched = sorted({c for lora, _ in loras for c in lora.encoders})
        if touched and not self.writes_encoders:
            labels = " and ".join(ENCODERS[c].label for c in touched)
            planned.notes.append(
                f"The LoRAs' {labels} parts were not fused: the {self.key} format holds the transformer "
                "only (the pipeline format includes the text encoders)"
            )
            touched = []
        wanted = set(touched) | self.forced_encoders(settings)
        if wanted or self.links_base:
            planned.root = pipeline_root(base_path)
        for component in ENCODERS if base.family.key == "flux1" else ():
            if component in wanted:
                assert planned.root is not None
                encoder = open_encoder(planned.root, component)
                eplan = plan_tensors(encoder, loras, ignore_unmatched, component)
                planned.parts.append(
                    Part(
                        component,
                        encoder,
                        eplan,
                        self.encoder_writer(component, encoder, eplan, settings),
                        self.subfolder(component),
                    )
                )
        return planned

    def prepare(self, planned: BuildPlan, device: str, run) -> dict:
        """What runs before the output is written (a fitted file's measuring pass); returns what the manifest adds."""
        from fluxstudio.formats.fitting import Fitting

        writer = planned.writer
        return {"fit": writer.fit(device, run)} if isinstance(writer, Fitting) else {}

    def link(self, planned: BuildPlan, folder: Path) -> None:  # noqa: B027 - a hook: most formats take nothing
        """Bring in what the format takes from the base unchanged (a pipeline's other components)."""

    def linked_bytes(self, planned: BuildPlan, target: Path) -> int:
        return 0

    def finish(
        self, tmp: Path, out: Path, files: list[Path], report: dict, family: Family, held: partials.Claim
    ) -> None:
        """Put the finished output in place: the files, one by one, beside where they go."""
        for f in files:
            partials.move_into_place(f, out if f.name == out.name else out.parent / f.name, held)
        shutil.rmtree(tmp, ignore_errors=True)

    # -- the preview --------------------------------------------------------------------------------------------
    def preview_problem(self, precision: str) -> Why | None:
        """Why diffusers cannot load an output of this precision for the preview, or None."""
        return None

    def width_problem(self, width: int) -> Why | None:
        """Why diffusers cannot load an output of a base this wide (its transformer's width) for the preview, or None."""
        return None

    def preview_runtime(self, precision: str) -> Runtime:
        """How the preview runs the base at this precision for the unfused comparison."""
        return self.option(precision).runtime

    def load_transformer(self, path: Path, config: Path):
        """The transformer of an output (or of a base written in this format), as diffusers loads it, in bf16."""
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_single_file(str(path), config=str(config), dtype=torch.bfloat16)


ENCODER_PLACES = {"clip_l": "CLIP-L", "t5xxl_fp8_e4m3fn": "T5-XXL"}


def pipeline_lines(option: Option, family: Family, imports: str, load: str, pipeline: str = "") -> str:
    """A snippet that loads a transformer (`load`) into its family's pipeline (from the Hub unless `pipeline`)."""
    pipe_cls, repo = PIPELINES[family.key]
    repo = pipeline or repo
    lines = ["import torch", imports, "", load]
    if option.runtime == "fp8":
        lines.append(
            "transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)"
        )
    lines += [
        f'pipe = {pipe_cls}.from_pretrained(r"{repo}", transformer=transformer, torch_dtype=torch.bfloat16)',
        'pipe.enable_model_cpu_offload()  # or pipe.to("cuda") on a large card',
    ]
    return "\n".join(lines)
