"""The built-in `demo` base model and LoRA: small FLUX.1-architecture weights made locally and deterministically.

They let a user try the whole flow at once, with no download and no GPU.
"""

from __future__ import annotations

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

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config)
    model.save_config(folder)
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
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
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * strength / rank**0.5).to(torch.bfloat16)
    save_file(sd, str(path))
    return path


def ensure_base() -> Path:
    return _atomic_dir(paths.demo_dir() / "base", lambda d: make_flux1_model(d, DEMO_CONFIG))


def ensure_lora() -> Path:
    folder = paths.demo_dir() / "lora"

    def make(d: Path) -> None:
        from fluxstudio.models import open_base

        base = open_base(ensure_base())
        shapes = {
            name[: -len(".weight")]: info.shape
            for name, (_, info) in base.tensors.items()
            if name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(DEMO_LORA_TARGETS)
        }
        make_peft_lora(d / "demo_lora.safetensors", shapes)

    return _atomic_dir(folder, make) / "demo_lora.safetensors"
