"""GGML block quantization against vectors made by ggml's own reference quantizers (tools/ggml_reference.py,
ggml_quantize_chunk with no importance matrix): the compiled loops that run on the CPU and the torch functions that
run on CUDA (here on the CPU)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numba
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fluxstudio.quant import ggml, ggml_loops

REF = load_file(str(Path(__file__).parent / "data" / "ggml_reference.safetensors"))
# random rows with outliers, fused FLUX-like rows of 3072 and of 12288 values, zero / constant / tiny / on-grid rows
# and the like, heavy-tailed rows (tools/ggml_reference.py)
CASES = ("random", "fused", "edge", "wide", "heavy")
TYPES = ggml.quantized()


def _torch(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The torch function of a type, on every block at once: what runs on CUDA."""
    block = ggml.sizes(qtype)[0]
    return ggml._QUANTIZERS[qtype](x.float().reshape(-1, block)).reshape(x.shape[0], -1)


def _same_blocks(ours: torch.Tensor, theirs: torch.Tensor, qtype: str) -> float:
    assert ours.shape == theirs.shape
    nbytes = ggml.sizes(qtype)[1]
    return (ours.reshape(-1, nbytes) == theirs.reshape(-1, nbytes)).all(1).float().mean().item()


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("case", CASES)
def test_bytes_match_ggml(qtype, case):
    x = REF[f"{case}.input"]
    same = _same_blocks(ggml.quantize(x, qtype), REF[f"{case}.{qtype}"], qtype)
    assert same == 1.0, f"{qtype} {case}: {same:.2%} of blocks identical to ggml's"


@pytest.mark.parametrize("qtype", sorted(ggml_loops.KERNELS))
@pytest.mark.parametrize("case", CASES)
def test_the_torch_functions_cuda_runs_match_ggml_too(qtype, case):
    x = REF[f"{case}.input"]
    same = _same_blocks(_torch(x, qtype), REF[f"{case}.{qtype}"], qtype)
    assert same == 1.0, f"{qtype} {case}: {same:.2%} of blocks identical to ggml's"


@pytest.mark.parametrize("qtype", sorted(ggml_loops.KERNELS))
def test_an_odd_number_of_blocks(qtype):
    # Q4_K and Q5_K search two blocks side by side: an odd count leaves the last one alone
    block, nbytes = ggml.sizes(qtype)
    x = REF["fused.input"].float().reshape(-1, block)[:3]
    out = np.zeros((3, nbytes), dtype=np.uint8)
    ggml_loops.KERNELS[qtype](x.numpy(), out)
    assert np.array_equal(out, REF[f"fused.{qtype}"].reshape(-1, nbytes)[:3].numpy())


def test_the_loops_half_conversions_are_ieee_round_to_nearest_even():
    """The scales' float16 bytes, as F16C converts: every half's value back, and float32s all over the range (ties,
    subnormals, overflow to infinity, signed zeros) to the nearest half, ties to even."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = np.array([ggml_loops.fp16_value(int(h)) for h in halves], dtype=np.float32)
    want = halves.view(np.float16).astype(np.float32)
    assert np.array_equal(np.isnan(back), np.isnan(want)) and np.array_equal(
        back[~np.isnan(want)], want[~np.isnan(want)]
    )
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (halves[:0x7C00].view(np.float16).astype(np.float32).view(np.uint32) | 0x1000).astype(
        np.uint32
    )  # halfway up
    edge = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 6.1e-5], np.float32)
    values = np.concatenate([bits.view(np.float32), ties.view(np.float32), edge, -edge])
    values = values[~np.isnan(values)]
    ours = np.array([ggml_loops.fp16_bits(v) for v in values], dtype=np.uint32).astype(np.uint16)
    with np.errstate(over="ignore"):  # (beyond 65520 numpy's cast says so: infinity is the answer)
        assert np.array_equal(ours, values.astype(np.float16).view(np.uint16))


@pytest.mark.slow  # (it compiles every type again: cached code keeps no types)
def test_the_loops_compute_in_float32_as_c_does():
    # numba gives float64 to a float32 mixed with a Python int or float: each such step would round otherwise than C
    for qtype, kernel in ggml_loops.KERNELS.items():
        block, nbytes = ggml.sizes(qtype)
        fresh = numba.njit(nogil=True, error_model="numpy")(kernel.py_func)
        fresh(np.ones((1, block), np.float32), np.zeros((1, nbytes), np.uint8))
        typemap = next(iter(fresh.overloads.values())).type_annotation.typemap
        doubles = sorted(name for name, t in typemap.items() if str(t) == "float64")
        assert not doubles, (qtype, doubles)


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
