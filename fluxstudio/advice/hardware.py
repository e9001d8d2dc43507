"""Know the machine: probe() what is here, recommend() a precision for a model on a card.

probe() never raises: no CUDA, no NVML, an old driver or a broken torch each degrade to what can be known, with
a note. recommend() is a pure, table-driven function of a target card and a model.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

from fluxstudio.units import existing_parent, free_bytes

GB = 10**9
FP8_CAPABILITY = (8, 9)
BF16_CAPABILITY = (8, 0)
NVFP4_CAPABILITY = (10, 0)  # Blackwell: RTX 50, B200


@dataclass(frozen=True)
class Accelerator:
    kind: str  # "NVIDIA CUDA", "AMD ROCm", "Apple MPS", "Intel XPU"
    name: str
    index: int = 0
    capability: tuple[int, int] | None = None
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    driver: str = ""
    runtime: str = ""  # CUDA / ROCm version torch was built with
    bf16: bool = False
    fp8_compute: bool = False
    bitsandbytes: bool = False
    usable_by_torch: bool = True  # False when seen by nvidia-smi only (torch is a CPU build)


@dataclass(frozen=True)
class HardwareInfo:
    os: str
    cpu: str
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    disk_path: str
    accelerators: list[Accelerator] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def now(self) -> HardwareInfo:
        """The same machine with its free RAM and disk read again (the GPUs are probed once)."""
        try:
            disk_free = free_bytes(Path(self.disk_path))
        except OSError:
            disk_free = 0
        return replace(self, ram_available_bytes=psutil.virtual_memory().available, disk_free_bytes=disk_free)


LIBRARIES = ("torch", "diffusers", "bitsandbytes", "safetensors", "peft", "accelerate", "huggingface_hub", "gradio")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            pass
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(run: Callable = subprocess.run) -> list[dict]:
    """GPUs as nvidia-smi reports them (works without torch CUDA); [] when there is no nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    out = run(
        [exe, "--query-gpu=name,memory.total,memory.used,driver_version,compute_cap", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 5:
            cap = tuple(int(x) for x in parts[4].split(".")) if parts[4][:1].isdigit() else None
            gpus.append(
                {
                    "name": parts[0],
                    "total": int(float(parts[1])) * 2**20,
                    "used": int(float(parts[2])) * 2**20,
                    "driver": parts[3],
                    "capability": cap,
                }
            )
    return gpus


def _torch_accelerators(torch, smi: list[dict], notes: list[str]) -> list[Accelerator]:
    found: list[Accelerator] = []
    try:
        cuda_ok = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - a broken driver must not break the probe
        notes.append(f"CUDA could not be queried ({type(exc).__name__}: {exc}).")
        cuda_ok = False
    if cuda_ok:
        hip = getattr(torch.version, "hip", None)
        for i in range(torch.cuda.device_count()):
            try:
                props = torch.cuda.get_device_properties(i)
                cap = (props.major, props.minor)
                free, total = torch.cuda.mem_get_info(i)
                found.append(
                    Accelerator(
                        kind="AMD ROCm" if hip else "NVIDIA CUDA",
                        name=props.name,
                        index=i,
                        capability=None if hip else cap,
                        vram_total_bytes=total,
                        vram_free_bytes=free,
                        driver=smi[i]["driver"] if i < len(smi) else "",
                        runtime=str(hip or torch.version.cuda or ""),
                        bf16=bool(hip) or cap >= BF16_CAPABILITY,
                        fp8_compute=not hip and cap >= FP8_CAPABILITY,
                        bitsandbytes=bool(hip) or cap >= (6, 0),
                    )
                )
            except Exception as exc:  # noqa: BLE001
                notes.append(f"GPU {i} could not be read ({type(exc).__name__}: {exc}).")
    elif smi:
        notes.append(
            "An NVIDIA GPU is present but this PyTorch cannot use it (a CPU build, or a driver too old): "
            "reinstall PyTorch with CUDA (the launcher does this) to build on the GPU."
        )
    try:
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            found.append(
                Accelerator(
                    kind="Apple MPS",
                    name=f"Apple {platform.machine()} GPU",
                    vram_total_bytes=psutil.virtual_memory().total,
                    bf16=True,
                )
            )
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            for i in range(torch.xpu.device_count()):
                props = torch.xpu.get_device_properties(i)
                found.append(
                    Accelerator(
                        kind="Intel XPU",
                        name=props.name,
                        index=i,
                        vram_total_bytes=getattr(props, "total_memory", 0),
                        bf16=True,
                    )
                )
    except Exception as exc:  # noqa: BLE001
        notes.append(f"Other accelerators could not be queried ({type(exc).__name__}).")
    return found


def probe(output_dir: Path | None = None, torch_module=None, run: Callable = subprocess.run) -> HardwareInfo:
    """What this machine has. Never raises; what cannot be known is left empty with a note."""
    from fluxstudio import paths

    notes: list[str] = []
    vm = psutil.virtual_memory()
    disk_path = existing_parent(output_dir or paths.outputs_dir())
    try:
        disk_free = free_bytes(disk_path)
    except OSError:
        disk_free = 0
    try:
        smi = _nvidia_smi(run)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"nvidia-smi failed ({type(exc).__name__}).")
        smi = []
    torch = torch_module
    if torch is None:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - a broken torch install
            notes.append(f"PyTorch could not be imported ({type(exc).__name__}: {exc}).")
    accelerators = _torch_accelerators(torch, smi, notes) if torch is not None else []
    if torch is not None and not any(a.kind in ("NVIDIA CUDA", "AMD ROCm") for a in accelerators):
        accelerators += [
            Accelerator(
                kind="NVIDIA CUDA",
                name=g["name"],
                index=i,
                capability=g["capability"],
                vram_total_bytes=g["total"],
                vram_free_bytes=g["total"] - g["used"],
                driver=g["driver"],
                bf16=bool(g["capability"] and g["capability"] >= BF16_CAPABILITY),
                fp8_compute=bool(g["capability"] and g["capability"] >= FP8_CAPABILITY),
                bitsandbytes=True,
                usable_by_torch=False,
            )
            for i, g in enumerate(smi)
        ]
    if not accelerators:
        notes.append("No GPU found: FluxStudio can still fuse and quantize on the CPU, for a GPU machine to run.")
    return HardwareInfo(
        os=f"{platform.system()} {platform.release()}",
        cpu=_cpu_name(),
        cpu_cores=os.cpu_count() or 1,
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        disk_free_bytes=disk_free,
        disk_path=str(disk_path),
        accelerators=accelerators,
        notes=notes,
    )
