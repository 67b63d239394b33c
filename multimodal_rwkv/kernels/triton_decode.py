"""Triton recurrent WKV-6 for small T (decode): one program per (batch*head, value block) keeps the fp32
state block ``S[K, BV]`` in registers and steps through the tokens::

    o_t = r_t (S + diag(u) k_t^T v_t);   S <- diag(exp(w_t)) S + k_t^T v_t

The state is read from ``state_in`` and written to ``state_out``; they may be the same tensor
(:func:`wkv6_decode_` updates a state in place). Forward only (inference); the dispatcher uses the
chunked kernel whenever gradients are needed. Runs under TRITON_INTERPRET=1 too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from multimodal_rwkv.errors import KernelError
from multimodal_rwkv.kernels.triton_chunk import check_head_sizes


@triton.jit
def _decode(r, k, v, w, u, s_in, s_out, o, T,
            H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, USE_S0: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets for large B*T*H*K
    i_b = i_bh // H
    i_h = i_bh % H
    o_k = tl.arange(0, K)
    o_v = i_v * BV + tl.arange(0, BV)
    s_off = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if USE_S0:
        S = tl.load(s_in + s_off).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    b_u = tl.load(u + i_h * K + o_k).to(tl.float32)
    for t in range(0, T):
        pk = (i_b * T + t) * H * K + i_h * K + o_k
        pv = (i_b * T + t) * H * V + i_h * V + o_v
        b_r = tl.load(r + pk).to(tl.float32)
        b_k = tl.load(k + pk).to(tl.float32)
        b_w = tl.load(w + pk).to(tl.float32)
        b_v = tl.load(v + pv).to(tl.float32)
        kv = b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_r[:, None] * (S + b_u[:, None] * kv), axis=0)
        tl.store(o + pv, b_o.to(o.dtype.element_ty))
        S = S * tl.exp(b_w)[:, None] + kv
    tl.store(s_out + s_off, S)


def _launch(r, k, v, w, u, s_in, s_out):
    B, T, H, K = r.shape
    V = v.shape[-1]
    check_head_sizes(K, V)
    BV = min(V, 32)
    o = torch.empty(B, T, H, V, device=r.device, dtype=r.dtype)
    rc, kc, vc, wc, uc = (x.contiguous() for x in (r, k, v, w, u))
    _decode[(V // BV, B * H)](rc, kc, vc, wc, uc, s_in if s_in is not None else s_out, s_out, o, T,
                              H=H, K=K, V=V, BV=BV, USE_S0=s_in is not None, num_warps=4)
    return o


def wkv6_decode(r, k, v, w, u, initial_state=None, output_final_state=False):
    """Recurrent WKV-6 (no autograd), shapes as :func:`multimodal_rwkv.kernels.wkv6`.

    ``initial_state`` is not modified; the final state is a new float32 tensor.
    Returns ``(o [B,T,H,V] in r.dtype, final_state or None)``.
    """
    B, T, H, K = r.shape
    V = v.shape[-1]
    s_out = torch.empty(B, H, K, V, device=r.device, dtype=torch.float32)
    s_in = None if initial_state is None else initial_state.float().contiguous()
    with torch.no_grad():
        o = _launch(r, k, v, w, u, s_in, s_out)
    return o, (s_out if output_final_state else None)


def wkv6_decode_(r, k, v, w, u, state):
    """In-place decode step: advances ``state`` ([B,H,K,V] float32, contiguous) over the T tokens and
    returns ``o`` [B,T,H,V] in r.dtype. No autograd."""
    from multimodal_rwkv.kernels.dispatch import _validate

    # the shapes and devices wkv6 checks, the state's too: the kernel would read past mis-shaped inputs
    _validate(r, k, v, w, u, state)
    if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or not state.is_contiguous():
        raise KernelError("wkv6_decode_: state must be a contiguous float32 tensor [B,H,K,V]")
    with torch.no_grad():
        return _launch(r, k, v, w, u, state, state)
