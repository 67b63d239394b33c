"""Triton chunked WKV-6: forward and backward for training (CUDA; also runs under TRITON_INTERPRET=1).

Importing this module imports triton and defines the kernels (nothing is compiled until the first
call). The dispatcher imports it lazily, only when the ``triton`` backend is used.

Algorithm (chunks of ``BT`` = 64 tokens, split into sub-chunks of ``BC`` = 16; ``c`` is the
chunk-local inclusive cumsum of the log-decay ``w``, summed in float64 and held as two fp32 tensors
(hi, lo), ``e`` the exclusive one, read as ``c`` shifted by one row so that ``e_t - c_{t-1}`` is
exactly 0). Every exponent that is a difference of two sums is taken as ``(hi - hi) + (lo - lo)``
(``_gap``): it keeps fp32 precision relative to the gap, not to the sums, which reach -1000 and
below after a strong decay (plain fp32 sums put errors of ~4e-5 into o and every gradient there):

* ``_fwd_h``: per (batch, head, value block), a loop over chunks keeps the fp32 state ``S`` in
  registers and stores the state entering each chunk, ``h[n]``:
  ``S <- exp(c_L) * S + (k * exp(c_L - c))^T v``.
* ``_fwd_o``: per (chunk, sub-chunk ``i``, batch*head), in parallel:
  ``o_i = (r_i exp(e_i)) h[n] + sum_{j<i} [(r_i exp(e_i - m_i)) (k_j exp(m_i - c_j))^T] v_j
  + diag_i + bonus`` with ``m_i = c[i*BC - 1]``, so every exponent is <= 0 (no overflow for
  log-decay down to -20 and below); the diagonal ``BC x BC`` block uses the exact pairwise
  exponent ``e_t - c_s`` column by column.
* ``_bwd_dh``: reverse loop over chunks for the state gradient ``dh[n]`` (w.r.t. the state leaving
  chunk ``n``), seeded with the gradient of the final state; also yields ``d initial_state``.
* ``_bwd_main``: per sub-chunk, ``dr``, ``dk``, ``dv`` (same factorisation, same stable exponents)
  and ``dw_z = sum_{s < z < t} P_ts`` over all token pairs, built from direct sums of pair terms
  (no "total minus prefix" telescoping, whose cancellation ruins fp32 ``dw`` under strong decay).
* In PyTorch: ``du = sum r k (v . do)``.

All accumulation is fp32; inputs may be fp32, bf16 or fp16. ``tl.dot`` uses IEEE fp32 for fp32
inputs and TF32 for 16-bit inputs (at least as precise as the inputs); the small triangular-mask
products that assemble ``dw`` always use IEEE fp32. Head sizes: powers of two
from 16 to 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from multimodal_rwkv.errors import KernelError
from multimodal_rwkv.kernels.torch_chunked import LOG_DECAY_FLOOR

BT = 64  # chunk length
BC = 16  # sub-chunk length
# Launch settings of each kernel (Triton's num_warps / num_stages) and the value-block width of the
# two state loops; ``bench/gpu_kernels.py --sweep`` times alternatives on a GPU. On an H200 (bf16,
# B=8 T=4096 H=32) these took forward+backward from 19.7 ms (all 4 warps, BV=32) to 18.4 ms; no
# other single change gained more than 3% (BENCHMARKS.md, "WKV kernels (GPU)").
LAUNCH = {"fwd_h": {"num_warps": 4}, "fwd_o": {"num_warps": 4},
          "bwd_dh": {"num_warps": 4}, "bwd_main": {"num_warps": 2}}
STATE_BV = 64


def kernels_interpreted() -> bool:
    """True if this module's kernels were defined under the Triton interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRETED


def check_head_sizes(K: int, V: int) -> None:
    """Raise KernelError unless K and V are powers of two in [16, 128]."""
    for name, n in (("K", K), ("V", V)):
        if n < 16 or n > 128 or (n & (n - 1)):
            raise KernelError(f"wkv6 triton: head size {name}={n} unsupported (need a power of two in 16..128)")


@triton.jit
def _gap(a, a_lo, b, b_lo):
    """``a - b`` for cumulative sums held as fp32 pairs (hi, lo): the hi difference is exact when the
    two are close (Sterbenz), so the result keeps fp32 precision relative to the gap itself, however
    large the sums are."""
    return (a - b) + (a_lo - b_lo)


@triton.jit
def _fwd_h(k, v, c, clo, s0, h, sT, T, NT,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
           USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*T*H*K
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    base_k = (i_b * T * H + i_h) * K
    base_v = (i_b * T * H + i_h) * V
    s_off = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_S0:
        S = tl.load(s0 + s_off).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for n in range(0, NT):
        tl.store(h + (i_bh * NT + n) * K * V + o_k[:, None] * V + o_v[None, :], S)
        rows = n * BT + o_t
        b_k = tl.load(k + base_k + rows[:, None] * (H * K) + o_k[None, :]).to(tl.float32)
        p_c = base_k + rows[:, None] * (H * K) + o_k[None, :]
        b_c = tl.load(c + p_c)
        b_c_lo = tl.load(clo + p_c)
        p_cl = base_k + (n * BT + BT - 1) * (H * K) + o_k
        b_cl = tl.load(c + p_cl)
        b_cl_lo = tl.load(clo + p_cl)
        b_v = tl.load(v + base_v + rows[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
        b_kd = b_k * tl.exp(_gap(b_cl[None, :], b_cl_lo[None, :], b_c, b_c_lo))
        S = S * tl.exp(b_cl)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    if STORE_FINAL:
        tl.store(sT + s_off, S)


@triton.jit
def _fwd_o(r, k, v, c, clo, u, h, o, T, NT,
           H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
           PREC: tl.constexpr):
    i_ti = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*T*H*K
    NC: tl.constexpr = BT // BC
    i_n = i_ti // NC
    i_i = i_ti % NC
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, K)
    o_v = tl.arange(0, V)
    base_k = (i_b * T * H + i_h) * K
    base_v = (i_b * T * H + i_h) * V
    t0 = i_n * BT + i_i * BC
    rows = t0 + o_c
    p_k = base_k + rows[:, None] * (H * K) + o_k[None, :]
    b_r = tl.load(r + p_k).to(tl.float32)
    b_k = tl.load(k + p_k).to(tl.float32)
    # exclusive cumsum e_t = c_{t-1} (0 at the first row of the chunk)
    first = (i_i * BC + o_c) == 0
    b_e = tl.load(c + p_k - H * K, mask=(~first)[:, None], other=0.0)
    b_e_lo = tl.load(clo + p_k - H * K, mask=(~first)[:, None], other=0.0)
    b_v = tl.load(v + base_v + rows[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
    b_u = tl.load(u + i_h * K + o_k).to(tl.float32)
    b_h = tl.load(h + (i_bh * NT + i_n) * K * V + o_k[:, None] * V + o_v[None, :])
    acc = tl.dot(b_r * tl.exp(b_e), b_h, input_precision=PREC)
    # off-diagonal sub-chunks j < i, factorised around m = c[i*BC - 1]
    if i_i > 0:
        b_m = tl.load(c + base_k + (t0 - 1) * (H * K) + o_k)[None, :]
        b_m_lo = tl.load(clo + base_k + (t0 - 1) * (H * K) + o_k)[None, :]
        b_q = b_r * tl.exp(_gap(b_e, b_e_lo, b_m, b_m_lo))
        for j in range(0, i_i):
            rows_j = i_n * BT + j * BC + o_c
            p_kj = base_k + rows_j[:, None] * (H * K) + o_k[None, :]
            b_kj = tl.load(k + p_kj).to(tl.float32)
            b_gj = tl.exp(_gap(b_m, b_m_lo, tl.load(c + p_kj), tl.load(clo + p_kj)))
            b_vj = tl.load(v + base_v + rows_j[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
            b_a = tl.dot(b_q, tl.trans(b_kj * b_gj), input_precision=PREC)
            acc += tl.dot(b_a, b_vj, input_precision=PREC)
    # diagonal block, exact pairwise exponent, one column s at a time
    for s in range(0, BC):
        p_s = base_k + (t0 + s) * (H * K) + o_k
        b_ks = tl.load(k + p_s).to(tl.float32)
        b_cs = tl.load(c + p_s)[None, :]
        b_cs_lo = tl.load(clo + p_s)[None, :]
        b_vs = tl.load(v + base_v + (t0 + s) * (H * V) + o_v).to(tl.float32)
        below = o_c > s
        b_x = tl.where(below[:, None], _gap(b_e, b_e_lo, b_cs, b_cs_lo), 0.0)
        b_a = tl.sum(tl.where(below[:, None], b_r * b_ks[None, :] * tl.exp(b_x), 0.0), axis=1)
        acc += b_a[:, None] * b_vs[None, :]
    # bonus u on the current token
    acc += tl.sum(b_r * b_u[None, :] * b_k, axis=1)[:, None] * b_v
    tl.store(o + base_v + rows[:, None] * (H * V) + o_v[None, :], acc.to(o.dtype.element_ty))


@triton.jit
def _bwd_dh(r, c, do, dsT, dh, ds0, T, NT,
            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
            USE_DST: tl.constexpr, STORE_DS0: tl.constexpr, PREC: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*T*H*K
    i_b = i_bh // H
    i_h = i_bh % H
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    base_k = (i_b * T * H + i_h) * K
    base_v = (i_b * T * H + i_h) * V
    s_off = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_DST:
        dS = tl.load(dsT + s_off).to(tl.float32)
    else:
        dS = tl.zeros([K, BV], dtype=tl.float32)
    for nn in range(0, NT):
        n = NT - 1 - nn
        tl.store(dh + (i_bh * NT + n) * K * V + o_k[:, None] * V + o_v[None, :], dS)
        rows = n * BT + o_t
        p = base_k + rows[:, None] * (H * K) + o_k[None, :]
        b_r = tl.load(r + p).to(tl.float32)
        b_e = tl.load(c + p - H * K, mask=(o_t > 0)[:, None], other=0.0)
        b_cl = tl.load(c + base_k + (n * BT + BT - 1) * (H * K) + o_k)
        b_do = tl.load(do + base_v + rows[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
        dS = dS * tl.exp(b_cl)[:, None] + tl.dot(tl.trans(b_r * tl.exp(b_e)), b_do, input_precision=PREC)
    if STORE_DS0:
        tl.store(ds0 + s_off, dS)


@triton.jit
def _bwd_main(r, k, v, c, clo, u, h, dh, do, dr, dk, dv, dw, T, NT,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
              PREC: tl.constexpr):
    # dw_z = sum over all (t, s) pairs with s < z < t of P_ts = r_t k_s exp(sum_{s<y<t} w_y) (do_t . v_s)
    # (s = -1: initial state, t = T: final state). It is assembled from direct sums of pair terms
    # (triangular 0/1 matrices instead of "total minus prefix"), so nothing cancels: fp32 dw stays
    # accurate even when it is tiny (strong decay).
    i_ti = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*T*H*K
    NC: tl.constexpr = BT // BC
    i_n = i_ti // NC
    i_i = i_ti % NC
    i_b = i_bh // H
    i_h = i_bh % H
    o_c = tl.arange(0, BC)
    o_k = tl.arange(0, K)
    o_v = tl.arange(0, V)
    m_up = tl.where(o_c[None, :] > o_c[:, None], 1.0, 0.0)  # [z, t]: t > z
    m_lo = tl.where(o_c[None, :] < o_c[:, None], 1.0, 0.0)  # [z, s]: s < z
    base_k = (i_b * T * H + i_h) * K
    base_v = (i_b * T * H + i_h) * V
    t0 = i_n * BT + i_i * BC
    rows = t0 + o_c
    p_k = base_k + rows[:, None] * (H * K) + o_k[None, :]
    p_v = base_v + rows[:, None] * (H * V) + o_v[None, :]
    b_r = tl.load(r + p_k).to(tl.float32)
    b_k = tl.load(k + p_k).to(tl.float32)
    b_c = tl.load(c + p_k)
    b_c_lo = tl.load(clo + p_k)
    first = (i_i * BC + o_c) == 0
    b_e = tl.load(c + p_k - H * K, mask=(~first)[:, None], other=0.0)
    b_e_lo = tl.load(clo + p_k - H * K, mask=(~first)[:, None], other=0.0)
    p_cl = base_k + (i_n * BT + BT - 1) * (H * K) + o_k
    b_cl = tl.load(c + p_cl)[None, :]
    b_cl_lo = tl.load(clo + p_cl)[None, :]
    b_v = tl.load(v + p_v).to(tl.float32)
    b_do = tl.load(do + p_v).to(tl.float32)
    b_u = tl.load(u + i_h * K + o_k).to(tl.float32)
    hv = (i_bh * NT + i_n) * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.load(h + hv)
    b_dh = tl.load(dh + hv)
    # inter-chunk terms: pairs with s before the chunk (via h) or t after it (via dh)
    b_kd = tl.exp(_gap(b_cl, b_cl_lo, b_c, b_c_lo))  # [BC,K]
    b_dr = tl.exp(b_e) * tl.dot(b_do, tl.trans(b_h), input_precision=PREC)
    b_dk = b_kd * tl.dot(b_v, tl.trans(b_dh), input_precision=PREC)
    b_dv = tl.dot(b_k * b_kd, b_dh, input_precision=PREC)
    b_dw = tl.dot(m_up, b_r * b_dr, input_precision="ieee") + tl.dot(m_lo, b_k * b_dk, input_precision="ieee")
    b_dw += tl.sum(b_h * b_dh, axis=1)[None, :] * tl.exp(b_cl)  # pairs spanning the whole chunk
    # earlier sub-chunks j < i: dr (rows here, columns in j); dw from out-going pairs of j
    if i_i > 0:
        b_m = tl.load(c + base_k + (t0 - 1) * (H * K) + o_k)[None, :]
        b_m_lo = tl.load(clo + base_k + (t0 - 1) * (H * K) + o_k)[None, :]
        b_gq = tl.exp(_gap(b_e, b_e_lo, b_m, b_m_lo))
        acc = tl.zeros([BC, K], dtype=tl.float32)
        for j in range(0, i_i):
            rows_j = i_n * BT + j * BC + o_c
            p_kj = base_k + rows_j[:, None] * (H * K) + o_k[None, :]
            b_kj = tl.load(k + p_kj).to(tl.float32)
            b_cj = tl.load(c + p_kj)
            b_cj_lo = tl.load(clo + p_kj)
            b_vj = tl.load(v + base_v + rows_j[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
            b_da = tl.dot(b_do, tl.trans(b_vj), input_precision=PREC)  # [BC(t), BC(s)]
            acc += tl.dot(b_da, b_kj * tl.exp(_gap(b_m, b_m_lo, b_cj, b_cj_lo)), input_precision=PREC)
            b_out = b_kj * tl.exp(_gap(b_cl, b_cl_lo, b_cj, b_cj_lo)) * tl.dot(b_vj, tl.trans(b_dh),
                                                                               input_precision=PREC)
            b_dw += tl.sum(b_out, axis=0)[None, :]
        b_drx = b_gq * acc
        b_dr += b_drx
        b_dw += tl.dot(m_up, b_r * b_drx, input_precision="ieee")
    # later sub-chunks j > i: dk, dv (columns here, rows in j); dw from in-coming pairs of j
    b_dkx = tl.zeros([BC, K], dtype=tl.float32)
    for j in range(i_i + 1, NC):
        rows_j = i_n * BT + j * BC + o_c
        p_rj = base_k + rows_j[:, None] * (H * K) + o_k[None, :]
        b_rj = tl.load(r + p_rj).to(tl.float32)
        b_ej = tl.load(c + p_rj - H * K)
        b_ej_lo = tl.load(clo + p_rj - H * K)
        p_mj = base_k + (i_n * BT + j * BC - 1) * (H * K) + o_k
        b_mj = tl.load(c + p_mj)[None, :]
        b_mj_lo = tl.load(clo + p_mj)[None, :]
        b_doj = tl.load(do + base_v + rows_j[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
        b_qj = b_rj * tl.exp(_gap(b_ej, b_ej_lo, b_mj, b_mj_lo))  # [BC,K]
        b_gk = tl.exp(_gap(b_mj, b_mj_lo, b_c, b_c_lo))  # [BC,K]
        b_da = tl.dot(b_doj, tl.trans(b_v), input_precision=PREC)  # [BC(t in j), BC(s in i)]
        b_dkx += b_gk * tl.dot(tl.trans(b_da), b_qj, input_precision=PREC)
        b_a = tl.dot(b_qj, tl.trans(b_k * b_gk), input_precision=PREC)  # [BC(t), BC(s)]
        b_dv += tl.dot(tl.trans(b_a), b_doj, input_precision=PREC)
        b_in = b_rj * tl.exp(b_ej) * tl.dot(b_doj, tl.trans(b_h), input_precision=PREC)
        b_dw += tl.sum(b_in, axis=0)[None, :]
    b_dk += b_dkx
    b_dw += tl.dot(m_lo, b_k * b_dkx, input_precision="ieee")
    # pairs (t in sub-chunk a > i, s in sub-chunk b < i) span this whole sub-chunk
    for a in range(i_i + 1, NC):
        rows_a = i_n * BT + a * BC + o_c
        p_ra = base_k + rows_a[:, None] * (H * K) + o_k[None, :]
        p_ma = base_k + (i_n * BT + a * BC - 1) * (H * K) + o_k
        b_ma = tl.load(c + p_ma)[None, :]
        b_ma_lo = tl.load(clo + p_ma)[None, :]
        b_qa = tl.load(r + p_ra).to(tl.float32) * tl.exp(
            _gap(tl.load(c + p_ra - H * K), tl.load(clo + p_ra - H * K), b_ma, b_ma_lo))
        b_doa = tl.load(do + base_v + rows_a[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
        for bb in range(0, i_i):
            rows_b = i_n * BT + bb * BC + o_c
            p_kb = base_k + rows_b[:, None] * (H * K) + o_k[None, :]
            b_kb = tl.load(k + p_kb).to(tl.float32) * tl.exp(_gap(b_ma, b_ma_lo, tl.load(c + p_kb),
                                                                   tl.load(clo + p_kb)))
            b_vb = tl.load(v + base_v + rows_b[:, None] * (H * V) + o_v[None, :]).to(tl.float32)
            b_da = tl.dot(b_doa, tl.trans(b_vb), input_precision=PREC)
            b_dw += tl.sum(b_qa * tl.dot(b_da, b_kb, input_precision=PREC), axis=0)[None, :]
    # diagonal block, column by column
    for s in range(0, BC):
        p_s = base_k + (t0 + s) * (H * K) + o_k
        b_ks = tl.load(k + p_s).to(tl.float32)
        b_cs = tl.load(c + p_s)[None, :]
        b_cs_lo = tl.load(clo + p_s)[None, :]
        b_vs = tl.load(v + base_v + (t0 + s) * (H * V) + o_v).to(tl.float32)
        below = o_c > s
        b_g = tl.where(below[:, None], tl.exp(tl.where(below[:, None], _gap(b_e, b_e_lo, b_cs, b_cs_lo), 0.0)), 0.0)
        b_dac = tl.sum(b_do * b_vs[None, :], axis=1)  # dA[t, s]
        b_dr += b_dac[:, None] * b_ks[None, :] * b_g
        b_p = b_dac[:, None] * b_r * b_g  # pair terms P_ts / k_s, rows t
        dk_s = tl.sum(b_p, axis=0)  # [K]
        b_ac = tl.sum(b_r * b_ks[None, :] * b_g, axis=1)  # A[t, s]
        dv_s = tl.sum(b_ac[:, None] * b_do, axis=0)  # [V]
        is_s = o_c == s
        b_dk += tl.where(is_s[:, None], dk_s[None, :], 0.0)
        b_dv += tl.where(is_s[:, None], dv_s[None, :], 0.0)
        b_dw += tl.where(below[:, None], tl.dot(m_up, b_p, input_precision="ieee"), 0.0) * b_ks[None, :]
    # bonus
    b_dd = tl.sum(b_do * b_v, axis=1)
    b_dr += b_dd[:, None] * b_u[None, :] * b_k
    b_dk += b_dd[:, None] * b_u[None, :] * b_r
    b_dv += tl.sum(b_r * b_u[None, :] * b_k, axis=1)[:, None] * b_do
    tl.store(dr + p_k, b_dr)
    tl.store(dk + p_k, b_dk)
    tl.store(dv + p_v, b_dv)
    tl.store(dw + p_k, b_dw)


# Whether @triton.jit produced interpreter functions (TRITON_INTERPRET=1 when this module was imported).
_INTERPRETED = type(_fwd_h).__name__ == "InterpretedFunction"


def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _pad_t(x, Tp):
    T = x.shape[1]
    if Tp == T:
        return x.contiguous()
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, Tp - T)).contiguous()


def _bv(V):
    return min(V, STATE_BV)


def _chunk_cumsum(w, B, NT, H, K):
    """Chunk-local inclusive cumsum of the log-decay as an fp32 pair ``(hi, lo)`` with ``hi + lo`` the
    float64 sum: the kernels take differences of these sums as exponents, and a plain fp32 sum
    (magnitude up to 64 x 60) would leave the small differences after a strong decay with an
    absolute error of ~1e-4 (see :func:`_gap`). The floor keeps -inf out of the sums."""
    c = w.double().clamp(min=LOG_DECAY_FLOOR).view(B, NT, BT, H, K).cumsum(2).view(B, NT * BT, H, K)
    hi = c.float()
    return hi.contiguous(), (c - hi.double()).float().contiguous()


def _states(k, v, c, clo, s0, B, Tp, NT, H, K, V, store_final, prec):
    h = torch.empty(B, H, NT, K, V, device=k.device, dtype=torch.float32)
    sT = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32) if store_final else h
    BV = _bv(V)
    _fwd_h[(V // BV, B * H)](k, v, c, clo, s0 if s0 is not None else h, h, sT, Tp, NT, H=H, K=K, V=V, BV=BV, BT=BT,
                              USE_S0=s0 is not None, STORE_FINAL=store_final, PREC=prec, **LAUNCH["fwd_h"])
    return h, (sT if store_final else None)


class _WKV6Chunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, s0, out_final):
        B, T, H, K = r.shape
        V = v.shape[-1]
        NT = -(-T // BT)
        Tp = NT * BT
        rp, kp, vp, wp = (_pad_t(x, Tp) for x in (r, k, v, w))
        c, clo = _chunk_cumsum(wp, B, NT, H, K)
        s0c = None if s0 is None else s0.float().contiguous()
        prec = _prec(r.dtype)
        h, sT = _states(kp, vp, c, clo, s0c, B, Tp, NT, H, K, V, out_final, prec)
        o = torch.empty(B, Tp, H, V, device=r.device, dtype=r.dtype)
        uc = u.contiguous()
        _fwd_o[(NT * (BT // BC), B * H)](rp, kp, vp, c, clo, uc, h, o, Tp, NT, H=H, K=K, V=V, BT=BT, BC=BC,
                                          PREC=prec, **LAUNCH["fwd_o"])
        ctx.save_for_backward(rp, kp, vp, c, clo, uc, s0c)
        ctx.meta = (T, Tp, NT, s0 is not None, prec, w.dtype, u.dtype, None if s0 is None else s0.dtype)
        return (o if Tp == T else o[:, :T].contiguous()), sT

    @staticmethod
    def backward(ctx, do, dsT):
        from multimodal_rwkv.kernels.reference import first_derivatives_only

        first_derivatives_only("triton")
        rp, kp, vp, c, clo, uc, s0c = ctx.saved_tensors
        T, Tp, NT, has_s0, prec, w_dtype, u_dtype, s0_dtype = ctx.meta
        has_s0 = has_s0 and ctx.needs_input_grad[5]  # skip d(initial_state) when nobody wants it
        B, _, H, K = rp.shape
        V = vp.shape[-1]
        if do is None:
            do = torch.zeros(B, T, H, V, device=rp.device, dtype=rp.dtype)
        dop = _pad_t(do, Tp)
        h, _ = _states(kp, vp, c, clo, s0c, B, Tp, NT, H, K, V, False, prec)
        dh = torch.empty_like(h)
        ds0 = torch.empty(B, H, K, V, device=rp.device, dtype=torch.float32) if has_s0 else None
        use_dst = dsT is not None
        dst = dsT.float().contiguous() if use_dst else None
        BV = _bv(V)
        _bwd_dh[(V // BV, B * H)](rp, c, dop, dst if use_dst else dh, dh, ds0 if has_s0 else dh, Tp, NT,
                                   H=H, K=K, V=V, BV=BV, BT=BT, USE_DST=use_dst, STORE_DS0=has_s0,
                                   PREC=prec, **LAUNCH["bwd_dh"])
        dr = torch.empty(B, Tp, H, K, device=rp.device, dtype=torch.float32)
        dk = torch.empty_like(dr)
        dv = torch.empty(B, Tp, H, V, device=rp.device, dtype=torch.float32)
        dw = torch.empty_like(dr)
        _bwd_main[(NT * (BT // BC), B * H)](rp, kp, vp, c, clo, uc, h, dh, dop, dr, dk, dv, dw, Tp, NT, H=H, K=K, V=V,
                                             BT=BT, BC=BC, PREC=prec, **LAUNCH["bwd_main"])
        dd = (dop.float() * vp.float()).sum(-1, keepdim=True)  # [B,Tp,H,1]
        du = (rp.float() * kp.float() * dd).sum((0, 1))
        return (dr[:, :T].to(rp.dtype), dk[:, :T].to(kp.dtype), dv[:, :T].to(vp.dtype), dw[:, :T].to(w_dtype),
                du.to(u_dtype), None if ds0 is None else ds0.to(s0_dtype), None)


def wkv6_triton(r, k, v, w, u, initial_state=None, output_final_state=False):
    """Chunked WKV-6 with Triton kernels, differentiable (shapes as :func:`multimodal_rwkv.kernels.wkv6`).

    Returns ``(o [B,T,H,V] in r.dtype, final_state [B,H,K,V] float32 or None)``.
    """
    check_head_sizes(r.shape[-1], v.shape[-1])
    B, T, H, K = r.shape
    if T == 0:
        final = None
        if output_final_state:
            final = (torch.zeros(B, H, K, v.shape[-1], device=r.device, dtype=torch.float32)
                     if initial_state is None else initial_state.float().clone())
        return r.new_zeros(B, 0, H, v.shape[-1]), final
    # one dtype for the products: the widest of r, k, v (mixed inputs are not rounded to r's)
    dt = torch.promote_types(torch.promote_types(r.dtype, k.dtype), v.dtype)
    o, sT = _WKV6Chunk.apply(r.to(dt), k.to(dt), v.to(dt), w, u, initial_state, bool(output_final_state))
    return o.to(r.dtype), sT
