"""Pure-PyTorch WKV-6: a chunked, numerically stable form (prefill, training) and a step loop (decode).

Chunked form (chunk length ``L``, sub-chunks of length ``C``; ``c`` = inclusive cumulative log-decay
inside a chunk, ``e`` the exclusive one (``e_t = c_{t-1}``), ``c_L`` its last row)::

    o_t  = (r_t * exp(e_t)) @ S_n                                    # state entering the chunk
         + sum_{s<t in chunk} (sum_j r_tj k_sj exp(e_tj - c_sj)) v_s   # intra-chunk
         + (r_t . (u * k_t)) v_t                                       # bonus
    S_{n+1} = exp(c_L) * S_n + (k * exp(c_L - c))^T @ v

Every exponent is <= 0, so nothing overflows even for log-decay -20 per step. The intra-chunk
matrix is factorised per row sub-chunk ``a`` around the reference point ``m_a = c[a*C - 1]``
(the last row before the sub-chunk): ``(r_t exp(e_t - m_a)) . (k_s exp(m_a - c_s))``, both
factors <= 1 for ``s < a*C <= t``. The diagonal ``C x C`` sub-blocks use the exact pairwise
exponent ``e_t - c_s`` (computed on the ``t > s`` pairs only), the scheme of flash-linear-attention's
``chunk_rwkv6`` intra kernel, unless every sub-chunk's total log-decay is >= -3
(:data:`_DIAG_FACTOR_LIMIT`, e.g. RWKV-6's initial decays): they are then factorised around
``m_a`` as well, with column factors up to e^3. Measured side by side on the 2-core box, fwd+bwd:
1.27-1.37x at B=8, T=63, H=4, K=32 (1 thread), 1.21-1.39x at B=1, T=1024, H=8, K=64 and 1.11x at
H=4 (2 threads); it equals the pair form to fp64 rounding.
Each exponent is computed as a direct segment sum of ``w`` (local cumsums, and 0/1 "strictly
between" masks), not as a difference of two chunk-level cumsums, so that fp32 ``dw`` stays accurate
under strong decay (a difference sends +g and -g into the same ``w`` and they cancel).

Backward: plain autograd through this formulation keeps ~15x the input size of activations
(about 500 MB per layer at B=1, T=4096, H=8, K=64), which made RWKV-6 training use more memory than a
Llama of equal size. When gradients are needed the chunked computation therefore runs inside
:class:`_ChunkedWKVFunction`: the forward runs without grad, in groups of ``G`` chunks (about
``group_tokens`` tokens), and saves only its (padded, cast) inputs plus the fp32/fp64 state entering
each group ([B,H,K,V] per group). Backward walks the groups in reverse and calls
:func:`_chunked_core_backward`, the reverse of :func:`_chunked_core` written out by hand: it
recomputes the group's exponents and states exactly as the forward does, walks the state gradient
back through the chunks, and builds dr, dk, dv, du and the gradient handed to the previous group
with batched matmuls. The log-decay gradient follows the forward's factorisation: each ``dw_z`` is
a sum over the (query, key) pairs whose decay segment covers step ``z`` (``q * dq`` through the
row factors, ``k * dk`` through the column factors, ``G * S`` through a chunk's total decay), never
the difference of two large sums (``revcumsum(r*dr) - revcumsum(k*dk)``, which loses fp32 ``dw``
when the decay is strong). Results equal autograd's through the same formulation to fp64 rounding
(tested against the step-by-step reference). Peak extra memory is one group's intermediates.
Hand-written rather than autograd through a recomputed forward: no graph is recorded. Six
side-by-side runs on the noisy 2-core box, 1-2 threads, measured fwd+bwd 1.0-1.4x faster at
B=1, T=1024 and 4096, H=8, K=64, and 0.98-1.26x at the VisualRWKV recipe's B=8, T=63, H=4, K=32.
Without grad (inference, ``torch.no_grad``, or no input requiring grad) the plain forward runs
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*xs):
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _excl_cumsum(x):
    """sum_{z < t} x_z along dim -2 (a matmul with a 0/1 strictly-lower mask: row 0 is exactly 0)."""
    n = x.shape[-2]
    return torch.matmul(_tri(n, -1, x.dtype, x.device), x)


def _rev_excl_cumsum(x):
    """sum_{z > t} x_z along dim -2 (the last row is exactly 0)."""
    n = x.shape[-2]
    return torch.matmul(_tri(n, 1, x.dtype, x.device), x)


def _tri(n, side, dtype, device):
    """0/1 [n, n]: strictly lower (side=-1: z < t) or strictly upper (side=1: z > t) triangle."""
    key = ("tri", n, side, dtype, str(device))
    m = _BETWEEN_CACHE.get(key)
    if m is None:
        ones = torch.ones(n, n, dtype=dtype, device=device)
        m = torch.tril(ones, -1) if side < 0 else torch.triu(ones, 1)
        _BETWEEN_CACHE[key] = m
    return m


_BETWEEN_CACHE: dict = {}  # small constant masks, keyed by (size, dtype, device)


def _strictly_between(n, dtype, device):
    """0/1 tensor M[t, s, z] = 1 iff s < z < t, shape [n, n, n]."""
    key = (n, dtype, str(device))
    m = _BETWEEN_CACHE.get(key)
    if m is None:
        i = torch.arange(n, device=device)
        m = ((i.view(1, n, 1) < i.view(1, 1, n)) & (i.view(1, 1, n) < i.view(n, 1, 1))).to(dtype)
        _BETWEEN_CACHE[key] = m
    return m


def _diag_pairs(n, dtype, device):
    """For the pairs (t, s) with t > s of an n x n block: the row indices of t and of s [n_pairs],
    their one-hot selectors [n_pairs, n], the segment masks 1[s < z < t] [n_pairs, n], and the 0/1
    matrix [n_pairs, n*n] that scatters pair values into the flattened block."""
    key = ("pairs", n, dtype, str(device))
    hit = _BETWEEN_CACHE.get(key)
    if hit is None:
        ti, si = torch.tril_indices(n, n, -1, device=device)
        eye = torch.eye(n, dtype=dtype, device=device)
        seg = _strictly_between(n, dtype, device)[ti, si]
        scatter = torch.zeros(ti.numel(), n * n, dtype=dtype, device=device)
        scatter[torch.arange(ti.numel(), device=device), ti * n + si] = 1
        hit = (ti, si, eye[ti], eye[si], seg, scatter)
        _BETWEEN_CACHE[key] = hit
    return hit


def _pair_terms(rs, ks, ws):
    """The diagonal sub-blocks' pair factors in pair-major layout: for every sub-chunk (``M`` of
    them, flattened) and pair t > s, ``r_t``, ``k_s`` and ``exp(sum_{s<z<t} w_z)``, each
    [n_pairs, M, K]. Pair-major turns the constant selector/segment products into one large
    matmul or row gather each (batched 28x8 products are slow on CPU)."""
    C, K = rs.shape[-2:]
    ti, si, _, _, seg, _ = _diag_pairs(C, rs.dtype, rs.device)
    front = lambda x: x.reshape(-1, C, K).transpose(0, 1)  # noqa: E731 - [C, M, K] view
    eD = torch.exp(torch.matmul(seg, front(ws).reshape(C, -1))).view(len(ti), -1, K)
    return front(rs)[ti], front(ks)[si], eD


def _diag_blocks(rs, ks, ws, u_):
    """The diagonal ``C x C`` sub-blocks of the intra-chunk matrix, bonus on the diagonal:
    ``A[t, s] = sum_j r_tj k_sj exp(sum_{s<z<t} w_zj)`` for t > s, ``r_t . (u * k_t)`` for t = s.
    Returns ``(A [..., C, C], r_t, k_s, exp(...))`` (the last three pair-major, see :func:`_pair_terms`)."""
    C = rs.shape[-2]
    scatter = _diag_pairs(C, rs.dtype, rs.device)[-1]
    rt, kt, eD = _pair_terms(rs, ks, ws)  # [n_pairs, M, K]
    Ap = (rt * kt * eD).sum(-1)  # [n_pairs, M]
    bonus = (rs * u_.unsqueeze(3) * ks).sum(-1)  # [..., C]
    A = torch.matmul(Ap.t(), scatter).view(*rs.shape[:-1], C) + torch.diag_embed(bonus)
    return A, rt, kt, eD


# A diagonal sub-block may also be factorised, like the off-diagonal ones, around the last row
# before it: A[t, s] = (r_t exp(el_t)) . (k_s exp(-cl_s)) with el/cl the exclusive/inclusive
# log-decay sums inside the sub-chunk. The column factor exp(-cl_s) grows up to exp(-(the
# sub-chunk's total log-decay)), and the log-decay gradient then takes a difference of the two
# factors' terms, so this is only done when every sub-chunk's total is >= -_DIAG_FACTOR_LIMIT
# (factors <= e^3 = 20: fp32 dw loses at most ~1 digit, far inside the tests' tolerance) and no
# w is positive. RWKV-6's initial decays (-exp(-6) .. -exp(-1) per step) give at most -2.9 over 8
# steps. It replaces the pair terms, about a third of a fwd+bwd's op time at T=1024, K=64 (profile).
_DIAG_FACTOR_LIMIT = 3.0


def _diag_factorisable(ws) -> bool:
    """Whether the diagonal sub-blocks of ``ws`` [..., P, C, K] may use the factorised form."""
    tot = ws.sum(dim=-2)
    return bool(tot.min() >= -_DIAG_FACTOR_LIMIT) and bool(ws.max() <= 0)


def _diag_blocks_factorised(q, kx, rs, ks, u_):
    """:func:`_diag_blocks`'s ``A`` from the row factors ``q = r exp(el)`` (the off-diagonal blocks'
    too) and the column factors ``kx = k exp(-cl)`` (see :data:`_DIAG_FACTOR_LIMIT`)."""
    C = q.shape[-2]
    bonus = (rs * u_.unsqueeze(3) * ks).sum(-1)
    return torch.matmul(q, kx.transpose(-1, -2)) * _tri(C, -1, q.dtype, q.device) + torch.diag_embed(bonus)


def _chunk_scan(U, dec, S):
    """``S_{n+1} = dec_n * S_n + U_n`` over the chunks (dim 2): the state entering each chunk
    [B,H,N,K,V] and the state after the last."""
    states = []
    for n in range(U.shape[2]):
        states.append(S)
        S = torch.addcmul(U[:, :, n], dec[:, :, n], S)
    return torch.stack(states, dim=2), S


def wkv6_recurrent(r, k, v, w, u, initial_state=None, output_final_state=False):
    """Step loop vectorised over batch and heads; best for small T (decode).

    Shapes as :func:`multimodal_rwkv.kernels.wkv6`. Computes in float32 (float64 for float64
    inputs). Returns ``(o [B,T,H,V] in r.dtype, final_state [B,H,K,V] or None)``.
    """
    cd = _compute_dtype(r, k, v, w, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    r_, k_, v_, w_ = (x.to(cd) for x in (r, k, v, w))
    S = torch.zeros(B, H, K, V, dtype=cd, device=r.device) if initial_state is None else initial_state.to(cd)
    dec = torch.exp(w_).unsqueeze(-1)  # [B,T,H,K,1]
    bonus = (r_ * u.to(cd) * k_).sum(-1, keepdim=True) * v_  # [B,T,H,V]: (r_t . (u*k_t)) v_t
    kc = k_.unsqueeze(-1)  # [B,T,H,K,1]
    vr = v_.unsqueeze(-2)  # [B,T,H,1,V]
    outs = []
    for t in range(T):
        o = torch.matmul(r_[:, t].unsqueeze(-2), S).squeeze(-2) + bonus[:, t]  # [B,H,V]
        outs.append(o)
        S = torch.addcmul(S * dec[:, t], kc[:, t], vr[:, t])
    if T == 0:
        o = torch.zeros(B, 0, H, V, dtype=cd, device=r.device)
    else:
        o = outs[0].unsqueeze(1) if T == 1 else torch.stack(outs, dim=1)
    final = S.to(torch.float32) if (output_final_state and cd != torch.float64) else (S if output_final_state else None)
    return o.to(r.dtype), final


def _chunked_core(r_, k_, v_, w_, u_, S, C):
    """The chunked form on prepared inputs.

    ``r_, k_, w_``: [B,H,N,L,K], ``v_``: [B,H,N,L,V] (compute dtype, T padded to N*L), ``u_``:
    [1,H,1,1,K], ``S``: state entering the first chunk [B,H,K,V]. Returns ``(o [B,H,N,L,V], S_end)``.
    """
    B, H, N, L, K = r_.shape
    V = v_.shape[-1]
    P = L // C
    cd = r_.dtype
    dev = r_.device
    # Every exponent is built as a direct (segment) sum of w, never as a difference of two large
    # cumulative sums: the value is then accurate, and so is its gradient (a difference would send
    # +g and -g into the same w and cancel in float32, ruining dw when the decay is strong).
    e = _excl_cumsum(w_)  # sum_{z<t} w_z within the chunk, [B,H,N,L,K]
    rc = _rev_excl_cumsum(w_)  # sum_{z>s} w_z within the chunk
    tot = w_.sum(dim=3)  # [B,H,N,K]

    # ---- inter-chunk: states entering each chunk ----
    U = torch.matmul((k_ * torch.exp(rc)).transpose(-1, -2), v_)  # [B,H,N,K,V]
    dec = torch.exp(tot).unsqueeze(-1)  # [B,H,N,K,1]
    Sn, S = _chunk_scan(U, dec, S)  # Sn: [B,H,N,K,V]
    o = torch.matmul(r_ * torch.exp(e), Sn)  # [B,H,N,L,V]

    rs = r_.reshape(B, H, N, P, C, K)
    ks = k_.reshape(B, H, N, P, C, K)
    vs = v_.reshape(B, H, N, P, C, V)
    ws = w_.reshape(B, H, N, P, C, K)
    # ---- intra-chunk, off-diagonal sub-blocks, factorised around m_a = c[a*C - 1] ----
    # row factor r_t exp(sum_{aC <= z < t} w_z); column factor k_s exp(sum_{s < z < aC} w_z); both <= 1
    o_intra = 0
    fact = _diag_factorisable(ws)
    if P > 1 or fact:
        el = _excl_cumsum(ws)  # [B,H,N,P,C,K]
        q = rs * torch.exp(el)  # row factors, of the off-diagonal and the factorised diagonal blocks
    if P > 1:
        rl = _rev_excl_cumsum(ws)  # sum_{s<z<=end of its sub-chunk}
        gsub = ws.sum(dim=4)  # [B,H,N,P,K] sub-chunk totals
        between = _strictly_between(P, cd, dev)  # [P(a),P(b),P(b')]: b < b' < a
        mid = torch.einsum("abx,nhmxk->nhmabk", between, gsub)  # [B,H,N,P(a),P(b),K]
        outs = [torch.zeros(B, H, N, C, V, dtype=cd, device=dev)]
        for a in range(1, P):  # columns in sub-chunks b < a only (no masked waste)
            y = rl[:, :, :, :a] + mid[:, :, :, a, :a].unsqueeze(-2)  # [B,H,N,a,C,K] = sum_{s<z<aC} w_z
            kx = (ks[:, :, :, :a] * torch.exp(y)).reshape(B, H, N, a * C, K)
            A = torch.matmul(q[:, :, :, a], kx.transpose(-1, -2))  # [B,H,N,C,a*C]
            outs.append(torch.matmul(A, v_[:, :, :, : a * C]))  # [B,H,N,C,V]
        o_intra = torch.stack(outs, dim=3)  # [B,H,N,P,C,V]
    # ---- diagonal sub-blocks: factorised when the decay allows, else the exact pairwise exponent
    # sum_{s<z<t} w_z on the t > s pairs only ----
    if fact:
        Ad = _diag_blocks_factorised(q, ks * torch.exp(-(el + ws)), rs, ks, u_)
    else:
        Ad = _diag_blocks(rs, ks, ws, u_)[0]  # [B,H,N,P,C,C]
    o_intra = o_intra + torch.matmul(Ad, vs)
    o = o + o_intra.reshape(B, H, N, L, V)

    return o, S


def _chunked_core_backward(r_, k_, v_, w_, u_, S, C, dO, dS_end):
    """Gradients of :func:`_chunked_core` (same inputs) given ``dO`` [B,H,N,L,V] and ``dS_end``.

    The reverse of the forward graph written out by hand: every exponent is recomputed exactly as
    the forward builds it, and each log-decay gradient is a sum over the (query, key) pairs whose
    segment covers that step, never a difference of two large sums (so fp32 ``dw`` stays accurate
    under strong decay). Returns ``(dr, dk, dv, dw, du [1,H,1,1,K], dS_start)``.
    """
    B, H, N, L, K = r_.shape
    V = v_.shape[-1]
    P = L // C
    cd = r_.dtype
    dev = r_.device
    # ---- inter-chunk: recompute the states, then walk the state gradient backwards ----
    ee = torch.exp(_excl_cumsum(w_))
    erc = torch.exp(_rev_excl_cumsum(w_))
    dec = torch.exp(w_.sum(dim=3)).unsqueeze(-1)  # [B,H,N,K,1]
    re = r_ * ee
    kd = k_ * erc
    U = torch.matmul(kd.transpose(-1, -2), v_)  # [B,H,N,K,V]
    Wo = torch.matmul(re.transpose(-1, -2), dO)  # [B,H,N,K,V]: what the chunk's outputs ask of S_n
    Sn = _chunk_scan(U, dec, S)[0]  # state entering each chunk
    grads = [None] * N
    G = dS_end
    for n in reversed(range(N)):
        grads[n] = G  # gradient of the state leaving chunk n
        G = torch.addcmul(Wo[:, :, n], dec[:, :, n], G)
    dS_start = G
    Gn = torch.stack(grads, dim=2)  # gradient of the state leaving each chunk
    dre = torch.matmul(dO, Sn.transpose(-1, -2))  # [B,H,N,L,K]
    dkd = torch.matmul(v_, Gn.transpose(-1, -2))
    dr = dre * ee
    dk = dkd * erc
    dv = torch.matmul(kd, Gn)
    d_tot = (Gn * dec * Sn).sum(-1)  # [B,H,N,K]: S_{n+1} = exp(tot) S_n + U
    dw = _rev_excl_cumsum(re * dre) + _excl_cumsum(kd * dkd) + d_tot.unsqueeze(3)

    sub = (B, H, N, P, C)
    rs, ks, vs, ws = r_.reshape(*sub, K), k_.reshape(*sub, K), v_.reshape(*sub, V), w_.reshape(*sub, K)
    dOs = dO.reshape(*sub, V)
    drs, dks, dvs, dws = dr.view(*sub, K), dk.view(*sub, K), dv.view(*sub, V), dw.view(*sub, K)
    # ---- intra-chunk, off-diagonal sub-blocks (factorised as in the forward) ----
    fact = _diag_factorisable(ws)
    if P > 1 or fact:
        el = _excl_cumsum(ws)
        eel = torch.exp(el)
        q = rs * eel
    if P > 1:
        rl = _rev_excl_cumsum(ws)
        between = _strictly_between(P, cd, dev)
        mid = torch.einsum("abx,nhmxk->nhmabk", between, ws.sum(dim=4))  # [B,H,N,P(a),P(b),K]
        dq = torch.zeros_like(q)
        d_rl = torch.zeros_like(rl)
        d_mid = torch.zeros_like(mid)
        for a in range(1, P):
            ey = torch.exp(rl[:, :, :, :a] + mid[:, :, :, a, :a].unsqueeze(-2))  # [B,H,N,a,C,K]
            kx = ks[:, :, :, :a] * ey
            kxf = kx.reshape(B, H, N, a * C, K)
            qa, dOa = q[:, :, :, a], dOs[:, :, :, a]
            A = torch.matmul(qa, kxf.transpose(-1, -2))  # [B,H,N,C,a*C]
            dv[:, :, :, : a * C] += torch.matmul(A.transpose(-1, -2), dOa)
            dA = torch.matmul(dOa, v_[:, :, :, : a * C].transpose(-1, -2))
            dq[:, :, :, a] = torch.matmul(dA, kxf)
            dkx = torch.matmul(dA.transpose(-1, -2), qa).view(B, H, N, a, C, K)
            dks[:, :, :, :a] += dkx * ey
            dy = dkx * kx  # gradient of the exponent sum_{s<z<aC} w_z
            d_rl[:, :, :, :a] += dy
            d_mid[:, :, :, a, :a] += dy.sum(dim=-2)
        drs += dq * eel
        dws += _rev_excl_cumsum(q * dq) + _excl_cumsum(d_rl)
        dws += torch.einsum("abx,nhmabk->nhmxk", between, d_mid).unsqueeze(-2)
    # ---- diagonal sub-blocks and the bonus (the same form as the forward chose) ----
    if fact:
        ecl = torch.exp(-(el + ws))
        kxd = ks * ecl
        Ad = _diag_blocks_factorised(q, kxd, rs, ks, u_)
        dvs += torch.matmul(Ad.transpose(-1, -2), dOs)
        dAd = torch.matmul(dOs, vs.transpose(-1, -2))  # [B,H,N,P,C,C]
        dAm = dAd * _tri(C, -1, cd, dev)
        dqd = torch.matmul(dAm, kxd)
        dkxd = torch.matmul(dAm.transpose(-1, -2), q)
        drs += dqd * eel
        dks += dkxd * ecl
        gk = kxd * dkxd  # q = r exp(el_t): w_z for z < t; kx = k exp(-cl_s): w_z for z <= s, negated
        dws += _rev_excl_cumsum(q * dqd) - _rev_excl_cumsum(gk) - gk
    else:
        _, _, sel_t, sel_s, seg_p, scatter = _diag_pairs(C, cd, dev)
        Ad, rt, kt, eD = _diag_blocks(rs, ks, ws, u_)  # rt, kt, eD: [n_pairs, B*H*N*P, K]
        dvs += torch.matmul(Ad.transpose(-1, -2), dOs)
        dAd = torch.matmul(dOs, vs.transpose(-1, -2))  # [B,H,N,P,C,C]
        Mp = torch.matmul(scatter, dAd.reshape(-1, C * C).t()).unsqueeze(-1) * eD  # [n_pairs, B*H*N*P, K]
        Mk, Mr = Mp * kt, Mp * rt
        n_pairs = Mp.shape[0]
        back = lambda x: x.view(C, -1, K).transpose(0, 1).reshape(*sub, K)  # noqa: E731 - [C, M, K] -> [..., C, K]
        drs += back(torch.matmul(sel_t.t(), Mk.view(n_pairs, -1)))
        dks += back(torch.matmul(sel_s.t(), Mr.view(n_pairs, -1)))
        dws += back(torch.matmul(seg_p.t(), (Mk * rt).view(n_pairs, -1)))
    db = torch.diagonal(dAd, dim1=-2, dim2=-1).unsqueeze(-1)  # [B,H,N,P,C,1]: d bonus
    uu = u_.unsqueeze(3)
    drs += db * uu * ks
    dks += db * uu * rs
    du = (db * rs * ks).sum(dim=(0, 2, 3, 4)).view(1, H, 1, 1, K)
    return dr, dk, dv, dw, du, dS_start


class _ChunkedWKVFunction(torch.autograd.Function):
    """:func:`_chunked_core` with the hand-written backward :func:`_chunked_core_backward`, run
    group by group (see the module docstring).

    Inputs: prepared ``r_, k_, v_, w_`` [B,H,N,L,*], ``u_`` [1,H,1,1,K], ``S0`` [B,H,K,V], and the
    ints ``C`` (sub-chunk) and ``G`` (chunks per group). Outputs ``(o [B,H,N,L,V], S_final)``.
    """

    @staticmethod
    def forward(ctx, r_, k_, v_, w_, u_, S0, C, G):
        N = r_.shape[2]
        starts = []
        S = S0
        o_parts = []
        for g0 in range(0, N, G):
            starts.append(S)
            sl = slice(g0, min(g0 + G, N))
            o_g, S = _chunked_core(r_[:, :, sl], k_[:, :, sl], v_[:, :, sl], w_[:, :, sl], u_, S, C)
            o_parts.append(o_g)
        o = o_parts[0] if len(o_parts) == 1 else torch.cat(o_parts, dim=2)
        ctx.save_for_backward(r_, k_, v_, w_, u_, torch.stack(starts, dim=0))
        ctx.C, ctx.G = C, G
        return o, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dO, dS_final):
        r_, k_, v_, w_, u_, starts = ctx.saved_tensors
        C, G = ctx.C, ctx.G
        N = r_.shape[2]
        need = ctx.needs_input_grad[:6]
        grads = [torch.empty_like(x) if need[i] else None for i, x in enumerate((r_, k_, v_, w_))]
        du = torch.zeros_like(u_)
        dS = torch.zeros_like(starts[0]) if dS_final is None else dS_final.to(starts.dtype)
        if dO is None:
            dO = torch.zeros(*r_.shape[:4], v_.shape[-1], dtype=r_.dtype, device=r_.device)
        g0s = list(range(0, N, G))
        for gi in reversed(range(len(g0s))):
            sl = slice(g0s[gi], min(g0s[gi] + G, N))
            *gx, gu, dS = _chunked_core_backward(r_[:, :, sl], k_[:, :, sl], v_[:, :, sl], w_[:, :, sl], u_,
                                                 starts[gi], C, dO[:, :, sl], dS)
            for i in range(4):
                if need[i]:
                    grads[i][:, :, sl] = gx[i]
            du += gu
        return (*grads, du if need[4] else None, dS if need[5] else None, None, None)


def wkv6_chunked(r, k, v, w, u, initial_state=None, output_final_state=False, chunk_size=32, sub_chunk=8,
                 group_tokens=512):
    """Chunked, stable WKV-6 in pure PyTorch (differentiable with autograd).

    Args: as :func:`multimodal_rwkv.kernels.wkv6`; ``chunk_size`` ``L`` must be a multiple of
    ``sub_chunk`` ``C``. Any T (padded internally with zero keys and zero log-decay, which leave the
    state unchanged). Computes in float32 (float64 for float64 inputs). When autograd needs
    gradients, the backward recomputes groups of about ``group_tokens`` tokens (whole chunks) from
    saved group-start states instead of keeping the whole graph (see the module docstring).

    Returns ``(o [B,T,H,V] in r.dtype, final_state [B,H,K,V] float32 (float64 for float64) or None)``.
    """
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk {sub_chunk}")
    cd = _compute_dtype(r, k, v, w, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    L, C = chunk_size, sub_chunk
    if T == 0:
        final = None
        if output_final_state:
            final = (torch.zeros(B, H, K, V, dtype=cd, device=r.device) if initial_state is None
                     else initial_state.to(cd))
            final = final if cd == torch.float64 else final.float()
        return r.new_zeros(B, 0, H, V), final
    if T < L:  # shrink the chunk for short inputs (keep it a multiple of the sub-chunk)
        L = max(C, -(-T // C) * C)
    N = -(-T // L)
    Tp = N * L

    def prep(x):
        x = x.to(cd)
        if Tp != T:
            x = F.pad(x, (0, 0, 0, 0, 0, Tp - T))
        D = x.shape[-1]
        return x.view(B, N, L, H, D).permute(0, 3, 1, 2, 4)  # [B,H,N,L,D]

    r_, k_, v_, w_ = prep(r), prep(k), prep(v), prep(w)
    u_ = u.to(cd).view(1, H, 1, 1, K)

    S0 = torch.zeros(B, H, K, V, dtype=cd, device=r.device) if initial_state is None else initial_state.to(cd)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, k, v, w, u, initial_state)):
        G = max(1, group_tokens // L)
        o, S = _ChunkedWKVFunction.apply(r_, k_, v_, w_, u_, S0, C, G)
    else:
        o, S = _chunked_core(r_, k_, v_, w_, u_, S0, C)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, Tp, H, V)[:, :T]
    final = None
    if output_final_state:
        final = S if cd == torch.float64 else S.float()
    return o.to(r.dtype), final
