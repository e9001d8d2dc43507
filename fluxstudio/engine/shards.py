"""Streaming sharded safetensors writer.

Each shard file starts with a header area reserved up front (an upper bound computed from the tensor names);
tensors are appended straight after it as they come, so memory stays at one tensor and every byte is written
once. When the shard is full its real header is written into the reserved area, padded with spaces as the
safetensors format allows. Shards are renamed to `-0000i-of-0000n` and indexed at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fluxstudio.engine.safefile import DTYPE_NAMES

PREFIX = "diffusion_pytorch_model"
ENTRY_BOUND = 192  # bytes of header per tensor, beside its name: dtype, a 4-d shape and two offsets fit easily


def header_bound(names: list[str]) -> int:
    """Bytes to reserve for a header that may list any of these tensors (a multiple of 8)."""
    n = 64 + sum(len(name) + ENTRY_BOUND for name in names)
    return n + (-n % 8)


def _bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type] - an ndarray is a buffer


class ShardedWriter:
    """Shards named like diffusers' own (transformers': prefix "model"), or with `single_name` one file of that name
    whatever its size."""

    def __init__(
        self,
        folder: Path,
        max_shard_bytes: int,
        header_reserve: int,
        metadata: dict[str, str] | None = None,
        single_name: str | None = None,
        prefix: str = PREFIX,
    ) -> None:
        self.folder, self.prefix = folder, prefix
        self.single_name = single_name
        self.max_shard_bytes = max(1, max_shard_bytes) if single_name is None else float("inf")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.header_reserve = header_reserve + len(json.dumps(self.metadata)) + (-len(json.dumps(self.metadata)) % 8)
        self.shards: list[tuple[Path, list[str]]] = []  # finished temp file, its tensor names
        self.total_bytes = 0
        self._file = None
        self._header: dict[str, dict] = {}
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._header and self._size + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._file is None:
            path = (
                self.folder / f".{self.single_name or self.prefix}.shard-{len(self.shards) + 1:05d}"
            )  # writers may share a folder
            self._file = path.open("wb")
            self._file.seek(8 + self.header_reserve)
            self._size = 0
        self._file.write(_bytes_view(tensor))
        self._header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._size, self._size + nbytes],
        }
        self._size += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        f = self._file
        assert f is not None
        raw = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.header_reserve:
            raise RuntimeError(f"safetensors header of {len(raw)} bytes exceeds the {self.header_reserve} reserved")
        f.seek(0)
        f.write(self.header_reserve.to_bytes(8, "little"))
        f.write(raw + b" " * (self.header_reserve - len(raw)))
        f.close()
        self.shards.append((Path(f.name), list(self._header)))
        self._file = None
        self._header = {}

    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, write the index when there are several."""
        if self._file is not None:
            self._close_shard()
        n = len(self.shards)
        files: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.shards, start=1):
            fname = self.single_name or (
                f"{self.prefix}.safetensors" if n == 1 else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            )
            os.replace(tmp, self.folder / fname)
            files.append(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        return files

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
