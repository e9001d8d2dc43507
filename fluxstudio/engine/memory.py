"""Memory readouts: process RSS and anonymous memory, system RAM, and CUDA memory, sampled in the background."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil
from typing_extensions import Self

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class MemorySnapshot:
    rss_bytes: int
    anon_bytes: int  # memory the process owns (not file cache / mmapped files); equals RSS where unknown
    ram_available_bytes: int
    ram_total_bytes: int
    vram_allocated_bytes: int = 0
    vram_reserved_bytes: int = 0
    vram_used_bytes: int = 0  # whole device, from NVML where present
    vram_total_bytes: int = 0


def _anon_bytes(proc: psutil.Process) -> int:
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return proc.memory_info().rss


def _cuda_readings() -> tuple[int, int, int, int]:
    """(allocated, reserved, device used, device total); zeros when CUDA is not in use in this process."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0, 0, 0, 0
    try:
        free, total = torch.cuda.mem_get_info()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), total - free, total
    except Exception:  # noqa: BLE001 - a readout must never break a job
        return 0, 0, 0, 0


def snapshot(proc: psutil.Process | None = None) -> MemorySnapshot:
    proc = proc or psutil.Process()
    vm = psutil.virtual_memory()
    alloc, reserved, used, total = _cuda_readings()
    return MemorySnapshot(
        rss_bytes=proc.memory_info().rss,
        anon_bytes=_anon_bytes(proc),
        ram_available_bytes=vm.available,
        ram_total_bytes=vm.total,
        vram_allocated_bytes=alloc,
        vram_reserved_bytes=reserved,
        vram_used_bytes=used,
        vram_total_bytes=total,
    )


@dataclass
class _Peaks:
    rss_bytes: int = 0
    anon_bytes: int = 0
    vram_allocated_bytes: int = 0
    vram_used_bytes: int = 0
    samples: int = 0


@dataclass
class MemorySampler:
    """Samples memory every `interval` seconds in a daemon thread; use as a context manager.

    `current` is the latest snapshot, `peak_*` the highest values seen since start.
    """

    interval: float = 0.1
    _peaks: _Peaks = field(default_factory=_Peaks)
    _current: MemorySnapshot | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Self:
        self._proc = psutil.Process()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.sample()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> MemorySnapshot:
        snap = snapshot(getattr(self, "_proc", None))
        torch = sys.modules.get("torch")
        peak_alloc = snap.vram_allocated_bytes
        if snap.vram_total_bytes and torch is not None:
            peak_alloc = max(peak_alloc, torch.cuda.max_memory_allocated())
        with self._lock:
            self._current = snap
            p = self._peaks
            p.rss_bytes = max(p.rss_bytes, snap.rss_bytes)
            p.anon_bytes = max(p.anon_bytes, snap.anon_bytes)
            p.vram_allocated_bytes = max(p.vram_allocated_bytes, peak_alloc)
            p.vram_used_bytes = max(p.vram_used_bytes, snap.vram_used_bytes)
            p.samples += 1
        return snap

    @property
    def current(self) -> MemorySnapshot:
        with self._lock:
            return self._current or snapshot()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def peak_rss_bytes(self) -> int:
        return self._peaks.rss_bytes

    @property
    def peak_anon_bytes(self) -> int:
        return self._peaks.anon_bytes

    @property
    def peak_vram_bytes(self) -> int:
        return self._peaks.vram_allocated_bytes

    @property
    def samples(self) -> int:
        return self._peaks.samples
