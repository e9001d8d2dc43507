"""The original (BFL) key layout of FLUX.1 and FLUX.2 transformers, as the exact inverse of diffusers' converters.

`convert_flux_transformer_checkpoint_to_diffusers` and `convert_flux2_transformer_checkpoint_to_diffusers`
(diffusers/loaders/single_file_utils.py) split BFL's fused tensors and rename the rest; `layout` maps the other
way: each BFL tensor is a group of diffusers tensors concatenated along dim 0 (qkv, linear1) or one tensor renamed,
and the final layer's modulation has its two halves swapped (diffusers: scale then shift; BFL: shift then scale).
ComfyUI, Forge, stable-diffusion.cpp and city96's GGUF files use these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fluxstudio.errors import BadInputError

# (diffusers module pattern, BFL module, position in the fused BFL tensor or None)
_FLUX1 = (
    (r"x_embedder", "img_in", None),
    (r"context_embedder", "txt_in", None),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", r"double_blocks.\1.img_mod.lin", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", r"double_blocks.\1.txt_mod.lin", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", r"double_blocks.\1.img_mlp.2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", r"double_blocks.\1.txt_mlp.2", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", r"single_blocks.\1.modulation.lin", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", r"single_blocks.\1.linear1", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", r"single_blocks.\1.linear1", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", r"single_blocks.\1.linear1", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", r"single_blocks.\1.linear1", 3),
    (r"single_transformer_blocks\.(\d+)\.proj_out", r"single_blocks.\1.linear2", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q", r"single_blocks.\1.norm.query_norm", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k", r"single_blocks.\1.norm.key_norm", None),
)
# What FLUX.1 and FLUX.2 double blocks share: fused q|k|v, the output projections and the q/k norms.
_DOUBLE = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", r"double_blocks.\1.img_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", r"double_blocks.\1.img_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", r"double_blocks.\1.img_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q", r"double_blocks.\1.img_attn.norm.query_norm", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k", r"double_blocks.\1.img_attn.norm.key_norm", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q", r"double_blocks.\1.txt_attn.norm.query_norm", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k", r"double_blocks.\1.txt_attn.norm.key_norm", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj", None),
    (r"proj_out", "final_layer.linear", None),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None),
)
_FLUX2 = (
    (r"x_embedder", "img_in", None),
    (r"context_embedder", "txt_in", None),
    (r"time_guidance_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None),
    (r"time_guidance_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None),
    (r"time_guidance_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None),
    (r"time_guidance_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None),
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear", r"\1.lin", None),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q", r"single_blocks.\1.norm.query_norm", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k", r"single_blocks.\1.norm.key_norm", None),
)
RULES = {
    "flux1": [(re.compile(p + "$"), t, s) for p, t, s in _FLUX1 + _DOUBLE],
    "flux2": [(re.compile(p + "$"), t, s) for p, t, s in _FLUX2 + _DOUBLE],
}
SWAPPED = "final_layer.adaLN_modulation.1"


@dataclass(frozen=True)
class Group:
    """One BFL tensor: the diffusers tensors it is made of, in order along dim 0."""

    name: str
    parts: tuple[str, ...]

    @property
    def swapped(self) -> bool:
        return self.name.startswith(SWAPPED + ".")


def bfl_name(family: str, name: str) -> tuple[str, int | None]:
    """The BFL tensor a diffusers tensor belongs to, and its position there (None: the whole tensor)."""
    module, _, param = name.rpartition(".")
    for pattern, target, slot in RULES[family]:
        if pattern.fullmatch(module):
            bfl = pattern.sub(target, module)
            if bfl.endswith("_norm") and param == "weight":
                param = "scale"
            return f"{bfl}.{param}", slot
    raise BadInputError(
        f"The tensor {name} has no place in the original (BFL) FLUX layout.",
        "Save this model in the diffusers format instead.",
    )


def layout(family: str, names: list[str]) -> list[Group]:
    """BFL groups for a model's diffusers tensor names, in the order of their first part."""
    slots: dict[str, dict[int, str]] = {}
    for name in names:
        bfl, slot = bfl_name(family, name)
        parts = slots.setdefault(bfl, {})
        parts[0 if slot is None else slot] = name
    groups = []
    for bfl, parts in slots.items():
        if sorted(parts) != list(range(len(parts))):
            raise BadInputError(f"The base model lacks parts of {bfl}.", "The model files may be incomplete.")
        groups.append(Group(bfl, tuple(parts[i] for i in range(len(parts)))))
    return groups


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class Assembler:
    """Collects fused diffusers tensors and hands out BFL tensors once all of their parts are in.

    Each part is copied into the group's buffer as it arrives (in `dtype`: bf16 where the output is made from
    the bf16 rounding anyway), so memory holds one group (the largest is a single block's linear1) and one part,
    never the model.
    """

    def __init__(self, groups: list[Group], dtype: torch.dtype = torch.float32) -> None:
        self._where: dict[str, tuple[Group, int]] = {}
        for g in groups:
            for i, part in enumerate(g.parts):
                self._where[part] = (g, i)
        self.dtype = dtype
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}  # group -> (buffer, parts copied)

    def add(self, name: str, tensor: torch.Tensor, rows: list[int]) -> tuple[str, torch.Tensor] | None:
        """Take one part; `rows` are the row counts of all of the group's parts."""
        group, index = self._where[name]
        if len(group.parts) == 1:
            return group.name, swap_halves(tensor) if group.swapped else tensor
        if group.name not in self._buffers:
            shape = (sum(rows), *tensor.shape[1:])
            self._buffers[group.name] = (torch.empty(shape, dtype=self.dtype, device=tensor.device), 0)
        buffer, copied = self._buffers[group.name]
        start = sum(rows[:index])
        buffer[start : start + tensor.shape[0]].copy_(tensor)
        if copied + 1 < len(group.parts):
            self._buffers[group.name] = (buffer, copied + 1)
            return None
        del self._buffers[group.name]
        return group.name, buffer
