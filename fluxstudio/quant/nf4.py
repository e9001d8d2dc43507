"""bitsandbytes NF4 (4-bit, blocks of 64) in its serialized Linear4bit layout, as diffusers and Forge write it.

Per weight `W`: `W` (uint8, two codes a byte), `W.absmax` (float32, or uint8 with double quant), `W.quant_map`,
`W.quant_state.bitsandbytes__nf4` (and `W.nested_*` with double quant), from `QuantState.as_dict(packed=True)`.
On the CPU a table-lookup kernel bit-identical to bitsandbytes' own does the work about three times faster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from fluxstudio.errors import NumericError
from fluxstudio.quant.base import Precision, Rows, register

NF4_BLOCK = 64


class Nf4(Precision):
    key = "nf4"
    note = "bitsandbytes NF4 (4-bit) weights; needs bitsandbytes and a CUDA GPU."
    runtime = "nf4"

    def __init__(self, double_quant: bool = False) -> None:
        self.double_quant = double_quant

    bytes_per_param = 0.5 + 4 / NF4_BLOCK

    def nbytes(self, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        return (numel + 1) // 2 + 4 * math.ceil(numel / NF4_BLOCK) + 64 + 256

    def names(self, key: str) -> list[str]:
        suffixes = ["absmax", "quant_map", "quant_state.bitsandbytes__nf4"]
        if self.double_quant:
            suffixes += ["nested_absmax", "nested_quant_map"]
        return [key] + [f"{key}.{s}" for s in suffixes]

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return nf4_encode(key, weight.to(torch.bfloat16), bool(self.double_quant))

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        return nf4_rows(key, stored)

    def config(self) -> dict | None:
        """bitsandbytes' `quantization_config` for these weights, as diffusers and transformers read it (its defaults
        are fp4 and float32 compute: both set explicitly)."""
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
        raise NumericError(
            f"The weight {name} contains NaN or Inf values.", "The base model file is broken: get it again."
        )
    code = F.get_4bit_type("nf4", device=weight.device)
    if double_quant:  # the same steps as bitsandbytes.functional.quantize_4bit(compress_statistics=True)
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(
            absmax=qabsmax,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=NF4_BLOCK,
            code=code,
            quant_type="nf4",
            offset=offset,
            state2=state2,
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
    state = F.QuantState.from_dict(
        {k[len(name) + 1 :]: v for k, v in out.items() if k != name}, device=out[name].device
    )
    absmax = state.absmax
    assert state.shape is not None
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit does
        assert state.offset is not None
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
            packed[begin : begin + (n + 1) // 2].reshape(-1, 1), absmax[b0:b1], NF4_BLOCK, "nf4", [n], torch.float32
        )
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
                for x, y in zip(fast(p), reference(p), strict=False)
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
    return torch.cat(
        [exact, torch.zeros(64, dtype=torch.bfloat16), (torch.randn(1 << 16, generator=g) * 0.02).bfloat16()]
    )


NF4 = register(Nf4())
