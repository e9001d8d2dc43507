"""bf16 output equals diffusers' own load_lora + fuse_lora + unload_lora, within one bf16 ulp per element."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    FLUX1_TINY,
    FLUX2_TINY,
    assert_within_one_ulp,
    bf16_ulp,
    linear_shapes,
    load_dir,
    peft_lora,
    reference_fuse,
    write_model,
)
from safetensors.torch import load_file, save_file

from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef


def run(base, loras, tmp_path, precision="bf16", name="out", **kw):
    req = BuildRequest(str(base), tuple(LoraRef(str(p), s) for p, s in loras), precision, tmp_path / name, **kw)
    return build(req)


def check_against_diffusers(base, loras, tmp_path, family="flux1"):
    result = run(base, loras, tmp_path)
    ref, ref_config = reference_fuse(base, loras, family)
    assert_within_one_ulp(load_dir(result.output_dir), ref, base)
    return result, ref_config


def test_peft_lora_with_alpha(tiny_base, tmp_path):
    lora = peft_lora(tmp_path / "a.safetensors", linear_shapes(tiny_base), rank=8, alpha=4.0)
    result, _ = check_against_diffusers(tiny_base, [(lora, 0.7)], tmp_path)
    assert result.tensors_fused > 0
    # diffusers computing in bf16 (two roundings) agrees within one ulp of the operands
    ref_bf16, _ = reference_fuse(tiny_base, [(lora, 0.7)], dtype=torch.bfloat16)
    assert_within_one_ulp(load_dir(result.output_dir), ref_bf16, tiny_base)
    # and FluxStudio's single rounding is within half an ulp of the exact fp32 result
    k = "transformer_blocks.0.attn.to_q"
    w, l = load_dir(tiny_base), load_file(str(lora))
    exact = (
        w[f"{k}.weight"].float()
        + 0.7 * 0.5 * l[f"transformer.{k}.lora_B.weight"].float() @ l[f"transformer.{k}.lora_A.weight"].float()
    )
    assert ((load_dir(result.output_dir)[f"{k}.weight"].float() - exact).abs() <= bf16_ulp(exact) / 2).all()
    # alpha/rank is honoured: the same LoRA without alpha keys changes the weights twice as much
    lora1 = peft_lora(tmp_path / "b.safetensors", linear_shapes(tiny_base), rank=8)
    plain = load_dir(run(tiny_base, [], tmp_path, name="plain").output_dir)
    half = load_dir(result.output_dir)
    full = load_dir(run(tiny_base, [(lora1, 0.7)], tmp_path, name="full").output_dir)
    k = "transformer_blocks.0.attn.to_q.weight"
    ratio = (full[k].float() - plain[k].float()).norm() / (half[k].float() - plain[k].float()).norm()
    assert 1.9 < ratio < 2.1


def test_two_loras_with_different_scales(tiny_base, tmp_path):
    shapes = linear_shapes(tiny_base)
    a = peft_lora(tmp_path / "a.safetensors", shapes, rank=8, seed=1)
    b = peft_lora(tmp_path / "b.safetensors", {k: v for k, v in shapes.items() if "attn" in k}, rank=4, seed=2)
    check_against_diffusers(tiny_base, [(a, 0.8), (b, -0.5)], tmp_path)


def test_xlabs_format(tiny_base, tmp_path):
    g = torch.Generator().manual_seed(3)
    w = 128
    sd = {}
    for proc, out_f in (("qkv_lora1", 3 * w), ("proj_lora1", w), ("qkv_lora2", 3 * w), ("proj_lora2", w)):
        sd[f"double_blocks.0.processor.{proc}.down.weight"] = (torch.randn(16, w, generator=g) / 11).to(torch.bfloat16)
        sd[f"double_blocks.0.processor.{proc}.up.weight"] = (torch.randn(out_f, 16, generator=g) * 0.01).to(
            torch.bfloat16
        )
    path = tmp_path / "xlabs.safetensors"
    save_file(sd, str(path))
    result, _ = check_against_diffusers(tiny_base, [(path, 1.0)], tmp_path)
    assert result.tensors_fused == 8


def test_kohya_format(wide_base, tmp_path):
    g = torch.Generator().manual_seed(4)
    w, r = 3072, 4
    sd = {}
    modules = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * w, w),
        "lora_unet_double_blocks_0_img_attn_proj": (w, w),
        "lora_unet_double_blocks_0_img_mod_lin": (6 * w, w),
        "lora_unet_single_blocks_0_linear1": (3 * w + 4 * w, w),
        "lora_unet_single_blocks_0_linear2": (w, w + 4 * w),
    }
    for name, (out_f, in_f) in modules.items():
        sd[f"{name}.lora_down.weight"] = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
        sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, r, generator=g) * 0.02).to(torch.bfloat16)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))
    check_against_diffusers(wide_base, [(path, 0.9)], tmp_path)


def test_fill_base_with_turbo_alpha_shaped_lora(tmp_path):
    base = write_model(tmp_path / "fill", dict(FLUX1_TINY, in_channels=384, out_channels=64))
    shapes = linear_shapes(base)
    shapes["x_embedder"] = (128, 64)  # Turbo-Alpha was trained on FLUX.1-dev: 64 inputs, Fill has 384
    lora = peft_lora(tmp_path / "turbo.safetensors", shapes)
    result, _ = check_against_diffusers(base, [(lora, 1.0)], tmp_path)
    assert any("zero-padded 64→384" in n for n in result.notes)


def test_control_lora_widens_x_embedder(tiny_base, tmp_path):
    shapes = linear_shapes(tiny_base)
    shapes["x_embedder"] = (128, 128)  # a Control LoRA doubles the inputs: 64 -> 128
    g = torch.Generator().manual_seed(5)
    extra = {
        "transformer.x_embedder.lora_B.bias": (torch.randn(128, generator=g) * 0.01).to(torch.bfloat16),
        "transformer.transformer_blocks.0.attn.norm_q.weight": (1 + torch.randn(64, generator=g) * 0.1).to(
            torch.bfloat16
        ),
    }
    lora = peft_lora(tmp_path / "control.safetensors", shapes, extra=extra)
    result, ref_config = check_against_diffusers(tiny_base, [(lora, 1.0)], tmp_path)
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["in_channels"] == ref_config["in_channels"] == 128
    assert any("x_embedder widened 64→128" in n for n in result.notes)
    # FLUX derives out_channels from in_channels when unset: the output must pin it to load at all
    from diffusers import FluxTransformer2DModel

    assert out_config["out_channels"] == 64
    assert FluxTransformer2DModel.from_pretrained(tmp_path / "out").proj_out.out_features == 64


def test_flux2_base(tmp_path):
    base = write_model(tmp_path / "f2", FLUX2_TINY, class_name="Flux2Transformer2DModel")
    shapes = linear_shapes(base, contains=("attn.to_", "to_qkv_mlp_proj", "ff.linear"))
    assert shapes
    lora = peft_lora(tmp_path / "f2lora.safetensors", shapes)
    check_against_diffusers(base, [(lora, 0.6)], tmp_path, family="flux2")


def test_sharded_base_and_sharded_output_load_in_diffusers(tmp_path):
    import diffusers

    base = write_model(tmp_path / "sharded", FLUX1_TINY, shards=3)
    lora = peft_lora(tmp_path / "a.safetensors", linear_shapes(base))
    result = run(base, [(lora, 1.0)], tmp_path, shard_bytes=400_000)
    out = tmp_path / "out"
    assert len(result.files) > 1 and (out / "diffusion_pytorch_model.safetensors.index.json").exists()
    model = diffusers.FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16)
    ref, _ = reference_fuse(base, [(lora, 1.0)])
    assert_within_one_ulp(dict(model.state_dict()), ref, base)


def test_pipeline_folder_is_accepted(tmp_path):
    root = tmp_path / "pipe"
    write_model(root / "transformer", FLUX1_TINY)
    (root / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    result = run(root, [], tmp_path)
    assert result.files == ["diffusion_pytorch_model.safetensors"]
    manifest = json.loads((tmp_path / "out" / "fluxstudio.json").read_text())
    assert manifest["base"]["variant"] == "FLUX.1 dev" and manifest["loras"] == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_bases(tmp_path, dtype):
    base = write_model(tmp_path / "base", FLUX1_TINY, dtype=dtype)
    lora = peft_lora(tmp_path / "a.safetensors", linear_shapes(base))
    result, _ = check_against_diffusers(base, [(lora, 0.9)], tmp_path)
    assert json.loads((tmp_path / "out" / "fluxstudio.json").read_text())["base"]["dtype"] == str(dtype).removeprefix(
        "torch."
    )
    assert all(t.dtype == torch.bfloat16 for t in load_dir(result.output_dir).values())


def test_text_encoder_parts_are_reported_not_fused(tiny_base, tmp_path):
    extra = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 768),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(768, 4),
    }
    lora = peft_lora(tmp_path / "te.safetensors", linear_shapes(tiny_base), extra=extra)
    result = run(tiny_base, [(lora, 1.0)], tmp_path)
    assert any(
        "CLIP-L parts were not fused: the diffusers format holds the transformer only" in n for n in result.notes
    )
