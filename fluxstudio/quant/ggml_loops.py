"""ggml's reference quantizers as compiled loops (numba): Q8_0, Q5_0, Q4_0, Q5_1, Q4_1, the K-quants Q6_K, Q5_K,
Q4_K, Q3_K, Q2_K, and IQ4_NL and IQ4_XS, byte for byte as `ggml_quantize_chunk` makes them with no importance
matrix.

Each function follows ggml-quants.c's step for step (`make_qx_quants`, `make_qkx2_quants`, `make_q3_quants`,
`quantize_row_q*_ref`, `quantize_row_iq4_nl_impl`), in float32 with its operations in C's order: every integer and
constant that meets a float is made float32 first, as C converts it (numba would otherwise compute in float64), and
nothing is fused or reordered (no fastmath). Where C searches a block's sub-blocks one after the other, each on its
own, some run them side by side (each still in C's order), which the compiler turns into vector instructions. They
run without the GIL, so `ggml.quantize` runs chunks of blocks side
by side, one core each, as ggml's threads do. The torch functions in `ggml.py` make the same bytes on CUDA.

Compiled at first use (a few seconds per type) and cached on disk by numba.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

F = np.float32
EPS = F(1e-15)  # GROUP_MAX_EPS
FLT_MAX = F(np.finfo(np.float32).max)
TENTH, HALF = F(0.1), F(0.5)  # C's 0.1f and 0.5f (written here, a float literal in a loop would be a float64)
# ggml's kvalues_iq4nl
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F)

_jit = njit(nogil=True, cache=True, error_model="numpy")
_inline = njit(nogil=True, cache=True, error_model="numpy", inline="always")


LANES = 16  # sub-blocks that make_qkx2_quants runs side by side: Q2_K's 16 of a block, Q4_K's and Q5_K's 8 of two
MAGIC = F(12582912.0)  # 1.5 * 2^23: below 2^22 in magnitude, v + MAGIC rounds v to an integer, halves to even


@_inline
def nearest(v):
    """ggml's nearest_int as a float32 (its same addition; C reads the integer from the sum's bits). Levels stay
    float32 in the loops below: the compiler makes vectors of float steps, and C's int-to-float conversions of them
    are exact."""
    return (v + MAGIC) - MAGIC


@_inline
def nearest_in(v, lo, hi):
    """MAX(lo, MIN(hi, nearest_int(v))), as a float32."""
    return min(max(nearest(v), F(lo)), F(hi))


@_jit
def nearest_int(v):
    return int(nearest(v))


@_jit
def fp16_bits(v):
    """The IEEE half nearest to a float32 (ties to even, as F16C's conversion), as its 16 bits."""
    a = abs(np.float64(v))  # exact: the scalings below are by powers of two
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    if math.isnan(a):
        return sign | 0x7E00
    if a >= 65520.0:  # rounds to infinity
        return sign | 0x7C00
    if a < 2.0**-14:  # subnormal (or it rounds up to the smallest normal, 0x0400: the same bits)
        return sign | int(np.rint(a * 2.0**24))
    m, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1): 11 significant bits are rint(m * 2048)
    q = int(np.rint(m * 2048.0))
    if q == 2048:
        q, e = 1024, e + 1
    return sign | ((e + 14) << 10) | (q - 1024)


@_jit
def fp16_value(h):
    """GGML_FP16_TO_FP32 of 16 bits."""
    e, m = (h >> 10) & 31, h & 1023
    v = m * 2.0**-24 if e == 0 else (math.inf if m == 0 else math.nan) if e == 31 else (1024 + m) * 2.0 ** (e - 25)
    return F(-v if h & 0x8000 else v)


@_jit
def put_fp16(out, at, v):
    """Store `v` as a little-endian half at out[at]; return the float32 it stands for."""
    h = fp16_bits(v)
    out[at], out[at + 1] = h & 255, h >> 8
    return fp16_value(h)


@_inline
def signed_max(x, n):
    """(the value of largest magnitude, that magnitude) of x[:n], the first one on ties, as ggml's loops find it."""
    mx, amax = F(0), F(0)
    for i in range(n):
        if abs(x[i]) > amax:
            amax, mx = abs(x[i]), x[i]
    return mx, amax


@_inline
def make_qx_quants(n, nmax, x, L, iscales, sumlx, suml2):
    """make_qx_quants with rmse_type 1 and no weights: the scale; levels + nmax into L. Its 19 attempts (iscale
    -nmax/max, then -(nmax + 0.1*is)/max for is = -9..-1, 1..9) are summed side by side, each in its own order (the
    compiler makes vectors of them), and then compared one after the other, as C does. iscales, sumlx and suml2:
    scratch of 19."""
    mx, amax = signed_max(x, n)
    if amax < EPS:
        L[:n] = 0
        return F(0)
    iscales[0] = F(-nmax) / mx
    for t in range(1, 19):
        iscales[t] = -(F(nmax) + TENTH * F(t - 10 if t < 10 else t - 9)) / mx
    sumlx[:] = 0
    suml2[:] = 0
    for i in range(n):
        w = x[i] * x[i]
        wx = w * x[i]
        for t in range(19):
            q = nearest_in(iscales[t] * x[i], -nmax, nmax - 1)
            sumlx[t] += wx * q
            suml2[t] += w * q * q
    scale = sumlx[0] / suml2[0] if suml2[0] != 0 else F(0)
    best = scale * sumlx[0]
    choice = 0
    for t in range(1, 19):
        if suml2[t] > 0 and sumlx[t] * sumlx[t] > best * suml2[t]:
            scale = sumlx[t] / suml2[t]
            best = scale * sumlx[t]
            choice = t
    for i in range(n):
        L[i] = nearest_in(iscales[choice] * x[i], -nmax, nmax - 1) + F(nmax)
    return scale


@_inline
def make_qkx2_quants(n, nmax, x, w, L, rmin, nstep, use_mad, scales, mins, t):
    """make_qkx2_quants on 16 sub-blocks at once: x, w and L are [n, 16] (column s: sub-block s), the scales and
    the_mins go into scales and mins, the levels into L. Each sub-block's steps and sums run in C's order; the
    sub-blocks run side by side (the compiler makes vectors of them), which C's one-at-a-time loop cannot. t: scratch
    [14, 16] (a step's levels are not kept: the best step's are made again at the end)."""
    lo, hi, sum_w, sum_x, best, iscale, shift, best_iscale, sum_l, sum_l2, sum_xl, this_scale, this_min, flat = t
    for s in range(LANES):
        lo[s], hi[s] = x[0, s], x[0, s]
        sum_w[s] = w[0, s]
        sum_x[s] = sum_w[s] * x[0, s]
    for i in range(1, n):
        for s in range(LANES):
            if x[i, s] < lo[s]:
                lo[s] = x[i, s]
            if x[i, s] > hi[s]:
                hi[s] = x[i, s]
            sum_w[s] += w[i, s]
            sum_x[s] += w[i, s] * x[i, s]
    for s in range(LANES):
        if lo[s] > 0:
            lo[s] = F(0)
        flat[s] = hi[s] == lo[s]
        best_iscale[s] = F(nmax) / (hi[s] - lo[s])  # (a flat sub-block, hi == lo, keeps nothing of this)
        scales[s] = F(1) / best_iscale[s]
        shift[s] = lo[s]
        best[s] = F(0)
    for i in range(n):
        for s in range(LANES):
            diff = scales[s] * nearest_in(best_iscale[s] * (x[i, s] - lo[s]), 0, nmax) + lo[s] - x[i, s]
            best[s] += w[i, s] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        for s in range(LANES):
            iscale[s] = (rmin + TENTH * F(step) + F(nmax)) / (hi[s] - lo[s])
            sum_l[s], sum_l2[s], sum_xl[s] = F(0), F(0), F(0)
        for i in range(n):
            for s in range(LANES):
                q = nearest_in(iscale[s] * (x[i, s] - lo[s]), 0, nmax)
                sum_l[s] += w[i, s] * q
                sum_l2[s] += w[i, s] * q * q
                sum_xl[s] += w[i, s] * q * x[i, s]
        for s in range(LANES):
            D = sum_w[s] * sum_l2[s] - sum_l[s] * sum_l[s]
            this_scale[s] = (sum_w[s] * sum_xl[s] - sum_x[s] * sum_l[s]) / D
            this_min[s] = (sum_l2[s] * sum_x[s] - sum_l[s] * sum_xl[s]) / D
            if this_min[s] > 0:
                this_min[s] = F(0)
                this_scale[s] = sum_xl[s] / sum_l2[s]
            sum_l[s] = D  # (kept for the choice below)
            sum_l2[s] = F(0)  # this step's error
        for i in range(n):
            for s in range(LANES):
                q = nearest_in(iscale[s] * (x[i, s] - lo[s]), 0, nmax)
                diff = this_scale[s] * q + this_min[s] - x[i, s]
                sum_l2[s] += w[i, s] * (abs(diff) if use_mad else diff * diff)
        for s in range(LANES):
            if sum_l[s] > 0 and sum_l2[s] < best[s] and not flat[s]:
                best[s], scales[s], best_iscale[s], shift[s], lo[s] = (
                    sum_l2[s],
                    this_scale[s],
                    iscale[s],
                    lo[s],
                    this_min[s],
                )
    for s in range(LANES):
        for i in range(n):
            L[i, s] = F(0) if flat[s] else nearest_in(best_iscale[s] * (x[i, s] - shift[s]), 0, nmax)
        mins[s] = -lo[s]
        if flat[s]:
            scales[s] = F(0)


@_inline
def make_q3_quants(n, nmax, x, L, w, wx):
    """make_q3_quants with do_rmse: the scale; levels + nmax into L. w and wx: scratch of n."""
    mx, amax = signed_max(x, n)
    if amax < EPS:
        L[:n] = 0
        return F(0)
    iscale = F(-nmax) / mx
    sumlx, suml2 = F(0), F(0)
    for i in range(n):
        L[i] = nearest_in(iscale * x[i], -nmax, nmax - 1)
        w[i] = x[i] * x[i]
        wx[i] = w[i] * x[i]
        sumlx += wx[i] * L[i]
        suml2 += w[i] * L[i] * L[i]
    for _ in range(5):
        changed = False
        for i in range(n):
            slx = sumlx - wx[i] * L[i]
            if slx > 0:
                sl2 = suml2 - w[i] * L[i] * L[i]
                new = nearest_in(x[i] * sl2 / slx, -nmax, nmax - 1)
                if new != L[i]:
                    slx += wx[i] * new
                    sl2 += w[i] * new * new
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed = True
        if not changed:
            break
    L[:n] += F(nmax)
    return sumlx / suml2 if suml2 > 0 else F(0)


@_inline
def pack_2bit(L, out, at):
    """qs of Q2_K and Q3_K: byte 32*h + l holds values 128*h + l + 32*k in bits 2k."""
    for j in range(0, 256, 128):
        for q in range(32):
            out[at + j // 4 + q] = (
                int(L[j + q]) | (int(L[j + q + 32]) << 2) | (int(L[j + q + 64]) << 4) | (int(L[j + q + 96]) << 6)
            )


@_jit
def q6_k(x, out):
    """quantize_row_q6_K_ref: x [blocks, 256] -> out [blocks, 210]."""
    L, ls = np.zeros(256, F), np.zeros(16, np.int64)
    scales, iscales, sumlx, suml2 = np.zeros(16, F), np.zeros(19, F), np.zeros(19, F), np.zeros(19, F)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        max_scale, max_abs_scale = F(0), F(0)
        for ib in range(16):
            scales[ib] = make_qx_quants(16, 32, xb[16 * ib :], L[16 * ib :], iscales, sumlx, suml2)
            if abs(scales[ib]) > max_abs_scale:
                max_abs_scale, max_scale = abs(scales[ib]), scales[ib]
        y[:] = 0
        if max_abs_scale < EPS:
            continue
        iscale = F(-128) / max_scale
        d = put_fp16(y, 208, F(1) / iscale)
        for ib in range(16):
            ls[ib] = min(127, nearest_int(iscale * scales[ib]))  # an int8
            y[192 + ib] = ls[ib] & 255
        for j in range(16):
            dj = d * F(ls[j])
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = nearest_in(xb[16 * j + ii] / dj, -32, 31) + F(32)
        for j in range(0, 256, 128):
            ql, qh = j // 2, 128 + j // 4
            for q in range(32):
                a, b2, c, e = int(L[j + q]), int(L[j + q + 32]), int(L[j + q + 64]), int(L[j + q + 96])
                y[ql + q] = (a & 15) | ((c & 15) << 4)
                y[ql + q + 32] = (b2 & 15) | ((e & 15) << 4)
                y[qh + q] = (a >> 4) | ((b2 >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


@_inline
def transposed(xb, n, x, at):
    """x[i, at + s] = xb[n*s + i]: sub-block s of the block in column at + s."""
    for s in range(xb.shape[0] // n):
        for i in range(n):
            x[i, at + s] = xb[n * s + i]


@_inline
def from_columns(LT, n, m, L):
    """The levels back in C's order: L[n*s + i] = LT[i, s] for the first m columns."""
    for s in range(m):
        for i in range(n):
            L[n * s + i] = LT[i, s]


@_inline
def largest(scales, mins, m):
    """(max_scale, max_min) of the first m sub-blocks as C's loops find them: from 0, the first of equals kept."""
    max_scale, max_min = F(0), F(0)
    for j in range(m):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    return max_scale, max_min


@_inline
def k_pair(x, b, nmax, rmin, nstep, xt, w, LT, scales, mins, t):
    """make_qkx2_quants with Q4_K's and Q5_K's weights for blocks b and b + 1 (all zero for a missing second)."""
    xt[:] = 0
    for h in range(min(2, x.shape[0] - b)):
        transposed(x[b + h], 32, xt, 8 * h)
    av_x = t[0]
    av_x[:] = 0
    for i in range(32):
        for s in range(LANES):
            av_x[s] += xt[i, s] * xt[i, s]
    for s in range(LANES):
        av_x[s] = np.sqrt(av_x[s] / F(32))
    for i in range(32):
        for s in range(LANES):
            w[i, s] = av_x[s] + abs(xt[i, s])
    make_qkx2_quants(32, nmax, xt, w, LT, rmin, nstep, False, scales, mins, t)


@_inline
def k_scales(xb, y, nmax, L, LT, scales, mins):
    """The rest of the steps Q4_K and Q5_K share, for one block whose 8 sub-blocks' make_qkx2_quants are in
    scales[:8], mins[:8] and LT[:, :8]: the 6-bit scales and mins into y[0:16], levels into L."""
    from_columns(LT, 32, 8, L)
    max_scale, max_min = largest(scales, mins, 8)
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 255)  # C: a uint8, then MIN(63, .)
        lm = min(63, nearest_int(inv_min * mins[j]) & 255)
        if j < 4:
            y[4 + j] = ls
            y[4 + j + 4] = lm
        else:
            y[4 + j + 4] = (ls & 15) | ((lm & 15) << 4)
            y[4 + j - 4] |= (ls >> 4) << 6
            y[4 + j] |= (lm >> 4) << 6
    d = put_fp16(y, 0, max_scale / F(63))
    dmin = put_fp16(y, 2, max_min / F(63))
    for j in range(8):  # get_scale_min_k4
        if j < 4:
            sc, m = np.int64(y[4 + j]) & 63, np.int64(y[4 + j + 4]) & 63
        else:
            sc = (np.int64(y[4 + j + 4]) & 15) | ((np.int64(y[4 + j - 4]) >> 6) << 4)
            m = (np.int64(y[4 + j + 4]) >> 4) | ((np.int64(y[4 + j]) >> 6) << 4)
        dj = d * F(sc)
        if dj == 0:
            continue
        dm = dmin * F(m)
        for q in range(32):
            L[32 * j + q] = nearest_in((xb[32 * j + q] + dm) / dj, 0, nmax)


@_jit
def q4_k(x, out):
    """quantize_row_q4_K_ref: x [blocks, 256] -> out [blocks, 144]."""
    L, xt, w, LT = np.zeros(256, F), np.zeros((32, LANES), F), np.zeros((32, LANES), F), np.zeros((32, LANES), F)
    scales, mins, t = np.zeros(LANES, F), np.zeros(LANES, F), np.zeros((14, LANES), F)
    for b in range(0, x.shape[0], 2):
        k_pair(x, b, 15, F(-1), 20, xt, w, LT, scales, mins, t)
        for h in range(min(2, x.shape[0] - b)):
            y = out[b + h]
            y[:] = 0
            k_scales(x[b + h], y, 15, L, LT[:, 8 * h :], scales[8 * h :], mins[8 * h :])
            for j in range(0, 256, 64):
                for q in range(32):
                    y[16 + j // 2 + q] = int(L[j + q]) | (int(L[j + q + 32]) << 4)


@_jit
def q5_k(x, out):
    """quantize_row_q5_K_ref: x [blocks, 256] -> out [blocks, 176]."""
    L, xt, w, LT = np.zeros(256, F), np.zeros((32, LANES), F), np.zeros((32, LANES), F), np.zeros((32, LANES), F)
    scales, mins, t = np.zeros(LANES, F), np.zeros(LANES, F), np.zeros((14, LANES), F)
    for b in range(0, x.shape[0], 2):
        k_pair(x, b, 31, -HALF, 15, xt, w, LT, scales, mins, t)
        for h in range(min(2, x.shape[0] - b)):
            y = out[b + h]
            y[:] = 0
            k_scales(x[b + h], y, 31, L, LT[:, 8 * h :], scales[8 * h :], mins[8 * h :])
            for n in range(0, 256, 64):  # qh: bits n // 32 and n // 32 + 1 of byte j, values n + j's and n + 32 + j's
                for j in range(32):
                    l1, l2 = int(L[n + j]), int(L[n + j + 32])
                    y[16 + j] |= ((l1 >> 4) << (n // 32)) | ((l2 >> 4) << (n // 32 + 1))
                    y[48 + n // 2 + j] = (l1 & 15) | ((l2 & 15) << 4)


@_jit
def q3_k(x, out):
    """quantize_row_q3_K_ref: x [blocks, 256] -> out [blocks, 110]."""
    L, scales, w, wx = np.zeros(256, F), np.zeros(16, F), np.zeros(16, F), np.zeros(16, F)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        y[:] = 0
        max_scale, amax = F(0), F(0)
        for j in range(16):
            scales[j] = make_q3_quants(16, 4, xb[16 * j :], L[16 * j :], w, wx)
            if abs(scales[j]) > amax:
                amax, max_scale = abs(scales[j]), scales[j]
        if max_scale != 0:
            iscale = F(-32) / max_scale
            for j in range(16):
                q = min(max(nearest_int(iscale * scales[j]), -32), 31) + 32  # (C keeps it in an int8: it fits)
                if j < 8:
                    y[96 + j] = q & 15
                else:
                    y[96 + j - 8] |= (q & 15) << 4
                y[96 + 8 + j % 4] |= (q >> 4) << (2 * (j // 4))
            d = put_fp16(y, 108, F(1) / iscale)
        else:
            d = put_fp16(y, 108, F(0))
        for j in range(16):
            sc = np.int64(y[96 + j]) & 15 if j < 8 else np.int64(y[96 + j - 8]) >> 4
            sc = (sc | (((np.int64(y[96 + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
            dj = d * F(sc)
            if dj == 0:
                continue
            for ii in range(16):
                L[16 * j + ii] = nearest_in(xb[16 * j + ii] / dj, -4, 3) + F(4)
        for j in range(256):  # hmask: bit j // 32 of byte j % 32 is value j's high bit (no branch: it is random)
            high = int(L[j]) >> 2
            y[j % 32] |= high << (j // 32)
            L[j] -= F(4 * high)
        pack_2bit(L, y, 32)


@_jit
def q2_k(x, out):
    """quantize_row_q2_K_ref: x [blocks, 256] -> out [blocks, 84]."""
    L, xt, w, LT = np.zeros(256, F), np.zeros((16, LANES), F), np.zeros((16, LANES), F), np.zeros((16, LANES), F)
    scales, mins, t = np.zeros(LANES, F), np.zeros(LANES, F), np.zeros((14, LANES), F)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        y[:] = 0
        transposed(xb, 16, xt, 0)
        for i in range(16):
            for s in range(16):
                w[i, s] = abs(xt[i, s])
        make_qkx2_quants(16, 3, xt, w, LT, -HALF, 15, True, scales, mins, t)
        from_columns(LT, 16, 16, L)
        max_scale, max_min = largest(scales, mins, 16)
        if max_scale > 0:
            iscale = F(15) / max_scale
            for j in range(16):
                y[j] = nearest_int(iscale * scales[j]) & 255
            d = put_fp16(y, 80, max_scale / F(15))
        else:
            d = put_fp16(y, 80, F(0))
        if max_min > 0:
            iscale = F(15) / max_min
            for j in range(16):
                y[j] |= (nearest_int(iscale * mins[j]) << 4) & 255
            dmin = put_fp16(y, 82, max_min / F(15))
        else:
            dmin = put_fp16(y, 82, F(0))
        for j in range(16):
            dj = d * F(np.int64(y[j]) & 15)
            if dj == 0:
                continue
            dm = dmin * F(np.int64(y[j]) >> 4)
            for ii in range(16):
                L[16 * j + ii] = nearest_in((xb[16 * j + ii] + dm) / dj, 0, 3)
        pack_2bit(L, y, 16)


def _iq4_cells() -> np.ndarray:
    """best_index_int8 of every half-unit cell [k/2, (k+1)/2) from -127 to 113: the levels are integers, so the
    midpoints between two of them are multiples of 1/2 and every value of a cell has the same nearest level. C's
    comparison `x - val[mu-1] < val[mu] - x` is that of x with the midpoint: near a midpoint both differences are
    exact (no larger than x, or of its binade), so it decides as the midpoint does."""
    values = IQ4_VALUES.astype(np.float64)
    x = (np.arange(2 * -127, 2 * 113) + 0.5) / 2  # inside each cell, on no midpoint
    upper = np.clip(np.searchsorted(values, x, side="right"), 1, 15)
    return (upper - ((x - values[upper - 1]) < (values[upper] - x))).astype(np.int64)


IQ4_CELLS = _iq4_cells()


@_inline
def best_index_int8(v):
    """best_index_int8 over the IQ4 levels, by the cell of v (those below the first level or above the last in the
    end cells)."""
    return IQ4_CELLS[int(min(max(np.floor(v * F(2)), F(-254)), F(225))) + 254]


@_inline
def iq4_scale(xb):
    """quantize_row_iq4_nl_impl's search for one block of 32 with ntry 7 and no importance weights: its scale."""
    values = IQ4_VALUES
    mx, amax = signed_max(xb, 32)
    if amax < EPS:
        return F(0)
    d = -mx / values[0]
    inv = F(1) / d
    sumqx, sumq2 = F(0), F(0)
    for j in range(32):
        q = values[best_index_int8(inv * xb[j])]
        w = xb[j] * xb[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F(0)
    best = d * sumqx
    for itry in range(-7, 8):
        inv = (F(itry) + values[0]) / mx
        sumqx, sumq2 = F(0), F(0)
        for j in range(32):
            q = values[best_index_int8(inv * xb[j])]
            w = xb[j] * xb[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@_inline
def iq4_levels(xb, inv, y, at):
    """Sixteen bytes at y[at]: the nearest level of inv * x, value j in the low nibble of byte j, 16 + j high."""
    for j in range(16):
        y[at + j] = best_index_int8(inv * xb[j]) | (best_index_int8(inv * xb[16 + j]) << 4)


@_jit
def iq4_nl(x, out):
    """quantize_iq4_nl: x [blocks, 32] -> out [blocks, 18]."""
    for b in range(x.shape[0]):
        d = iq4_scale(x[b])
        put_fp16(out[b], 0, d)
        iq4_levels(x[b], F(1) / d if d != 0 else F(0), out[b], 2)


@_jit
def iq4_xs(x, out):
    """quantize_iq4_xs: x [blocks, 256] -> out [blocks, 136]."""
    scales = np.zeros(8, F)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        y[:] = 0
        max_scale, amax_scale = F(0), F(0)
        for ib in range(8):
            scales[ib] = iq4_scale(xb[32 * ib :])
            if abs(scales[ib]) > amax_scale:
                amax_scale, max_scale = abs(scales[ib]), scales[ib]
        d = -max_scale / F(32)
        put_fp16(y, 0, d)
        inv = F(1) / d if d != 0 else F(0)
        scales_h = 0
        for ib in range(8):
            q = min(max(nearest_int(inv * scales[ib]), -32), 31)
            dl = d * F(q)
            iq4_levels(xb[32 * ib :], F(1) / dl if dl != 0 else F(0), y, 8 + 16 * ib)
            q += 32
            y[4 + ib // 2] |= (q & 15) << (4 * (ib % 2))
            scales_h |= (q >> 4) << (2 * ib)
        y[2], y[3] = scales_h & 255, scales_h >> 8


# -- the 32-value types: a scale (and a minimum) per block --------------------------------------------------------


@_jit
def q8_0(x, out):
    """quantize_row_q8_0_ref: x [blocks, 32] -> out [blocks, 34]."""
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        amax = F(0)
        for j in range(32):
            amax = max(amax, abs(xb[j]))  # C's MAX(amax, fabsf(v))
        d = amax / F(127)
        inv = F(1) / d if d != 0 else F(0)
        put_fp16(y, 0, d)
        for j in range(32):
            v = xb[j] * inv
            r = np.trunc(v)  # roundf: halves away from zero (v - r is exact)
            if abs(v - r) >= HALF:
                r += np.sign(v)
            y[2 + j] = int(r) & 255


@_inline
def pack_nibbles(levels, y, at):
    """Value j in the low nibble of byte j, value 16 + j in its high one."""
    for j in range(16):
        y[at + j] = (levels[j] & 15) | ((levels[16 + j] & 15) << 4)


@_inline
def put_qh(levels, y, at):
    """The 5-bit types' qh: bit j of a little-endian uint32 is the fifth bit of value j."""
    qh = 0
    for j in range(32):
        qh |= ((levels[j] >> 4) & 1) << j
    for k in range(4):
        y[at + k] = (qh >> (8 * k)) & 255


@_inline
def q_0(x, out, half):
    """quantize_row_q4_0_ref (half 8: out [blocks, 18]) and q5_0 (half 16: [blocks, 22]) of x [blocks, 32]."""
    levels = np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        d = signed_max(xb, 32)[0] / F(-half)
        inv = F(1) / d if d != 0 else F(0)
        put_fp16(y, 0, d)
        for j in range(32):  # C: MIN(2*half - 1, (int8_t)(x0 + half + 0.5f))
            levels[j] = min(2 * half - 1, int(xb[j] * inv + (F(half) + HALF)))
        if half == 16:
            put_qh(levels, y, 2)
        pack_nibbles(levels, y, 2 if half == 8 else 6)


@_inline
def q_1(x, out, nmax):
    """quantize_row_q4_1_ref (nmax 15: out [blocks, 20]) and q5_1 (31: [blocks, 24]) of x [blocks, 32]."""
    levels = np.zeros(32, np.int64)
    for b in range(x.shape[0]):
        xb, y = x[b], out[b]
        lo, hi = FLT_MAX, -FLT_MAX  # C's loop from FLT_MAX and -FLT_MAX: the first of equal values kept
        for j in range(32):
            if xb[j] < lo:
                lo = xb[j]
            if xb[j] > hi:
                hi = xb[j]
        d = (hi - lo) / F(nmax)
        inv = F(1) / d if d != 0 else F(0)
        put_fp16(y, 0, d)
        put_fp16(y, 2, lo)
        for j in range(32):  # C: MIN(15, (int8_t)(x0 + 0.5f)) for Q4_1, (uint8_t)(x0 + 0.5f) for Q5_1
            v = int((xb[j] - lo) * inv + HALF)
            levels[j] = min(15, v) if nmax == 15 else v & 255
        if nmax == 31:
            put_qh(levels, y, 4)
        pack_nibbles(levels, y, 4 if nmax == 15 else 8)


@_jit
def q4_0(x, out):
    q_0(x, out, 8)


@_jit
def q5_0(x, out):
    q_0(x, out, 16)


@_jit
def q4_1(x, out):
    q_1(x, out, 15)


@_jit
def q5_1(x, out):
    q_1(x, out, 31)


KERNELS = {
    "Q8_0": q8_0,
    "Q5_0": q5_0,
    "Q4_0": q4_0,
    "Q5_1": q5_1,
    "Q4_1": q4_1,
    "Q6_K": q6_k,
    "Q5_K": q5_k,
    "Q4_K": q4_k,
    "Q3_K": q3_k,
    "Q2_K": q2_k,
    "IQ4_NL": iq4_nl,
    "IQ4_XS": iq4_xs,
}
