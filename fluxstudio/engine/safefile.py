"""Read and check .safetensors files without trusting them.

Headers are parsed by hand so that a pickle checkpoint, a truncated download or a garbage file gets a clear
message before any library touches it. Nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from fluxstudio.errors import BadInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Bounds on what a header may make this program do: FLUX.2-dev's largest shard lists about 700 tensors in about
# 100 KB, a LoRA with text-encoder parts a few thousand. Past these a file is not a model but an attack or garbage.
MAX_HEADER = 16 << 20
MAX_TENSORS = 100_000
PICKLE_HINT = (
    "FluxStudio reads only .safetensors, because pickle checkpoints (.ckpt/.bin/.pt) can run code when "
    "opened. Get the .safetensors version of this file."
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # where its data starts in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _sniff_pickle(head: bytes) -> bool:
    # torch.save zip archives start with a zip magic; raw pickles with PROTO (0x80) and a version 2..5.
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path: str | Path, what: str = "file") -> Header:
    """Parse and validate a safetensors header; raise BadInputError with a clear message otherwise."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"The {what} {path} does not exist.", "Check the path.", (path,))
    if not path.is_file():
        raise BadInputError(f"The {what} {path} is not a file.", "Pick a .safetensors file.", (path,))
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        (n,) = struct.unpack("<Q", head[:8]) if len(head) == 9 else (0,)
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and 2 <= n <= MAX_HEADER
        if not looks_safetensors and _sniff_pickle(head):
            raise BadInputError(f"The {what} {path.name} is a pickle checkpoint, not safetensors.", PICKLE_HINT)
        if len(head) < 9:
            raise BadInputError(f"The {what} {path.name} is empty or truncated.", "Download it again.")
        if head[8:9] == b"{" and MAX_HEADER < n < size:
            raise BadInputError(
                f"The {what} {path.name} has a header of {n / 2**20:.0f} MB, far more than any model's: "
                "it is not a file FluxStudio can read.",
                "Pick another file.",
            )
        if not looks_safetensors or 8 + n > size:
            raise BadInputError(
                f"The {what} {path.name} is not a valid safetensors file (or is truncated).",
                "Download it again or pick another file.",
            )
        f.seek(8)
        raw = f.read(n)
    try:
        header = _parse(raw)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise TypeError("metadata is not an object")
        tensors: dict[str, TensorInfo] = {}
        end_max = 0
        for name, entry in header.items():
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(dtype, shape, end - start, 8 + n + start)
            if start < 0 or end < start or info.nbytes != info.numel * dtype.itemsize:
                raise ValueError(f"bad offsets for {name}")
            end_max = max(end_max, end)
            tensors[name] = info
    except RecursionError:
        raise BadInputError(
            f"The {what} {path.name} is not a valid safetensors file (its header nests too deeply).",
            "Download it again or pick another file.",
        ) from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"The {what} {path.name} is not a valid safetensors file ({exc}).",
            "Download it again or pick another file.",
        ) from None
    if 8 + n + end_max > size:
        raise BadInputError(
            f"The {what} {path.name} is truncated ({size:,} of {8 + n + end_max:,} bytes).",
            "The download was probably interrupted: download it again.",
        )
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _parse(raw: bytes) -> dict:
    """A header's JSON object, refused before it is parsed where it lists more entries than any model has (counted
    by their offsets: parsing 200,000 empty entries alone takes seconds), and after, where its keys are as many."""
    if (entries := raw.count(b'"data_offsets"')) > MAX_TENSORS:
        raise ValueError(f"{entries:,} entries, more than any model has")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise TypeError("header is not an object")
    if len(header) > MAX_TENSORS + 1:
        raise ValueError(f"{len(header):,} entries, more than any model has")
    return header


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a plain read (no mmap: memory stays at this tensor, RSS does not grow with the file)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    f.seek(info.offset)
    if info.nbytes and f.readinto(buf.numpy()) != info.nbytes:  # type: ignore[attr-defined] - a raw file has it
        raise BadInputError(
            f"{Path(f.name).name} is truncated.", "The download was probably interrupted: download it again."
        )
    return buf.view(info.dtype).reshape(info.shape)


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor of an already validated file (for small files such as LoRAs)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise BadInputError(f"Could not read {path.name}: {exc}.", "Download it again or pick another file.") from None


def sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
