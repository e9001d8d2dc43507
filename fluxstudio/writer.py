"""Streaming sharded safetensors writer.

Tensors are appended to a spill file as they come (memory stays at one tensor); when a shard is full its
final file is assembled: header first, then the data in safetensors' own order (widest dtype first, then
name, which keeps every tensor aligned). Shards are renamed to `-0000i-of-0000n` and indexed at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxstudio.safefile import DTYPE_NAMES

PREFIX = "diffusion_pytorch_model"
COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # in the spill file
    nbytes: int


def _bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class ShardedWriter:
    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = folder
        self.max_shard_bytes = max(1, max_shard_bytes)
        self.shards: list[tuple[Path, list[str]]] = []  # assembled temp file, its tensor names
        self.total_bytes = 0
        self._entries: list[_Entry] = []
        self._spill_path = folder / ".spill"
        self._spill = None
        self._spill_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._spill_size + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._spill is None:
            self._spill = self._spill_path.open("wb")
            self._spill_size = 0
        self._spill.write(_bytes_view(tensor))
        self._entries.append(_Entry(name, tensor.dtype, tuple(tensor.shape), self._spill_size, nbytes))
        self._spill_size += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        assert self._spill is not None
        self._spill.close()
        self._spill = None
        entries = sorted(self._entries, key=lambda e: (-e.dtype.itemsize, e.name))
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for e in entries:
            header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        path = self.folder / f".shard-{len(self.shards) + 1:05d}"
        with self._spill_path.open("rb") as src, path.open("wb") as dst:
            dst.write(len(raw).to_bytes(8, "little"))
            dst.write(raw)
            for e in entries:
                src.seek(e.offset)
                left = e.nbytes
                while left:
                    block = src.read(min(left, COPY_CHUNK))
                    dst.write(block)
                    left -= len(block)
        self._spill_path.unlink()
        self.shards.append((path, [e.name for e in entries]))
        self._entries = []

    def close(self) -> list[Path]:
        """Finish the last shard, name the shards, write the index when there are several."""
        if self._entries:
            self._close_shard()
        n = len(self.shards)
        files: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self.shards, start=1):
            fname = f"{PREFIX}.safetensors" if n == 1 else f"{PREFIX}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.folder / fname)
            files.append(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{PREFIX}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files

    def abort(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
