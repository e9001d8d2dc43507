"""Make the GGUF quantization reference vectors that the tests compare against, with ggml itself.

ggml is not a dependency of FluxStudio: this script is run by hand, once, against a ggml shared library built from
llama.cpp's sources (the `llama-cpp-python` sdist on PyPI vendors them), and its output is committed:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp/ggml && touch ggml.pc.in
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON && cmake --build build --target ggml-base
    python tools/ggml_reference.py build/src/libggml-base.so tests/data/ggml_reference.safetensors

`ggml_quantize_chunk` with a NULL importance matrix runs ggml's reference quantizers (`quantize_row_*_ref`).
Inputs are bf16 values (what FluxStudio quantizes: the fused tensor rounded to bf16), stored as bf16.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# ggml_type ids and bytes per block of 256 values (from ggml.h / ggml-common.h)
TYPES = {
    "Q8_0": (8, 34 * 8),
    "Q5_0": (6, 22 * 8),
    "Q4_0": (2, 18 * 8),
    "Q6_K": (14, 210),
    "Q5_K": (13, 176),
    "Q4_K": (12, 144),
}
ROW = 3072  # FLUX.1's width: every FLUX weight row is a multiple of it


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    randn = torch.randn(48, ROW, generator=g) * 0.02
    randn[::7, ::97] *= 40  # outliers, as trained weights have
    # A fused FLUX-like weight: base std 0.02 plus a rank-16 LoRA delta of ~3% of its norm.
    base = torch.randn(48, ROW, generator=g) * 0.02
    a, b = torch.randn(16, ROW, generator=g) / ROW**0.5, torch.randn(48, 16, generator=g) * 0.02 * 0.03 * 4
    fused = base + b @ a
    edge = torch.zeros(12, ROW)
    edge[1] = 0.5  # constant
    edge[2] = torch.linspace(-1, 1, ROW)
    edge[3] = torch.randn(ROW, generator=g).abs() * 0.01  # positive only
    edge[4] = -torch.randn(ROW, generator=g).abs() * 0.01  # negative only
    edge[5] = torch.randn(ROW, generator=g) * 1e-6  # tiny
    edge[6, ::256] = 1.0  # one value per super-block
    edge[7] = torch.randn(ROW, generator=g) * 0.02
    edge[7, 1::2] = 0
    edge[8] = torch.randn(ROW, generator=g) * 3  # large
    edge[9] = torch.randint(-8, 8, (ROW,), generator=g).float() * 0.01  # on a grid: ties
    edge[10] = torch.randn(ROW, generator=g) * 0.02
    edge[10, 512:1024] = 0  # zero sub-blocks inside a block
    edge[11] = torch.randn(ROW, generator=g) * 0.02 + 0.05  # offset
    return {"random": randn, "fused": fused, "edge": edge}


def main(lib_path: str, out: str) -> None:
    lib = ctypes.CDLL(lib_path)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    tensors = {}
    for case, x in cases().items():
        x = x.to(torch.bfloat16)
        tensors[f"{case}.input"] = x
        src = x.float().contiguous()
        rows, n = src.shape
        for name, (type_id, block_bytes) in TYPES.items():
            dst = torch.zeros(rows * n // 256 * block_bytes, dtype=torch.uint8)
            size = fn(type_id, src.data_ptr(), dst.data_ptr(), 0, rows, n, None)
            assert size == dst.numel(), (name, size, dst.numel())
            tensors[f"{case}.{name}"] = dst.view(rows, -1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"source": "ggml_quantize_chunk, no imatrix (ggml's reference quantizers)"})
    print(f"wrote {out}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
