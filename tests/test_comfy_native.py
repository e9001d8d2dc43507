"""ComfyUI's native quantized checkpoints (`comfy_quant`), made with comfy-kitchen: bit for bit what comfy-kitchen
makes of the fused float32 weights, in the layout ComfyUI's loader reads (pinned below against its source), on
FLUX.1 and FLUX.2, widened and padded bases and shapes that need padding; the LoRA they keep; and files fitted to a
size, whose layers mix the precisions a generation of cards multiplies natively."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import FLUX1_TINY, FLUX1_WIDE, FLUX2_TINY, linear_shapes, peft_lora, write_model
from safetensors import safe_open
from safetensors.torch import load_file

from fluxstudio import cli
from fluxstudio.engine.fuse import execute, plan_tensors
from fluxstudio.engine.lora import load_lora
from fluxstudio.engine.models import open_base
from fluxstudio.errors import BadInputError
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.formats import FORMATS
from fluxstudio.formats.bfl import layout

PRECISIONS = ("fp8", "nvfp4", "mxfp8", "int8", "int8-convrot")

# What ComfyUI's loader expects, read in its source:
# - comfy/quant_ops.py, QUANT_ALGOS: each format's comfy-kitchen layout and its storage dtype;
# - comfy/ops.py, MixedPrecisionOps.Linear._load_from_state_dict: `L.comfy_quant` is read with
#   json.loads(tensor.numpy().tobytes()); fp8 takes `weight_scale`; nvfp4 `weight_scale_2` (the tensor scale) and
#   `weight_scale` viewed as float8_e4m3fn (the block scales); mxfp8 `weight_scale` "E8M0 block scales stored as
#   uint8 in safetensors", viewed as float8_e8m0fnu; int8_tensorwise `weight_scale` (per row) and the config's
#   "convrot" / "convrot_groupsize"; every Params gets orig_shape=(out_features, in_features);
# - its state_dict (and _quantized_weight_state_dict) writes the marker as
#   torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8);
# - comfy/utils.py, convert_old_quants: the header's `_quantization_metadata` ({"format_version": "1.0",
#   "layers": {L: conf}}) gives each layer L its `L.comfy_quant`.
LAYOUTS = {
    "float8_e4m3fn": "TensorCoreFP8Layout",
    "nvfp4": "TensorCoreNVFP4Layout",
    "mxfp8": "TensorCoreMXFP8Layout",
    "int8_tensorwise": "TensorWiseINT8Layout",
}
CONFIGS = {
    "fp8": {"format": "float8_e4m3fn"},
    "nvfp4": {"format": "nvfp4"},
    "mxfp8": {"format": "mxfp8"},
    "int8": {"format": "int8_tensorwise"},
    "int8-convrot": {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256},
}
F8, U8, I8, F32 = torch.float8_e4m3fn, torch.uint8, torch.int8, torch.float32
KEPT_BF16 = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def up(n: int, m: int) -> int:
    return -(-n // m) * m


def stored_shapes(precision: str, out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each stored tensor's shape and dtype beside `weight`, as comfy-kitchen's layouts pad and swizzle them."""
    if precision == "fp8":
        return {"weight": ((out, inp), F8), "weight_scale": ((), F32)}
    if precision == "nvfp4":  # padded to 16 x 16; block scales in 128-row x 4-column tiles
        rows, cols = up(out, 16), up(inp, 16)
        return {
            "weight": ((rows, cols // 2), U8),
            "weight_scale": ((up(rows, 128), up(cols // 16, 4)), F8),
            "weight_scale_2": ((), F32),
        }
    if precision == "mxfp8":  # padded to 32 x 32
        rows, cols = up(out, 32), up(inp, 32)
        return {"weight": ((rows, cols), F8), "weight_scale": ((up(rows, 128), up(cols // 32, 4)), U8)}
    return {"weight": ((out, inp), I8), "weight_scale": ((out, 1), F32)}


def comfy_weights(path, only: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every quantized Linear's weight (or those named in `only`) as ComfyUI rebuilds it from the file, dequantized by
    comfy-kitchen (with the padding, which ComfyUI cuts off at the module's own shape)."""
    from comfy_kitchen import tensor as ck

    sd = load_file(str(path))
    out = {}
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        p = key[: -len("comfy_quant")]
        if only and p + "weight" not in only:
            continue
        conf = json.loads(sd[key].numpy().tobytes())
        name = LAYOUTS[conf["format"]]
        cls, q = ck.get_layout_class(name), sd[p + "weight"]
        common = {"orig_dtype": torch.float32, "orig_shape": _stored_shape(name, q)}
        if name == "TensorCoreFP8Layout":
            params = cls.Params(scale=sd[p + "weight_scale"], **common)
        elif name == "TensorCoreNVFP4Layout":
            params = cls.Params(scale=sd[p + "weight_scale_2"], block_scale=sd[p + "weight_scale"].view(F8), **common)
        elif name == "TensorCoreMXFP8Layout":
            params = cls.Params(scale=sd[p + "weight_scale"].view(torch.float8_e8m0fnu), **common)
        else:
            params = cls.Params(
                scale=sd[p + "weight_scale"],
                convrot=conf.get("convrot", False),
                convrot_groupsize=conf.get("convrot_groupsize", 256),
                **common,
            )
        out[p + "weight"] = ck.QuantizedTensor(q, name, params).dequantize()
    return out


def _stored_shape(layout_name: str, q: torch.Tensor) -> tuple[int, int]:
    rows, cols = q.shape
    return (rows, cols * 2) if layout_name == "TensorCoreNVFP4Layout" else (rows, cols)


def fused_fp32(base, lora, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The engine's fused float32 sums under BFL names (q|k|v and linear1 concatenated as BFL keeps them): the
    weights every quantization of this test starts from."""
    model = open_base(base)
    plan = plan_tensors(model, [(load_lora(lora, model.family), scale)])
    sums: dict[str, torch.Tensor] = {}
    execute(plan.jobs, lambda name, t: {name: t.float().clone()}, sums.__setitem__)
    return {g.name: torch.cat([sums[p] for p in g.parts]) for g in layout(model.family.key, list(sums))}


def ck_reference(precision: str, weight: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """comfy-kitchen's quantization of the whole weight at once, serialized as ComfyUI serializes it."""
    from comfy_kitchen import tensor as ck

    layout_name = LAYOUTS[CONFIGS[precision]["format"]]
    cls = ck.get_layout_class(layout_name)
    if precision.startswith("int8"):
        q, params = cls.quantize(weight, per_channel=True, convrot=precision == "int8-convrot", convrot_groupsize=256)
    elif precision == "mxfp8":
        q, params = cls.quantize(weight)
    else:
        q, params = cls.quantize(weight, scale="recalculate")
    sd = ck.QuantizedTensor(q, layout_name, params).state_dict(key)
    return {k: v.view(U8) if v.dtype == torch.float8_e8m0fnu else v for k, v in sd.items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(U8), b.reshape(-1).view(U8))


def quantized_layers(sd: dict[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".comfy_quant")] for k in sd if k.endswith(".comfy_quant")}


def make(base, lora, out, precision, scale=1.0):
    loras = (LoraRef(str(lora), scale),) if lora else ()
    return build(BuildRequest(str(base), loras, precision, out, format="comfyui"))


@pytest.fixture(scope="module")
def typical(wide_base, tmp_path_factory):
    """A typical LoRA on the width-3072 model (|ΔW| about 2% of |W|), its comfy_quant builds at every precision,
    and the fused float32 weights they were made from."""
    tmp = tmp_path_factory.mktemp("comfy")
    lora = peft_lora(tmp / "lora.safetensors", linear_shapes(wide_base), strength=0.02)
    builds = {p: make(wide_base, lora, tmp / f"w-{p}", p) for p in PRECISIONS}
    return lora, builds, fused_fp32(wide_base, lora)


def test_every_precision_is_comfy_kitchens_quantization_of_the_fused_fp32_weights_bit_for_bit(typical):
    _, builds, fused = typical
    for precision, result in builds.items():
        sd = load_file(result.output_dir)
        layers = quantized_layers(sd)
        # the double block's 5 Linears per stream, the single block's linear1, linear2 and modulation
        assert len(layers) == 13, (precision, sorted(layers))
        read_back = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
        seen = comfy_weights(result.output_dir, read_back)
        for layer in layers:
            key = layer + ".weight"
            ref = ck_reference(precision, fused[key], key)
            for name, want in ref.items():
                assert same(sd[name], want), (precision, name)  # the bytes themselves
        for key in read_back:  # and what ComfyUI rebuilds from them is what the retention score read back
            codec = FORMATS["comfyui"].option(precision)
            rows = codec.rows(key, sd, tuple(fused[key].shape))(0, fused[key].shape[0])
            assert torch.equal(rows, seen[key].float()), (precision, key)


def test_the_layout_is_the_one_comfyui_reads(typical, wide_base):
    """Keys, dtypes, shapes, each `.comfy_quant`, the header, and what stays bf16: against the facts read in
    comfy/ops.py, comfy/quant_ops.py and comfy/utils.py (listed at the top of this file)."""
    _, builds, fused = typical
    for precision, result in builds.items():
        with safe_open(result.output_dir, "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        sd = load_file(result.output_dir)
        assert not any(k.startswith("model.diffusion_model.") for k in keys) and "scaled_fp8" not in keys
        header = json.loads(meta["_quantization_metadata"])
        layers = quantized_layers(sd)
        assert header["format_version"] == "1.0" and set(header["layers"]) == layers
        for layer in layers:
            conf = CONFIGS[precision]
            assert header["layers"][layer] == conf
            assert bytes(sd[layer + ".comfy_quant"].tolist()) == json.dumps(conf).encode("utf-8")
            assert sd[layer + ".comfy_quant"].dtype == U8
            want = stored_shapes(precision, *fused[layer + ".weight"].shape)
            got = {k[len(layer) + 1 :]: v for k, v in sd.items() if k.startswith(layer + ".") and "bias" not in k}
            assert set(got) == set(want) | {"comfy_quant"}, (precision, layer, sorted(got))
            for name, (shape, dtype) in want.items():
                assert (tuple(got[name].shape), got[name].dtype) == (shape, dtype), (precision, layer, name)
        for k, v in sd.items():
            if k.endswith(".comfy_quant") or any(k.startswith(layer + ".weight") for layer in layers):
                continue
            assert v.dtype == torch.bfloat16, (precision, k, v.dtype)  # biases, norms, 1-D tensors, kept layers
        for prefix in KEPT_BF16:
            kept = [k for k in sd if k.startswith(prefix) and k.endswith(".weight")]
            assert kept and not any(k[: -len(".weight")] in layers for k in kept), (precision, prefix)
        manifest = json.loads(meta["fluxstudio"])
        assert manifest["format"] == "comfyui" and manifest["precision"] == precision


def test_retention_of_a_typical_lora_and_a_requantized_base_that_loses_it(typical):
    _, builds, _ = typical
    floors = {"fp8": 0.98, "mxfp8": 0.98, "int8": 0.98, "int8-convrot": 0.98, "nvfp4": 0.97}
    scores = {p: r.lora_retained for p, r in builds.items()}
    for precision, result in builds.items():
        assert floors[precision] <= result.lora_retained <= 1.05, scores
        assert not any(n.startswith("Warning") for n in result.notes)
        with safe_open(result.output_dir, "pt") as f:
            saved = json.loads(f.metadata()["fluxstudio"])
        assert saved["lora_retained"] == result.lora_retained and len(saved["lora_retained_worst"]) == 5
    print("retention:", scores)

    # The trap, on one FLUX-sized weight: a base downloaded as NVFP4 (back to bf16 values), the LoRA fused into it
    # and quantized again, against fusing into the full-precision base first. Retention as the build scores it:
    # <stored - base, ΔW> / |ΔW|².
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3072, 3072, generator=g) * 0.02
    delta = (torch.randn(3072, 16, generator=g) * 0.0056) @ (torch.randn(16, 3072, generator=g) / 3072**0.5)  # 2%
    codec = FORMATS["comfyui"].option("nvfp4")

    def stored(t: torch.Tensor) -> torch.Tensor:
        return codec.rows("L.weight", codec.encode("L.weight", t), tuple(t.shape))(0, t.shape[0])

    def kept(base: torch.Tensor) -> float:
        return float(((stored(base + delta) - base) * delta).sum() / (delta * delta).sum())

    first, again = kept(w), kept(stored(w))
    print(f"one weight, NVFP4: fused first {first:.3f}, into a requantized base {again:.3f}")
    assert first > 0.9 and again < 0.6


def test_flux2_keeps_its_stream_modulations_in_bf16(tmp_path):
    base = write_model(tmp_path / "base", FLUX2_TINY, "Flux2Transformer2DModel")
    lora = peft_lora(tmp_path / "l.safetensors", linear_shapes(base, ("attn.to_", "ff.linear", "to_qkv_mlp_proj")))
    fused = fused_fp32(base, lora)
    for precision in ("fp8", "nvfp4"):
        result = make(base, lora, tmp_path / f"f2-{precision}", precision)
        sd = load_file(result.output_dir)
        layers = quantized_layers(sd)
        for mod in (
            "double_stream_modulation_img.lin",
            "double_stream_modulation_txt.lin",
            "single_stream_modulation.lin",
        ):
            assert sd[mod + ".weight"].dtype == torch.bfloat16 and mod not in layers
        assert "double_blocks.0.img_attn.qkv" in layers and "single_blocks.0.linear1" in layers
        for layer in layers:
            ref = ck_reference(precision, fused[layer + ".weight"], layer + ".weight")
            assert all(same(sd[k], v) for k, v in ref.items()), layer


def test_widened_control_and_padded_fill_bases(wide_base, tmp_path):
    shapes = dict(linear_shapes(wide_base), x_embedder=(3072, 128))  # a Control LoRA: 64 -> 128 input channels
    lora = peft_lora(tmp_path / "control.safetensors", shapes)
    result = make(wide_base, lora, tmp_path / "w-control", "mxfp8")
    assert any("widened 64→128" in n for n in result.notes)
    sd = load_file(result.output_dir)
    assert sd["img_in.weight"].shape == (3072, 128) and sd["img_in.weight"].dtype == torch.bfloat16
    assert "img_in.comfy_quant" not in sd

    fill = write_model(tmp_path / "fill", dict(FLUX1_WIDE, in_channels=384, num_single_layers=0))
    shapes = dict(linear_shapes(fill), x_embedder=(3072, 64))  # Turbo-Alpha-shaped: 64 inputs on Fill's 384
    lora = peft_lora(tmp_path / "turbo.safetensors", shapes)
    result = make(fill, lora, tmp_path / "fill-fp8", "fp8")
    assert any("zero-padded 64→384" in n for n in result.notes)
    sd = load_file(result.output_dir)
    assert sd["img_in.weight"].shape == (3072, 384) and sd["img_in.weight"].dtype == torch.bfloat16
    fused = fused_fp32(fill, lora)
    for layer in quantized_layers(sd):
        ref = ck_reference("fp8", fused[layer + ".weight"], layer + ".weight")
        assert all(same(sd[k], v) for k, v in ref.items()), layer


# A width (24) that no 16 or 32 divides: NVFP4 and MXFP8 pad every Linear, ConvRot's groups of 256 do not fit
ODD = dict(FLUX1_TINY, attention_head_dim=24, num_attention_heads=1, axes_dims_rope=[8, 8, 8], joint_attention_dim=40)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_shapes_that_need_padding(tmp_path, precision):
    base = write_model(tmp_path / "base", ODD)
    lora = peft_lora(tmp_path / "l.safetensors", linear_shapes(base), strength=0.02)
    result = make(base, lora, tmp_path / "odd", precision)
    sd, fused = load_file(result.output_dir), fused_fp32(base, lora)
    layers = quantized_layers(sd)
    assert "single_blocks.0.linear1" in layers  # 3 x 24 + 96 = 168 rows of 24 inputs
    seen = comfy_weights(result.output_dir)
    for layer in layers:
        key = layer + ".weight"
        out, inp = fused[key].shape
        used = "int8" if precision == "int8-convrot" else precision  # no group of 256 fits 24 inputs
        for name, (shape, dtype) in stored_shapes(used, out, inp).items():
            assert (tuple(sd[f"{layer}.{name}"].shape), sd[f"{layer}.{name}"].dtype) == (shape, dtype), (layer, name)
        ref = ck_reference(used, fused[key], key)
        assert all(same(sd[k], v) for k, v in ref.items()), layer
        # ComfyUI cuts the padding off at the module's shape; so does the score
        codec = FORMATS["comfyui"].option(used)
        rows = codec.rows(key, sd, (out, inp))(0, out)
        assert rows.shape == (out, inp) and torch.equal(rows, seen[key].float()[:out, :inp]), layer
    if precision == "int8-convrot":
        assert any("not a multiple of 256" in n and "stored as plain INT8" in n for n in result.notes)
        header = json.loads(safe_open(result.output_dir, "pt").metadata()["_quantization_metadata"])
        assert {json.dumps(c) for c in header["layers"].values()} == {json.dumps(CONFIGS["int8"])}
    assert 0.9 < result.lora_retained <= 1.05, result.lora_retained


def test_chunked_quantization_equals_the_whole_tensor_across_tile_boundaries():
    """Rows are quantized 1024 at a time with the whole tensor's scale: the bytes equal one call on the whole."""
    from fluxstudio.quant import comfy

    g = torch.Generator().manual_seed(3)
    for shape in ((2050, 96), (1100, 200), (3072, 64)):
        w = torch.randn(shape, generator=g) * 0.02
        w[7, 3] = 0.9  # one outlier sets the tensor scale of fp8 / NVFP4
        for precision in PRECISIONS:
            codec = FORMATS["comfyui"].option(precision)
            if not codec.fits(shape):
                continue
            ours = codec.encode("L.weight", w)
            ref = ck_reference(precision, w, "L.weight")
            assert all(same(ours[k], v) for k, v in ref.items()), (precision, shape)
            assert bytes(ours["L.comfy_quant"].tolist()) == json.dumps(CONFIGS[precision]).encode()
            rows = codec.rows("L.weight", ours, shape)
            whole = rows(0, shape[0])
            parts = torch.cat([rows(a, min(a + 300, shape[0])) for a in range(0, shape[0], 300)])
            assert torch.equal(whole, parts) and whole.shape == shape
            assert codec.nbytes(shape) == sum(v.numel() * v.element_size() for v in ours.values()), precision
    assert math.isclose(comfy.NVFP4.bytes_per_param, 0.5625)


def test_the_diffusers_preview_reads_comfy_fp8_as_bfl_fp8r_and_the_rest_dequantized(typical, wide_base):
    from diffusers.quantizers.bfl.utils import BFLFP8RLinear

    _, builds, _ = typical
    fmt = FORMATS["comfyui"]
    fp8 = fmt.load_transformer(builds["fp8"].output_dir, wide_base)
    assert isinstance(fp8.transformer_blocks[0].attn.to_q, BFLFP8RLinear)
    nvfp4 = fmt.load_transformer(builds["nvfp4"].output_dir, wide_base)
    assert isinstance(nvfp4.transformer_blocks[0].attn.to_q, torch.nn.Linear)
    assert nvfp4.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    # the values are the file's: q of the double block is the first third of its qkv
    seen = comfy_weights(builds["nvfp4"].output_dir)["double_blocks.0.img_attn.qkv.weight"]
    q = nvfp4.transformer_blocks[0].attn.to_q.weight
    assert torch.equal(q, seen[: q.shape[0]].to(torch.bfloat16))


def test_the_legacy_scaled_fp8_file_asks_comfyui_for_full_precision_because_it_has_no_input_scales(tmp_path):
    """Why the older scaled-fp8 file keeps its 2-element `scaled_fp8` marker while the comfy_quant fp8 file asks for
    nothing, from the loaders' own code:
    - comfy/utils.py, convert_old_quants: a marker of 2 elements -> `"full_precision_matrix_mult": true` on every
      layer; any other size -> fp8 matmul allowed;
    - ComfyUI's mixed-precision Linear (comfy/ops.py, forward) quantizes a layer's input with
      `QuantizedTensor.from_float(input, layout, scale=input_scale)`, and comfy-kitchen's TensorCoreFP8Layout.quantize
      takes amax/448 of the activation itself when that scale is None: a dynamic scale, right without input scales;
    - ComfyUI before its mixed-precision ops (comfy/ops.py, scaled_fp8_ops' fp8_linear) and Forge
      (backend/operations.py, fp8_linear) cast an input without `scale_input` to fp8 with scale 1 after clamping it
      to ±448: FLUX's large activations would be cut off. The legacy file is for those runtimes, so it keeps the
      marker that turns their fp8 matmul off; ComfyUI's own fp8 file is the one that multiplies in fp8."""
    from comfy_kitchen.tensor import TensorCoreFP8Layout

    from fluxstudio.quant.plain import SCALED_FP8

    assert SCALED_FP8.file_markers()["scaled_fp8"].numel() == 2
    assert FORMATS["comfyui"].option("fp8").config == {"format": "float8_e4m3fn"}  # no full-precision flag

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.02
    x = torch.randn(64, 512, generator=g)
    x[3] *= 900  # one token with FLUX-sized activations (thousands)
    exact = x @ w.T
    q, params = TensorCoreFP8Layout.quantize(w)
    wq = TensorCoreFP8Layout.dequantize(q, params)

    def error(xq: torch.Tensor) -> float:
        return float((xq @ wq.T - exact).norm() / exact.norm())

    xq, xparams = TensorCoreFP8Layout.quantize(x)  # ComfyUI's mixed-precision path: scale from the activation
    dynamic = error(TensorCoreFP8Layout.dequantize(xq, xparams))
    clamped = error(x.clamp(-448, 448).to(torch.float8_e4m3fn).float())  # scale 1, clamped: the older fp8 matmul
    assert dynamic < 0.05 and clamped > 0.5, (dynamic, clamped)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", PRECISIONS)
def test_on_cuda_the_bytes_are_comfy_kitchens_cuda_quantization_and_the_cpus(precision):
    """A build on a GPU quantizes with comfy-kitchen's CUDA backend: chunked as on the CPU, bit for bit its
    quantization of the whole tensor, and the same bytes as the CPU's eager backend in at least 99.9% of values."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3072, 4096, generator=g) * 0.02
    w[11, 7] = 0.7
    codec = FORMATS["comfyui"].option(precision)
    cuda = codec.encode("L.weight", w.cuda())
    ref = ck_reference(precision, w.cuda(), "L.weight")
    assert all(same(cuda[k], v.cpu()) for k, v in ref.items()), precision
    cpu = codec.encode("L.weight", w)
    assert set(cpu) == set(cuda)
    for k in cpu:
        a, b = cpu[k].reshape(-1).view(U8), cuda[k].reshape(-1).view(U8)
        assert a.shape == b.shape and (a == b).float().mean().item() >= 0.999, (precision, k)


@pytest.mark.gpu
def test_a_build_on_cuda_keeps_the_lora(typical, wide_base, tmp_path):
    lora, builds, _ = typical
    for precision in PRECISIONS:
        loras = (LoraRef(str(lora), 1.0),)
        result = build(BuildRequest(str(wide_base), loras, precision, tmp_path / precision, "comfyui", device="cuda"))
        assert abs(result.lora_retained - builds[precision].lora_retained) < 0.01, precision


def test_a_file_fitted_for_rtx_50_mixes_precisions_per_layer_as_comfyui_reads_them(typical, wide_base, tmp_path):
    """Fitted for RTX 50 (NVFP4, fp8, MXFP8 and bf16) to a tenth more than the uniform fp8 file: each layer carries
    its own config and layout, the file fits, and it has less error than fp8 by the fit's measure (engine/fit.py)."""
    lora, builds, _ = typical
    budget = int(builds["fp8"].output_bytes * 1.1)
    out = tmp_path / "fit.safetensors"
    result = build(
        BuildRequest(str(wide_base), (LoraRef(str(lora)),), "fit-nvfp4", out, format="comfyui", fit_bytes=budget)
    )
    mix = result.fit
    print("\n".join(f"{k}: {v}" for k, v in mix["types"].items()), mix["error"], mix["presets"])
    assert out.stat().st_size <= budget and result.precision == "fit-nvfp4"
    assert len(mix["types"]) >= 2 and set(mix["types"]) <= {"nvfp4", "fp8", "mxfp8", "bf16"}
    assert mix["error"] < mix["presets"]["fp8"]["error"]
    assert result.lora_retained is not None and result.lora_retained >= builds["fp8"].lora_retained
    with safe_open(str(out), "pt") as f:
        header = json.loads(f.metadata()["_quantization_metadata"])
    sd = load_file(str(out))
    layers = quantized_layers(sd)
    assert set(header["layers"]) == layers
    by_config = {json.dumps(c, sort_keys=True): p for p, c in CONFIGS.items() if p != "int8-convrot"}
    seen = set()
    for layer in layers:
        precision = by_config[json.dumps(header["layers"][layer], sort_keys=True)]
        assert bytes(sd[layer + ".comfy_quant"].tolist()) == json.dumps(CONFIGS[precision]).encode("utf-8")
        for name, (shape, dtype) in stored_shapes(precision, *sd[layer + ".weight"].shape).items():
            if name != "weight":  # (the weight's own stored shape is what the padding made)
                assert (tuple(sd[f"{layer}.{name}"].shape), sd[f"{layer}.{name}"].dtype) == (shape, dtype)
        seen.add(precision)
    assert seen | ({"bf16"} & set(mix["types"])) == set(mix["types"])  # the header holds the mix
    for name in (k for k in sd if k.endswith(".weight") and k[: -len(".weight")] not in layers):
        assert sd[name].dtype == torch.bfloat16
    FORMATS["comfyui"].load_transformer(out, wide_base)  # the preview reads the mix (comfy-kitchen dequantizes)


def test_a_fitted_file_below_its_smallest_precision_is_one_sentence_and_no_file(wide_base, tmp_path, capsys):
    out = tmp_path / "outputs" / "small.safetensors"
    with pytest.raises(BadInputError) as small:
        build(BuildRequest(str(wide_base), (), "fit-int8", out, format="comfyui", fit_bytes=10**6))
    assert small.value.message.count(". ") == 0 and "even int8 for every weight" in small.value.message
    assert "GGUF" in small.value.hint
    code = cli.main(
        [
            "fuse",
            "--base",
            str(wide_base),
            "--format",
            "comfyui",
            "--precision",
            "fit-fp8",
            "--fit",
            "1MB",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "even fp8 for every weight" in err and "Traceback" not in err
    assert not out.parent.exists() or not list(out.parent.iterdir())
