"""Memory-lean training forms of the RWKV block's projections (hand-written backward).

Plain autograd keeps every intermediate that some backward formula reads: for RWKV-6's time
mixing that is the token-shift difference, six mixed inputs, five data-dependent mix vectors, the
LoRA activations and the decay; for channel mixing the two mixed inputs, ``relu(h)`` and
``relu(h)^2``; for the output the group norm's input and output, the gate, its input and their
product. At B=1, T=4096, C=512 that made a 6x512 RWKV-6 keep 1.9 GB of activations against
1.3 GB for a Llama of equal size. The Functions here save only the block input (``x`` and the
shift carried in), the GEMM outputs that are costly to recompute (``h``, ``receptance(x_r)``,
``value(.)``), the WKV output, the gate's input and the small LoRA activations, and recompute the
elementwise parts in backward. Same formulas as :mod:`multimodal_rwkv.model.modeling`'s plain
forms, which stay the reference: the tests compare outputs and every gradient.

They are used when autograd records (training), autocast is off, and every projection involved
is this package's plain bias-free ``Linear`` (a LoRA-wrapped projection keeps the plain form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from multimodal_rwkv.kernels import cpu


def token_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x_{t-1}`` for every t: ``[B,T,C]`` with ``shift`` ``[B,C]`` as the token before t=0 (in
    ``x``'s dtype). Shared by these forms and the plain ones in modeling.py."""
    prev = shift.to(x.dtype).unsqueeze(1)
    if x.shape[1] == 1:
        return prev
    return torch.cat([prev, x[:, :-1]], dim=1)


def _shift_grads(dxx: torch.Tensor, dx: torch.Tensor):
    """Route the gradient of ``xx = prev - x`` into ``dx`` (in place) and the carried-in shift."""
    dx -= dxx
    dx[:, :-1] += dxx[:, 1:]
    return dxx[:, 0]


def _wgrad(d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The weight gradient of ``cpu.linear(a, W)`` given its output gradient ``d`` ([out, in])."""
    return d.reshape(-1, d.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


def _sum_bt(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 1), keepdim=True)


def _log_decay(decay: torch.Tensor, tb: torch.Tensor, dw2: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``logw = -exp(decay + tb @ dw2)`` in float32, ``[B,T,A]``, with ``tb = tanh(x_w @ dw1)``."""
    return -torch.exp((decay + cpu.linear(tb, dw2.t()).view(B, T, -1)).float())


def mix_offsets(th: torch.Tensor, w2: torch.Tensor) -> list[torch.Tensor]:
    """ddlerp's five data-dependent mix offsets ``m_i = th_i @ w2[i]`` (slots w, k, v, r, g), each
    ``[BT, C]``, from ``th = tanh(x @ w1)`` ``[BT, 5R]`` and ``w2`` ``[5, R, C]``: one product per
    slot through :func:`multimodal_rwkv.kernels.cpu.linear`. On the 2-core box, at BT=4096, R=32,
    C=512, the five oneDNN products take 7 ms where MKL's batched product takes 20 ms. Shared by
    these forms and the plain ones in modeling.py."""
    R = w2.shape[1]
    return [cpu.linear(th[:, i * R:(i + 1) * R], w2[i].t()) for i in range(w2.shape[0])]


class DDLerpProject(torch.autograd.Function):
    """RWKV-6 time mixing up to the WKV inputs: token shift, ddlerp with the 5-slot LoRA
    (w, k, v, r, g), the decay LoRA and the r/k/v/gate projections.

    ``forward(x [B,T,C], shift [B,C], maa_x, maa_w, maa_k, maa_v, maa_r, maa_g [1,1,C],
    w1 [C,5R], w2 [5,R,C], Wr, Wk, Wv, Wg [A,C], decay [1,1,A], dw1 [C,D], dw2 [D,A])``
    returns ``(r, k, v, gate_pre, logw)``, each [B,T,A]; ``logw = -exp(wraw)`` is the log-decay in
    float32 (``wraw = decay + tanh(x_w @ dw1) @ dw2`` is recomputed in backward, not kept).
    """

    @staticmethod
    def forward(ctx, x, shift, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, Wr, Wk, Wv, Wg, decay, dw1, dw2):
        B, T, C = x.shape
        xx = token_shift(x, shift) - x
        th = torch.tanh(cpu.linear((x + xx * maa_x).view(B * T, C), w1.t()))  # [BT, 5R]
        m = [mi.view(B, T, C) for mi in mix_offsets(th, w2)]
        xw = x + xx * (maa_w + m[0])
        tb = torch.tanh(cpu.linear(xw.view(B * T, C), dw1.t()))  # [BT, D]
        logw = _log_decay(decay, tb, dw2, B, T)
        del xw
        outs = [cpu.linear(x + xx * (maa + m[i]), W) for i, (maa, W) in
                enumerate(((maa_k, Wk), (maa_v, Wv), (maa_r, Wr), (maa_g, Wg)), start=1)]
        ctx.save_for_backward(x, shift, th, tb, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, Wr, Wk, Wv, Wg,
                              decay, dw1, dw2)
        k, v, r, g = outs
        return r, k, v, g, logw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dr, dk, dv, dg, dlogw):
        (x, shift, th, tb, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, Wr, Wk, Wv, Wg, decay, dw1,
         dw2) = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, C = x.shape
        BT = B * T
        xx = token_shift(x, shift) - x
        xxx = x + xx * maa_x
        m = [mi.view(B, T, C) for mi in mix_offsets(th, w2)]
        maas = (maa_w, maa_k, maa_v, maa_r, maa_g)
        grads = [None] * 17
        dxi = [None] * 5  # gradients of the five mixed inputs (w, k, v, r, g)
        # decay: logw = -exp(wraw), wraw = decay + tanh(x_w @ dw1) @ dw2
        if dlogw is not None:
            logw = _log_decay(decay, tb, dw2, B, T)
            dwraw = (dlogw * logw).to(x.dtype)
            d2 = dwraw.reshape(BT, -1)
            grads[14] = _sum_bt(dwraw) if need[14] else None
            grads[16] = tb.t() @ d2 if need[16] else None
            db = cpu.linear(d2, dw2) * (1 - tb * tb)
            if need[15]:
                grads[15] = (x + xx * (maa_w + m[0])).view(BT, C).t() @ db
            dxi[0] = cpu.linear(db, dw1).view(B, T, C)
        # projections (slot order of the mix LoRA: w, k, v, r, g)
        for slot, d, W, gi in ((1, dk, Wk, 11), (2, dv, Wv, 12), (3, dr, Wr, 10), (4, dg, Wg, 13)):
            if d is None:
                continue
            if need[gi]:
                grads[gi] = _wgrad(d, x + xx * (maas[slot] + m[slot]))
            dxi[slot] = cpu.linear_t(d, W)
        dx = torch.zeros_like(x)
        dxx = torch.zeros_like(x)
        dm = torch.empty(5, B, T, C, dtype=x.dtype, device=x.device)
        for slot, d in enumerate(dxi):
            if d is None:
                dm[slot] = 0
                continue
            dx += d
            dxx.addcmul_(d, maas[slot] + m[slot])
            torch.mul(d, xx, out=dm[slot])
            grads[3 + slot] = _sum_bt(dm[slot]) if need[3 + slot] else None
        # mix LoRA: m = tanh(xxx @ w1) @ w2 (per slot)
        th5 = th.view(BT, 5, -1).transpose(0, 1)  # [5, BT, R]
        dm = dm.view(5, BT, C)
        grads[9] = torch.bmm(th5.transpose(1, 2), dm) if need[9] else None
        da = torch.cat([cpu.linear(dm[i], w2[i]) for i in range(5)], dim=1) * (1 - th * th)  # [BT, 5R]
        grads[8] = xxx.view(BT, C).t() @ da if need[8] else None
        dxxx = cpu.linear(da, w1).view(B, T, C)
        dx += dxxx
        dxx.addcmul_(dxxx, maa_x)
        grads[2] = _sum_bt(dxxx * xx) if need[2] else None
        dshift = _shift_grads(dxx, dx)
        grads[0] = dx
        grads[1] = dshift.to(shift.dtype) if need[1] else None
        return tuple(grads)


class ChannelMixLean(torch.autograd.Function):
    """RWKV channel mixing: ``sigmoid(Wr x_r) * (Wv relu(Wk x_k)^2)``, ``x_* = x + (prev - x) * mu_*``
    (x060: ``mu = time_maa_*``; x052: ``mu = 1 - time_mix_*``).

    ``forward(x [B,T,C], shift [B,C], mu_k, mu_r [1,1,C], Wk [F,C], Wr [C,C], Wv [C,F])`` -> [B,T,C].
    """

    @staticmethod
    def forward(ctx, x, shift, mu_k, mu_r, Wk, Wr, Wv):
        xx = token_shift(x, shift) - x
        h = cpu.linear(x + xx * mu_k, Wk)
        vo = cpu.linear(torch.relu(h).square(), Wv)
        rr = cpu.linear(x + xx * mu_r, Wr)
        ctx.save_for_backward(x, shift, mu_k, mu_r, Wk, Wr, Wv, h, rr, vo)
        return torch.sigmoid(rr) * vo

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, shift, mu_k, mu_r, Wk, Wr, Wv, h, rr, vo = ctx.saved_tensors
        need = ctx.needs_input_grad
        xx = token_shift(x, shift) - x
        sr = torch.sigmoid(rr)
        dvo = dout * sr
        drr = dout * vo * sr * (1 - sr)
        rh = torch.relu(h)
        dWv = _wgrad(dvo, rh.square()) if need[6] else None
        dh = cpu.linear_t(dvo, Wv) * (2 * rh)
        dWk = _wgrad(dh, x + xx * mu_k) if need[4] else None
        dWr = _wgrad(drr, x + xx * mu_r) if need[5] else None
        dxk = cpu.linear_t(dh, Wk)
        dxr = cpu.linear_t(drr, Wr)
        dx = dxk + dxr
        dxx = dxk * mu_k + dxr * mu_r
        dmu_k = _sum_bt(dxk * xx) if need[2] else None
        dmu_r = _sum_bt(dxr * xx) if need[3] else None
        dshift = _shift_grads(dxx, dx)
        return dx, dshift.to(shift.dtype) if need[1] else None, dmu_k, dmu_r, dWk, dWr, dWv


class NormGatedOutput(torch.autograd.Function):
    """Time mixing's tail: ``Wo (GroupNorm(y / div) * silu(gate_pre))``.

    ``forward(y [B*T,A] (the WKV output), gate_pre [B,T,A], gn_weight, gn_bias [A], Wo [C,A], groups,
    eps, div)`` -> [B,T,C]. Keeps ``y`` and ``gate_pre`` only; the group norm is recomputed in
    backward (and differentiated there by autograd), the gate and the product by hand.
    """

    @staticmethod
    def _norm(y, gate_pre, weight, bias, groups, eps, div):
        return F.group_norm(y if div == 1 else y / div, groups, weight, bias, eps).view(gate_pre.shape).to(gate_pre.dtype)

    @staticmethod
    def forward(ctx, y, gate_pre, weight, bias, Wo, groups, eps, div):
        ctx.save_for_backward(y, gate_pre, weight, bias, Wo)
        ctx.args = (groups, eps, div)
        return cpu.linear(NormGatedOutput._norm(y, gate_pre, weight, bias, groups, eps, div) * F.silu(gate_pre), Wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y, gp, weight, bias, Wo = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(bool(n)) for t, n in ((y, need[0]), (weight, need[2]), (bias, need[3]))]
            yn = NormGatedOutput._norm(leaves[0], gp, leaves[1], leaves[2], *ctx.args)
        sg = torch.sigmoid(gp)
        g = gp * sg
        ynd = yn.detach()
        dWo = _wgrad(dout, ynd * g) if need[4] else None
        dp = cpu.linear_t(dout, Wo)
        dgp = dp * ynd * (sg * (1 + gp * (1 - sg))) if need[1] else None
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad(yn, wanted, dp * g) if wanted else ())
        dy, dw, db = (next(got) if t.requires_grad else None for t in leaves)
        return dy, dgp, dw, db, dWo, None, None, None
