"""Builders for tiny FLUX-architecture models and LoRAs in every format, and diffusers' own fuse as reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FLUX1_TINY = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 64,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 24, 24],
}
FLUX2_TINY = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 128,
    "num_attention_heads": 1,
    "joint_attention_dim": 64,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32],
}
# FLUX.1 width (diffusers' kohya/BFL converters hard-code 3072), one block of each kind.
FLUX1_WIDE = dict(
    FLUX1_TINY,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    axes_dims_rope=[16, 56, 56],
)


def meta_state_shapes(class_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    import diffusers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = getattr(diffusers, class_name).from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_model(
    folder: Path,
    config: dict,
    class_name: str = "FluxTransformer2DModel",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    spread: float = 0.0,
) -> Path:
    """A random model in diffusers layout (config.json + safetensors, an index when sharded). `spread`: each
    tensor's scale is 0.02 times 2 to a power drawn from [-spread, spread] (layers of unequal sizes, as in a trained
    model), instead of 0.02 for all."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in meta_state_shapes(class_name, config).items():
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            sd[name] = torch.ones(shape, dtype=dtype)
        else:
            scale = 0.02 * 2 ** (spread * (2 * float(torch.rand((), generator=g)) - 1))
            sd[name] = (torch.randn(shape, generator=g) * scale).to(dtype)
    cfg = {"_class_name": class_name, "_diffusers_version": "0.42.1", **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    names = list(sd)
    if shards == 1:
        save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: sd[k] for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def linear_shapes(folder: Path, contains: tuple[str, ...] = ("attn.to_", "ff.net", "proj_mlp", "proj_out")) -> dict:
    from fluxstudio.engine.models import open_base

    base = open_base(folder)
    return {
        n[: -len(".weight")]: info.shape
        for n, (_, info) in base.tensors.items()
        if n.endswith(".weight") and len(info.shape) == 2 and any(c in n for c in contains)
    }


def peft_lora(
    path: Path,
    shapes: dict,
    rank: int = 8,
    seed: int = 1,
    alpha: float | None = None,
    strength: float = 0.05,
    prefix: str = "transformer.",
    extra: dict | None = None,
) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out_f, in_f) in sorted(shapes.items()):
        sd[f"{prefix}{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
        sd[f"{prefix}{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * strength / rank**0.5).to(
            torch.bfloat16
        )
        if alpha is not None:
            sd[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    sd.update(extra or {})
    save_file(sd, str(path))
    return path


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference_fuse(
    base: Path, loras: list[tuple[Path, float]], family: str = "flux1", dtype: torch.dtype = torch.float32
) -> tuple[dict, dict]:
    """diffusers' own path: load_lora_weights per adapter, set_adapters(scales), fuse_lora, unload_lora.

    In fp32 by default, then rounded once to bf16: in bf16, peft rounds the delta and every partial sum, which
    on its own drifts by several ulps from the exact result when two LoRAs partly cancel.
    """
    import diffusers

    if family == "flux1":
        model = diffusers.FluxTransformer2DModel.from_pretrained(base, torch_dtype=dtype)
        pipe = diffusers.FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=model,
        )
        names = []
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
            names.append(f"a{i}")
        pipe.set_adapters(names, [s for _, s in loras])
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    else:
        model = diffusers.Flux2Transformer2DModel.from_pretrained(base, torch_dtype=dtype)
        names = []
        for i, (path, _) in enumerate(loras):
            model.load_lora_adapter(str(path), prefix="transformer", adapter_name=f"a{i}")
            names.append(f"a{i}")
        model.set_adapters(names, [s for _, s in loras])
        model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    config = {k: getattr(model.config, k) for k in model.config}  # diffusers widens by setattr
    return {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}, config


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    mag = x.float().abs().clamp(min=2.0**-126)
    return torch.exp2(torch.floor(torch.log2(mag)) - 7)


def assert_within_one_ulp(ours: dict, ref: dict, base: Path | dict) -> None:
    """|ours - ref| <= one bf16 ulp of the element's largest operand (the base weight or the fused value).

    Where a delta almost cancels the weight, the result is tiny and any rounding of the operands (peft's bf16
    delta, or a different fp32 summation order) is large next to the result's own ulp, hence the operands' ulp.
    """
    base_sd = (
        base if isinstance(base, dict) else load_dir(base if (base / "config.json").exists() else base / "transformer")
    )
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))[:5]
    for k, want in ref.items():
        a, b = ours[k].float(), want.float()
        assert a.shape == b.shape, (k, a.shape, b.shape)
        w = base_sd[k].float()
        if w.shape != a.shape:  # widened by a Control LoRA
            w = torch.nn.functional.pad(w, (0, a.shape[-1] - w.shape[-1]))
        tol = bf16_ulp(torch.maximum(torch.maximum(a.abs(), b.abs()), w.abs()))
        bad = (a - b).abs() > tol
        assert not bad.any(), f"{k}: {int(bad.sum())} elements differ by more than one bf16 ulp"


def flux1_inputs(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator().manual_seed(seed)
    seq, txt = 16, 8
    return {
        "hidden_states": torch.randn(1, seq, config["in_channels"], generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(1, txt, config["joint_attention_dim"], generator=g).to(dtype),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g).to(dtype),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(seq, 3),
        "txt_ids": torch.zeros(txt, 3),
        "guidance": torch.tensor([3.5]),
        "return_dict": False,
    }


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
