"""The diffusers folder: sharded safetensors named as diffusers names them, config.json (with bitsandbytes'
`quantization_config` for NF4), the manifest and a README with the loading code.

- bf16: plain bfloat16.
- fp8: Linear weights as float8_e4m3fn, everything diffusers' layerwise casting skips kept bf16, so that
  `from_pretrained(..., torch_dtype=bf16)` + `enable_layerwise_casting(fp8, bf16)` runs it.
- nf4: bitsandbytes' Linear4bit layout exactly as diffusers writes it (blocksize 64).
The same writer makes a pipeline's components (its T5-XXL with transformers' own rules: `wo` kept in full precision).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxstudio.engine import manifest, partials
from fluxstudio.engine.fuse import FusePlan
from fluxstudio.engine.models import BaseModel, Family
from fluxstudio.formats.base import PIPELINES, Format, Option, Settings, Writer, pipeline_lines
from fluxstudio.formats.writers import DiffusersWriter
from fluxstudio.quant import Precision
from fluxstudio.quant.nf4 import NF4, Nf4
from fluxstudio.quant.plain import BF16, FP8


class DiffusersFormat(Format):
    key = "diffusers"
    label = "diffusers (Python)"
    options: tuple[Option, ...] = (BF16, FP8, NF4)
    default = "bf16"
    where = "Load it with from_pretrained (snippet below)."
    writes_encoders = False
    holds = "transformer"  # what its README says the folder is

    def codec(self, precision: str, settings: Settings) -> Precision:
        """The precision's encoder, with the build's NF4 option."""
        option = self.option(precision)
        assert isinstance(option, Precision)
        return Nf4(settings.double_quant) if isinstance(option, Nf4) else option

    def base_parts(self, lora_components: set[str]) -> list[str] | None:
        return ["transformer"]

    def main_writer(self, precision: str, base: BaseModel, plan: FusePlan, settings: Settings) -> Writer:
        return DiffusersWriter(
            self.codec(precision, settings), base, plan.jobs, plan.config_updates, settings.shard_bytes
        )

    def finish(
        self, tmp: Path, out: Path, files: list[Path], report: dict, family: Family, held: partials.Claim
    ) -> None:
        """The manifest and a README beside the weights, then the folder into place."""
        manifest.write_folder(tmp, report)
        (tmp / "README.md").write_text(self.readme(out.name, report, family), encoding="utf-8")
        partials.move_into_place(tmp, out, held)

    def readme(self, name: str, report: dict, family: Family) -> str:
        precision = report["precision"]
        loras = "\n".join(f"- {e['name']} (scale {e['scale']}, sha256 {e['sha256'][:12]}…)" for e in report["loras"])
        t5 = report.get("text_encoder_precision", {}).get("text_encoder_2", "")
        return (
            f"# {name}\n\n"
            f"{report['base']['variant']} {self.holds} with these LoRAs fused at full precision, then saved as {precision}"
            f"{f' (T5-XXL: {t5})' if t5 else ''}:\n\n"
            f"{loras or '- (no LoRA)'}\n\n{self.option(precision).note}\n\n"
            f"## Load it\n\n```python\n{self.snippet('path/to/' + name, precision, family, t5)}\n```\n\n"
            "Made with FluxStudio; `fluxstudio.json` records the inputs, versions and timings.\n"
        )

    def snippet(self, path: str, precision: str, family: Family, t5: str = "", pipeline: str = "") -> str:
        cls = family.class_name
        pipe_cls, _ = PIPELINES[family.key]
        return pipeline_lines(
            self.option(precision),
            family,
            f"from diffusers import {cls}, {pipe_cls}",
            f'transformer = {cls}.from_pretrained(r"{path}", torch_dtype=torch.bfloat16)',
            pipeline,
        )

    def load_transformer(self, path: Path, config: Path):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(path / self.subfolder("transformer"), dtype=torch.bfloat16)
