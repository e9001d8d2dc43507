"""Peak memory of a whole-pipeline export with a full-size T5-XXL: is it bounded by one tensor, not by the model?

    python bench/pipeline_memory.py [--work DIR] [--t5-layers 24]

Builds once (random weights, streamed to disk): a FLUX.1-width transformer of 1 double + 1 single block, a CLIP-L
and a T5-XXL of their real shapes (T5: 4.76 B parameters, 9.5 GB in bf16), the demo's VAE, scheduler and
tokenizers. A LoRA touches the transformer, CLIP-L and T5. Then it runs `fluxstudio fuse --format pipeline` in a
fresh process, twice (T5 in NF4, and in bf16), and prints the peak anonymous memory (what the process itself
holds, page cache excluded) against the 1.5 GB goal, with the model sizes beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fuse_vs_diffusers import make_model

GOAL = 1.5e9
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}


def write_encoder(folder: Path, cls_name: str, config: dict) -> None:
    """A transformers text encoder of random bf16 weights, written one tensor at a time with FluxStudio's writer."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    from fluxstudio.engine.shards import ShardedWriter, header_bound

    cls = getattr(transformers, cls_name)
    cfg = cls.config_class(**config)
    with init_empty_weights():
        model = cls(cfg)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    shapes = {n: p.shape for n, p in model.state_dict().items() if n not in tied}
    names = list(shapes)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    writer = ShardedWriter(folder, 5 * 10**9, header_bound(names), prefix="model")
    g = torch.Generator().manual_seed(1)
    for name, shape in shapes.items():
        writer.add(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    writer.close()


def make_pipeline(folder: Path, t5_layers: int) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from fluxstudio.sources import demo

    if (folder / "model_index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    make_model(folder / "transformer", 1, 1)
    demo.make_tokenizers(folder)
    if not (folder / "text_encoder").exists():
        write_encoder(folder / "text_encoder", "CLIPTextModel", CLIP_L)
    if not (folder / "text_encoder_2").exists():
        write_encoder(folder / "text_encoder_2", "T5EncoderModel", T5_XXL | {"num_layers": t5_layers})
    AutoencoderKL(**demo.DEMO_VAE).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(demo.FLUX1_INDEX, indent=2))
    return folder


def make_lora(path: Path, t5_layers: int) -> Path:
    """Rank-16 LoRA on the transformer's attention, every CLIP-L attention and MLP, and every T5 block."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    sd = {}

    def add(key: str, out_f: int, in_f: int) -> None:
        sd[f"{key}.lora_A.weight"] = (torch.randn(16, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
        sd[f"{key}.lora_B.weight"] = (torch.randn(out_f, 16, generator=g) * 0.01).to(torch.bfloat16)

    for m in ("to_q", "to_k", "to_v"):
        add(f"transformer.transformer_blocks.0.attn.{m}", 3072, 3072)
    for i in range(12):
        for m, (o, n) in {
            "self_attn.q_proj": (768, 768),
            "self_attn.v_proj": (768, 768),
            "mlp.fc1": (3072, 768),
        }.items():
            add(f"text_encoder.text_model.encoder.layers.{i}.{m}", o, n)
    for i in range(t5_layers):
        add(f"text_encoder_2.encoder.block.{i}.layer.0.SelfAttention.q", 4096, 4096)
        add(f"text_encoder_2.encoder.block.{i}.layer.1.DenseReluDense.wi_0", 10240, 4096)
    save_file(sd, str(path))
    return path


def run(base: Path, lora: Path, out: Path, t5: str, env: dict) -> dict:
    report = out.with_suffix(".json")
    cmd = [
        sys.executable,
        "-m",
        "fluxstudio",
        "fuse",
        "--base",
        str(base),
        "--lora",
        str(lora),
        "--format",
        "pipeline",
        "--precision",
        "nf4",
        "--t5-precision",
        t5,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--device",
        "cpu",
        "--report-json",
        str(report),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(report.read_text())


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fluxstudio-bench")
    ap.add_argument("--t5-layers", type=int, default=24, help="T5 blocks (24 is T5-XXL)")
    args = ap.parse_args()
    work = args.work / f"pipeline-t5-{args.t5_layers}"
    base = make_pipeline(work / "base", args.t5_layers)
    lora = make_lora(work / "lora.safetensors", args.t5_layers)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLUXSTUDIO_HOME=str(work / "home"))
    t5_bytes = sum(f.stat().st_size for f in (base / "text_encoder_2").glob("*.safetensors"))
    all_bytes = sum(f.stat().st_size for f in base.rglob("*.safetensors"))
    print(f"base pipeline: {gb(all_bytes)} of weights, T5 alone {gb(t5_bytes)} ({args.t5_layers} blocks)")
    print(f"{'T5 precision':<14}{'seconds':>9}{'peak anon':>12}{'peak RSS':>11}{'output':>10}  fused per component")
    for t5 in ("nf4", "bf16"):
        r = run(base, lora, work / f"out-{t5}", t5, env)
        print(
            f"{t5:<14}{r['seconds']:>9.1f}{gb(r['peak_anon_bytes']):>12}{gb(r['peak_ram_bytes']):>11}"
            f"{gb(r['output_bytes']):>10}  {r['fused_per_component']}"
        )
        print(
            f"  peak anonymous memory / goal (1.5 GB): {r['peak_anon_bytes'] / GOAL:.2f}; "
            f"/ T5's own size: {r['peak_anon_bytes'] / t5_bytes:.3f}"
        )


if __name__ == "__main__":
    main()
