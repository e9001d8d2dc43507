"""One-file outputs for ComfyUI, Forge and GGUF loaders: BFL keys that diffusers' own converters read back exactly,
fp8 / scaled fp8 / NF4 layouts, GGUF files that the gguf package and diffusers load, and their bad inputs."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from helpers import (
    FLUX1_TINY,
    FLUX1_WIDE,
    FLUX2_TINY,
    flux1_inputs,
    linear_shapes,
    load_dir,
    peft_lora,
    relative_error,
    write_model,
)
from safetensors import safe_open
from safetensors.torch import load_file

from fluxstudio import formats
from fluxstudio.errors import BadInputError, OutputError
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.formats.bfl import SWAPPED
from fluxstudio.quant import ggml


def make(base, loras, out, precision, fmt, **kw):
    return build(BuildRequest(str(base), tuple(LoraRef(str(p), s) for p, s in loras), precision, out, format=fmt, **kw))


@pytest.fixture(scope="session")
def fill_base(tmp_path_factory):
    """A width-3072 FLUX.1 Fill (384 input channels), one block of each kind."""
    return write_model(tmp_path_factory.mktemp("fill") / "base", dict(FLUX1_WIDE, in_channels=384))


@pytest.fixture(scope="session")
def wide_lora(wide_base, tmp_path_factory):
    return peft_lora(tmp_path_factory.mktemp("wl") / "lora.safetensors", linear_shapes(wide_base))


@pytest.fixture(scope="session")
def wide_folder(wide_base, wide_lora, tmp_path_factory):
    """The bf16 diffusers folder of the fused wide model: the reference every one-file output is compared with."""
    out = tmp_path_factory.mktemp("wf") / "bf16"
    make(wide_base, [(wide_lora, 0.8)], out, "bf16", "diffusers")
    return out


def from_single_file(path, folder, cls="FluxTransformer2DModel", **kw):
    import diffusers

    return getattr(diffusers, cls).from_single_file(str(path), config=str(folder), torch_dtype=torch.bfloat16, **kw)


def assert_round_trip(single, folder, cls="FluxTransformer2DModel"):
    loaded = from_single_file(single, folder, cls).state_dict()
    ref = load_dir(folder)
    assert set(loaded) == set(ref), sorted(set(loaded) ^ set(ref))[:5]
    for k, v in ref.items():
        assert loaded[k].shape == v.shape and torch.equal(loaded[k], v), k


def test_bf16_single_file_round_trips_through_diffusers(wide_base, wide_lora, wide_folder, tmp_path):
    r = make(wide_base, [(wide_lora, 0.8)], tmp_path / "flux-fused", "bf16", "single-file")
    single = tmp_path / "flux-fused.safetensors"
    assert r.output_dir == str(single) and single.is_file() and r.format == "single-file"
    assert_round_trip(single, wide_folder)
    with safe_open(str(single), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert (
        "double_blocks.0.img_attn.norm.key_norm.scale" in keys and "img_in.weight" in keys
    )  # ComfyUI's FLUX detection
    assert "single_blocks.0.linear1.weight" in keys
    manifest = json.loads(meta["fluxstudio"])
    assert manifest["format"] == "single-file" and manifest["precision"] == "bf16"
    assert manifest["loras"][0]["scale"] == 0.8 and len(manifest["loras"][0]["sha256"]) == 64
    assert not list(tmp_path.glob(".*partial*"))


def test_final_layer_halves_and_qkv_order_are_bfl(wide_folder, tmp_path, wide_base):
    """Key names alone cannot catch a swapped modulation or a q/k/v mix-up (both load silently): check values."""
    make(wide_base, [], tmp_path / "plain", "bf16", "single-file")
    bfl = load_file(str(tmp_path / "plain.safetensors"))
    ref = load_dir(wide_base)
    shift_scale = bfl[f"{SWAPPED}.weight"]
    scale, shift = ref["norm_out.linear.weight"].chunk(2)
    assert torch.equal(shift_scale, torch.cat([shift, scale]))
    q, k, v, mlp = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    parts = [ref[f"single_transformer_blocks.0.{m}.weight"] for m in (q, k, v, mlp)]
    assert torch.equal(bfl["single_blocks.0.linear1.weight"], torch.cat(parts))


def test_widened_control_base_round_trips(wide_base, tmp_path):
    shapes = dict(linear_shapes(wide_base), x_embedder=(3072, 128))  # a Control LoRA: 64 -> 128 input channels
    lora = peft_lora(tmp_path / "control.safetensors", shapes)
    make(wide_base, [(lora, 1.0)], tmp_path / "folder", "bf16", "diffusers")
    r = make(wide_base, [(lora, 1.0)], tmp_path / "fused-control.safetensors", "bf16", "single-file")
    assert any("widened 64→128" in n for n in r.notes)
    assert_round_trip(tmp_path / "fused-control.safetensors", tmp_path / "folder")


@pytest.mark.slow
def test_padded_fill_base_round_trips(fill_base, tmp_path):
    shapes = dict(linear_shapes(fill_base), x_embedder=(3072, 64))  # Turbo-Alpha-shaped: 64 inputs on Fill's 384
    lora = peft_lora(tmp_path / "turbo.safetensors", shapes)
    make(fill_base, [(lora, 1.0)], tmp_path / "folder", "bf16", "diffusers")
    r = make(fill_base, [(lora, 1.0)], tmp_path / "fill", "bf16", "single-file")
    assert any("zero-padded 64→384" in n for n in r.notes)
    assert_round_trip(tmp_path / "fill.safetensors", tmp_path / "folder")


def test_flux2_round_trips(tmp_path):
    base = write_model(tmp_path / "base", FLUX2_TINY, "Flux2Transformer2DModel")
    lora = peft_lora(tmp_path / "l.safetensors", linear_shapes(base, ("attn.to_", "ff.linear", "to_qkv_mlp_proj")))
    make(base, [(lora, 1.0)], tmp_path / "folder", "bf16", "diffusers")
    make(base, [(lora, 1.0)], tmp_path / "f2", "bf16", "single-file")
    keys = set(load_file(str(tmp_path / "f2.safetensors")))
    assert "double_stream_modulation_img.lin.weight" in keys  # ComfyUI's FLUX.2 detection
    assert_round_trip(tmp_path / "f2.safetensors", tmp_path / "folder", "Flux2Transformer2DModel")


def _forward(model, config):
    with torch.no_grad():
        return model(**flux1_inputs(config))[0]


def _reference(folder):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16)
    return _forward(model, dict(model.config))


def _comfy_scaled_fp8(path):
    """What ComfyUI and Forge compute from a scaled fp8 file: weight = fp8 × scale_weight, under BFL names."""
    sd = load_file(str(path))
    marker = sd.pop("scaled_fp8")
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 2
    out = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight"):
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight")
        if scale is not None:
            assert v.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.numel() == 1
            v = v.float() * scale
        out[k] = v.to(torch.bfloat16)
    return out


def test_fp8_and_scaled_fp8_run_close_to_bf16(wide_base, wide_lora, wide_folder, tmp_path):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    ref = _reference(wide_folder)
    config = dict(FluxTransformer2DModel.load_config(str(wide_folder)))
    make(wide_base, [(wide_lora, 0.8)], tmp_path / "p.safetensors", "fp8", "single-file")
    plain = from_single_file(tmp_path / "p.safetensors", wide_folder)
    err_plain = relative_error(_forward(plain, config), ref)

    make(wide_base, [(wide_lora, 0.8)], tmp_path / "s.safetensors", "fp8-scaled", "single-file")
    model = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
    model.load_state_dict(
        convert_flux_transformer_checkpoint_to_diffusers(_comfy_scaled_fp8(tmp_path / "s.safetensors"))
    )
    err_scaled = relative_error(_forward(model, config), ref)
    assert err_plain < 0.08 and err_scaled < 0.08, (err_plain, err_scaled)
    # weights of std 0.02 sit in fp8's subnormal range: the per-tensor scale moves them back into its normal range
    assert err_scaled < err_plain


def test_nf4_single_file_is_forges_layout(wide_base, wide_lora, tmp_path):
    make(wide_base, [(wide_lora, 0.8)], tmp_path / "folder", "nf4", "diffusers")
    make(wide_base, [(wide_lora, 0.8)], tmp_path / "n.safetensors", "nf4", "single-file")
    sd, folder = load_file(str(tmp_path / "n.safetensors")), load_dir(tmp_path / "folder")
    p = ""
    assert any("bitsandbytes__nf4" in k for k in sd)  # how Forge recognises NF4
    for suffix in ("", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"):
        assert f"{p}double_blocks.0.img_attn.qkv.weight{suffix}" in sd
    assert torch.equal(sd[f"{p}double_blocks.0.img_mod.lin.weight"], folder["transformer_blocks.0.norm1.linear.weight"])
    qkv = [folder[f"transformer_blocks.0.attn.{m}.weight"] for m in ("to_q", "to_k", "to_v")]
    assert torch.equal(sd[f"{p}double_blocks.0.img_attn.qkv.weight"], torch.cat(qkv))
    absmax = [folder[f"transformer_blocks.0.attn.{m}.weight.absmax"] for m in ("to_q", "to_k", "to_v")]
    assert torch.equal(sd[f"{p}double_blocks.0.img_attn.qkv.weight.absmax"], torch.cat(absmax))
    assert sd[f"{p}double_blocks.0.img_attn.norm.query_norm.scale"].dtype == torch.bfloat16


# a forward pass of the random width-3072 model against bf16: what each type's rounding leaves of the output
GGUF_ERRORS = {
    "Q8_0": 0.02,
    "Q5_K_M": 0.1,
    "Q5_1": 0.1,
    "Q4_K_M": 0.2,  # Q4_K, and Q5_K where the mix raises it: Q4_K_S's types too
    "Q4_1": 0.2,
    "IQ4_XS": 0.2,
    "IQ4_NL": 0.2,
    "Q3_K_M": 0.3,  # Q3_K, and Q4_K where the mix raises it: Q3_K_S's types too
    "Q2_K": 0.6,
}


@pytest.mark.parametrize("precision", list(GGUF_ERRORS))
def test_gguf_loads_in_diffusers_and_runs_close_to_bf16(wide_base, wide_lora, wide_folder, tmp_path, precision):
    from diffusers import GGUFQuantizationConfig

    r = make(wide_base, [(wide_lora, 0.8)], tmp_path / "g", precision, "gguf")
    path = tmp_path / "g.gguf"
    assert r.output_dir == str(path) and path.stat().st_size == r.output_bytes + _gguf_overhead(path)
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "flux"
    assert json.loads(bytes(reader.fields["fluxstudio"].parts[-1]).decode())["precision"] == precision
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert (
        types["img_in.weight"] == "F32"
        and types["txt_in.weight"] == "F16"
        and types["single_blocks.0.linear1.bias"] == "F32"
    )
    preset = formats.FORMATS["gguf"].option(precision)
    assert types["single_blocks.0.linear1.weight"] == preset.weights
    # llama.cpp's K-mixes raise the double blocks' qkv weights, and set the file type as llama-quantize does
    assert types["double_blocks.0.img_attn.qkv.weight"] == types["double_blocks.0.txt_attn.qkv.weight"]
    assert types["double_blocks.0.img_attn.qkv.weight"] == (preset.qkv or preset.weights)
    assert reader.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType[f"MOSTLY_{precision}"]
    model = from_single_file(
        path, wide_folder, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
    )
    err = relative_error(_forward(model, dict(model.config)), _reference(wide_folder))
    print(f"{precision}: relative error of the output {err:.4f}")
    assert err < GGUF_ERRORS[precision], err  # random weights are every type's worst case


def _gguf_overhead(path):
    """Header and alignment padding: the file size less the tensor bytes."""
    reader = gguf.GGUFReader(str(path))
    return path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)


def test_gguf_package_reads_every_type(tiny_base, tmp_path):
    """Every GGUF precision: gguf's own dequantize equals ours, and both are close to the fused bf16 weights."""
    wide_rows = write_model(tmp_path / "b256", dict(FLUX1_TINY, attention_head_dim=128))  # rows of 256: K-quants fit
    make(wide_rows, [], tmp_path / "ref", "bf16", "single-file")
    ref = load_file(str(tmp_path / "ref.safetensors"))
    for precision in formats.FORMATS["gguf"].precisions:
        make(wide_rows, [], tmp_path / precision, precision, "gguf")
        reader = gguf.GGUFReader(str(tmp_path / f"{precision}.gguf"))
        assert {t.name for t in reader.tensors} == set(ref)
        for t in reader.tensors:
            theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
            shape = tuple(reversed([int(d) for d in t.shape]))
            assert theirs.reshape(shape).shape == ref[t.name].shape, t.name
            if t.tensor_type.name in ggml.quantized():
                ours = ggml.dequantize(torch.from_numpy(t.data.copy()), t.tensor_type.name, shape)
                assert torch.equal(ours, theirs.reshape(shape)), (precision, t.name)
            err = relative_error(theirs.reshape(shape), ref[t.name])
            assert err < {"Q2_K": 0.4, "Q3_K": 0.2}.get(t.tensor_type.name, 0.15), (precision, t.name, err)
            if t.tensor_type.name in ("F32", "F16", "BF16"):
                assert err < 1e-3


def test_rows_that_do_not_fit_k_quants_fall_back_with_a_note(tiny_base, tmp_path):
    r = make(tiny_base, [], tmp_path / "t.gguf", "Q4_K_S", "gguf")  # width 128: rows of 64 and 128
    assert any("not a multiple of 256" in n and "F16" in n for n in r.notes)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors}
    assert "F16" in types.values() and "Q4_K" in types.values() or "F16" in types.values()


def test_bad_format_inputs_get_one_sentence(tiny_base, tmp_path):
    with pytest.raises(BadInputError, match="gguf format has no precision 'nf4'.*offers Q8_0"):
        make(tiny_base, [], tmp_path / "x", "nf4", "gguf")
    with pytest.raises(BadInputError, match="cannot hold a flux3 model"):
        formats.get_format("gguf").check("Q8_0", "flux3")
    with pytest.raises(OutputError, match="ends in .gguf, but a single-file output is a .safetensors file"):
        make(tiny_base, [], tmp_path / "x.gguf", "bf16", "single-file")
    with pytest.raises(BadInputError, match="Unknown output format"):
        make(tiny_base, [], tmp_path / "x", "bf16", "onnx")
    assert formats.output_path("gguf", tmp_path / "name") == tmp_path / "name.gguf"
    assert formats.output_path("single-file", tmp_path / "v1.2") == tmp_path / "v1.2.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # nothing partial, nothing at all


def test_cancel_leaves_no_partial_file(tiny_base, tmp_path):
    from fluxstudio.errors import CancelledError
    from fluxstudio.progress import CancelToken, Run

    token = CancelToken()

    def progress(ev):
        if ev.stage == "fuse" and ev.done >= 3:
            token.cancel()

    with pytest.raises(CancelledError):
        build(BuildRequest(str(tiny_base), (), "Q8_0", tmp_path / "out", format="gguf"), Run(progress, token))
    assert [p.name for p in tmp_path.iterdir()] == ["base"]
