"""Reference WKV-6 recurrence: the plain step loop, the ground truth for every other backend.

Math (per batch b and head h; row vectors r_t, k_t, w_t of size K and v_t of size V)::

    o_t = r_t @ (S_{t-1} + diag(u) k_t^T v_t)         # [V]
    S_t = diag(exp(w_t)) @ S_{t-1} + k_t^T v_t         # [K, V], key-major

``w`` is the log-decay (``-exp(wraw)`` <= 0), so ``exp(w_t)`` is the per-channel decay in (0, 1].
The loop is differentiable with autograd. It serves x052 (RWKV-5) too: pass ``w`` broadcast over T.
"""
from __future__ import annotations

import torch


def wkv6_reference(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """Step recurrence, obviously correct, differentiable.

    Args:
        r, k, w: ``[B, T, H, K]``; ``w`` is the log-decay (<= 0).
        v: ``[B, T, H, V]``.
        u: ``[H, K]`` bonus for the current token.
        initial_state: ``[B, H, K, V]`` or None (zeros).
        output_final_state: return the state after the last step.
        compute_dtype: internal dtype; default float32 (float64 if any input is float64).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``r``; ``final_state``
        ``[B, H, K, V]`` float32 (float64 if computing in float64), or None.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if torch.float64 in (r.dtype, k.dtype, v.dtype, w.dtype) else torch.float32
    B, T, H, K = r.shape
    V = v.shape[-1]
    cd = compute_dtype
    r_, k_, v_, w_ = (x.to(cd) for x in (r, k, v, w))
    u_ = u.to(cd)
    if initial_state is None:
        S = torch.zeros(B, H, K, V, dtype=cd, device=r.device)
    else:
        S = initial_state.to(cd)
    decay = torch.exp(w_)  # [B,T,H,K]
    outs = []
    for t in range(T):
        rt, kt, vt = r_[:, t], k_[:, t], v_[:, t]  # [B,H,K], [B,H,K], [B,H,V]
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)  # [B,H,K,V]
        o = torch.einsum("bhk,bhkv->bhv", rt, S + u_.unsqueeze(-1) * kv)
        outs.append(o)
        S = decay[:, t].unsqueeze(-1) * S + kv
    o = torch.stack(outs, dim=1).to(r.dtype) if T > 0 else r.new_zeros(B, 0, H, V)
    final = None
    if output_final_state:
        final = S if cd == torch.float64 else S.to(torch.float32)
    return o, final


def first_derivatives_only(backend: str) -> None:
    """Called by the fast backends' backward passes: under ``create_graph=True`` (grad mode on in
    backward) their gradients would carry no graph, so a second derivative would silently miss
    their part. A RuntimeError says so instead; the reference backend differentiates twice."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"wkv6: the {backend!r} backend gives first derivatives only (create_graph=True / "
                           "double backward); use backend='reference' for higher derivatives")
