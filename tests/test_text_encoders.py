"""Text-encoder parts of LoRAs (CLIP-L, T5-XXL) and whole-pipeline exports, on the demo pipeline built locally."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import assert_within_one_ulp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxstudio.engine.models import open_encoder
from fluxstudio.errors import BadInputError, LoraMismatchError
from fluxstudio.flows.build import build
from fluxstudio.flows.request import BuildRequest, LoraRef
from fluxstudio.sources import demo

CLIP_MODULES = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1")
T5_MODULES = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wo",
)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return demo.make_flux1_pipeline(tmp_path_factory.mktemp("demo") / "pipeline")


def _pair(g, out_f: int, in_f: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1


def encoder_lora_parts(pipe_dir, seed: int = 0) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module as LoRAs name it) -> (A, B) for a few CLIP-L and T5 modules and one transformer module."""
    g = torch.Generator().manual_seed(seed)
    clip, t5 = open_encoder(pipe_dir, "text_encoder"), open_encoder(pipe_dir, "text_encoder_2")
    parts = {}
    for i in range(2):
        for m in CLIP_MODULES:
            out_f, in_f = clip.tensors[clip.weight_key(f"encoder.layers.{i}.{m}")][1].shape
            parts[("text_encoder", f"text_model.encoder.layers.{i}.{m}")] = _pair(g, out_f, in_f)
        for m in T5_MODULES:
            out_f, in_f = t5.tensors[f"encoder.block.{i}.{m}.weight"][1].shape
            parts[("text_encoder_2", f"encoder.block.{i}.{m}")] = _pair(g, out_f, in_f)
    parts[("transformer", "transformer_blocks.0.attn.to_q")] = _pair(g, 512, 512)
    return parts


def peft_file(path, parts, components=("transformer", "text_encoder", "text_encoder_2")):
    sd = {}
    for (component, module), (a, b) in parts.items():
        if component in components:
            sd[f"{component}.{module}.lora_A.weight"], sd[f"{component}.{module}.lora_B.weight"] = a, b
    save_file(sd, str(path))
    return path


def kohya_file(path, parts, alpha: float = 2.0):
    """The same LoRA as sd-scripts writes it: lora_te1_ (CLIP-L), lora_te3_ (T5), lora_unet_ (transformer)."""
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"}
    sd = {}
    for (component, module), (a, b) in parts.items():
        name = (
            prefixes[component] + module.replace(".", "_")
            if component in prefixes
            else "lora_unet_double_blocks_0_img_attn_qkv"
        )
        if component == "transformer":
            continue
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = a, b
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def export(base, lora, out, precision="bf16", format="pipeline", **kw):
    return build(BuildRequest(str(base), (LoraRef(str(lora), 1.0),), precision, out, format=format, **kw))


def diffusers_reference(pipe_dir, lora_path) -> tuple[dict, dict]:
    """CLIP-L fused by diffusers' own fuse_lora(components=["text_encoder"]), and T5 by peft's merge (the code that
    fuse_lora runs): diffusers' text-encoder loader knows only CLIP's module names, so it cannot load T5 parts.
    Both in fp32, rounded once to bf16 at the end."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    pipe = FluxPipeline.from_pretrained(pipe_dir, dtype=torch.float32)
    sd = load_file(str(lora_path))
    pipe.load_lora_weights({k: v for k, v in sd.items() if k.startswith(("transformer.", "text_encoder."))})
    pipe.fuse_lora(components=["text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    t5_sd = {k.removeprefix("text_encoder_2."): v for k, v in sd.items() if k.startswith("text_encoder_2.")}
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in t5_sd})
    t5 = pipe.text_encoder_2
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), t5)
    set_peft_model_state_dict(t5, t5_sd)
    for module in t5.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    t5_fused = {k.replace(".base_layer", ""): v for k, v in t5.state_dict().items() if "lora_" not in k}
    return (
        {k: v.bfloat16() for k, v in pipe.text_encoder.state_dict().items()},
        {k: v.bfloat16() for k, v in t5_fused.items()},
    )


def component_weights(folder, component) -> dict[str, torch.Tensor]:
    enc = open_encoder(folder, component)
    return {
        enc.canonical(k): v
        for f in sorted((folder / component).glob("*.safetensors"))
        for k, v in load_file(str(f)).items()
    }


def test_text_encoder_fuse_equals_diffusers_fuse_lora(pipe_dir, tmp_path):
    parts = encoder_lora_parts(pipe_dir)
    lora = peft_file(tmp_path / "te.safetensors", parts)
    result = export(pipe_dir, lora, tmp_path / "out")
    assert result.fused_per_component == {"transformer": 1, "text_encoder": 8, "text_encoder_2": 8}
    clip_ref, t5_ref = diffusers_reference(pipe_dir, lora)
    clip_ours, t5_ours = (
        component_weights(tmp_path / "out", "text_encoder"),
        component_weights(tmp_path / "out", "text_encoder_2"),
    )
    for ours, ref, component in ((clip_ours, clip_ref, "text_encoder"), (t5_ours, t5_ref, "text_encoder_2")):
        base = component_weights(pipe_dir, component)
        assert set(ours) <= set(ref)
        changed = [k for k in ours if not torch.equal(ours[k], base[k])]
        assert len(changed) == 8  # exactly the LoRA's modules moved
        assert_within_one_ulp(ours, {k: ref[k] for k in ours}, base)
    data = json.loads((tmp_path / "out" / "fluxstudio.json").read_text())
    assert data["fused_per_component"] == result.fused_per_component
    assert data["loras"][0]["components"] == ["transformer", "text_encoder", "text_encoder_2"]


def test_kohya_te1_and_te3_parts_fuse_like_the_same_lora_in_peft_keys(pipe_dir, tmp_path):
    parts = encoder_lora_parts(pipe_dir, seed=3)
    kohya = kohya_file(tmp_path / "kohya.safetensors", parts, alpha=2.0)
    # the same LoRA with kohya's alpha / rank folded into B, in the keys diffusers' fuse_lora reads
    folded = {key: (a, b * 2.0 / 4) for key, (a, b) in parts.items() if key[0] != "transformer"}
    peft = peft_file(tmp_path / "peft.safetensors", folded)
    export(pipe_dir, kohya, tmp_path / "from-kohya")
    clip_ref, t5_ref = diffusers_reference(pipe_dir, peft)
    for component, ref in (("text_encoder", clip_ref), ("text_encoder_2", t5_ref)):
        ours = component_weights(tmp_path / "from-kohya", component)
        assert_within_one_ulp(ours, {k: ref[k] for k in ours}, component_weights(pipe_dir, component))
        assert any(not torch.equal(ours[k], v) for k, v in component_weights(pipe_dir, component).items())


def test_exported_pipeline_loads_in_one_line_and_generates(pipe_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from diffusers import FluxPipeline

    lora = peft_file(tmp_path / "te.safetensors", encoder_lora_parts(pipe_dir))
    result = export(pipe_dir, lora, tmp_path / "nf4-t5", "fp8", t5_precision="nf4")
    out = tmp_path / "nf4-t5"
    # unchanged components are hard links to the base's files, not copies
    for rel in (
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer_2/tokenizer.json",
        "scheduler/scheduler_config.json",
    ):
        assert os.stat(out / rel).st_ino == os.stat(pipe_dir / rel).st_ino
    assert (
        json.loads((out / "text_encoder_2" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"]
        == "nf4"
    )
    assert "FluxPipeline.from_pretrained" in (out / "README.md").read_text()
    assert result.files == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
    ]

    pipe = FluxPipeline.from_pretrained(out, dtype=torch.bfloat16)  # nothing else: no repo, no extra files
    t5_linears = [m for m in pipe.text_encoder_2.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert (
        len(t5_linears) == 2 * 6
    )  # q, k, v, o, wi_0, wi_1 per block; wo stays in full precision, as transformers keeps it
    image = pipe(
        "a red cat",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1),
        max_sequence_length=32,
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0

    export(pipe_dir, lora, tmp_path / "bf16")
    pipe = FluxPipeline.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    again = pipe(
        "a red cat",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(1),
        max_sequence_length=32,
        output_type="np",
    ).images[0]
    assert again.shape == (64, 64, 3)


def test_a_pipeline_export_without_text_encoder_lora_links_both_encoders(pipe_dir, tmp_path):
    lora = peft_file(tmp_path / "tr.safetensors", encoder_lora_parts(pipe_dir), components=("transformer",))
    result = export(pipe_dir, lora, tmp_path / "out")
    out = tmp_path / "out"
    assert result.fused_per_component == {"transformer": 1}
    for component in ("text_encoder", "text_encoder_2"):
        assert (
            os.stat(out / component / "model.safetensors").st_ino
            == os.stat(pipe_dir / component / "model.safetensors").st_ino
        )


# ComfyUI's CLIP loader (comfy/sd.py detect_te_model, comfy/clip_model.py CLIPTextModel_) reads transformers-4 keys:
# text_model.embeddings.*, text_model.encoder.layers.N.*, text_model.final_layer_norm.*; CLIP-L is recognised by
# "text_model.encoder.layers.0.mlp.fc1.weight" (and T5-XXL by "encoder.block.23.layer.1.DenseReluDense.wi_1.weight").
CLIP_LAYER_KEYS = [
    f"{m}.{p}"
    for m in (
        "layer_norm1",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
        "self_attn.k_proj",
        "self_attn.out_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    )
    for p in ("bias", "weight")
]


def comfy_clip_keys(layers: int) -> list[str]:
    return sorted(
        [
            "text_model.embeddings.position_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
            "text_model.final_layer_norm.bias",
            "text_model.final_layer_norm.weight",
        ]
        + [f"text_model.encoder.layers.{i}.{k}" for i in range(layers) for k in CLIP_LAYER_KEYS]
    )


@pytest.mark.parametrize("format,precision", [("single-file", "fp8-scaled"), ("gguf", "Q8_0")])
def test_one_file_outputs_get_fused_text_encoders_in_comfyui_layout(pipe_dir, tmp_path, format, precision):
    from fluxstudio import library

    lora = peft_file(tmp_path / "te.safetensors", encoder_lora_parts(pipe_dir))
    result = export(pipe_dir, lora, tmp_path / "flux", precision, format)
    clip_file, t5_file = tmp_path / "flux.clip_l.safetensors", tmp_path / "flux.t5xxl_fp8_e4m3fn.safetensors"
    with safe_open(str(clip_file), "pt") as f:
        assert sorted(f.keys()) == comfy_clip_keys(2)
        assert "text_model.encoder.layers.0.mlp.fc1.weight" in f.keys()  # noqa: SIM118 - safe_open has no __contains__
    clip_ref, t5_ref = diffusers_reference(pipe_dir, lora)
    clip = {k.removeprefix("text_model."): v for k, v in load_file(str(clip_file)).items()}
    assert_within_one_ulp(clip, {k: clip_ref[k] for k in clip}, component_weights(pipe_dir, "text_encoder"))

    t5 = load_file(str(t5_file))
    assert sorted(t5) == sorted(
        k for k in t5_ref if k != "encoder.embed_tokens.weight"
    )  # transformers' keys, tied once
    fp8 = sorted(k for k, v in t5.items() if v.dtype == torch.float8_e4m3fn)
    assert fp8 == sorted(
        f"encoder.block.{i}.layer.{j}"
        for i in range(2)
        for j in (
            "0.SelfAttention.q.weight",
            "0.SelfAttention.k.weight",
            "0.SelfAttention.v.weight",
            "0.SelfAttention.o.weight",
            "1.DenseReluDense.wi_0.weight",
            "1.DenseReluDense.wi_1.weight",
        )
    )
    for k in fp8:  # fp8 of the fp32 fused weight, rounded once
        want = t5_ref[k].float().clamp(-448, 448).to(torch.float8_e4m3fn)
        assert (t5[k].float() - want.float()).abs().max() <= want.float().abs().max() * 2**-3

    assert result.files == sorted(
        [clip_file.name, t5_file.name, f"flux{'.gguf' if format == 'gguf' else '.safetensors'}"]
    )
    from fluxstudio.formats import FORMATS

    assert "models/text_encoders/" in FORMATS[format].placement(result.files)
    entry = library.list_outputs(tmp_path)[0]
    assert entry.size_bytes == sum(f.stat().st_size for f in tmp_path.glob("flux*"))
    library.delete_output(tmp_path, entry.name)
    assert not list(tmp_path.glob("flux*"))


def test_the_diffusers_format_says_the_text_encoder_parts_were_not_fused(pipe_dir, tmp_path):
    lora = peft_file(tmp_path / "te.safetensors", encoder_lora_parts(pipe_dir))
    result = export(pipe_dir, lora, tmp_path / "out", format="diffusers")
    assert any("CLIP-L and T5-XXL parts were not fused" in n for n in result.notes)
    assert result.fused_per_component == {"transformer": 1}


def assert_nothing_partial(folder):
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_text_encoder_parts_that_match_nothing_get_one_sentence(pipe_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = _pair(g, 64, 64)
    save_file(
        {
            "text_encoder.text_model.encoder.layers.9.mlp.fc1.lora_A.weight": a,
            "text_encoder.text_model.encoder.layers.9.mlp.fc1.lora_B.weight": b,
        },
        str(tmp_path / "odd.safetensors"),
    )
    out = tmp_path / "outs"
    out.mkdir()
    with pytest.raises(LoraMismatchError, match=r"1 of 1 parts of odd.safetensors match nothing in this CLIP-L"):
        export(pipe_dir, tmp_path / "odd.safetensors", out / "p")
    assert_nothing_partial(out)


def test_an_unknown_t5_layout_gets_one_sentence(pipe_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = _pair(g, 64, 64)
    save_file(
        {
            "lora_te3_encoder_layers_0_attention_query.lora_down.weight": a,
            "lora_te3_encoder_layers_0_attention_query.lora_up.weight": b,
        },
        str(tmp_path / "t5odd.safetensors"),
    )
    with pytest.raises(LoraMismatchError, match=r"T5-XXL part in a layout FluxStudio does not know"):
        export(pipe_dir, tmp_path / "t5odd.safetensors", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_pipeline_needs_the_whole_base_and_a_t5_precision_it_offers(pipe_dir, tmp_path):
    lora = peft_file(tmp_path / "te.safetensors", encoder_lora_parts(pipe_dir), components=("transformer",))
    export(
        pipe_dir / "transformer", lora, tmp_path / "from-subfolder"
    )  # the transformer/ of a pipeline finds its pipeline
    shutil.copytree(pipe_dir / "transformer", tmp_path / "alone")
    with pytest.raises(BadInputError, match="a transformer alone, without the pipeline"):
        export(tmp_path / "alone", lora, tmp_path / "p")
    with pytest.raises(BadInputError, match="The T5 text encoder has no precision 'Q8_0'"):
        export(pipe_dir, lora, tmp_path / "p", t5_precision="Q8_0")
    assert not (tmp_path / "p").exists()


def test_downloads_fetch_only_what_the_output_needs(pipe_dir, tmp_path):
    from fakehub import FakeHub, folder_files

    from fluxstudio.sources.hub import Hub

    files = folder_files(pipe_dir)
    files["flux1-dev.safetensors"] = b"BFL's own single file, which no output needs" * 1000
    fake = FakeHub().start()
    fake.add_repo("acme/flux-pipe", files)
    cache = tmp_path / "hf"
    try:

        def fetched() -> set[str]:
            snap = next((cache / "models--acme--flux-pipe" / "snapshots").iterdir())
            return {str(p.relative_to(snap)).split("/")[0] for p in snap.rglob("*") if p.is_file()}

        def run(lora, out, format, precision):
            return build(
                BuildRequest("acme/flux-pipe", (LoraRef(str(lora), 1.0),), precision, tmp_path / out, format=format),
                hub=Hub(endpoint=fake.url, cache_dir=str(cache)),
            )

        parts = encoder_lora_parts(pipe_dir)
        transformer_only = peft_file(tmp_path / "tr.safetensors", parts, components=("transformer",))
        clip_only = peft_file(tmp_path / "clip.safetensors", parts, components=("transformer", "text_encoder"))
        run(transformer_only, "a", "diffusers", "bf16")
        assert fetched() == {"model_index.json", "transformer"}
        run(transformer_only, "b", "single-file", "bf16")
        assert fetched() == {"model_index.json", "transformer"}
        run(clip_only, "c", "single-file", "bf16")  # the LoRA changes CLIP-L: its encoder comes too, T5 does not
        assert fetched() == {"model_index.json", "transformer", "text_encoder"}
        run(transformer_only, "d", "pipeline", "bf16")
        assert fetched() == {
            "model_index.json",
            "transformer",
            "text_encoder",
            "text_encoder_2",
            "vae",
            "scheduler",
            "tokenizer",
            "tokenizer_2",
        }  # never the repo's top-level single file
    finally:
        fake.stop()


def test_the_loras_panel_says_which_components_a_lora_changes(pipe_dir, tmp_path):
    from fluxstudio.studio import Studio

    parts = encoder_lora_parts(pipe_dir)
    studio = Studio(output_dir=tmp_path / "outputs", local=True)
    line = studio.describe_lora(peft_file(tmp_path / "all.safetensors", parts), str(pipe_dir), "flux1")
    assert "changes the transformer + CLIP-L + T5-XXL" in line
    line = studio.describe_lora(peft_file(tmp_path / "tr.safetensors", parts, ("transformer",)), str(pipe_dir), "flux1")
    assert "changes the transformer ·" in line and "1 matched" in line
