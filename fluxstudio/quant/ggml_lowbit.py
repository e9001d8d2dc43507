"""More ggml block types in torch, byte for byte as ggml's reference quantizers make them (no importance matrix):
Q4_1 and Q5_1 (32 values, a scale and a minimum), Q3_K and Q2_K (K-quants of 3 and 2 bits), IQ4_NL and IQ4_XS (4-bit
non-linear levels, blocks of 32 and super-blocks of 256).

As in `ggml.py`, each function follows ggml-quants.c step by step over every block at once (`quantize_row_q4_1_ref`,
`quantize_row_q2_K_ref`, `quantize_row_q3_K_ref`, and `quantize_iq4_nl` / `quantize_iq4_xs`, which is what
`ggml_quantize_chunk` and llama-quantize run), with its float operations in the same order; loops over the values of
a block become loops over rows of a [values, blocks] tensor, and sums add left to right. The types register
themselves with `ggml.py`'s tables and the precision registry when this module is imported.
"""

from __future__ import annotations

import torch

from fluxstudio.quant import ggml, ggml_loops
from fluxstudio.quant.base import register
from fluxstudio.quant.ggml import (
    QK_K,
    _f16_bytes,
    _f16_value,
    _high_bits,
    _levels,
    _low_high,
    _make_qkx2,
    _nibbles,
    _pack_fields,
    _positive,
    _rdiv,
    _seq_sum,
    _shifts,
    _signed_max,
)

IQ4_VALUES = tuple(int(v) for v in ggml_loops.IQ4_VALUES)  # ggml's kvalues_iq4nl


# -- Q4_1, Q5_1: (value - min) / d, rounded half up ------------------------------------------------------------------


def _first_zero_where_zero(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A block's min (or max) as C's loop finds it: where it is zero, the sign of the first zero of the block (the
    first one that reaches it wins, later equal ones do not replace it), which the fp16 bytes keep."""
    zero = v == 0
    if bool(zero.any()):
        first = (x == 0).to(torch.uint8).argmax(1, keepdim=True)
        v = torch.where(zero, x.gather(1, first).squeeze(1), v)
    return v


def _q_1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mn = _first_zero_where_zero(x.amin(1), x)
    mx = _first_zero_where_zero(x.amax(1), x)
    d = (mx - mn) / nmax
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.trunc((x - mn[:, None]) * inv[:, None] + 0.5).clamp(max=nmax).to(torch.uint8)  # C: MIN(n, (int8_t)v)
    return d, mn, q


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, mn, q = _q_1(x, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _nibbles(q[:, :16], q[:, 16:])], 1)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, mn, q = _q_1(x, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])], 1)


def _dq4_1(b: torch.Tensor) -> torch.Tensor:
    q = _low_high(b[:, 4:]).float()
    return (_f16_value(b[:, :2])[:, None] * q).add_(_f16_value(b[:, 2:4])[:, None])


def _dq5_1(b: torch.Tensor) -> torch.Tensor:
    high = ((b[:, 4:8, None] >> _shifts(8, 1, b.device)) & 1).reshape(-1, 32)
    q = (_low_high(b[:, 8:]) | (high << 4)).float()
    return (_f16_value(b[:, :2])[:, None] * q).add_(_f16_value(b[:, 2:4])[:, None])


# -- Q2_K: 16 sub-blocks of 16, 2-bit levels with a 4-bit scale and min each -----------------------------------------


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """[blocks, 256] levels of 2 bits -> 64 bytes: byte 32*h + l holds values 128*h + l + 32*k in bits 2k."""
    nb = levels.shape[0]
    return _pack_fields(levels.reshape(nb, 2, 4, 32), 2).reshape(nb, 64)


def _q2_k_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q2_K block's scales byte per sub-block, its levels, and d and dmin as float16 [blocks, 2]."""
    nb = x.shape[0]
    cols = x.reshape(nb * 16, 16).t().contiguous()
    scales, mins, iscale, shift, flat = _make_qkx2(cols, cols.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = _positive(scales.amax(1)), _positive(mins.amax(1))
    inv_scale = torch.where(max_scale > 0, _rdiv(15.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(15.0, max_min), torch.zeros_like(max_min))
    # C stores nearest_int() in a uint8 (and ORs the min's, shifted by 4, into it)
    ls = torch.round(inv_scale[:, None] * scales).to(torch.int64)
    lm = torch.round(inv_min[:, None] * mins).to(torch.int64)
    packed = ((ls & 255) | ((lm << 4) & 255)).to(torch.uint8)
    d16 = torch.where(max_scale > 0, max_scale / 15, torch.zeros_like(max_scale)).to(torch.float16)
    dmin16 = torch.where(max_min > 0, max_min / 15, torch.zeros_like(max_min)).to(torch.float16)
    d = (d16.float()[:, None] * (packed & 15).float()).reshape(-1)
    dm = (dmin16.float()[:, None] * (packed >> 4).float()).reshape(-1)
    sub = x.reshape(-1, 16)
    levels = torch.round((sub + dm[:, None]) / d.masked_fill(d == 0, 1.0)[:, None]).clamp_(0, 3)
    kept = (d == 0).nonzero().squeeze(1)  # ggml leaves make_qkx2_quants' levels where the sub-block's scale is 0
    if kept.numel() > 0:
        levels[kept] = _levels(sub[kept], shift[kept, None], iscale[kept, None], 0, 3).masked_fill_(
            flat[kept, None], 0.0
        )
    return packed, levels.to(torch.uint8).reshape(nb, 256), torch.stack([d16, dmin16], 1)


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    packed, levels, dd = _q2_k_parts(x)
    return torch.cat([packed, _pack_2bit(levels), dd.view(torch.uint8)], 1)


def _dq2_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16_value(b[:, 80:82]), _f16_value(b[:, 82:84])
    sc = b[:, :16]
    dl = (d[:, None] * (sc & 15).float())[..., None]
    ml = (dmin[:, None] * (sc >> 4).float())[..., None]
    q = (b[:, 16:80].reshape(-1, 2, 1, 32) >> _shifts(4, 2, b.device)[None, None, :, None]) & 3
    return (dl * q.reshape(-1, 16, 16).float() - ml).reshape(-1, QK_K)


# -- Q3_K: 16 sub-blocks of 16, 3-bit levels with a 6-bit signed scale each -----------------------------------------


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse over columns of 16 values ([16, M]) -> (scale, levels + nmax). Its
    coordinate search makes up to five passes over a column and stops after one that changes nothing; such a pass
    leaves the column as it was, so each pass here runs only on the columns the pass before changed (about a fifth
    after the first), gathered together, and writes them back."""
    mx = _signed_max(x, 0)
    zero = mx.abs() < 1e-15  # ggml's GROUP_MAX_EPS
    iscale = _rdiv(-float(nmax), mx.masked_fill(zero, 1.0))
    levels = _levels(x, None, iscale, -nmax, nmax - 1)
    w_all = x * x
    wx_all = w_all * x
    sumlx_all = _seq_sum(wx_all * levels)
    suml2_all = _seq_sum(w_all * levels * levels)
    cols = torch.arange(x.shape[1], device=x.device)
    xs, w, wx, lv, sumlx, suml2 = x, w_all, wx_all, levels, sumlx_all, suml2_all
    gathered = False
    # 1.0 where C takes a step, else 0.0, and lerp by it: exactly its ends, and several times faster on the CPU than
    # torch's bool masks and where (the candidates made finite first: where C stops early they may be nan)
    take = torch.empty_like(sumlx)
    cond = torch.empty_like(sumlx)
    for _ in range(5):
        changed = torch.zeros_like(sumlx)
        for i in range(x.shape[0]):
            li = lv[i]
            before = sumlx - wx[i] * li  # C goes on only where this is > 0
            sl2 = suml2 - w[i] * li * li
            new = torch.round(xs[i] * sl2 / before).clamp_(-nmax, nmax - 1).nan_to_num_(0.0)
            slx = before + wx[i] * new
            sl2 = sl2 + w[i] * new * new
            torch.gt(before, 0.0, out=take)
            take.mul_(torch.ne(new, li, out=cond)).mul_(torch.gt(sl2, 0.0, out=cond))
            take.mul_(torch.gt(slx * slx * suml2, sumlx * sumlx * sl2, out=cond))
            lv[i] = torch.lerp(li, new, take)
            sumlx = torch.lerp(sumlx, slx, take)
            suml2 = torch.lerp(suml2, sl2, take)
            changed = torch.maximum(changed, take)
        if gathered:  # back into place
            levels.index_copy_(1, cols, lv)
            sumlx_all.index_copy_(0, cols, sumlx)
            suml2_all.index_copy_(0, cols, suml2)
        else:  # the first pass ran on every column, its levels in place
            sumlx_all, suml2_all = sumlx, suml2
        keep = changed.nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        cols = cols[keep]
        xs, w, wx, lv = xs[:, keep], w[:, keep], wx[:, keep], lv[:, keep]
        sumlx, suml2 = sumlx[keep], suml2[keep]
        take, cond = torch.empty_like(sumlx), torch.empty_like(sumlx)
        gathered = True
    some = suml2_all > 0
    scale = torch.where(some, sumlx_all / suml2_all.masked_fill(~some, 1.0), torch.zeros_like(sumlx_all))
    levels += nmax
    if bool(zero.any()):  # (a full-size masked_fill is slow on the CPU: only where there is a zero column)
        levels.masked_fill_(zero[None, :], 0.0)
    return scale.masked_fill(zero, 0.0), levels


def _q3_k_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q3_K block's 16 scales (6 bits, offset 32), its levels (0..7) and d as float16."""
    nb = x.shape[0]
    cols = x.reshape(nb * 16, 16).t().contiguous()
    scales, lv = _make_q3(cols, 4)
    scales = scales.reshape(nb, 16)
    max_scale = _signed_max(scales, 1)
    some = max_scale != 0
    iscale = _rdiv(-32.0, max_scale.masked_fill(~some, 1.0))
    ls = (torch.round(iscale[:, None] * scales).clamp_(-32, 31) + 32).masked_fill_(~some[:, None], 0.0)
    d16 = torch.where(some, 1 / iscale, torch.zeros_like(iscale)).to(torch.float16)
    d = (d16.float()[:, None] * (ls - 32)).reshape(-1)
    sub = x.reshape(-1, 16)
    levels = torch.round(sub / d.masked_fill(d == 0, 1.0)[:, None]).clamp_(-4, 3).add_(4)
    kept = (d == 0).nonzero().squeeze(1)  # ggml keeps make_q3_quants' levels where d is 0
    if kept.numel() > 0:
        levels[kept] = lv[:, kept].t()
    return ls.to(torch.uint8), levels.to(torch.uint8).reshape(nb, 256), d16


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    ls, levels, d16 = _q3_k_parts(x)
    nb = x.shape[0]
    hmask = _pack_fields((levels >> 2).reshape(nb, 8, 32), 1)  # bit b of byte m: the high bit of value 32b + m
    scales = torch.cat([(ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4), _pack_fields((ls >> 4).reshape(nb, 4, 4), 2)], 1)
    return torch.cat([hmask, _pack_2bit(levels & 3), scales, d16[:, None].view(torch.uint8)], 1)


def _dq3_k(b: torch.Tensor) -> torch.Tensor:
    d = _f16_value(b[:, 108:110])
    s = b[:, 96:108]
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], 1)
    high = (s[:, 8:12, None] >> _shifts(4, 2, b.device)).transpose(1, 2).reshape(-1, 16) & 3
    dl = (d[:, None] * ((low | (high << 4)).to(torch.int8) - 32).float())[..., None]
    ql = ((b[:, 32:96].reshape(-1, 2, 1, 32) >> _shifts(4, 2, b.device)[None, None, :, None]) & 3).reshape(-1, 16, 16)
    qh = ((b[:, :32].reshape(-1, 1, 32) >> _shifts(8, 1, b.device)[None, :, None]) & 1).reshape(-1, 16, 16)
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(-1, QK_K)


# -- IQ4_NL, IQ4_XS: the nearest of 16 non-linear levels --------------------------------------------------------------


class _Levels:
    """IQ4's 16 levels, looked up by half-unit cells (`ggml_loops.IQ4_CELLS`: why that is best_index_int8)."""

    def __init__(self, device: torch.device) -> None:
        index = torch.from_numpy(ggml_loops.IQ4_CELLS)
        self.index_of = index.to(device)
        self.value_of = torch.tensor(IQ4_VALUES, dtype=torch.float32)[index].to(device)

    def index(self, v: torch.Tensor) -> torch.Tensor:
        """ggml's best_index_int8 for every value."""
        return _lookup(self.index_of, v * 2.0)


_TABLES: dict[torch.device, _Levels] = {}


def _levels_on(device: torch.device) -> _Levels:
    if device not in _TABLES:
        _TABLES[device] = _Levels(device)
    return _TABLES[device]


def _lookup(table: torch.Tensor, twice: torch.Tensor) -> torch.Tensor:
    """`table` at the half-unit cell of each value (given doubled, in place: a scaling by 2 is exact), those below
    the first level or above the last in the end cells. The cells go as int32 to index_select: on the CPU several
    times faster than int64 ones to take."""
    cells = twice.clamp_(-254.0, 225.0).floor_().add_(254.0).to(torch.int32)
    return table.index_select(0, cells.reshape(-1)).reshape(cells.shape)


def _iq4_scales(x: torch.Tensor, value_of: torch.Tensor) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's search with ntry 7 over columns of 32 values ([32, M]) -> the scale of each."""
    w = x * x
    mx = _signed_max(x, 0)
    zero = mx.abs() < 1e-15  # ggml's GROUP_MAX_EPS
    mx = mx.masked_fill(zero, 1.0)
    d = -mx / -127.0  # -max / values[0]
    q = _lookup(value_of, (2 / d) * x)  # the nearest level of id * x (2 * (id * x) is (2 * id) * x exactly)
    wq = w * q
    sumqx, sumq2 = _seq_sum(wq * x), _seq_sum(wq * q)
    d = torch.where(sumq2 > 0, sumqx / sumq2.masked_fill(sumq2 == 0, 1.0), torch.zeros_like(d))
    best = d * sumqx
    won, cond = torch.empty_like(d), torch.empty_like(d)
    for itry in range(-7, 8):
        q = _lookup(value_of, _rdiv(float(2 * (itry - 127)), mx) * x)  # id = (itry + values[0]) / max
        wq = w * q
        sumqx, sumq2 = _seq_sum(wq * x), _seq_sum(wq * q)
        # 1.0 where C takes this try, else 0.0, and lerp by it (exactly its ends, and faster than where on the CPU)
        take = torch.gt(sumq2, 0.0, out=won).mul_(torch.gt(sumqx * sumqx, best * sumq2, out=cond))
        d = torch.lerp(d, sumqx / sumq2.masked_fill(sumq2 == 0, 1.0), take)
        best = torch.lerp(best, d * sumqx, take)
    return d.masked_fill(zero, 0.0)


def _iq4_levels(x: torch.Tensor, inv: torch.Tensor, table: _Levels) -> torch.Tensor:
    """[blocks of 32] values -> 16 bytes each: value j in the low nibble of byte j, value 16 + j in its high one."""
    lv = table.index(inv[:, None] * x).to(torch.uint8)
    return _nibbles(lv[:, :16], lv[:, 16:])


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    table = _levels_on(x.device)
    d = _iq4_scales(x.t().contiguous(), table.value_of)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return torch.cat([_f16_bytes(d), _iq4_levels(x, inv, table)], 1)


def _iq4_xs(x: torch.Tensor) -> torch.Tensor:
    table = _levels_on(x.device)
    nb = x.shape[0]
    scales = _iq4_scales(x.reshape(nb * 8, 32).t().contiguous(), table.value_of).reshape(nb, 8)
    d = _signed_max(scales, 1) / -32  # C's float d (its fp16 rounding is only what is stored)
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    ls = torch.round(inv[:, None] * scales).clamp_(-32, 31)
    dl = d[:, None] * ls
    idl = torch.where(dl != 0, 1 / dl, torch.zeros_like(dl)).reshape(-1)
    qs = _iq4_levels(x.reshape(-1, 32), idl, table).reshape(nb, 128)
    ls = (ls + 32).to(torch.int64)
    scales_h = ((ls >> 4) << torch.arange(0, 16, 2, device=x.device)).sum(1)
    scales_l = ((ls[:, 0::2] & 15) | ((ls[:, 1::2] & 15) << 4)).to(torch.uint8)
    h_bytes = torch.stack([scales_h & 255, scales_h >> 8], 1).to(torch.uint8)
    return torch.cat([_f16_bytes(d), h_bytes, scales_l, qs], 1)


def _dq_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    q = _low_high(b[:, 2:]).long()
    return _f16_value(b[:, :2])[:, None] * values[q]


def _dq_iq4_xs(b: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=b.device)
    d = _f16_value(b[:, :2])
    h = b[:, 2].to(torch.int64) | (b[:, 3].to(torch.int64) << 8)
    high = (h[:, None] >> torch.arange(0, 16, 2, device=b.device)) & 3
    low = torch.stack([b[:, 4:8] & 15, b[:, 4:8] >> 4], 2).reshape(-1, 8).to(torch.int64)
    dl = (d[:, None] * ((low | (high << 4)) - 32).float())[..., None]
    qs = b[:, 8:].reshape(-1, 8, 16)
    q = torch.cat([qs & 15, qs >> 4], 2).long()
    return (dl * values[q]).reshape(-1, QK_K)


NEW = {
    "Q5_1": (_q5_1, _dq5_1),
    "Q4_1": (_q4_1, _dq4_1),
    "Q3_K": (_q3_k, _dq3_k),
    "Q2_K": (_q2_k, _dq2_k),
    "IQ4_NL": (_iq4_nl, _dq_iq4_nl),
    "IQ4_XS": (_iq4_xs, _dq_iq4_xs),
}
for _name, (_quantize, _dequantize) in NEW.items():
    ggml._QUANTIZERS[_name], ggml._DEQUANTIZERS[_name] = _quantize, _dequantize
    register(ggml.GgmlType(_name))
