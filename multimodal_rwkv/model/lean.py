"""Memory-lean training forms of the RWKV block's projections (hand-written backward).

Plain autograd keeps every intermediate that some backward formula reads: for RWKV-6's time
mixing that is the token-shift difference, six mixed inputs, five data-dependent mix vectors, the
LoRA activations and the decay; for channel mixing the two mixed inputs, ``relu(h)`` and
``relu(h)^2``; for the output the group norm's input and output, the gate, its input and their
product. At B=1, T=4096, C=512 that made a 6x512 RWKV-6 keep 1.9 GB of activations against
1.3 GB for a Llama of equal size. The Functions here save only the block input (``x`` and the
shift carried in), the GEMM outputs that are costly to recompute (``relu(h)^2``, ``receptance(x_r)``,
``value(.)``), the WKV output, the gate's input and the small LoRA activations, and recompute the
elementwise parts in backward. The token-shift mixing and the norm-and-gate run as fused one-pass
kernels both ways (:func:`multimodal_rwkv.kernels.cpu.mix`, :func:`~multimodal_rwkv.kernels.cpu.gn_gate`).
Same formulas as :mod:`multimodal_rwkv.model.modeling`'s plain forms, which stay the reference:
the tests compare outputs and every gradient.

They are used when autograd records (training), autocast is off, and every projection involved
is this package's plain bias-free ``Linear`` (a LoRA-wrapped projection keeps the plain form).
"""
from __future__ import annotations

import torch

from multimodal_rwkv.kernels import cpu


def _sum_bt(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=(0, 1), keepdim=True)


def _log_decay(decay: torch.Tensor, tb: torch.Tensor, dw2: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """``logw = -exp(decay + tb @ dw2)`` in float32, ``[B,T,A]``, with ``tb = tanh(x_w @ dw1)``."""
    y = cpu.linear(tb, dw2.t()).view(B, T, -1)  # a fresh product: updated in place
    y = y.add_(decay) if y.dtype == decay.dtype else y + decay
    return y.float().exp_().neg_()


def stack_mix(*maa: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` from n mixing vectors of shape ``[1, 1, C]`` (the ``mu`` of
    :func:`multimodal_rwkv.kernels.cpu.mix`). Shared by these forms and the plain ones in modeling.py."""
    return torch.cat([m.reshape(1, -1) for m in maa])


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
        xxx = cpu.mix(x, shift, maa_x.view(1, C))[0]
        th = cpu.linear(xxx, w1.t()).tanh_()  # [BT, 5R]
        del xxx
        # x_i = x + xx * (maa_i + th_i @ w2[i]) for the slots w, k, v, r, g (offsets summed in registers)
        xs = cpu.mix_lora(x, shift, stack_mix(maa_w, maa_k, maa_v, maa_r, maa_g), th, w2)
        tb = cpu.linear(xs[0], dw1.t()).tanh_()  # [BT, D]
        logw = _log_decay(decay, tb, dw2, B, T)
        k, v, r, g = (cpu.linear(xs[i], W).view(B, T, -1) for i, W in ((1, Wk), (2, Wv), (3, Wr), (4, Wg)))
        ctx.save_for_backward(x, shift, th, tb, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, Wr, Wk, Wv, Wg,
                              decay, dw1, dw2)
        return r, k, v, g, logw

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dr, dk, dv, dg, dlogw):
        (x, shift, th, tb, maa_x, maa_w, maa_k, maa_v, maa_r, maa_g, w1, w2, Wr, Wk, Wv, Wg, decay, dw1,
         dw2) = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, C = x.shape
        BT = B * T
        maas = stack_mix(maa_w, maa_k, maa_v, maa_r, maa_g)
        m = cpu.mix_offsets(th, w2)
        # the five mixed inputs again, for the weight gradients that are wanted (m is kept: its
        # gradient needs it); none are when the weights are frozen (state tuning)
        xs = cpu.mix(x, shift, maas, m) if any(need[i] for i in (10, 11, 12, 13, 15)) else None
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
                grads[15] = xs[0].t() @ db
            dxi[0] = cpu.linear(db, dw1)
        # projections (slot order of the mix LoRA: w, k, v, r, g)
        for slot, d, W, gi in ((1, dk, Wk, 11), (2, dv, Wv, 12), (3, dr, Wr, 10), (4, dg, Wg, 13)):
            if d is None:
                continue
            if need[gi]:
                grads[gi] = cpu.weight_grad(d, xs[slot])
            dxi[slot] = cpu.linear_t(d, W).view(BT, C)
        del xs
        dxi = [d if d is not None else x.new_zeros(BT, C) for d in dxi]
        # the mixing: dx, the shift's gradient, maa_* and the offsets' gradients dm_i = dx_i * xx
        dx, dshift, dmaa, dm = cpu.mix_backward(dxi, x, shift, maas, m, want_doff=True)
        del dxi, m
        for slot in range(5):
            grads[3 + slot] = dmaa[slot].view(1, 1, C).to(maa_w.dtype) if need[3 + slot] else None
        # mix LoRA: m_i = tanh(xxx @ w1)_i @ w2[i]
        R = w2.shape[1]
        if need[9]:
            grads[9] = torch.stack([th[:, i * R:(i + 1) * R].t() @ dm[i] for i in range(5)])
        da = torch.cat([cpu.linear(dm[i], w2[i]) for i in range(5)], dim=1) * (1 - th * th)  # [BT, 5R]
        del dm
        if need[8]:
            grads[8] = cpu.mix(x, shift, maa_x.view(1, C))[0].t() @ da
        dxxx = cpu.linear(da, w1)
        dx, dshift, dmaa_x, _ = cpu.mix_backward([dxxx], x, shift, maa_x.view(1, C), dx=dx, dshift=dshift)
        grads[2] = dmaa_x.view(1, 1, C).to(maa_x.dtype) if need[2] else None
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
        B, T, C = x.shape
        xk, xr = cpu.mix(x, shift, stack_mix(mu_k, mu_r))
        q = cpu.linear(xk, Wk).relu_().square_()  # relu(h)^2: all the backward needs of h
        del xk
        vo = cpu.linear(q, Wv)
        rr = cpu.linear(xr, Wr)
        ctx.save_for_backward(x, shift, mu_k, mu_r, Wk, Wr, Wv, q, rr, vo)
        return torch.sigmoid(rr).mul_(vo).view(B, T, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, shift, mu_k, mu_r, Wk, Wr, Wv, q, rr, vo = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, C = x.shape
        dout = dout.reshape(B * T, C)
        mus = stack_mix(mu_k, mu_r)
        dvo, drr = cpu.sigmoid_gate_backward(dout, rr, vo)
        dWv = cpu.weight_grad(dvo, q) if need[6] else None
        dh = cpu.relu_square_backward_(cpu.linear_t(dvo, Wv), q)  # * 2 relu(h)
        del dvo
        if need[4] or need[5]:
            xk, xr = cpu.mix(x, shift, mus)
            dWk = cpu.weight_grad(dh, xk) if need[4] else None
            dWr = cpu.weight_grad(drr, xr) if need[5] else None
            del xk, xr
        else:
            dWk = dWr = None
        dxk = cpu.linear_t(dh, Wk)
        dxr = cpu.linear_t(drr, Wr)
        dx, dshift, dmu, _ = cpu.mix_backward([dxk, dxr], x, shift, mus)
        dmu_k = dmu[0].view(1, 1, C).to(mu_k.dtype) if need[2] else None
        dmu_r = dmu[1].view(1, 1, C).to(mu_r.dtype) if need[3] else None
        return dx, dshift.to(shift.dtype) if need[1] else None, dmu_k, dmu_r, dWk, dWr, dWv


class NormGatedOutput(torch.autograd.Function):
    """Time mixing's tail: ``Wo (GroupNorm(y / div) * silu(gate_pre))``.

    ``forward(y [B*T,A] (the WKV output), gate_pre [B,T,A], gn_weight, gn_bias [A], Wo [C,A], groups,
    eps, div)`` -> [B,T,C]. Keeps ``y`` and ``gate_pre`` only; the norm and gate are one fused pass
    each way (:func:`multimodal_rwkv.kernels.cpu.gn_gate` and its backward).
    """

    @staticmethod
    def forward(ctx, y, gate_pre, weight, bias, Wo, groups, eps, div):
        ctx.save_for_backward(y, gate_pre, weight, bias, Wo)
        ctx.args = (groups, eps * div * div)  # GroupNorm(y / div, eps) == GroupNorm(y, eps * div^2)
        B, T, A = gate_pre.shape
        return cpu.linear(cpu.gn_gate(y, gate_pre.view(B * T, A), weight, bias, *ctx.args), Wo).view(B, T, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y, gp, weight, bias, Wo = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, T, A = gp.shape
        dout = dout.reshape(B * T, -1)
        dz = cpu.linear_t(dout, Wo)
        dy, dgp, dw, db, z = cpu.gn_gate_backward(y, gp.view(B * T, A), weight, bias, dz, *ctx.args)
        dWo = cpu.weight_grad(dout, z) if need[4] else None
        return (dy if need[0] else None, dgp.view(B, T, A) if need[1] else None, dw if need[2] else None,
                db if need[3] else None, dWo, None, None, None)
