"""The built-in `demo` base model and LoRA: small FLUX.1-architecture weights made locally and deterministically.

They let a user try the whole flow at once, with no download and no GPU: a whole FluxPipeline (random CLIP-L, T5,
VAE and tokenizers too), so that pipeline exports and previews run and are tested on the CPU in seconds.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch

from fluxstudio import paths

DEMO_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 8,
    "joint_attention_dim": 512,
    "pooled_projection_dim": 256,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 24, 24],
}
DEMO_PARAMS = 36_694_080  # the transformer's parameters (a test counts them): sizes before the demo is built
# The rest of the demo pipeline, sized to the transformer: CLIP-L's width is the pooled projection, T5's the joint
# attention; the VAE has FLUX's 16 latent channels (64 packed) and a scale factor of 2, so 64x64 images are quick.
DEMO_CLIP = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 256,
}
DEMO_T5 = {
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 2,
    "num_heads": 8,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
DEMO_VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
FLUX1_VAE = dict(
    DEMO_VAE,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    norm_num_groups=32,
)  # FLUX.1's own shape
FLUX1_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DEMO_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "proj_out")


def _atomic_dir(target: Path, make) -> Path:
    if target.exists():
        return target
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        make(tmp)
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    return target


def make_flux1_model(folder: Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a randomly initialized FluxTransformer2DModel (diffusers format) into `folder`."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config)
    model.save_config(folder)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    return folder


def make_tokenizers(folder: Path) -> tuple:
    """A CLIP tokenizer over single characters and a T5 (unigram) tokenizer over letters and digits, made locally."""
    from transformers import CLIPTokenizer, T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i for i, c in enumerate(chars, start=2)})
    vocab.update({c + "</w>": i for i, c in enumerate(chars, start=2 + len(chars))})
    clip = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (c, -1.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789.,!?'"
    ]
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    clip.save_pretrained(folder / "tokenizer")
    t5.save_pretrained(folder / "tokenizer_2")
    return clip, t5


def make_flux1_pipeline(
    folder: Path,
    config: dict = DEMO_CONFIG,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    clip: dict = DEMO_CLIP,
    t5: dict = DEMO_T5,
    transformer: Path | None = None,
    vae: dict = DEMO_VAE,
) -> Path:
    """Write a whole FluxPipeline folder of random weights: transformer (or links to the files of `transformer`,
    an existing one), CLIP-L, T5, VAE, scheduler, tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    if transformer is None:
        make_flux1_model(folder / "transformer", config, seed, dtype)
    else:
        (folder / "transformer").mkdir()
        for f in transformer.iterdir():
            (folder / "transformer" / f.name).hardlink_to(f)
    clip_tok, t5_tok = make_tokenizers(folder)
    torch.manual_seed(seed + 1)
    clip_model = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), bos_token_id=0, eos_token_id=1, **clip))
    clip_model.to(dtype).save_pretrained(folder / "text_encoder")  # type: ignore[arg-type] - transformers' hints
    t5_model = T5EncoderModel(T5Config(vocab_size=len(t5_tok), **t5))
    t5_model.to(dtype).save_pretrained(folder / "text_encoder_2")  # type: ignore[arg-type]
    AutoencoderKL(**vae).save_pretrained(folder / "vae")  # small: kept in fp32
    FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(FLUX1_INDEX, indent=2) + "\n", encoding="utf-8")
    return folder


def make_peft_lora(
    path: Path, linear_shapes: dict[str, tuple[int, int]], rank: int = 8, seed: int = 1, strength: float = 0.05
) -> Path:
    """Write a diffusers/peft-format LoRA for the given modules (name -> (out, in)) with realistic magnitudes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in sorted(linear_shapes.items()):
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * strength / rank**0.5).to(
            torch.bfloat16
        )
    save_file(sd, str(path))
    return path


def ensure_base() -> Path:
    """The demo pipeline (its transformer/ is the base every format fuses into)."""
    return _atomic_dir(paths.demo_dir() / "pipeline", make_flux1_pipeline)


def ensure_lora() -> Path:
    folder = paths.demo_dir() / "lora"

    def make(d: Path) -> None:
        from fluxstudio.engine.models import open_base

        base = open_base(ensure_base())
        shapes = {
            name[: -len(".weight")]: (info.shape[0], info.shape[1])
            for name, (_, info) in base.tensors.items()
            if name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(DEMO_LORA_TARGETS)
        }
        make_peft_lora(d / "demo_lora.safetensors", shapes)

    return _atomic_dir(folder, make) / "demo_lora.safetensors"
