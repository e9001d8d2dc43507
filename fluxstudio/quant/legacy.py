"""Output precisions: turn one fused fp32 tensor into the tensors to write, plus the config block.

- bf16: plain bfloat16.
- fp8:  Linear weights as float8_e4m3fn (clamped to +-448), everything diffusers' layerwise casting skips kept
        bf16, so `from_pretrained(..., torch_dtype=bf16)` + `enable_layerwise_casting(fp8, bf16)` runs it.
- nf4:  bitsandbytes' serialized Linear4bit layout exactly as diffusers writes it (blocksize 64).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fluxstudio.formats import FORMATS, PRECISIONS

FP8_MAX = 448.0
NF4_BLOCK = 64


@dataclass(frozen=True)
class Quantizer:
    precision: str
    quantized_modules: frozenset[str]  # Linear modules whose weight gets the low-precision format
    double_quant: bool = False
    kept_modules: frozenset[str] = frozenset()  # Linear modules the model's class keeps in full precision

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] in self.quantized_modules

    def encode(self, name: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """fp32 (or any float) tensor, on the CPU or the GPU -> {key: tensor} to write, all on the CPU."""
        if not self.is_quantized(name) or self.precision == "bf16":
            return {name: fused.to(torch.bfloat16).cpu()}
        if self.precision == "fp8":
            return {name: fp8_encode(fused)}
        return nf4_encode(name, fused.to(torch.bfloat16), self.double_quant)

    def stored_rows(self, name: str, out: dict[str, torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
        """Rows [start, stop) of what `encode` stored for this tensor, back in fp32, each call a new tensor (the
        LoRA-retention score compares them chunk by chunk, and overwrites them)."""
        if self.is_quantized(name) and self.precision == "nf4":
            return nf4_rows(name, out)
        t = out[name]
        return lambda start, stop: t[start:stop].to(torch.float32, copy=True)

    def keys(self, name: str) -> list[str]:
        """The names `encode` will write for this tensor."""
        if not self.is_quantized(name) or self.precision != "nf4":
            return [name]
        suffixes = ["absmax", "quant_map", "quant_state.bitsandbytes__nf4"]
        if self.double_quant:
            suffixes += ["nested_absmax", "nested_quant_map"]
        return [name] + [f"{name}.{s}" for s in suffixes]

    def estimate_bytes(self, name: str, numel: int) -> int:
        return encoded_bytes(self.precision if self.is_quantized(name) else "bf16", numel)

    def config_block(self) -> dict | None:
        if self.precision != "nf4":
            return None
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": None,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8",
            "load_in_4bit": True,
            "load_in_8bit": False,
        }


def encoded_bytes(precision: str, numel: int) -> int:
    """Bytes that one weight of `numel` values takes at a precision (with NF4's block scales and quant state)."""
    if precision == "nf4":
        return (numel + 1) // 2 + 4 * math.ceil(numel / NF4_BLOCK) + 64 + 256
    return math.ceil(numel * PRECISIONS[precision].bytes_per_param) + (4 if precision == "fp8-scaled" else 0)


def fp8_encode(weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """weight (/ scale) clamped to ±448 as float8_e4m3fn, on the CPU; a chunk of rows at a time, so that no full-size
    float32 temporary sits beside the fused weight (a single file's linear1 alone is a quarter GB in float32)."""
    out = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    rows, dst = weight.reshape(-1, weight.shape[-1]), out.view(-1, weight.shape[-1])
    step = max(1, (1 << 20) // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        chunk = rows[i : i + step].to(torch.float32, copy=True)  # never the caller's tensor: it is scored after
        dst[i : i + step] = (chunk if scale is None else chunk.div_(scale)).clamp_(-FP8_MAX, FP8_MAX)
    return out.cpu()


def layerwise_skip_patterns(model_cls: type) -> tuple[str, ...]:
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(getattr(model_cls, "_skip_layerwise_casting_patterns", None) or ())


def make_quantizer(precision: str, linear_modules: frozenset[str], model_cls: type, double_quant: bool = False) -> Quantizer:
    if precision not in FORMATS["diffusers"].precisions:
        raise ValueError(f"unknown precision {precision!r}")
    # transformers keeps some Linear layers out of quantization and in fp32 (T5: the feed-forward output `wo`)
    keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    kept = frozenset(m for m in linear_modules if m.rsplit(".", 1)[-1] in keep)
    modules = linear_modules - kept
    if precision == "fp8":
        skip = layerwise_skip_patterns(model_cls)
        modules = frozenset(m for m in modules if not any(re.search(p, m) for p in skip))
    return Quantizer(precision, modules, double_quant, kept)


def _bnb():
    """Import bitsandbytes quietly: on CPU it logs a scary line about an optional kernels package."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        import bitsandbytes.functional as F
    finally:
        logger.setLevel(level)
    return F


def nf4_encode(name: str, weight: torch.Tensor, double_quant: bool = False) -> dict[str, torch.Tensor]:
    """bitsandbytes NF4 of a bf16 weight, serialized like diffusers' Linear4bit state dict."""
    F = _bnb()
    if weight.is_cuda:
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(weight, NF4_BLOCK, "nf4", torch.uint8)
    else:
        packed, absmax = nf4_cpu(weight)
    if not torch.isfinite(absmax).all():
        from fluxstudio.errors import NumericError

        raise NumericError(f"The weight {name} contains NaN or Inf values.", "The base model file is broken: get it again.")
    code = F.get_4bit_type("nf4", device=weight.device)
    if double_quant:  # the same steps as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(
            absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=NF4_BLOCK, code=code,
            quant_type="nf4", offset=offset, state2=state2,
        )
    else:
        state = F.QuantState(
            absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=NF4_BLOCK, code=code, quant_type="nf4"
        )
    out = {name: packed.cpu()}
    out.update({f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()})
    return out


def nf4_rows(name: str, out: dict[str, torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """Rows [start, stop) of an NF4 weight as `nf4_encode` serialized it, in fp32: bitsandbytes' own kernel on just
    the blocks those rows span (a chunk that stays in cache decodes about three times faster than a whole weight)."""
    F = _bnb()
    state = F.QuantState.from_dict({k[len(name) + 1:]: v for k, v in out.items() if k != name}, device=out[name].device)
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit does
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax, packed = absmax.float(), out[name].reshape(-1)
    shape = tuple(state.shape)
    cols, total = math.prod(shape[1:]), math.prod(shape)

    def rows(start: int, stop: int) -> torch.Tensor:
        first, last = start * cols, stop * cols
        b0, b1 = first // NF4_BLOCK, -(-last // NF4_BLOCK)
        n = min(b1 * NF4_BLOCK, total) - b0 * NF4_BLOCK
        begin = b0 * NF4_BLOCK // 2
        values = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed[begin : begin + (n + 1) // 2].reshape(-1, 1), absmax[b0:b1], NF4_BLOCK, "nf4", [n], torch.float32)
        return values[first - b0 * NF4_BLOCK : last - b0 * NF4_BLOCK].view(stop - start, *shape[1:])

    return rows


def nf4_cpu(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes and block absmax on CPU, bit-identical to bitsandbytes' own CPU kernel, in chunks.

    bitsandbytes' CPU path (its default backend's quantize_4bit) spends three quarters of its time in
    torch.bucketize; `_Nf4Codes` finds the same code with a table lookup and one comparison, about three times
    faster. Its result is checked against bitsandbytes' kernel once per process, which is used instead should
    they ever differ (a new bitsandbytes with another code, say).
    """
    kernel = _cpu_kernel()
    flat = weight.reshape(-1)
    parts = [kernel(flat[i : i + CPU_CHUNK]) for i in range(0, flat.numel(), CPU_CHUNK)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts])


CPU_CHUNK = 1 << 18  # elements: a multiple of the block size, small enough to stay in cache


class _Nf4Codes:
    """Exact bucketize against bitsandbytes' NF4 bounds via a fine uniform grid over [-1, 1].

    Each grid bin is crossed by at most one bound (bounds are >= 0.08 apart, bins 0.0005 wide), so the code is
    `below[bin]` (bounds surely under the value) plus one exact comparison with the only bound that may be near.
    The margin covers float rounding in the bin computation.
    """

    BINS = 4096

    def __init__(self) -> None:
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

        bounds, _ = _get_4bit_quantize_bounds("nf4", torch.device("cpu"))
        edges = torch.linspace(-1, 1, self.BINS + 1, dtype=torch.float64)
        margin = 1e-5
        b = bounds.double()
        below = (b[None, :] < (edges[:-1, None] - margin)).sum(1)
        maybe = (b[None, :] < (edges[1:, None] + margin)).sum(1)
        if int((maybe - below).max()) > 1:
            raise ValueError("NF4 bounds too close for the lookup grid")
        self.below = below.to(torch.uint8)
        self.threshold = torch.cat([bounds, torch.tensor([float("inf")])])[below]

    def __call__(self, scaled: torch.Tensor) -> torch.Tensor:
        half = self.BINS / 2
        bins = scaled.mul(half).add_(half).to(torch.int32).clamp_(0, self.BINS - 1)
        return self.below[bins].add_(scaled > self.threshold[bins])


def _fast_nf4(a: torch.Tensor, codes: _Nf4Codes) -> tuple[torch.Tensor, torch.Tensor]:
    """The steps of bitsandbytes' default quantize_4bit (same arithmetic, in place), with `codes` for bucketize."""
    flat = a.reshape(-1).to(torch.float32, copy=True)
    n = flat.numel()
    full = n - n % NF4_BLOCK
    x = flat[:full].view(-1, NF4_BLOCK)
    absmax = torch.maximum(x.amax(-1), x.amin(-1).neg_()).abs_()
    x.mul_((1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    if full < n:  # a last partial block: bitsandbytes divides here instead of multiplying by the reciprocal
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        flat[full:] = torch.clamp(flat[full:] / am, -1, 1)
    if n % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    q = codes(flat)
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1), absmax


_KERNEL = None


def _cpu_kernel():
    """The fast kernel if it matches bitsandbytes' own on a probe with every tricky case, else bitsandbytes'."""
    global _KERNEL
    if _KERNEL is None:
        _bnb()
        def reference(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ops.bitsandbytes.quantize_4bit.default(a, NF4_BLOCK, "nf4", torch.uint8)

        try:
            codes = _Nf4Codes()

            def fast_nf4(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return _fast_nf4(a, codes)

            fast = fast_nf4
            probe = _probe()
            ok = all(
                torch.equal(x, y) and x.dtype == y.dtype
                for p in (probe, probe[:-7])
                for x, y in zip(fast(p), reference(p))
            )
        except (ValueError, RuntimeError, ImportError):
            ok = False
        if not ok:
            logging.getLogger(__name__).warning("fast NF4 kernel disagrees with bitsandbytes; using bitsandbytes' own")
        _KERNEL = fast if ok else reference
    return _KERNEL


def _probe() -> torch.Tensor:
    """Every bf16 value in [-1, 1] in blocks whose absmax is exactly 1 (so each is its own scaled value), a zero
    block, and realistic weights."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every) & (every.abs() <= 1)]
    every = torch.cat([every, torch.zeros(-every.numel() % 63, dtype=torch.bfloat16)]).view(-1, 63)
    exact = torch.cat([torch.ones(every.shape[0], 1, dtype=torch.bfloat16), every], dim=1).reshape(-1)
    g = torch.Generator().manual_seed(0)
    return torch.cat([exact, torch.zeros(64, dtype=torch.bfloat16), (torch.randn(1 << 16, generator=g) * 0.02).bfloat16()])
