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

import gguf
import torch
from safetensors.torch import save_file

# the types compared, by their ggml_type ids and sizes in the gguf package's own tables
TYPES = ("Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q5_1", "Q4_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
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
    # Added later, from a generator of their own (the cases above keep their values):
    h = torch.Generator().manual_seed(4321)
    # rows of 12288 values, as FLUX.1's MLP outputs (img_mlp.2) have: a fused weight again
    wide_base = torch.randn(4, 4 * ROW, generator=h) * 0.02
    wa, wb = torch.randn(16, 4 * ROW, generator=h) / (4 * ROW) ** 0.5, torch.randn(4, 16, generator=h) * 0.0024
    # heavy tails: Student's t with 2 degrees of freedom (a normal over the root of a chi-square's mean)
    chi2 = (torch.randn(16, ROW, 2, generator=h) ** 2).mean(-1)
    heavy = torch.randn(16, ROW, generator=h) / chi2.sqrt() * 0.01
    return {"random": randn, "fused": fused, "edge": edge, "wide": wide_base + wb @ wa, "heavy": heavy}


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
        for name in TYPES:
            qtype = gguf.GGMLQuantizationType[name]
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            dst = torch.zeros(rows * n // block * type_size, dtype=torch.uint8)
            size = fn(int(qtype), src.data_ptr(), dst.data_ptr(), 0, rows, n, None)
            assert size == dst.numel(), (name, size, dst.numel())
            tensors[f"{case}.{name}"] = dst.view(rows, -1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata={"source": "ggml_quantize_chunk, no imatrix (ggml's reference quantizers)"})
    print(f"wrote {out}: {sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
