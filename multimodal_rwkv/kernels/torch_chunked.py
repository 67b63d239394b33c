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
``m_a`` as well, with column factors up to e^3; it equals the pair form to fp64 rounding.
Each exponent is computed as a direct segment sum of ``w`` (0/+1/-1 segment masks applied by
matmul), not as a difference of two chunk-level cumsums, so that fp32 ``dw`` stays accurate
under strong decay (a difference sends +g and -g into the same ``w`` and they cancel).

Layout, for speed on CPUs: the inputs are copied once into chunk-major ``[N, B*H, L, K]``
(contiguous, so a group of chunks is a contiguous slice and no batched matmul copies its
operands), and the whole intra-chunk matrix of a chunk is one batched product of each row
sub-chunk's factors ``[C, K]`` with the column factors of all ``L`` columns for that reference
point ``[K, L]`` (the exact diagonal pairs, where used, are added into its block diagonal), so
the intra-chunk output is one ``[L, L] x [L, V]`` product instead of a loop over sub-chunks and
many 8x8 products. Measured side by side with the loop version (2 threads, B=1, H=8, K=64):
fwd+bwd 1.48x at weak decay (T=1024 and 4096), 1.16-1.18x at strong decay; forward 1.28-1.68x.

Backward: plain autograd through this formulation keeps ~15x the input size of activations
(about 500 MB per layer at B=1, T=4096, H=8, K=64), which made RWKV-6 training use more memory than a
Llama of equal size. When gradients are needed the chunked computation therefore runs inside
:class:`_ChunkedWKVFunction`: the forward runs without grad, in groups of ``G`` chunks (about
``group_tokens`` tokens), and saves only its (padded, cast) inputs plus the fp32/fp64 state entering
each group ([B*H,K,V] per group). Backward walks the groups in reverse and calls
:func:`_chunked_core_backward`, the reverse of :func:`_chunked_core` written out by hand: it
recomputes the group's exponents and states exactly as the forward does, walks the state gradient
back through the chunks, and builds dr, dk, dv, du and the gradient handed to the previous group
with batched matmuls. The log-decay gradient follows the forward's factorisation: each ``dw_z`` is
a sum over the (query, key) pairs whose decay segment covers step ``z`` (``q * dq`` through the
row factors, ``k * dk`` through the column factors, ``G * S`` through a chunk's total decay), never
the difference of two large sums (``revcumsum(r*dr) - revcumsum(k*dk)``, which loses fp32 ``dw``
when the decay is strong). Results equal autograd's through the same formulation to fp64 rounding
(tested against the step-by-step reference). Peak extra memory is one group's intermediates.
Hand-written rather than autograd through a recomputed forward: no graph is recorded.
Without grad (inference, ``torch.no_grad``, or no input requiring grad) the same forward runs,
group by group, and nothing is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# Log-decays below this are raised to it in the chunked forms (exp(-60) ~ 1e-26: a state entry
# that decays by it is gone next to anything it is added to). A log-decay of -inf (decay 0, what
# -exp(wraw) gives for wraw > 88.7 in fp32) would otherwise meet 0 * -inf in the segment-sum
# products (or -inf - -inf in a difference of cumulative sums) and turn every output into NaN.
LOG_DECAY_FLOOR = -60.0


def _compute_dtype(*xs):
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _final(S, *inputs):
    """The final state as returned: float64 for float64 inputs, else float32 (whatever the initial
    state's dtype, as the other backends)."""
    return S.to(_compute_dtype(*inputs))


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


def _intra_masks(L, C, diag, dtype, device):
    """Constant matrices of the intra-chunk exponents (cached), ``P = L // C`` sub-chunks, ``b(s)``
    the sub-chunk of row ``s``:

    - ``el`` [L, L]: ``el_t = sum_{b(t)C <= z < t} w_z`` (the row factors' exponent);
    - ``col`` [P*L, L]: the column factors' exponents around each row sub-chunk ``a``'s reference
      point, ``y[a, s] = sum_{s < z < aC} w_z`` for ``b(s) < a``; with ``diag`` also
      ``-sum_{aC <= z <= s} w_z`` for ``b(s) == a`` (the factorised diagonal sub-blocks); 0 elsewhere;
    - ``valid`` [P, L, 1]: 1 where ``col`` defines a factor (the rest is zeroed, never used).

    Each exponent is a direct segment sum of ``w`` (entries 0/+1/-1), never a difference of two
    cumulative sums."""
    key = ("intra", L, C, diag, dtype, str(device))
    hit = _BETWEEN_CACHE.get(key)
    if hit is None:
        P = L // C
        i = torch.arange(L, device=device)
        blk = i // C
        el = ((blk.view(L, 1) == blk.view(1, L)) & (i.view(1, L) < i.view(L, 1))).to(dtype)
        a = torch.arange(P, device=device).view(P, 1, 1)
        s, z = i.view(1, L, 1), i.view(1, 1, L)
        bs = blk.view(1, L, 1)
        off = (bs < a) & (s < z) & (z < a * C)
        col = off.to(dtype)
        valid = bs < a
        if diag:
            on = (bs == a) & (a * C <= z) & (z <= s)
            col = col - on.to(dtype)
            valid = valid | (bs == a)
        hit = (el, col.reshape(P * L, L), valid.to(dtype))
        _BETWEEN_CACHE[key] = hit
    return hit


def _diag_pairs(n, dtype, device):
    """For the pairs (t, s) with t > s of an n x n block: the row indices of t and of s [n_pairs],
    their one-hot selectors [n_pairs, n], the segment masks 1[s < z < t] [n_pairs, n], and the 0/1
    matrix [n_pairs, n*n] that scatters pair values into the flattened block."""
    key = ("pairs", n, dtype, str(device))
    hit = _BETWEEN_CACHE.get(key)
    if hit is None:
        ti, si = torch.tril_indices(n, n, -1, device=device)
        eye = torch.eye(n, dtype=dtype, device=device)
        i = torch.arange(n, device=device)
        between = (i.view(1, n, 1) < i.view(1, 1, n)) & (i.view(1, 1, n) < i.view(n, 1, 1))  # [t, s, z]: s < z < t
        seg = between.to(dtype)[ti, si]
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
    M = rs.numel() // (C * K)  # (given, not -1: sub-chunks of 1 have no pairs)
    eD = torch.exp(torch.matmul(seg, front(ws).reshape(C, -1))).view(len(ti), M, K)
    return front(rs)[ti], front(ks)[si], eD


def _diag_blocks(rs, ks, ws):
    """The diagonal ``C x C`` sub-blocks' strictly lower part, exactly:
    ``A[t, s] = sum_j r_tj k_sj exp(sum_{s<z<t} w_zj)`` for t > s, 0 on and above the diagonal.
    Returns ``(A [..., C, C], r_t, k_s, exp(...))`` (the last three pair-major, see :func:`_pair_terms`)."""
    C = rs.shape[-2]
    scatter = _diag_pairs(C, rs.dtype, rs.device)[-1]
    rt, kt, eD = _pair_terms(rs, ks, ws)  # [n_pairs, M, K]
    Ap = (rt * kt * eD).sum(-1)  # [n_pairs, M]
    return torch.matmul(Ap.t(), scatter).view(*rs.shape[:-1], C), rt, kt, eD


# A diagonal sub-block may also be factorised, like the off-diagonal ones, around the last row
# before it: A[t, s] = (r_t exp(el_t)) . (k_s exp(-cl_s)) with el/cl the exclusive/inclusive
# log-decay sums inside the sub-chunk. The column factor exp(-cl_s) grows up to exp(-(the
# sub-chunk's total log-decay)), and the log-decay gradient then takes a difference of the two
# factors' terms, so this is only done when every sub-chunk's total is >= -_DIAG_FACTOR_LIMIT
# (factors <= e^3 = 20: fp32 dw loses at most ~1 digit, far inside the tests' tolerance) and no
# w is positive. RWKV-6's initial decays (-exp(-6) .. -exp(-1) per step) give at most -2.9 over 8
# steps. It replaces the pair terms, about a third of a fwd+bwd's op time at T=1024, K=64 (profile).
_DIAG_FACTOR_LIMIT = 3.0


def _diag_factorisable(w_, C) -> bool:
    """Whether the diagonal sub-blocks of ``w_`` [n, M, L, K] (sub-chunks of ``C``) may use the factorised form."""
    if w_.device.type == "meta":  # shapes only (a model built on the meta device): either form
        return False
    n, M, L, K = w_.shape
    tot = w_.view(n, M, L // C, C, K).sum(dim=3)
    return bool(tot.min() >= -_DIAG_FACTOR_LIMIT) and bool(w_.max() <= 0)


def _chunk_scan(U, dec, S):
    """``S_{n+1} = dec_n * S_n + U_n`` over the chunks (dim 0): the state entering each chunk
    [N,M,K,V] and the state after the last."""
    states = []
    for n in range(U.shape[0]):
        states.append(S)
        S = torch.addcmul(U[n], dec[n], S)
    return torch.stack(states, dim=0), S


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
    final = _final(S, r, k, v, w) if output_final_state else None
    return o.to(r.dtype), final


def _block_diagonal(A, C):
    """The diagonal ``C x C`` sub-blocks of ``A`` [N,M,L,L] as a view [N,M,P,C,C]."""
    N, M, L, _ = A.shape
    return A.view(N, M, L // C, C, L // C, C).diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)


def _intra(q, k_, w_, C, fact):
    """The intra-chunk matrix without the exact diagonal pairs: ``A`` [n,M,L,L] strictly lower
    (its diagonal sub-blocks too when ``fact``), plus the column factors' ``exp`` (masked) and the
    factors ``KX`` [n,M,P,L,K] it was built from. Row sub-chunk ``a`` times all columns is one
    [C, K] x [K, L] product; all of them are one batched matmul."""
    n, M, L, K = k_.shape
    P = L // C
    _, col, valid = _intra_masks(L, C, fact, k_.dtype, k_.device)
    ey = torch.exp(torch.matmul(col, w_).view(n, M, P, L, K)) * valid
    KX = k_.unsqueeze(2) * ey
    A = torch.bmm(q.reshape(n * M * P, C, K), KX.reshape(n * M * P, L, K).transpose(1, 2)).view(n, M, L, L)
    return A * _tri(L, -1, A.dtype, A.device), ey, KX


def _chunked_core(r_, k_, v_, w_, u_, S, C):
    """The chunked form on prepared inputs (one group of chunks).

    ``r_, k_, w_``: [N,M,L,K], ``v_``: [N,M,L,V] (chunk-major, ``M`` = batch x heads, compute
    dtype, T padded to N*L), ``u_``: [1,M,1,K], ``S``: state entering the first chunk [M,K,V].
    Returns ``(o [N,M,L,V], S_end)``.
    """
    N, M, L, K = r_.shape
    P = L // C
    w_ = w_.clamp(min=LOG_DECAY_FLOOR)  # per group, not in the graph (see LOG_DECAY_FLOOR)
    # ---- inter-chunk: states entering each chunk; every exponent is a direct segment sum of w ----
    U = torch.matmul((k_ * torch.exp(_rev_excl_cumsum(w_))).transpose(-1, -2), v_)  # [N,M,K,V]
    dec = torch.exp(w_.sum(dim=2)).unsqueeze(-1)  # [N,M,K,1]
    Sn, S = _chunk_scan(U, dec, S)
    o = torch.matmul(r_ * torch.exp(_excl_cumsum(w_)), Sn)  # [N,M,L,V]
    # ---- intra-chunk, factorised per row sub-chunk around the last row before it ----
    fact = _diag_factorisable(w_, C)
    el = _intra_masks(L, C, fact, r_.dtype, r_.device)[0]
    q = r_ * torch.exp(torch.matmul(el, w_))
    A = _intra(q, k_, w_, C, fact)[0]
    if not fact:  # the diagonal sub-blocks' exact pairs
        sub = (N, M, P, C)
        _block_diagonal(A, C).add_(_diag_blocks(r_.view(*sub, K), k_.view(*sub, K), w_.view(*sub, K))[0])
    o = o + torch.matmul(A, v_) + (r_ * u_ * k_).sum(-1, keepdim=True) * v_  # ... + bonus
    return o, S


def _chunked_core_backward(r_, k_, v_, w_, u_, S, C, dO, dS_end):
    """Gradients of :func:`_chunked_core` (same inputs) given ``dO`` [N,M,L,V] and ``dS_end``.

    The reverse of the forward graph written out by hand: every exponent is recomputed exactly as
    the forward builds it, and each log-decay gradient is a sum over the (query, key) pairs whose
    segment covers that step, never a difference of two large sums (so fp32 ``dw`` stays accurate
    under strong decay). Returns ``(dr, dk, dv, dw, du [1,M,1,K], dS_start)``.
    """
    w_ = w_.clamp(min=LOG_DECAY_FLOOR)  # as the forward
    N, M, L, K = r_.shape
    P = L // C
    # ---- inter-chunk: recompute the states, then walk the state gradient backwards ----
    ee = torch.exp(_excl_cumsum(w_))
    erc = torch.exp(_rev_excl_cumsum(w_))
    dec = torch.exp(w_.sum(dim=2)).unsqueeze(-1)  # [N,M,K,1]
    re = r_ * ee
    kd = k_ * erc
    U = torch.matmul(kd.transpose(-1, -2), v_)  # [N,M,K,V]
    Wo = torch.matmul(re.transpose(-1, -2), dO)  # [N,M,K,V]: what the chunk's outputs ask of S_n
    Sn = _chunk_scan(U, dec, S)[0]  # state entering each chunk
    grads = [None] * N
    G = dS_end
    for n in reversed(range(N)):
        grads[n] = G  # gradient of the state leaving chunk n
        G = torch.addcmul(Wo[n], dec[n], G)
    dS_start = G
    Gn = torch.stack(grads, dim=0)  # gradient of the state leaving each chunk
    dre = torch.matmul(dO, Sn.transpose(-1, -2))  # [N,M,L,K]
    dkd = torch.matmul(v_, Gn.transpose(-1, -2))
    dr = dre * ee
    dk = dkd * erc
    dv = torch.matmul(kd, Gn)
    d_tot = (Gn * dec * Sn).sum(-1)  # [N,M,K]: S_{n+1} = exp(tot) S_n + U
    dw = _rev_excl_cumsum(re * dre) + _excl_cumsum(kd * dkd) + d_tot.unsqueeze(2)

    # ---- intra-chunk (factorised as in the forward) ----
    fact = _diag_factorisable(w_, C)
    el, col, _ = _intra_masks(L, C, fact, r_.dtype, r_.device)
    eel = torch.exp(torch.matmul(el, w_))
    q = r_ * eel
    A, ey, KX = _intra(q, k_, w_, C, fact)
    if not fact:  # the diagonal sub-blocks' exact pairs
        sub = (N, M, P, C)
        rs, ks, ws = r_.view(*sub, K), k_.view(*sub, K), w_.view(*sub, K)
        _, _, sel_t, sel_s, seg_p, scatter = _diag_pairs(C, r_.dtype, r_.device)
        Ad, rt, kt, eD = _diag_blocks(rs, ks, ws)  # rt, kt, eD: [n_pairs, N*M*P, K]
        _block_diagonal(A, C).add_(Ad)
    dv += torch.matmul(A.transpose(-1, -2), dO)
    dA = torch.matmul(dO, v_.transpose(-1, -2)) * _tri(L, -1, A.dtype, A.device)  # [N,M,L,L]
    dAb = dA.view(N * M * P, C, L)
    dq = torch.bmm(dAb, KX.reshape(N * M * P, L, K)).view(N, M, L, K)
    dKX = torch.bmm(dAb.transpose(1, 2), q.reshape(N * M * P, C, K)).view(N, M, P, L, K)
    dk += (dKX * ey).sum(dim=2)
    dr += dq * eel
    # q = r exp(el @ w): w_z for the rows whose segment covers z; KX = k exp(col @ w) likewise
    dw += torch.matmul(el.t(), q * dq) + torch.matmul(col.t(), (dKX * KX).reshape(N, M, P * L, K))
    if not fact and C > 1:  # (sub-chunks of one token have no pairs)
        dAd = _block_diagonal(dA, C)  # [N,M,P,C,C]
        Mp = torch.matmul(scatter, dAd.reshape(-1, C * C).t()).unsqueeze(-1) * eD  # [n_pairs, N*M*P, K]
        Mk, Mr = Mp * kt, Mp * rt
        n_pairs = Mp.shape[0]
        back = lambda x: x.view(C, -1, K).transpose(0, 1).reshape(N, M, L, K)  # noqa: E731 - [C, .., K] -> [N,M,L,K]
        dr += back(torch.matmul(sel_t.t(), Mk.view(n_pairs, -1)))
        dk += back(torch.matmul(sel_s.t(), Mr.view(n_pairs, -1)))
        dw += back(torch.matmul(seg_p.t(), (Mk * rt).view(n_pairs, -1)))
    # ---- bonus ----
    db = (dO * v_).sum(-1, keepdim=True)  # [N,M,L,1]
    dr += db * u_ * k_
    dk += db * u_ * r_
    dv += (r_ * u_ * k_).sum(-1, keepdim=True) * dO
    du = (db * r_ * k_).sum(dim=(0, 2), keepdim=True).view(1, M, 1, K)
    return dr, dk, dv, dw, du, dS_start


def _chunked_forward(r_, k_, v_, w_, u_, S, C, G):
    """:func:`_chunked_core` group by group (``G`` chunks each, bounding the intermediates'
    memory): ``(o, S_end, [state entering each group])``."""
    N = r_.shape[0]
    starts, o_parts = [], []
    for g0 in range(0, N, G):
        starts.append(S)
        sl = slice(g0, min(g0 + G, N))
        o_g, S = _chunked_core(r_[sl], k_[sl], v_[sl], w_[sl], u_, S, C)
        o_parts.append(o_g)
    o = o_parts[0] if len(o_parts) == 1 else torch.cat(o_parts, dim=0)
    return o, S, starts


class _ChunkedWKVFunction(torch.autograd.Function):
    """:func:`_chunked_core` with the hand-written backward :func:`_chunked_core_backward`, run
    group by group (see the module docstring).

    Inputs: prepared ``r_, k_, v_, w_`` [N,M,L,*], ``u_`` [1,M,1,K], ``S0`` [M,K,V], and the
    ints ``C`` (sub-chunk) and ``G`` (chunks per group). Outputs ``(o [N,M,L,V], S_final)``.
    """

    @staticmethod
    def forward(ctx, r_, k_, v_, w_, u_, S0, C, G):
        o, S, starts = _chunked_forward(r_, k_, v_, w_, u_, S0, C, G)
        ctx.save_for_backward(r_, k_, v_, w_, u_, torch.stack(starts, dim=0))
        ctx.C, ctx.G = C, G
        return o, S

    @staticmethod
    def backward(ctx, dO, dS_final):
        from multimodal_rwkv.kernels.dispatch import autocast_off

        with autocast_off(dO.device if dO is not None else ctx.saved_tensors[0].device):
            return _ChunkedWKVFunction._backward(ctx, dO, dS_final)

    @staticmethod
    def _backward(ctx, dO, dS_final):
        from multimodal_rwkv.kernels.reference import first_derivatives_only

        first_derivatives_only("torch")
        r_, k_, v_, w_, u_, starts = ctx.saved_tensors
        C, G = ctx.C, ctx.G
        N = r_.shape[0]
        need = ctx.needs_input_grad[:6]
        grads = [torch.empty_like(x) if need[i] else None for i, x in enumerate((r_, k_, v_, w_))]
        du = torch.zeros_like(u_)
        dS = torch.zeros_like(starts[0]) if dS_final is None else dS_final.to(starts.dtype)
        if dO is None:
            dO = torch.zeros(*r_.shape[:3], v_.shape[-1], dtype=r_.dtype, device=r_.device)
        g0s = list(range(0, N, G))
        for gi in reversed(range(len(g0s))):
            sl = slice(g0s[gi], min(g0s[gi] + G, N))
            *gx, gu, dS = _chunked_core_backward(r_[sl], k_[sl], v_[sl], w_[sl], u_, starts[gi], C,
                                                 dO[sl], dS)
            for i in range(4):
                if need[i]:
                    grads[i][sl] = gx[i]
            du += gu
        return (*grads, du if need[4] else None, dS if need[5] else None, None, None)


def _to_chunks(x, L, cd):
    """``[B,T,H,D]`` -> chunk-major ``[N, B*H, L, D]`` in ``cd``, T zero-padded to N*L (contiguous)."""
    B, T, H, D = x.shape
    N = -(-T // L)
    x = x.to(cd)
    if N * L != T:
        x = F.pad(x, (0, 0, 0, 0, 0, N * L - T))
    return x.view(B, N, L, H, D).permute(1, 0, 3, 2, 4).reshape(N, B * H, L, D).contiguous()


def wkv6_chunked(r, k, v, w, u, initial_state=None, output_final_state=False, chunk_size=32, sub_chunk=8,
                 group_tokens=512):
    """Chunked, stable WKV-6 in pure PyTorch (first derivatives, by its own backward).

    Args: as :func:`multimodal_rwkv.kernels.wkv6`; ``chunk_size`` ``L`` must be a multiple of
    ``sub_chunk`` ``C``. Any T (padded internally with zero keys and zero log-decay, which leave the
    state unchanged). Computes in float32 (float64 for float64 inputs), in groups of about
    ``group_tokens`` tokens (whole chunks), which bounds the intermediates' memory; when autograd
    needs gradients, the backward recomputes each group from its saved starting state instead of
    keeping the whole graph (see the module docstring).

    Returns ``(o [B,T,H,V] in r.dtype, final_state [B,H,K,V] float32 (float64 for float64) or None)``.
    """
    if not (isinstance(sub_chunk, int) and isinstance(chunk_size, int) and 1 <= sub_chunk <= chunk_size):
        raise ValueError(f"chunk_size and sub_chunk must be integers with 1 <= sub_chunk <= chunk_size, got "
                         f"{chunk_size!r} and {sub_chunk!r}")
    if chunk_size % sub_chunk:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of sub_chunk {sub_chunk}")
    cd = _compute_dtype(r, k, v, w, initial_state)
    B, T, H, K = r.shape
    V = v.shape[-1]
    L, C = chunk_size, sub_chunk
    if T == 0 or B == 0 or H == 0:  # nothing to compute (no tokens, or no rows / heads)
        final = None
        if output_final_state:
            final = (torch.zeros(B, H, K, V, dtype=cd, device=r.device) if initial_state is None
                     else initial_state.to(cd))
            final = _final(final, r, k, v, w)
        return r.new_zeros(B, T, H, V), final
    if T < L:  # shrink the chunk for short inputs (keep it a multiple of the sub-chunk)
        L = max(C, -(-T // C) * C)
    r_, k_, v_, w_ = (_to_chunks(x, L, cd) for x in (r, k, v, w))
    N = r_.shape[0]
    u_ = u.to(cd).view(1, 1, H, 1, K).expand(1, B, H, 1, K).reshape(1, B * H, 1, K)
    S0 = (torch.zeros(B * H, K, V, dtype=cd, device=r.device) if initial_state is None
          else initial_state.to(cd).reshape(B * H, K, V))
    G = max(1, group_tokens // L)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, k, v, w, u, initial_state)):
        o, S = _ChunkedWKVFunction.apply(r_, k_, v_, w_, u_, S0, C, G)
    else:
        o, S = _chunked_forward(r_, k_, v_, w_, u_, S0, C, G)[:2]
    o = o.view(N, B, H, L, V).permute(1, 0, 3, 2, 4).reshape(B, N * L, H, V)[:, :T]
    final = None
    if output_final_state:
        S = S.view(B, H, K, V)
        final = _final(S, r, k, v, w)
    return o.to(r.dtype), final
