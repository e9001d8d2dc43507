"""One build end to end: resolve -> inspect -> plan -> check disk -> stream -> finalize -> report.

Orchestration only. Everything is written into a hidden `.NAME.partial-*` folder beside the target and renamed
into place when complete; any failure or cancel removes it.
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fluxstudio import __version__, formats, units
from fluxstudio.engine import manifest, partials, retention
from fluxstudio.formats import snippets
from fluxstudio.errors import BadInputError, DiskSpaceError, OutputError
from fluxstudio.formats import pipeline
from fluxstudio.formats.outputs import DiffusersOutput, EncoderFile, make_output
from fluxstudio.engine.fuse import FusePlan, execute, plan_tensors
from fluxstudio.sources.hub import Hub
from fluxstudio.sources.resolve import resolve
from fluxstudio.engine.lora import LoadedLora, load_lora
from fluxstudio.engine.lora import components as lora_components
from fluxstudio.engine.memory import MemorySampler
from fluxstudio.engine.models import ENCODERS, BaseModel, open_base, open_encoder
from fluxstudio.progress import CancelToken, ProgressCallback, ProgressEvent, Run, Stage, check, report
from fluxstudio.flows.request import DEFAULT_SHARD_BYTES, DISK_MARGIN, BuildRequest, BuildResult, LoraRef  # noqa: F401 - re-exported


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("No CUDA GPU is available to this program.", "Use --device cpu (or auto).")
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"Unknown device {device!r}.", "Use auto, cpu or cuda.")
    return device


@contextmanager
def writing(folder: Path):
    """What the file system says while writing an output, as one sentence: a full disk, a folder it may not write."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError("The disk ran full while writing the output.", "Free some space and try again.") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(f"FluxStudio may not write in {folder}.",
                              "Choose another output folder, or allow writing there.", (folder,)) from None
        raise


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: Path, inputs: list[Path], overwrite: bool, is_file: bool = False) -> None:
    what = "file" if is_file else "folder"
    for p in inputs:
        if _inside(out, p) or _inside(p, out):
            raise OutputError(
                f"The output {what} {out.name} overlaps an input ({p.name}); FluxStudio never writes over its inputs.",
                f"Choose another output {what}.",
            )
    if out.is_symlink():
        raise OutputError(f"The output name {out.name} is a symbolic link; FluxStudio does not write through links.",
                          "Choose another name, or remove the link.", (out,))
    if out.exists() and out.is_dir() != (not is_file):
        raise OutputError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}.", "Choose another output name.", (out,))
    if out.exists() and not overwrite:
        raise OutputError(f"The output {what} {out.name} already exists.", "Choose another name, or allow overwriting.")


@dataclass
class Part:
    """One component's stream: its model, plan and writer, and the subfolder it goes to ("" for the top)."""

    component: str
    model: BaseModel
    plan: FusePlan
    output: object
    where: str = ""


@dataclass
class BuildPlan:
    base: BaseModel
    loras: list[tuple[LoadedLora, float]]
    parts: list[Part]  # the transformer first
    root: Path | None = None  # the base pipeline, for the pipeline format
    linked: list[str] = field(default_factory=list)  # pipeline components linked from the base, not rewritten
    notes: list[str] = field(default_factory=list)

    @property
    def plan(self) -> FusePlan:
        return self.parts[0].plan

    @property
    def output(self):
        return self.parts[0].output

    def need_bytes(self, target: Path) -> int:
        linked = pipeline.copy_bytes(self.root, self.linked, target) if self.linked else 0
        return sum(p.output.need_bytes() for p in self.parts) + linked

    def fused(self) -> dict[str, int]:
        """Tensors fused per component (the manifest and the report list them)."""
        return {p.component: p.plan.fused_count for p in self.parts if p.plan.fused_count}


ENCODER_FILES = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl_fp8_e4m3fn"}


def base_components(format: str, loras: list[tuple[Path, float]]) -> list[str] | None:
    """What of the base repo a build needs: None for everything (a pipeline), else the components to download."""
    if format == "pipeline":
        return None
    if not formats.get_format(format).extension:
        return ["transformer"]
    return ["transformer"] + sorted({c for path, _ in loras for c in lora_components(path) if c != "transformer"})


def plan_build(
    base_path: Path, loras: list[tuple[Path, float]], format: str, precision: str, filename: str = "output",
    shard_bytes: int = DEFAULT_SHARD_BYTES, double_quant: bool = False, ignore_unmatched: bool = False,
    progress: ProgressCallback | None = None, cancel: CancelToken | None = None, t5_precision: str = "",
) -> BuildPlan:
    """Open the base, read the LoRAs, plan every tensor of every component written, and choose the writers.

    The build and the app's estimate both come through here, so the size the app shows is the one the build
    checks the disk against.
    """
    base = open_base(base_path)
    fmt = formats.check(format, precision, base.family.key)
    t5_precision = formats.check_encoder_precision(fmt.key, t5_precision or precision)
    loaded = []
    for i, (path, scale) in enumerate(loras, start=1):
        check(cancel)
        report(progress, ProgressEvent(Stage.INSPECT, i, len(loras), item=path.name, message="Reading LoRAs"))
        loaded.append((load_lora(path, base.family), scale))
    fplan = plan_tensors(base, loaded, ignore_unmatched)
    main = make_output(fmt, precision, base, fplan.jobs, fplan.config_updates, filename, shard_bytes, double_quant)
    planned = BuildPlan(base, loaded, [Part("transformer", base, fplan, main, "transformer" if fmt.key == "pipeline" else "")])
    touched = sorted({c for lora, _ in loaded for c in lora.encoders})
    if fmt.key == "pipeline" or (touched and fmt.extension):
        planned.root = pipeline.pipeline_root(base_path)
    if touched and fmt.key == "diffusers":
        labels = " and ".join(ENCODERS[c].label for c in touched)
        planned.notes.append(f"The LoRAs' {labels} parts were not fused: the diffusers format holds the transformer only "
                             "(the pipeline format includes the text encoders)")
        touched = []
    for component in ENCODERS if base.family.key == "flux1" else ():
        quantized = component == "text_encoder_2" and fmt.key == "pipeline" and t5_precision != "bf16"
        if component not in touched and not quantized:
            continue
        encoder = open_encoder(planned.root, component)
        eplan = plan_tensors(encoder, loaded, ignore_unmatched, component)
        if fmt.key == "pipeline":
            out = DiffusersOutput(t5_precision if component == "text_encoder_2" else "bf16", encoder, eplan.jobs, {}, shard_bytes,
                                  double_quant, score=False)
        else:
            out = EncoderFile(encoder, eplan.jobs, f"{Path(filename).stem}.{ENCODER_FILES[component]}.safetensors")
        planned.parts.append(Part(component, encoder, eplan, out, component if fmt.key == "pipeline" else ""))
    if fmt.key == "pipeline":
        written = {p.where for p in planned.parts}
        planned.linked = [c for c in pipeline.components(planned.root) if c not in written]
    return planned


def build(
    req: BuildRequest,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    free_bytes: Callable[[Path], int] = units.free_bytes,
    hub: Hub | None = None,
) -> BuildResult:
    fmt = formats.check_precision(req.format, req.precision)  # before any download: the family is checked later
    formats.check_encoder_precision(fmt.key, req.t5_precision)
    out = formats.output_path(req.format, req.out_dir)
    stages: dict[str, float] = {}
    t0 = time.monotonic()
    with MemorySampler() as sampler:
        tick = time.monotonic()

        def stage_done(name: str) -> None:
            nonlocal tick
            now = time.monotonic()
            stages[name] = round(stages.get(name, 0.0) + now - tick, 3)
            tick = now

        report(progress, ProgressEvent(Stage.PREPARE, message="Preparing inputs"))
        device = pick_device(req.device)
        hub = hub or Hub()
        fetching = Run(progress, cancel)
        resolved = [resolve(r.ref, "lora", hub, fetching) for r in req.loras]
        lora_paths = [p for p, _ in resolved]
        lora_scales = [(p, r.scale) for p, r in zip(lora_paths, req.loras)]
        base_path, base_origin = resolve(req.base, "base", hub, fetching, base_components(fmt.key, lora_scales))
        download_notes = fetching.notes
        check_output(out, [base_path, *lora_paths], req.overwrite, is_file=bool(fmt.extension))
        stage_done("prepare")

        report(progress, ProgressEvent(Stage.INSPECT, message="Reading the base model and LoRAs"))
        planned = plan_build(
            base_path, lora_scales, req.format, req.precision, out.name, req.shard_bytes, req.double_quant,
            req.ignore_unmatched, progress, cancel, req.t5_precision,
        )
        base, loras, fplan, output = planned.base, planned.loras, planned.plan, planned.output
        companions = [out.parent / p.output.filename for p in planned.parts[1:] if fmt.extension]
        for extra in companions:
            check_output(extra, [base_path, *lora_paths], req.overwrite, is_file=True)
        with writing(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
        need = planned.need_bytes(out.parent) + DISK_MARGIN
        free = free_bytes(out.parent)
        if free < need:
            raise DiskSpaceError(
                f"Not enough free disk: this build needs about {units.gb(need)} and {out.parent} has {units.gb(free)} free.",
                "Free some space or choose another output folder.", (out.parent,),
            )
        stage_done("inspect")

        partials.reclaim(out.parent)  # what killed builds left, whatever their name
        inputs = _inputs(base_origin, [o for _, o in resolved], req, planned, [p.name for p in companions])
        with writing(out.parent), partials.claim(out) as held:
            for target in (out, *companions):  # again, now that no other build can take the name
                check_output(target, [base_path, *lora_paths], req.overwrite, is_file=bool(fmt.extension))
            tmp = partials.work_folder(out)
            try:
                files = []
                try:
                    for part in planned.parts:
                        folder = tmp / part.where
                        folder.mkdir(exist_ok=True)
                        part.output.open(folder, manifest.embedded(inputs, manifest.SLACK) if part.output is output else {})
                        label = "the transformer" if part.component == "transformer" else f"the {part.model.family.label} text encoder"
                        execute(part.output.jobs, part.output.encode, part.output.write, device, progress, cancel,
                                message=f"Fusing {label}")
                    stage_done("fuse")
                    kept = {"lora_retained": output.retention.score, "lora_retained_worst": output.retention.worst()}
                    report(progress, ProgressEvent(Stage.FINALIZE, message="Writing the output"))
                    if planned.linked:
                        pipeline.link(planned.root, planned.linked, tmp)
                    for part in planned.parts:
                        files += part.output.close(inputs | kept if part.output is output else None)
                finally:
                    for part in planned.parts:
                        part.output.abort()
                check(cancel)
                stage_done("finalize")
                result = BuildResult(
                    output_dir=str(out),
                    precision=req.precision,
                    format=fmt.key,
                    seconds=round(time.monotonic() - t0, 3),
                    stage_seconds=stages,
                    peak_ram_bytes=sampler.peak_rss_bytes,
                    peak_anon_bytes=sampler.peak_anon_bytes,
                    peak_vram_bytes=sampler.peak_vram_bytes,
                    output_bytes=sum(p.output.total_bytes for p in planned.parts),
                    files=sorted(str(p.relative_to(tmp)) for p in files if p.suffix in (".safetensors", ".gguf")),
                    tensors_fused=sum(planned.fused().values()),
                    fused_per_component=planned.fused(),
                    family=base.family.key,
                    **kept,
                    notes=download_notes + fplan.notes + planned.notes + output.notes
                    + [f"{lora.name}: {n}" for lora, _ in loras for n in lora.notes]
                    + retention.warnings(kept["lora_retained"], kept["lora_retained_worst"], req.precision),
                )
                if fmt.extension:
                    for f in files:
                        partials.move_into_place(f, out if f.name == out.name else out.parent / f.name, held)
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    full = _manifest(inputs, result)
                    manifest.write_folder(tmp, full)
                    (tmp / "README.md").write_text(snippets.readme(out.name, req.precision, base.family, full), encoding="utf-8")
                    partials.move_into_place(tmp, out, held)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return result


def _fingerprint(base) -> str:
    """A cheap identity of the base weights: file names, sizes and headers (not a full content hash)."""
    import hashlib

    h = hashlib.sha256()
    for header in base.headers:
        h.update(header.path.name.encode())
        h.update(str(header.path.stat().st_size).encode())
        for name, info in sorted(header.tensors.items()):
            h.update(f"{name}:{info.dtype}:{info.shape}".encode())
    return h.hexdigest()


def _inputs(base_origin: dict, lora_origins: list[dict], req: BuildRequest, planned: BuildPlan, companions: list[str]) -> dict:
    """What went into the output: known before the first byte is written, so one-file formats embed it."""
    from fluxstudio.advice.hardware import library_versions

    base, loras, fplan = planned.base, planned.loras, planned.plan

    return {
        "fluxstudio_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {
            **base_origin,
            "family": base.family.label,
            "class_name": base.family.class_name,
            "variant": base.variant,
            "dtype": str(base.dtype).removeprefix("torch."),
            "weights_fingerprint": _fingerprint(base),
        },
        "loras": [
            {
                **origin,
                "name": lora.name,
                "sha256": lora.sha256,
                "scale": scale,
                "format": lora.format,
                "ranks": lora.ranks,
                "modules_matched": fplan.matched.get(lora.name, 0),
                "components": lora.components,
            }
            for (lora, scale), origin in zip(loras, lora_origins)
        ],
        "format": req.format,
        "precision": req.precision,
        "fused_per_component": planned.fused(),
        **({"text_encoder_precision": {p.component: p.output.quantizer.precision for p in planned.parts[1:]}} if planned.parts[1:] else {}),
        **({"text_encoder_files": companions} if companions else {}),
        "double_quant": req.double_quant if req.precision == "nf4" else None,
        "config_updates": fplan.config_updates,
        "libraries": library_versions(),
    }


def _manifest(inputs: dict, result: BuildResult) -> dict:
    return {
        **inputs,
        "timings": result.stage_seconds,
        "seconds": result.seconds,
        "peak_ram_bytes": result.peak_ram_bytes,
        "output_bytes": result.output_bytes,
        "lora_retained": result.lora_retained,
        "lora_retained_worst": result.lora_retained_worst,
        "notes": result.notes,
    }
