"""Jobs for a front end: run one build at a time in the background, with live state to poll and a cancel."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from fluxstudio.engine.memory import MemorySampler, MemorySnapshot
from fluxstudio.errors import CancelledError, FluxStudioError
from fluxstudio.flows.request import BuildRequest, BuildResult
from fluxstudio.progress import CancelToken, ProgressEvent, Run


class Status(str, Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class Job:
    id: str
    request: BuildRequest  # or what another kind of job takes (a preview)
    cancel: CancelToken = field(default_factory=CancelToken)
    sampler: MemorySampler = field(default_factory=lambda: MemorySampler(interval=0.2))
    status: Status = Status.RUNNING
    event: ProgressEvent | None = None
    started: float = field(default_factory=time.monotonic)
    stage_started: float = field(default_factory=time.monotonic)
    result: BuildResult | None = None
    error: FluxStudioError | None = None
    _thread: threading.Thread | None = None

    @property
    def finished(self) -> bool:
        return self.status != Status.RUNNING

    @property
    def memory(self) -> MemorySnapshot:
        return self.sampler.current

    def eta_seconds(self) -> float | None:
        """Remaining time of the current stage from its byte rate so far."""
        ev = self.event
        elapsed = time.monotonic() - self.stage_started
        if ev is None or not ev.bytes_total or elapsed < 2:
            return None
        new = ev.bytes_done - ev.bytes_start
        if new < (ev.bytes_total - ev.bytes_start) / 100 or new <= 0:
            return None  # too early for a rate worth showing
        return max(0.0, elapsed * (ev.bytes_total - ev.bytes_done) / new)

    def on_progress(self, ev: ProgressEvent) -> None:
        if self.event is None or ev.stage != self.event.stage:
            self.stage_started = time.monotonic()
        self.event = ev

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class JobRunner:
    """Runs builds in background threads, one at a time; unexpected errors are reported, never raised."""

    def __init__(self, run: Callable[..., BuildResult] | None = None, **build_kwargs) -> None:
        if run is None:
            from fluxstudio.flows.build import build as run
        self._run = run
        self._build_kwargs = build_kwargs
        self._jobs: dict[str, Job] = {}
        self._one_at_a_time = threading.Lock()

    def start(self, request, run: Callable | None = None) -> Job:
        """Start a build (or, with `run`, another job taking the same arguments: a preview); one at a time."""
        job = Job(uuid.uuid4().hex, request)
        self._jobs[job.id] = job
        job._thread = threading.Thread(
            target=self._work, args=(job, run or self._run), name=f"job-{job.id[:8]}", daemon=True
        )
        job._thread.start()
        return job

    def get(self, job_id: str | None) -> Job | None:
        return self._jobs.get(job_id or "")

    def cancel(self, job_id: str | None) -> bool:
        job = self.get(job_id)
        if job is None or job.finished:
            return False
        job.cancel.cancel()
        return True

    def _work(self, job: Job, run: Callable) -> None:
        import logging

        with self._one_at_a_time, job.sampler:
            try:
                job.result = run(job.request, Run(job.on_progress, job.cancel), **self._build_kwargs)
                job.status = Status.DONE
            except CancelledError as exc:
                job.error, job.status = exc, Status.CANCELLED
            except FluxStudioError as exc:
                job.error, job.status = exc, Status.FAILED
            except Exception as exc:
                logging.getLogger(__name__).exception("job failed")
                job.error = FluxStudioError(
                    f"Something unexpected went wrong ({type(exc).__name__}).", "Details are in the log."
                )
                job.status = Status.FAILED
