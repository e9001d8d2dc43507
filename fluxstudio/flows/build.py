"""One build end to end: resolve -> inspect -> plan -> check disk -> stream -> finalize -> report.

Orchestration only: what is particular to a format, its format object decides (`fluxstudio.formats`). Everything is
written into a hidden `.NAME.partial-*` folder beside the target, under a lock on the name, and renamed into place
when complete; any failure or cancel removes it.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from fluxstudio import __version__, units
from fluxstudio.engine import manifest, partials, retention
from fluxstudio.engine.fuse import execute
from fluxstudio.engine.lora import components as lora_components
from fluxstudio.engine.lora import load_lora
from fluxstudio.engine.memory import MemorySampler
from fluxstudio.engine.models import BaseModel, open_base
from fluxstudio.errors import BadInputError, DiskSpaceError, OutputError, OutputExistsError
from fluxstudio.flows.request import DISK_MARGIN, BuildRequest, BuildResult
from fluxstudio.formats import BuildPlan, Format, Settings, get_format, output_path
from fluxstudio.progress import ProgressEvent, Run, Stage, running
from fluxstudio.sources.hub import Hub
from fluxstudio.sources.resolve import resolve


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
            raise DiskSpaceError(
                "The disk ran full while writing the output.", "Free some space and try again."
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise OutputError(
                f"FluxStudio may not write in {folder}.",
                "Choose another output folder, or allow writing there.",
                (folder,),
            ) from None
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
        raise OutputError(
            f"The output name {out.name} is a symbolic link; FluxStudio does not write through links.",
            "Choose another name, or remove the link.",
            (out,),
        )
    if out.exists() and out.is_dir() != (not is_file):
        raise OutputError(
            f"{out} exists and is a {'folder' if out.is_dir() else 'file'}.", "Choose another output name.", (out,)
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"The output {what} {out.name} already exists.", "Choose another name, or ask to replace it."
        )


def fitted(fmt: Format, req: BuildRequest) -> str:
    """The precision a request asks of its format: with a size to fit in, the format's fitted precision it names
    (its first where it names none)."""
    if req.fit_bytes:
        if not fmt.fits:
            raise BadInputError(
                f"GGUF and ComfyUI-native files are fitted to a size, not the {fmt.key} format.",
                "Choose one of them, or a precision instead of a size.",
            )
        named = fmt.check(req.precision) if req.precision and req.precision.lower() != "fit" else ""
        if named and named not in fmt.fit_keys:
            raise BadInputError(
                f"{named} is one precision for every weight: a size to fit chooses them itself.",
                f"Give the size with {' or '.join(fmt.fit_keys)}, or {named} without a size.",
            )
        return named or fmt.fit_keys[0]
    precision = fmt.check(req.precision)
    if precision in fmt.fit_keys:
        raise BadInputError("A fitted file needs the size it must fit in.", "Give the size, such as 12GB.")
    return precision


def plan_build(
    base_path: Path,
    loras: list[tuple[Path, float]],
    fmt: Format,
    precision: str,
    settings: Settings,
    ignore_unmatched: bool = False,
    run: Run | None = None,
) -> BuildPlan:
    """Open the base, read the LoRAs, and let the format plan every tensor of every component it writes.

    The build and the app's estimate both come through here, so the size the app shows is the one the build
    checks the disk against.
    """
    run = running(run)
    base = open_base(base_path)
    precision = fmt.check(precision, base.family.key)
    loaded = []
    for i, (path, scale) in enumerate(loras, start=1):
        run.check()
        run.report(ProgressEvent(Stage.INSPECT, i, len(loras), item=path.name, message="Reading LoRAs"))
        loaded.append((load_lora(path, base.family), scale))
    return fmt.plan(base_path, base, loaded, precision, settings, ignore_unmatched)


def build(
    req: BuildRequest,
    run: Run | None = None,
    free_bytes: Callable[[Path], int] = units.free_bytes,
    hub: Hub | None = None,
) -> BuildResult:
    run = running(run)
    fmt = get_format(req.format)
    precision = fitted(fmt, req)  # before any download: the family is checked once the base is here
    out = output_path(fmt.key, req.out_dir)
    t5 = fmt.encoder_precision(req.t5_precision, precision)
    settings = Settings(out.name, req.shard_bytes, req.double_quant, t5, req.fit_bytes)
    stages: dict[str, float] = {}
    t0 = time.monotonic()
    with MemorySampler() as sampler:
        tick = time.monotonic()

        def stage_done(name: str) -> None:
            nonlocal tick
            now = time.monotonic()
            stages[name] = round(stages.get(name, 0.0) + now - tick, 3)
            tick = now

        run.report(ProgressEvent(Stage.PREPARE, message="Preparing inputs"))
        device = pick_device(req.device)
        hub = hub or Hub()
        lora_run, base_run = Run(run.progress, run.cancel), Run(run.progress, run.cancel)
        resolved = [resolve(r.ref, "lora", hub, lora_run) for r in req.loras]
        lora_paths = [p for p, _ in resolved]
        lora_scales = [(p, r.scale) for p, r in zip(lora_paths, req.loras, strict=False)]
        touched = {c for path in lora_paths for c in lora_components(path)}
        base_path, base_origin = resolve(req.base, "base", hub, base_run, fmt.base_parts(touched))
        check_output(out, [base_path, *lora_paths], req.overwrite, is_file=fmt.one_file)
        stage_done("prepare")

        run.report(ProgressEvent(Stage.INSPECT, message="Reading the base model and LoRAs"))
        planned = plan_build(base_path, lora_scales, fmt, precision, settings, req.ignore_unmatched, run)
        companions = planned.companions(out)
        for extra in companions:
            check_output(extra, [base_path, *lora_paths], req.overwrite, is_file=True)
        with writing(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
        need = planned.need_bytes(out.parent) + DISK_MARGIN
        free = free_bytes(out.parent)
        if free < need:
            raise DiskSpaceError(
                f"Not enough free disk: this build needs about {units.gb(need)} and {out.parent} has {units.gb(free)} free.",
                "Free some space or choose another output folder.",
                (out.parent,),
            )
        stage_done("inspect")
        if measured := fmt.prepare(planned, device, run):
            stage_done("measure")

        partials.reclaim(out.parent)  # what killed builds left, whatever their name
        origins = [o for _, o in resolved]
        inputs = _inputs(base_origin, origins, req, precision, planned, [p.name for p in companions]) | measured
        main = planned.writer
        with writing(out.parent), partials.claim(out) as held:
            for target in (out, *companions):  # again, now that no other build can take the name
                check_output(target, [base_path, *lora_paths], req.overwrite, is_file=fmt.one_file)
            tmp = partials.work_folder(out)
            try:
                files: list[Path] = []
                try:
                    for part in planned.parts:
                        folder = tmp / part.where
                        folder.mkdir(exist_ok=True)
                        part.writer.open(
                            folder, manifest.embedded(inputs, manifest.SLACK) if part.writer is main else {}
                        )
                        label = (
                            "the transformer"
                            if part.component == "transformer"
                            else f"the {part.model.family.label} text encoder"
                        )
                        execute(
                            part.writer.jobs,
                            part.writer.encode,
                            part.writer.write,
                            device,
                            run,
                            message=f"Fusing {label}",
                        )
                    stage_done("fuse")
                    kept = {"lora_retained": main.retention.score, "lora_retained_worst": main.retention.worst()}
                    run.report(ProgressEvent(Stage.FINALIZE, message="Writing the output"))
                    fmt.link(planned, tmp)
                    for part in planned.parts:
                        files += part.writer.close(inputs | kept if part.writer is main else None)
                finally:
                    for part in planned.parts:
                        part.writer.abort()
                run.check()
                stage_done("finalize")
                result = BuildResult(
                    output_dir=str(out),
                    precision=precision,
                    format=fmt.key,
                    seconds=round(time.monotonic() - t0, 3),
                    stage_seconds=stages,
                    peak_ram_bytes=sampler.peak_rss_bytes,
                    peak_anon_bytes=sampler.peak_anon_bytes,
                    peak_vram_bytes=sampler.peak_vram_bytes,
                    output_bytes=sum(p.writer.total_bytes for p in planned.parts),
                    files=sorted(str(p.relative_to(tmp)) for p in files if p.suffix in (".safetensors", ".gguf")),
                    tensors_fused=sum(planned.fused().values()),
                    fused_per_component=planned.fused(),
                    family=planned.base.family.key,
                    **kept,
                    fit=measured.get("fit", {}),
                    notes=base_run.notes
                    + lora_run.notes
                    + planned.plan.notes
                    + planned.notes
                    + main.notes
                    + [f"{lora.name}: {n}" for lora, _ in planned.loras for n in lora.notes]
                    + retention.warnings(kept["lora_retained"], kept["lora_retained_worst"], precision),
                )
                fmt.finish(tmp, out, files, _manifest(inputs, result), planned.base.family, held)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return result


def _fingerprint(base: BaseModel) -> str:
    """A cheap identity of the base weights: file names, sizes and headers (not a full content hash)."""
    h = hashlib.sha256()
    for header in base.headers:
        h.update(header.path.name.encode())
        h.update(str(header.path.stat().st_size).encode())
        for name, info in sorted(header.tensors.items()):
            h.update(f"{name}:{info.dtype}:{info.shape}".encode())
    return h.hexdigest()


def _inputs(
    base_origin: dict,
    lora_origins: list[dict],
    req: BuildRequest,
    precision: str,
    planned: BuildPlan,
    companions: list[str],
) -> dict:
    """What went into the output: known before the first byte is written, so one-file formats embed it."""
    from fluxstudio.advice.hardware import library_versions

    base, loras, fplan = planned.base, planned.loras, planned.plan
    encoders = planned.parts[1:]
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
            for (lora, scale), origin in zip(loras, lora_origins, strict=False)
        ],
        "format": planned.format.key,
        "precision": precision,
        "fused_per_component": planned.fused(),
        **({"text_encoder_precision": {p.component: p.writer.precision for p in encoders}} if encoders else {}),
        **({"text_encoder_files": companions} if companions else {}),
        "double_quant": req.double_quant if planned.format.option(precision).double_quant is not None else None,
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
