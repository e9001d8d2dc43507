"""Units of the engine: the NF4 CPU kernel, the shard writer, the demo model, the memory sampler."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from fluxstudio.engine.memory import MemorySampler
from fluxstudio.engine.shards import ShardedWriter, header_bound
from fluxstudio.quant import nf4 as quantize
from fluxstudio.sources import demo


def bnb_nf4(w):
    return torch.ops.bitsandbytes.quantize_4bit.default(w, 64, "nf4", torch.uint8)


def test_fast_nf4_kernel_is_in_use_and_bit_identical_to_bitsandbytes():
    assert quantize._cpu_kernel().__name__ == "fast_nf4"
    every = quantize._probe()  # every bf16 value in [-1, 1] as an exact scaled value, ties included
    g = torch.Generator().manual_seed(1)
    cases = [
        every,
        every[:-7],
        (torch.randn(1_000_003, generator=g) * 0.02).bfloat16(),
        torch.zeros(130, dtype=torch.bfloat16),
        (torch.randn(64 * 9 + 5, generator=g) * 1e-30).bfloat16(),
        torch.randn(3, 448, generator=g).bfloat16(),
    ]
    for w in cases:
        ours = quantize.nf4_cpu(w)
        ref = bnb_nf4(w)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        assert ours[1].view(torch.int32).equal(ref[1].view(torch.int32))  # bit patterns, -0.0 included


def test_nf4_refuses_nan():
    from fluxstudio.errors import NumericError

    w = torch.zeros(128, 64, dtype=torch.bfloat16)
    w[5, 5] = float("nan")
    with pytest.raises(NumericError, match="NaN"):
        quantize.nf4_encode("x.weight", w)


def test_writer_shards_and_reserved_header(tmp_path):
    tensors = {
        f"t{i}": torch.full((1000 + i,), float(i)).to(dt)
        for i, dt in enumerate([torch.float32, torch.bfloat16, torch.uint8] * 3)
    }
    writer = ShardedWriter(tmp_path, 6000, header_bound(list(tensors)))
    for k, v in tensors.items():
        writer.add(k, v)
    files = writer.close()
    assert len(files) > 1 and not list(tmp_path.glob(".shard-*"))
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    loaded = {}
    for f in files:
        loaded.update(load_file(str(f)))
    assert set(index["weight_map"]) == set(tensors) == set(loaded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


DEMO_WEIGHTS = (
    "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def test_demo_is_deterministic_and_cached(isolated_home, tmp_path, monkeypatch):
    first = demo.ensure_base()
    lora = demo.ensure_lora()
    data = b"".join((first / f).read_bytes() for f in DEMO_WEIGHTS)
    lora_data = lora.read_bytes()
    assert demo.ensure_base() == first  # made once
    monkeypatch.setenv("FLUXSTUDIO_HOME", str(tmp_path / "other"))
    again = demo.ensure_base()
    assert again != first and b"".join((again / f).read_bytes() for f in DEMO_WEIGHTS) == data
    assert demo.ensure_lora().read_bytes() == lora_data


def test_memory_sampler_sees_a_500mb_tensor_and_stops():
    def samples_taken(n: int) -> None:  # a busy machine can make a sample slow: wait for them, not for a time
        until, deadline = sampler.samples + n, time.monotonic() + 60
        while sampler.samples < until and time.monotonic() < deadline:
            time.sleep(0.01)

    with MemorySampler(interval=0.05) as sampler:
        samples_taken(4)
        before = sampler.current.anon_bytes
        x = torch.ones(125_000_000, dtype=torch.float32)  # 500 MB, touched
        samples_taken(3)
        during = sampler.peak_anon_bytes
        del x
        samples_taken(3)
        assert sampler.running
    assert not sampler.running and sampler.samples >= 10
    grown = during - before
    assert abs(grown - 500e6) / 500e6 < 0.1, grown
    assert sampler.current.anon_bytes < during - 400e6  # freed


@pytest.mark.gpu
def test_cuda_build_matches_the_cpu_build(tiny_base, tmp_path):
    """On a GPU machine: fusing on CUDA and quantizing with bitsandbytes' CUDA kernel gives the CPU result."""
    from helpers import load_dir

    from fluxstudio.flows.build import build
    from fluxstudio.flows.request import BuildRequest

    for device in ("cpu", "cuda"):
        build(BuildRequest(str(tiny_base), (), "nf4", tmp_path / device, device=device))
    cpu, gpu = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    assert set(cpu) == set(gpu)
    for k in cpu:
        if cpu[k].dtype == torch.uint8 and not k.endswith("bitsandbytes__nf4"):
            assert (cpu[k] == gpu[k]).float().mean() > 0.999, k
        else:
            assert torch.allclose(cpu[k].float(), gpu[k].float()), k
