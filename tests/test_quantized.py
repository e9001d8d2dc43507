"""nf4 and fp8 outputs load and run through diffusers' own loaders and keep the LoRA's effect."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FLUX1_TINY, flux1_inputs, linear_shapes, load_dir, peft_lora, relative_error, write_model
from safetensors.torch import load_file

from fluxstudio import quant
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.quant.plain import FP8, FP8_MAX, fp8_encode

F = pytest.importorskip("bitsandbytes.functional")


def run(base, lora, tmp_path, precision, name, **kw):
    loras = (LoraRef(str(lora), 0.8),) if lora else ()
    return build(BuildRequest(str(base), loras, precision, tmp_path / name, **kw))


@pytest.fixture
def fused(tiny_base, tmp_path):
    lora = peft_lora(tmp_path / "lora.safetensors", linear_shapes(tiny_base), rank=8)
    run(tiny_base, lora, tmp_path, "bf16", "bf16")
    return tiny_base, lora


@pytest.fixture
def cpu_bnb(monkeypatch):
    """diffusers refuses bitsandbytes without a GPU; lift that one check to load on CPU (FACTS §3)."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    monkeypatch.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)


def bf16_model(folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_loads_in_diffusers_and_matches_bitsandbytes(fused, tmp_path, cpu_bnb, double_quant):
    import bitsandbytes as bnb
    from diffusers import FluxTransformer2DModel

    base, lora = fused
    run(base, lora, tmp_path, "nf4", "nf4", double_quant=double_quant)
    out = tmp_path / "nf4"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is double_quant

    model = FluxTransformer2DModel.from_pretrained(out, device_map="cpu", torch_dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == sum(1 for m in bf16_model(tmp_path / "bf16").modules() if isinstance(m, torch.nn.Linear))

    # every quantized tensor equals bitsandbytes' own quantization of the bf16 fused weight
    fused_bf16 = load_dir(tmp_path / "bf16")
    ours = load_dir(out)
    for name, w in fused_bf16.items():
        if f"{name}.quant_map" not in ours:
            assert torch.equal(ours[name], w), name
            continue
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        expected = {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
        for key, value in expected.items():
            if key.endswith("bitsandbytes__nf4"):
                assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(value.tolist())), key
            else:
                assert torch.equal(ours[key], value), key

    # and it computes what the bf16 fused model computes, up to 4-bit rounding
    inputs = flux1_inputs(FLUX1_TINY)
    with torch.no_grad():
        got = model(**inputs)[0]
        want = bf16_model(tmp_path / "bf16")(**inputs)[0]
    assert relative_error(got, want) < 0.15


def test_fp8_loads_with_layerwise_casting_and_runs(fused, tmp_path):
    from safetensors import safe_open

    base, lora = fused
    run(base, lora, tmp_path, "fp8", "fp8")
    out = tmp_path / "fp8"
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert dtypes["transformer_blocks.0.attn.to_q.weight"] == "F8_E4M3"
    assert dtypes["transformer_blocks.0.norm1.linear.weight"] == "BF16"  # layerwise casting skips 'norm' modules
    assert dtypes["transformer_blocks.0.attn.to_q.bias"] == "BF16"

    model = bf16_model(out)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    inputs = flux1_inputs(FLUX1_TINY)
    with torch.no_grad():
        got = model(**inputs)[0]
        want = bf16_model(tmp_path / "bf16")(**inputs)[0]
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < 0.1


def test_fp8_clamps_instead_of_nan():
    out = FP8.encode("lin.weight", torch.tensor([[1000.0, -1e6, 1.0, 0.0]]))["lin.weight"]
    assert out.dtype == torch.float8_e4m3fn
    assert out.float().tolist() == [[FP8_MAX, -FP8_MAX, 1.0, 0.0]]


def retention(q_fused: torch.Tensor, q_base: torch.Tensor, delta: torch.Tensor) -> float:
    """Share of the LoRA's change that survives quantization: <Q(W+D) - Q(W), D> / |D|^2 (FACTS §1)."""
    return float(((q_fused - q_base) * delta).sum() / (delta * delta).sum())


def dequant(precision, name, tensors):
    if precision == "fp8":
        return tensors[name].float()
    state = F.QuantState.from_dict(
        {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}, "cpu"
    )
    return F.dequantize_4bit(tensors[name], state).float()


@pytest.mark.parametrize("precision", ["nf4", "fp8"])
def test_lora_effect_retained(tmp_path, precision):
    """A realistic small LoRA (rank 16, |D|/|W| ~ 3%) on a 1024x1024 layer: fuse-then-quantize keeps >= 98%."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024) * 0.02
    a, b = torch.randn(16, 1024) / 32, torch.randn(1024, 16) * 0.0035
    delta = b @ a
    assert 0.01 < float(delta.norm() / w.norm()) < 0.05
    q = quant.get(precision)
    q_base = dequant(precision, "lin.weight", q.encode("lin.weight", w))
    q_fused = dequant(precision, "lin.weight", q.encode("lin.weight", w + delta))
    kept = retention(q_fused, q_base, delta)
    # requantizing the already quantized base (what other tools do) loses much of it
    q_requant = dequant(precision, "lin.weight", q.encode("lin.weight", q_base + delta))
    kept_requant = retention(q_requant, q_base, delta)
    print(f"{precision}: fuse-then-quantize keeps {kept:.4f}, requantizing keeps {kept_requant:.4f}")
    assert kept >= 0.98
    assert kept_requant < 0.9


def test_retention_through_a_whole_build(tmp_path):
    """The same metric on a model built end to end, for the layer the LoRA touches."""
    base = write_model(tmp_path / "wide", dict(FLUX1_TINY, num_attention_heads=16, num_single_layers=0))
    key = "transformer_blocks.0.attn.to_q"
    lora = peft_lora(tmp_path / "l.safetensors", {key: (1024, 1024)}, rank=16, strength=0.06)
    for precision in ("nf4", "fp8"):
        plain = load_dir(run(base, None, tmp_path, precision, f"{precision}-plain").output_dir)
        with_lora = load_dir(run(base, lora, tmp_path, precision, f"{precision}-lora").output_dir)
        w = load_dir(base)[f"{key}.weight"].float()
        lsd = load_file(str(lora))
        delta = 0.8 * lsd[f"transformer.{key}.lora_B.weight"].float() @ lsd[f"transformer.{key}.lora_A.weight"].float()
        assert 0.01 < float(delta.norm() / w.norm()) < 0.08
        r = retention(dequant(precision, f"{key}.weight", with_lora), dequant(precision, f"{key}.weight", plain), delta)
        print(f"{precision}: LoRA effect retained {r:.4f}")
        assert r >= 0.98, (precision, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_encode_a_chunk_of_rows_at_a_time_equals_the_whole_tensor_cast(dtype):
    w = (torch.randn(3000, 700, generator=torch.Generator().manual_seed(0)) * 300).to(dtype)  # > 1 M values: chunks
    before = w.clone()
    expect = w.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(fp8_encode(w).view(torch.uint8), expect.view(torch.uint8))
    scale = torch.tensor(0.75)
    expect = w.float().div(scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(fp8_encode(w, scale).view(torch.uint8), expect.view(torch.uint8))
    assert torch.equal(w, before)  # the fused weight is scored after it is encoded: never changed in place
