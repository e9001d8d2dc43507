"""GGML block quantization in torch against vectors made by ggml's own reference quantizers
(tools/ggml_reference.py, ggml_quantize_chunk with no importance matrix)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file

from fluxstudio.quant import ggml, ggml_lowbit

REF = load_file(str(Path(__file__).parent / "data" / "ggml_reference.safetensors"))
# random rows with outliers, fused FLUX-like rows of 3072 and of 12288 values, zero / constant / tiny / on-grid rows
# and the like, heavy-tailed rows (tools/ggml_reference.py)
CASES = ("random", "fused", "edge", "wide", "heavy")
TYPES = ggml.quantized()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("case", CASES)
def test_bytes_match_ggml(qtype, case):
    x = REF[f"{case}.input"]
    ours = ggml.quantize(x, qtype)
    theirs = REF[f"{case}.{qtype}"]
    assert ours.shape == theirs.shape
    nbytes = ggml.sizes(qtype)[1]
    same = (ours.reshape(-1, nbytes) == theirs.reshape(-1, nbytes)).all(1).float().mean().item()
    assert same == 1.0, f"{qtype} {case}: {same:.2%} of blocks identical to ggml's"


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_the_gguf_package(qtype):
    for case in CASES:
        x = REF[f"{case}.input"]
        data = ggml.quantize(x, qtype)
        theirs = torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[qtype]).copy())
        assert torch.equal(ggml.dequantize(data, qtype, tuple(x.shape)), theirs.reshape(x.shape).float()), case


def test_every_type_of_the_gguf_package_that_flux_files_use_is_made_here():
    assert set(TYPES) == {"Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"} | {
        "IQ4_NL",
        "IQ4_XS",
    }


def test_bf16_float32_and_chunking_give_the_same_bytes(monkeypatch):
    x = REF["random.input"]
    whole = ggml.quantize(x, "Q4_K")
    monkeypatch.setattr(ggml, "CHUNK", 2048)  # many chunks, run side by side, one core each
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (tests/run.sh gives each test process one)
    try:
        assert torch.equal(ggml.quantize(x.float(), "Q4_K"), whole)
        assert torch.get_num_threads() == 2  # and torch's own thread count is given back
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "part, args",
    [
        (ggml._k_scales, (15, -1.0, 20)),
        (ggml._k_scales, (31, -0.5, 15)),
        (ggml._q6_k_parts, ()),
        (ggml_lowbit._q3_k_parts, ()),
        (ggml_lowbit._q2_k_parts, ()),
    ],
)
def test_torchscript_runs_the_k_quants_and_gives_what_python_gives(part, args):
    assert isinstance(part.compiled(), torch.jit.ScriptFunction)  # compiled on this torch, not silently left as Python
    x = REF["edge.input"].float().reshape(-1, ggml.QK_K)
    python = part.__wrapped__(x, *args)
    for _ in range(3):  # TorchScript profiles the first run and optimizes the next ones
        assert all(torch.equal(a, b) for a, b in zip(part(x, *args), python, strict=False))


def test_the_cpu_ordered_sum_adds_as_the_row_loop_cuda_uses():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(32, 3, 4099, generator=g) * torch.rand(32, 3, 4099, generator=g).pow(8) * 1e3
    t[5, :, :100] = 1e-40  # subnormals
    t[:, 0, :7] = -0.0
    assert torch.equal(ggml._seq_sum(t), ggml._row_by_row_sum(t))
    assert not torch.equal(
        ggml._seq_sum(t), t.sum(0)
    )  # torch's own sum adds in another order: this data tells them apart


def test_rows_must_fit_the_blocks():
    with pytest.raises(ValueError, match="do not fit Q4_K blocks of 256"):
        ggml.quantize(torch.zeros(2, 320), "Q4_K")


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES)
def test_cuda_matches_cpu(qtype):
    for case in CASES:
        x = REF[f"{case}.input"]
        cpu = ggml.quantize(x, qtype)
        cuda = ggml.quantize(x.cuda(), qtype)
        nbytes = ggml.sizes(qtype)[1]
        same = (cpu.reshape(-1, nbytes) == cuda.reshape(-1, nbytes)).all(1).float().mean().item()
        assert same >= 0.99, (qtype, case, same)
