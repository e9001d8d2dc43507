"""GGML block quantization: Q8_0, Q5_0, Q4_0 and the K-quants Q6_K, Q5_K, Q4_K (`ggml_lowbit.py` adds Q5_1, Q4_1,
Q3_K, Q2_K, IQ4_NL and IQ4_XS), byte for byte as ggml's reference quantizers make them (`quantize_row_*_ref` in
ggml-quants.c, no importance matrix). `tests/test_ggml_quants.py` checks the bytes against vectors made by ggml
itself.

On the CPU every type runs as compiled loops (`ggml_loops.py`, ggml's C transliterated for numba), in chunks side by
side, one core each. The functions here are the same quantizers in torch, vectorized over every block at once, for
CUDA (and tested on the CPU against the same vectors). Their float operations are the same
and in the same order within each element, and sums run left to right as ggml's loops add, so near ties between two
candidate scales are decided as ggml decides them (ggml's own builds differ on a few, with and without FMA).

Rows are quantized independently; their length must be a multiple of the type's block size.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fluxstudio.quant import ggml_loops
from fluxstudio.quant.base import Precision, Rows, register

QK_K = 256
CHUNK = 1 << 17  # values a core takes at a time (on CUDA: bounds torch's temporaries, about 60 bytes a value)
_ONE_AT_A_TIME = threading.Lock()  # torch's thread count is process-wide: one quantize() changes it at a time


QUANTIZED = ("Q8_0", "Q5_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K")  # the block types made here (ggml_lowbit adds more)


def quantized() -> tuple[str, ...]:
    """Every block type made here and in `ggml_lowbit` (which `fluxstudio.quant` imports)."""
    return tuple(_QUANTIZERS)


def sizes(qtype: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type, from the gguf package's own table."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]


def row_bytes(qtype: str, n: int) -> int:
    block, nbytes = sizes(qtype)
    return n // block * nbytes


def quantize(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize a 2-D (or 1-D) float tensor row by row -> uint8 [rows, row_bytes] on the CPU."""
    block, nbytes = sizes(qtype)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    rows, n = x2.shape
    if n % block:
        raise ValueError(f"rows of {n} values do not fit {qtype} blocks of {block}")
    flat = x2.reshape(-1, block)
    out = torch.empty(flat.shape[0], nbytes, dtype=torch.uint8)
    step = max(1, CHUNK // block)
    starts = range(0, flat.shape[0], step)
    if x.is_cuda:
        for i in starts:
            out[i : i + step] = _QUANTIZERS[qtype](flat[i : i + step].to(torch.float32)).cpu()
        return out.reshape(rows, -1)
    kernel = ggml_loops.KERNELS[qtype]

    def one(i: int) -> None:  # into its rows of `out` (a numpy view of the same memory)
        kernel(flat[i : i + step].to(torch.float32).contiguous().numpy(), out[i : i + step].numpy())

    with _ONE_AT_A_TIME:  # chunks side by side, one core each (torch's own conversion on one thread each)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                list(pool.map(one, starts))
        finally:
            torch.set_num_threads(threads)
    return out.reshape(rows, -1)


def dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values that `quantize` bytes stand for (as ggml's dequantize_row_* computes them)."""
    blocks = data.reshape(-1, sizes(qtype)[1])
    return _DEQUANTIZERS[qtype](blocks).reshape(shape)


# -- helpers -------------------------------------------------------------------------------------------------


def _rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """num / t correctly rounded, as C divides (torch computes `number / tensor` as a reciprocal times the number)."""
    return torch.tensor(num, dtype=t.dtype, device=t.device) / t


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(*v.shape, 2)


def _f16_value(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _signed_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Along `dim` of a 2-D tensor, the value with the largest magnitude as ggml's loops pick it: the first one when
    +a and -a tie, +0.0 when all are zero (argmax would say the same, but it is slow along dim 0)."""
    hi, lo = x.amax(dim), x.amin(dim)
    out = torch.where(hi >= -lo, hi, lo)
    tie = ((hi == -lo) & (hi > 0)).nonzero().squeeze(1)
    if tie.numel() > 0:
        part = x.index_select(1 - dim, tie)
        out[tie] = part.gather(dim, part.abs().argmax(dim, keepdim=True)).squeeze(dim)
    return out.add_(0.0)  # -0.0 -> +0.0


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round sends them to even)."""
    r = torch.round(v)
    return torch.where((v - r).abs() == 0.5, v + 0.5 * torch.sign(v), r)


def _positive(v: torch.Tensor) -> torch.Tensor:
    """max(0, v) as a C loop starting from 0 finds it: -0.0 and negatives give +0.0."""
    return torch.where(v > 0, v, torch.zeros_like(v))


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 15) | ((hi & 15) << 4)


def _pack_fields(v: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 fields of `width` bits along dim -2 packed into one byte, the i-th shifted by i * width."""
    out = v.select(-2, 0).clone()
    for i in range(1, v.shape[-2]):
        out |= v.select(-2, i) << (i * width)
    return out


# -- 32-value blocks ------------------------------------------------------------------------------------------


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(1) / 127
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = _round_away(x * inv[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], 1)


def _q_0(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = _signed_max(x, 1) / -half
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.trunc(x * inv[:, None] + (half + 0.5)).clamp(max=2 * half - 1).to(torch.uint8)  # C: MIN(max, (int8_t)v)
    return d, q


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _q_0(x, 8)
    return torch.cat([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], 1)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """The 5-bit types' qh: bit j of a little-endian uint32 is the fifth bit of value j of the 32."""
    qh = (((q >> 4).to(torch.int64) & 1) << torch.arange(32, device=q.device)).sum(1)
    return torch.stack([(qh >> (8 * i)) & 255 for i in range(4)], 1).to(torch.uint8)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _q_0(x, 16)
    return torch.cat([_f16_bytes(d), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])], 1)


# -- K-quants -------------------------------------------------------------------------------------------------


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 from 0.0, left to right, as ggml's loops add: the same float result, so the same near-tie
    decisions (torch's own sum adds in another order). On the CPU index_add_ adds the rows in their order, in one call;
    on CUDA it adds them in any order."""
    if t.device.type == "cpu":
        into = torch.zeros_like(t[:1])
        return into.index_add_(0, torch.zeros(t.shape[0], dtype=torch.int64), t.contiguous()).squeeze(0)
    return _row_by_row_sum(t)


def _row_by_row_sum(t: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros_like(t[0])
    for row in t.unbind(0):
        acc += row
    return acc


def _levels(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    iscale: torch.Tensor,
    lo: int,
    hi: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """clamp(nearest_int(iscale * (x - shift)), lo, hi), written into `out` (round_ rounds halves to even, as
    ggml's nearest_int does for these magnitudes)."""
    if out is None:
        out = torch.empty_like(x)
    if shift is None:
        torch.mul(x, iscale, out=out)
    else:
        torch.sub(x, shift, out=out).mul_(iscale)
    return out.round_().clamp_(lo, hi)


def _err(t: torch.Tensor, use_mad: bool) -> torch.Tensor:
    """make_qkx2_quants' error of one value: |diff| with use_mad, diff² without (in place)."""
    return t.abs_() if use_mad else t.square_()


def _make_qkx2(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants over columns of 32 (or 16) values ([32, M]) -> (scale, -min, iscale, shift, flat)
    per column: its levels are clamp(nearest_int(iscale * (x - shift)), 0, nmax), or 0 where the column is flat."""
    mx = x.amax(0)
    mn = x.amin(0).clamp_(max=0)
    flat = mx == mn
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    cand = torch.empty_like(x)
    terms = x.new_empty([x.shape[0], 3, x.shape[1]])
    iscale = _rdiv(float(nmax), (mx - mn).masked_fill_(flat, 1.0))
    scale = 1 / iscale
    best = _seq_sum(_err(_levels(x, mn, iscale, 0, nmax, cand).mul_(scale).add_(mn).sub_(x), use_mad).mul_(w))
    # rows: the iscale and shift that give the best levels, their error, and their scale and min
    state = torch.stack([iscale, mn, best, scale, mn])
    best_iscale, best_shift, best, scale, mn = state.unbind(0)
    # C's float32 `rmin + rdelta*is + nmax` for each step
    nums = (
        torch.arange(nstep + 1, dtype=torch.float32, device=x.device)
        .mul_(torch.tensor(rdelta, dtype=torch.float32))
        .add_(rmin)
        .add_(nmax)
    )
    live = (~flat).float()
    won = torch.empty_like(live)
    for step in range(nstep + 1):
        # ggml keeps searching from the best min found so far: `min` is updated inside its loop
        iscale = nums[step] / (mx - mn).masked_fill_(flat, 1.0)
        _levels(x, mn, iscale, 0, nmax, cand)
        torch.mul(w, cand, out=terms[:, 0])
        torch.mul(terms[:, 0], cand, out=terms[:, 1])
        torch.mul(terms[:, 0], x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = _seq_sum(terms).unbind(0)  # three sums in one pass over the rows
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # C: if (this_min > 0) { this_min = 0; this_scale = sum_xl / sum_l2; }, with 0/1 weights (below)
        this_scale = torch.lerp(this_scale, sum_xl / sum_l2, torch.gt(this_min, 0.0, out=won))
        this_min.clamp_(max=0.0)
        err = _seq_sum(_err(cand.mul_(this_scale).add_(this_min).sub_(x), use_mad).mul_(w))
        # 1.0 where C takes this step (D > 0 and mad < best_mad), else 0.0: lerp by these weights gives its ends
        # exactly (the candidates made finite first: where D <= 0 they may be inf or nan, and are not taken)
        torch.gt(best, err, out=won).mul_(torch.gt(det, 0.0, out=det)).mul_(live)
        state = torch.lerp(state, torch.stack([iscale, mn, err, this_scale, this_min]).nan_to_num_(0.0), won)
        best_iscale, best_shift, best, scale, mn = state.unbind(0)
    return scale.masked_fill(flat, 0.0), -mn, best_iscale, best_shift, flat


def _k_scales(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared steps of Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins -> (d and dmin as float16
    [blocks, 2], the 12 bytes of packed scales and mins, levels)."""
    nb = x.shape[0]
    cols = x.reshape(nb * 8, 32).t().contiguous()  # [32, sub-blocks]: ggml's per-value loops become row operations
    av = (_seq_sum(cols * cols) / 32).double().sqrt_().float()  # torch's float32 sqrt is not always correctly rounded
    w = av + cols.abs()
    scales, mins, iscale, shift, flat = _make_qkx2(cols, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = _positive(scales.amax(1)), _positive(mins.amax(1))
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    # C stores nearest_int() in a uint8 (negative values wrap) and then takes MIN(63, .)
    ls = (torch.round(inv_scale[:, None] * scales).to(torch.int64) & 255).clamp(max=63)
    lm = (torch.round(inv_min[:, None] * mins).to(torch.int64) & 255).clamp(max=63)
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    d = (d16.float()[:, None] * ls.float()).reshape(-1)
    dm = (dmin16.float()[:, None] * lm.float()).reshape(-1)
    sub = x.reshape(-1, 32)
    levels = torch.round((sub + dm[:, None]) / d.masked_fill(d == 0, 1.0)[:, None]).clamp_(0, nmax)
    kept = (d == 0).nonzero().squeeze(1)  # ggml leaves make_qkx2_quants' levels where the sub-block's scale is 0
    if kept.numel() > 0:
        levels[kept] = _levels(sub[kept], shift[kept, None], iscale[kept, None], 0, nmax).masked_fill_(
            flat[kept, None], 0.0
        )
    levels = levels.to(torch.uint8).reshape(nb, 4, 2, 32)
    packed = torch.cat(
        [
            (ls[:, :4] | ((ls[:, 4:] >> 4) << 6)),
            (lm[:, :4] | ((lm[:, 4:] >> 4) << 6)),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        1,
    ).to(torch.uint8)
    return torch.stack([d16, dmin16], 1), packed, levels


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    dd, packed, lv = _k_scales(x, 15, -1.0, 20)
    return torch.cat([dd.view(torch.uint8), packed, _nibbles(lv[:, :, 0], lv[:, :, 1]).reshape(x.shape[0], 128)], 1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    dd, packed, lv = _k_scales(x, 31, -0.5, 15)
    qh = _pack_fields((lv >> 4).reshape(x.shape[0], 8, 32), 1)  # bit k of qh[j]: the high bit of sub-block k
    return torch.cat([dd.view(torch.uint8), packed, qh, _nibbles(lv[:, :, 0], lv[:, :, 1]).reshape(x.shape[0], 128)], 1)


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 over columns of 16 values ([16, M]) -> (scale, iscales, choice, zero):
    a column's levels are clamp(nearest_int(iscale * x), -nmax, nmax - 1) + nmax with the iscale
    `iscales.gather(0, choice)`, or 0 where the column is all zero."""
    mx = _signed_max(x, 0)
    zero = mx.abs() < 1e-15
    mx.masked_fill_(zero, 1.0)
    w = x * x
    wx = w * x
    # every attempt's iscale, [19, M]: -(nmax + 0.1*is) / max for is = 0, -9..-1, 1..9, in float32 as C has it
    steps = torch.cat([torch.zeros(1), torch.arange(-9, 0), torch.arange(1, 10)]).float().to(x.device)
    iscales = steps.mul_(torch.tensor(0.1, dtype=torch.float32)).add_(nmax).neg_()[:, None] / mx
    # one value of every column at a time, for all attempts at once; the sums add left to right, as ggml's loop
    q, term, sumlx, suml2 = x.new_empty([4, iscales.shape[0], iscales.shape[1]]).unbind(0)
    for i in range(x.shape[0]):
        _levels(x[i], None, iscales, -nmax, nmax - 1, q)
        if i == 0:
            torch.mul(q, w[i], out=suml2).mul_(q)
            torch.mul(q, wx[i], out=sumlx)
        else:  # (in place where it can: writing into another buffer costs more than the product)
            suml2.add_(torch.mul(q, w[i], out=term).mul_(q))
            sumlx.add_(q.mul_(wx[i]))
    # make_qx_quants' choice: one attempt after the other, with its float32 comparisons. Where suml2 is 0 so is sumlx
    # (all its levels are 0, or their terms underflow), C's scale is 0, and that attempt never wins.
    scales = torch.div(sumlx, suml2, out=q).nan_to_num_(0.0)  # (into the loop's buffers: fresh ones cost more)
    bests = torch.mul(scales, sumlx, out=term)
    squares = sumlx.square_()
    best = bests[0]
    for attempt in range(1, iscales.shape[0]):
        # won: 1.0 where C's `sumlx*sumlx > best*suml2` holds, else 0.0 (into rows that are not read again); lerp by
        # these weights gives its ends exactly, and much faster than torch.where selects on the CPU
        won = torch.gt(squares[attempt], suml2[attempt].mul_(best), out=squares[attempt])
        best.lerp_(bests[attempt], won)
    # the last attempt that won, or 0
    index = squares[1:].mul_(torch.arange(1, iscales.shape[0], device=x.device)[:, None]).amax(0).long()[None]
    return scales.gather(0, index).squeeze(0).masked_fill_(zero, 0.0), iscales, index, zero


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    body, d16 = _q6_k_parts(x)
    return torch.cat([body, d16[:, None].view(torch.uint8)], 1)


def _q6_k_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q6_K block without its last field, and that field, d, as float16 (a block whose values are all zero is all
    zero bytes)."""
    nb = x.shape[0]
    cols = x.reshape(nb * 16, 16).t().contiguous()
    scales, iscales, choice, zero = _make_qx(cols, 32)
    scales = scales.reshape(nb, 16)
    max_scale = _signed_max(scales, 1)
    empty = max_scale.abs() < 1e-15
    iscale = _rdiv(-128.0, torch.where(empty, torch.ones_like(max_scale), max_scale))
    d16 = (1 / iscale).to(torch.float16)
    sc = torch.round(iscale[:, None] * scales).clamp(max=127)
    d = (d16.float()[:, None] * sc).reshape(-1)
    sub = x.reshape(-1, 16)
    lv = (sub / d.masked_fill(d == 0, 1.0)[:, None]).round_().clamp_(-32, 31).add_(32)
    kept = (d == 0).nonzero().squeeze(1)  # ggml leaves make_qx_quants' levels where the sub-block's scale is 0
    if kept.numel() > 0:
        iscale = iscales[:, kept].gather(0, choice[:, kept]).t()
        lv[kept] = _levels(sub[kept], None, iscale, -32, 31).add_(32).masked_fill_(zero[kept, None], 0.0)
    lv = lv.to(torch.int8).to(torch.uint8).reshape(nb, 2, 4, 32)  # (torch converts float to uint8 slowly)
    ql = _nibbles(lv[:, :, 0:2], lv[:, :, 2:4]).reshape(nb, 128)
    qh = _pack_fields(lv >> 4, 2).reshape(nb, 64)
    body = torch.cat([ql, qh, sc.to(torch.int8).to(torch.uint8)], 1)  # int8 -> uint8 wraps, as a byte view would
    if bool(empty.any()):
        body.masked_fill_(empty[:, None], 0)
    return body, d16.masked_fill(empty, 0.0)


_QUANTIZERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_0": _q4_0, "Q6_K": _q6_k, "Q5_K": _q5_k, "Q4_K": _q4_k}


# -- dequantization (ggml's dequantize_row_*) -------------------------------------------------------------------


def _dq8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float().mul_(_f16_value(b[:, :2])[:, None])


def _low_high(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 15, qs >> 4], 1)


def _shifts(n: int, width: int, device: torch.device) -> torch.Tensor:
    """0, width, 2*width, ... as uint8: shift counts for unpacking bytes (in uint8: int64 would be slower)."""
    return torch.arange(0, n * width, width, dtype=torch.uint8, device=device)


def _dq4_0(b: torch.Tensor) -> torch.Tensor:
    return _low_high(b[:, 2:]).float().sub_(8).mul_(_f16_value(b[:, :2])[:, None])


def _dq5_0(b: torch.Tensor) -> torch.Tensor:
    high = ((b[:, 2:6, None] >> _shifts(8, 1, b.device)) & 1).reshape(-1, 32)  # bit j of the little-endian qh
    q = _low_high(b[:, 6:]) | (high << 4)
    return q.float().sub_(16).mul_(_f16_value(b[:, :2])[:, None])


def _k_unpack(b: torch.Tensor):
    d, dmin = _f16_value(b[:, 0:2]), _f16_value(b[:, 2:4])
    s = b[:, 4:16].to(torch.int64)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return d[:, None] * sc.float(), dmin[:, None] * m.float()


def _dq4_k(b: torch.Tensor) -> torch.Tensor:
    scale, mn = _k_unpack(b)
    qs = b[:, 16:144].reshape(-1, 4, 32)
    q = torch.stack([qs & 15, qs >> 4], 2).reshape(-1, 8, 32).float()
    return q.mul_(scale[..., None]).sub_(mn[..., None]).reshape(-1, QK_K)


def _dq5_k(b: torch.Tensor) -> torch.Tensor:
    scale, mn = _k_unpack(b)
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 32)
    high = (qh[:, None, :] >> _shifts(8, 1, b.device)[None, :, None]) & 1  # bit 2s+h of qh[j] -> sub-block 2s+h
    q = torch.stack([qs & 15, qs >> 4], 2).reshape(-1, 8, 32) | (high << 4)
    return q.float().mul_(scale[..., None]).sub_(mn[..., None]).reshape(-1, QK_K)


def _dq6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(torch.int8).float()
    d = _f16_value(b[:, 208:210])
    low = torch.cat([ql & 15, ql >> 4], 2)  # [nb, 2, 4, 32]
    high = (qh >> _shifts(4, 2, b.device)[None, None, :, None]) & 3
    q = (low | (high << 4)).reshape(-1, 16, 16).float().sub_(32)
    return q.mul_(d[:, None, None] * sc[..., None]).reshape(-1, QK_K)


_DEQUANTIZERS = {"Q8_0": _dq8_0, "Q5_0": _dq5_0, "Q4_0": _dq4_0, "Q6_K": _dq6_k, "Q5_K": _dq5_k, "Q4_K": _dq4_k}


# -- as precisions: what a GGUF file stores per tensor -----------------------------------------------------------------


class GgmlType(Precision):
    """One ggml block type: each row quantized on its own (its length a multiple of the block)."""

    from_fp32 = False

    def __init__(self, qtype: str) -> None:
        self.key = qtype
        self.block, self.type_size = sizes(qtype)
        self.bytes_per_param = self.type_size / self.block

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[:-1]) * row_bytes(self.key, shape[-1])

    def fits(self, shape: tuple[int, ...]) -> bool:
        return shape[-1] % self.block == 0

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: quantize(weight.to(torch.bfloat16), self.key)}

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        data = stored[key]  # 2-D: one row of blocks per weight row
        return lambda start, stop: dequantize(
            data[start:stop], self.key, (stop - start, data.shape[1] // self.type_size * self.block)
        )


class GgmlFloat(Precision):
    """F32, F16 and BF16 as GGUF stores them (BF16 as its raw 16 bits: numpy has no bfloat16)."""

    def __init__(self, qtype: str, dtype: torch.dtype) -> None:
        self.key, self.dtype = qtype, dtype
        self.block, self.type_size = sizes(qtype)
        self.bytes_per_param = self.type_size

    def fits(self, shape: tuple[int, ...]) -> bool:
        return True

    def encode(self, key: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        x = weight.to(torch.bfloat16).to(self.dtype).cpu()
        return {key: x.view(torch.int16) if self.dtype == torch.bfloat16 else x}

    def rows(self, key: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...] | None = None) -> Rows:
        data = stored[key].view(self.dtype)
        return lambda start, stop: data[start:stop].to(torch.float32, copy=True)


for _q in QUANTIZED:
    register(GgmlType(_q))
for _q, _dtype in (("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16)):
    register(GgmlFloat(_q, _dtype))
