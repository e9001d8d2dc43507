"""The front door: everything the app and the CLI ask of FluxStudio, in one place, in domain terms.

Describe a base (a reference: `demo`, a Hub repo id or URL, a local folder), describe a LoRA against it, estimate an
output, start / watch / cancel a build, list and delete outputs, advise a format and precision. The edges (ui/,
cli.py) import the core only through this module, plus the error and event types; they render and wire, and hold
no domain logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fluxstudio import __version__, paths
from fluxstudio.advice import catalogue
from fluxstudio.advice import recommend as advice
from fluxstudio.advice.catalogue import PRESETS
from fluxstudio.advice.hardware import HardwareInfo, library_versions, probe
from fluxstudio.advice.recommend import Pick, Recommendation
from fluxstudio.engine.fit import describe as describe_fit
from fluxstudio.engine.retention import describe as describe_retention
from fluxstudio.errors import BadInputError, FluxStudioError
from fluxstudio.flows.jobs import Job, JobRunner, Status
from fluxstudio.flows.request import DISK_MARGIN, BuildRequest, BuildResult, LoraRef
from fluxstudio.formats import FORMATS, Format, get_format
from fluxstudio.library import Entry, delete_output, list_outputs, safe_name
from fluxstudio.progress import Run
from fluxstudio.sources import uploads
from fluxstudio.sources.hub import Hub, has_token, save_token
from fluxstudio.sources.refs import Ref, parse_ref
from fluxstudio.units import free_bytes, human_bytes, parse_size

__all__ = [
    "FORMATS",
    "PRESETS",
    "THIS_MACHINE",
    "BaseStatus",
    "BuildRequest",
    "BuildResult",
    "Entry",
    "Estimate",
    "Format",
    "Job",
    "LoraRef",
    "Pick",
    "Recommendation",
    "Run",
    "Status",
    "Studio",
    "__version__",
    "advice",
    "describe_fit",
    "describe_retention",
    "free_bytes",
    "get_format",
    "human_bytes",
    "library_versions",
    "parse_size",
    "paths",
    "safe_name",
]
THIS_MACHINE = "This machine"
UPLOAD_QUOTA = 4 * 10**9  # what one shared session may upload: a handful of LoRAs


@dataclass(frozen=True)
class BaseStatus:
    text: str  # one line for the page
    model_key: str  # the advice table's entry for this base
    need_token: bool = False
    partial_bytes: int = 0  # kept from an interrupted download


@dataclass(frozen=True)
class Estimate:
    bytes: int  # the output's size, as the build's writer computes it
    free: int
    exact: bool  # from the base's own weights and the LoRAs, or from the model table

    @property
    def need(self) -> int:
        """What the build checks the free disk against."""
        return self.bytes + DISK_MARGIN

    @property
    def fits(self) -> bool:
        return self.need <= self.free


@dataclass
class Studio:
    """One per app or CLI process. `local=False` (a shared session) refuses local paths."""

    output_dir: Path = field(default_factory=paths.outputs_dir)
    hub: Hub = field(default_factory=Hub)
    local: bool = True
    hardware: HardwareInfo | None = None  # probed on first use
    runner: JobRunner | None = None
    reclaimed_bytes: int = 0
    _scratch: Path | None = None

    def __post_init__(self) -> None:
        self.jobs: JobRunner = self.runner or JobRunner(hub=self.hub)

    @property
    def hw(self) -> HardwareInfo:
        if self.hardware is None:
            self.hardware = probe(self.output_dir)
        return self.hardware

    # -- references ------------------------------------------------------------------------------------------
    def ref(self, text: str) -> Ref:
        return parse_ref(text, self.local)

    @staticmethod
    def model_key(base: str, family: str = "flux1") -> str:
        """Which catalogue entry advises for this base (a preset's own, else its family's flagship)."""
        return catalogue.model_key(next((p.key for p in PRESETS if p.repo_id == base), None), family)

    def local_base(self, base: str) -> Path | None:
        """The base's folder when it is on this machine already (demo, a local folder, a cached Hub snapshot)."""
        ref = self.ref(base)
        if ref.kind == "demo":
            from fluxstudio.sources import demo

            return demo.ensure_base()
        if ref.kind == "local":
            return ref.path
        from huggingface_hub import try_to_load_from_cache

        config = "transformer/config.json" if not ref.subpath else f"{ref.subpath}/config.json"
        cached = try_to_load_from_cache(ref.repo_id, config, cache_dir=self.hub.cache_dir, revision=ref.revision)
        if isinstance(cached, str):
            folder = Path(cached).parent.parent if not ref.subpath else Path(cached).parent
            return folder if any(folder.rglob("*.safetensors")) else None
        return None

    def cached_preset(self) -> str | None:
        repos = set(self.hub.cached_repos())
        return next((p.key for p in PRESETS if p.repo_id in repos), None)

    # -- describe --------------------------------------------------------------------------------------------
    def describe_base(self, base: str) -> BaseStatus:
        """What the base is and what getting it costs. Raises FluxStudioError."""
        from fluxstudio.engine.models import open_base

        ref = self.ref(base)
        if ref.kind == "demo":
            return BaseStatus("Built-in demo model (FLUX.1 architecture, tiny): nothing to download.", "flux1")
        if ref.kind == "local":
            model = open_base(ref.path)
            return BaseStatus(
                f"{model.variant} · {str(model.dtype).removeprefix('torch.')} · {human_bytes(model.total_bytes)} "
                "· local folder",
                self.model_key(base, model.family.key),
            )
        p = self.hub.download_plan(ref)
        need_token = p.gated and not has_token()
        where = f"to download: {human_bytes(p.todo_bytes)}" if p.todo_bytes else "already downloaded"
        if p.todo_bytes and (p.cached_bytes or p.partial_bytes):
            where += f" ({human_bytes(p.cached_bytes + p.partial_bytes)} already here"
            where += ", and the download resumes from there)" if p.partial_bytes else ")"
        note = " · gated: accept its licence on the Hub and add a token with access" if need_token else ""
        return BaseStatus(f"{ref.display()} · {where}{note}", self.model_key(base), need_token, p.partial_bytes)

    def discard_download(self, base: str) -> int:
        """Delete what an interrupted download of this base kept; the bytes freed."""
        ref = self.ref(base)
        return self.hub.discard(ref) if ref.kind == "hub" else 0

    def resolve_lora(self, text: str) -> tuple[str, Path]:
        """(reference to build with, local file) for a typed LoRA reference; Hub LoRAs are downloaded here."""
        ref = self.ref(text)
        if ref.kind == "demo":
            from fluxstudio.sources import demo

            return "demo", demo.ensure_lora()
        if ref.kind == "local":
            if not ref.path.exists():
                raise BadInputError(f"The LoRA file {ref.path} does not exist.", "Check the path.", (ref.path,))
            return str(ref.path), ref.path
        return ref.text, self.hub.fetch_lora(ref).path

    def scratch(self) -> Path:
        """This process's own folder (uploads, the web server's temporary files), removed once the process is gone."""
        from fluxstudio.engine import partials

        if self._scratch is None:
            self._scratch = partials.owned_folder(paths.sessions_dir())
        return self._scratch

    def add_upload(self, tmp: str | Path, base: str, model_key: str, kept_bytes: int = 0) -> tuple[Path, str]:
        """Check an uploaded file as a LoRA for the base, then keep it in this process's folder: (the kept file, one
        line on it). The file at `tmp` (the web server's temporary copy) is consumed whatever happens, so that nothing
        rejected stays on disk. `kept_bytes`: what this session has kept so far."""
        src = Path(tmp)
        try:
            size = src.stat().st_size
            if not self.local and kept_bytes + size > UPLOAD_QUOTA:
                raise BadInputError(
                    f"This shared session has uploaded {human_bytes(kept_bytes)} already, and "
                    f"{human_bytes(UPLOAD_QUOTA)} is the limit.",
                    "Use LoRAs from the Hub instead.",
                )
            info = self.describe_lora(src, base, model_key)
            return uploads.keep(src, self.scratch() / "uploads"), info
        finally:
            uploads.discard(src)

    def describe_lora(self, path: Path, base: str, model_key: str) -> str:
        """One line on a LoRA, checked against the base when the base is here already."""
        from fluxstudio.engine.fuse import plan_tensors
        from fluxstudio.engine.lora import load_lora
        from fluxstudio.engine.models import ENCODERS, open_base

        lora = load_lora(path, self.family(catalogue.MODELS[model_key].family))
        labels = {"transformer": "transformer", **{c: e.label for c, e in ENCODERS.items()}}
        parts = [
            lora.format,
            "rank " + "/".join(map(str, lora.ranks)) if lora.ranks else "no LoRA matrices",
            f"{len(lora.modules) + len(lora.replacements)} modules",
            "changes the " + " + ".join(labels[c] for c in lora.components),
        ]
        base_dir = self.local_base(base)
        if base_dir is not None:
            fplan = plan_tensors(open_base(base_dir), [(lora, 1.0)], ignore_unmatched=True)
            parts.append(f"{fplan.matched.get(lora.name, 0)} matched")
            parts += [n.split(": ", 1)[-1] for n in fplan.notes]
        else:
            parts.append("checked against the base when it is downloaded")
        return " · ".join(parts)

    # -- estimate --------------------------------------------------------------------------------------------
    def estimate(
        self,
        base: str,
        lora_paths: list[Path],
        format: str,
        precision: str,
        model_key: str = "flux1",
        t5_precision: str = "",
        fit_bytes: int = 0,
    ) -> Estimate:
        """The output's size: exactly what the build checks the disk against when the base is here (the LoRAs
        count: a Control LoRA widens the model), else the model table's figure; a fitted file, its size at most.
        Never raises."""
        from fluxstudio.flows.build import plan_build
        from fluxstudio.formats import Settings

        fmt = get_format(format)
        free = free_bytes(self.output_dir)
        if precision in fmt.fit_keys:
            return Estimate(fit_bytes, free, False)
        try:
            base_dir = self.local_base(base)
            if base_dir is not None:
                settings = Settings(t5_precision=fmt.encoder_precision(t5_precision, precision))
                planned = plan_build(base_dir, [(Path(p), 1.0) for p in lora_paths], fmt, precision, settings)
                return Estimate(planned.need_bytes(self.output_dir), free, True)
        except FluxStudioError:
            pass  # not usable yet: the table's estimate stands
        return Estimate(catalogue.MODELS[model_key].weight_bytes(fmt.check(precision)), free, False)

    def sizes(self, base: str, format: str, model_key: str = "flux1") -> dict[str, int]:
        """Each precision of a format with the transformer's size at it: the model table's, scaled to the base's
        own number of parameters when the base is here (the demo is 80 MB, not 24 GB). Never raises."""
        from fluxstudio.engine.models import open_base
        from fluxstudio.sources.demo import DEMO_PARAMS

        model = catalogue.MODELS[model_key]
        scale = 1.0
        try:
            if base == "demo":  # without building it (the page asks this before anything else)
                scale = DEMO_PARAMS / model.params
            elif (folder := self.local_base(base)) is not None:
                scale = sum(info.numel for _, info in open_base(folder).tensors.values()) / model.params
        except FluxStudioError:
            pass  # not usable yet: the table's sizes stand
        return {p: int(model.weight_bytes(p) * scale) for p in get_format(format).precisions}

    def free_name(self, name: str, format: str) -> str:
        """`name`, or name-2, name-3…: the first that no output or running build in the outputs folder holds."""
        from fluxstudio.library import free_name

        return free_name(self.output_dir, name, get_format(format).extension)

    # -- jobs ------------------------------------------------------------------------------------------------
    def request(
        self,
        base: str,
        loras: list[tuple[str, float]],
        format: str,
        precision: str,
        name: str,
        shard: str = "5GB",
        t5_precision: str = "",
        overwrite: bool = False,
        fit_gb: float = 0.0,
    ) -> BuildRequest:
        """A build as the app asks for it. `fit_gb`: the size a fitted file (a `fitted` precision) must fit in."""
        fmt = get_format(format)
        precision = fmt.check(precision)
        return BuildRequest(
            base=self.ref(base).text,
            loras=tuple(LoraRef(r, s) for r, s in loras),
            precision=precision,
            format=fmt.key,
            out_dir=self.output_dir / (safe_name(name) + fmt.extension),
            shard_bytes=parse_size(shard),
            t5_precision=fmt.encoder_precision(t5_precision, precision),
            overwrite=overwrite and self.local,  # a shared session never replaces the owner's outputs
            fit_bytes=int(max(fit_gb or 0, 0) * 1e9) if precision in fmt.fit_keys else 0,
        )

    def start(self, request: BuildRequest) -> Job:
        return self.jobs.start(request)

    # -- try it ----------------------------------------------------------------------------------------------
    @staticmethod
    def preview_problem(request: BuildRequest) -> str | None:
        """Why this machine cannot preview the output of this build (one sentence and its hint), or None."""
        from fluxstudio.flows import preview

        why = preview.why_not(request.format, request.precision, request.base, request.device)
        return f"{why.message} {why.hint}" if why else None

    @staticmethod
    def preview_defaults(request: BuildRequest, output: Path) -> tuple[int, int]:
        """(steps, size) the preview starts from for a built output."""
        from fluxstudio.engine import manifest
        from fluxstudio.flows import preview

        variant = (manifest.read(output) or {}).get("base", {}).get("variant", "")
        return preview.defaults(variant, request.base == "demo")

    def _preview_request(self, request: BuildRequest, output: Path, prompt: str, seed, steps, size):
        from fluxstudio.flows import preview

        return preview.make_request(request, output, prompt, seed, steps, size, shared=not self.local)

    def start_preview(self, request: BuildRequest, output: Path, prompt: str, seed: int, steps: int, size: int) -> Job:
        """Render the same seed unfused and fused, as a job (after any running build: one job at a time)."""
        from fluxstudio.flows import preview

        return self.jobs.start(self._preview_request(request, output, prompt, seed, steps, size), preview.run)

    def preview(
        self, request: BuildRequest, output: Path, prompt: str, seed: int, steps: int, size: int, run: Run | None = None
    ):
        """The same, in this thread (the CLI): a PreviewResult."""
        from fluxstudio.flows import preview

        return preview.run(self._preview_request(request, output, prompt, seed, steps, size), run, self.hub)

    def saved_preview(self, name: str):
        """The preview saved beside an output of the library (PreviewResult), or None."""
        from fluxstudio.flows import preview

        return preview.read(self.output_dir / name) if safe_name(name) == name else None

    def job(self, job_id: str | None) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job_id: str | None) -> bool:
        return self.jobs.cancel(job_id)

    # -- library ---------------------------------------------------------------------------------------------
    def outputs(self) -> list[Entry]:
        return list_outputs(self.output_dir)

    def reclaim(self) -> int:
        """Remove what killed builds left in the outputs folder (work folders no running process owns) and
        interrupted downloads in the HF cache that nobody will resume."""
        from fluxstudio.engine import partials

        self.reclaimed_bytes = (
            partials.reclaim(self.output_dir) + self.hub.reclaim() + partials.reclaim(paths.sessions_dir(), ("*",))
        )
        return self.reclaimed_bytes

    def delete(self, name: str) -> None:
        if not self.local:
            raise BadInputError("Deleting outputs is not available in a shared session.", "Ask the app's owner.")
        delete_output(self.output_dir, name)

    # -- machine and Hub -------------------------------------------------------------------------------------
    def advise(self, target: str, model_key: str) -> Recommendation:
        model = advice.MODELS[model_key]
        return (
            advice.recommend_here(self.hw, model)
            if target == THIS_MACHINE
            else advice.recommend(advice.CARDS[target], model)
        )

    @staticmethod
    def family(key: str):
        from fluxstudio.engine.models import family_named

        return family_named(key)

    @staticmethod
    def save_token(token: str) -> str:
        return save_token(token)

    @staticmethod
    def has_token() -> bool:
        return has_token()

    def build(self, request: BuildRequest, run: Run | None = None) -> BuildResult:
        """A build in this thread (the CLI); the app starts jobs instead."""
        from fluxstudio.flows.build import build

        return build(request, run, hub=self.hub)

    @staticmethod
    def snippet(result: BuildResult, request: BuildRequest, path: str | None = None) -> str:
        """The code that loads a build's output (at `path`, default where it was saved: a shared session names no
        local path). An output of the demo goes into the demo's own pipeline, not FLUX's."""
        fmt = get_format(result.format)
        pipeline, note = "", ""
        if request.base == "demo":
            from fluxstudio.sources import demo

            pipeline = "path/to/the-demo-pipeline" if path else str(demo.ensure_base())
            note = "# The demo is a tiny random FLUX: this runs, and its images are noise.\n"
        return note + fmt.snippet(
            path or result.output_dir,
            result.precision,
            Studio.family(result.family),
            fmt.encoder_precision(request.t5_precision, result.precision),
            pipeline,
        )

    @staticmethod
    def placement(result: BuildResult) -> str:
        """Where a user puts a build's output ("" for a Python folder: the snippet says how to load it)."""
        fmt = get_format(result.format)
        return fmt.placement(result.files) if fmt.one_file else ""

    def download(self, text: str, lora: bool = False, run: Run | None = None):
        """Fetch a base (its transformer) or a LoRA from the Hub into the HF cache."""
        ref = parse_ref(text)
        if ref.kind != "hub":
            raise FluxStudioError(
                f"'{text}' is not a Hub reference.", "Use owner/name or a https://huggingface.co/... URL."
            )
        return ref, (self.hub.fetch_lora(ref, run) if lora else self.hub.fetch_base(ref, run))
