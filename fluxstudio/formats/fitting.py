"""What the fitted writers of GGUF and of ComfyUI's native format share: the streaming pass that measures every weight
they choose for at each candidate, the choice under the budget with the LoRA kept as the next one-precision file up
would keep it, and the summary the manifest and the result show. The measure itself is engine/fit.py's."""

from __future__ import annotations

import math

import torch

from fluxstudio.engine import fit
from fluxstudio.engine.fuse import TensorJob, execute
from fluxstudio.engine.retention import Retention, change_size
from fluxstudio.formats.bfl import Assembler, Group
from fluxstudio.quant import Precision


class Fitting:
    """Mixed into a BFL writer (its `assembler`, `rows`, `groups`, `retention`, `jobs` and `shapes`). The writer
    sets `choosable` (weight -> its candidates), `budget` and `fixed` (the bytes of all it does not choose for, the
    file's overhead included), and says what its one-precision outputs would hold (`uniform`), in size order
    (`ladder`), and how a choice is applied (`apply`)."""

    choosable: dict[str, list[Precision]]
    budget: int
    fixed: int
    ladder: tuple[str, ...] = ()
    made_from = torch.float32  # what the output is made from: the fused sums, or their bf16 rounding
    summary: dict

    # from the writer
    assembler: Assembler
    rows: dict[str, list[int]]
    groups: dict[str, Group]
    retention: Retention
    jobs: list[TensorJob]
    shapes: dict[str, tuple[int, ...]]

    def uniform(self) -> dict[str, tuple[dict[str, str], int]]:
        """The one-precision outputs to compare the mix with: their key -> (weight -> precision key, their bytes)."""
        raise NotImplementedError

    def apply(self, mix: dict[str, fit.Choice]) -> None:
        raise NotImplementedError

    def planned_bytes(self) -> int:
        raise NotImplementedError

    def need_bytes(self) -> int:
        return self.planned_bytes() if self.summary else self.budget  # before the choice: at most the budget

    def least(self) -> int:
        """The smallest file the candidates make."""
        return self.fixed + sum(min(c.nbytes(self.shapes[n]) for c in cs) for n, cs in self.choosable.items())

    def _lora_inputs(self, name: str, width: int) -> list[fit.LoraInputs]:
        parts, start = [], 0
        group = self.groups[name]
        for part, rows in zip(group.parts, self.rows[group.parts[0]], strict=False):
            job = self.retention.jobs.get(part)
            if job is not None and job.deltas:
                ups = [d.up.to(torch.float32) * d.weight for d in job.deltas]
                downs = [
                    torch.nn.functional.pad(d.down.to(torch.float32), (0, width - d.down.shape[1])) for d in job.deltas
                ]
                parts.append(fit.LoraInputs(start, start + rows, torch.cat(downs), change_size(ups, downs)))
            start += rows
        return parts

    def fit(self, device: str, run) -> dict:
        """Measure every weight at every candidate (a streaming pass that writes nothing), then choose."""
        measured: dict[str, fit.Measured] = {}

        def take(name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
            done = self.assembler.add(name, fused, self.rows[name])
            if done is not None and done[0] in self.choosable:
                key, t = done
                measured[key] = fit.measure(
                    key, t, self.choosable[key], self._lora_inputs(key, t.shape[1]), self.made_from
                )
            return {}

        execute(self.jobs, take, lambda key, value: None, device, run, message="Measuring each weight at each type")
        terms = fit.relative(measured)
        nbytes = {n: {c.key: c.nbytes(self.shapes[n]) for c in cs} for n, cs in self.choosable.items()}
        presets = {  # the one-precision outputs by the same measure, for comparison
            key: {
                "error": sum(sum(terms[n][types[n]]) for n in terms),
                "lora_error": sum(terms[n][types[n]][1] for n in terms),
                "bytes": size,
            }
            for key, (types, size) in self.uniform().items()
        }
        fitting = [k for k in self.ladder if presets[k]["bytes"] <= self.budget]
        up = self.ladder[self.ladder.index(fitting[-1]) + 1] if fitting and fitting[-1] != self.ladder[-1] else None
        mix, weight = fit.choose_keeping(
            terms, nbytes, self.budget - self.fixed, presets[up]["lora_error"] if up else None
        )
        self.apply(mix)
        self.summary = fit.summary(mix, {n: math.prod(self.shapes[n]) for n in mix}, terms) | {
            "budget_bytes": self.budget,
            "planned_bytes": self.planned_bytes(),
            "presets": presets,
            "lora_as": up,  # the output whose LoRA term the mix keeps within (the next one up from what fits)
            "lora_weight": weight,
        }
        return self.summary
