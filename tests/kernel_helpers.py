"""Shared helpers for the WKV kernel tests (random inputs, error metric)."""
from __future__ import annotations

import torch

# log-decay ranges, as w = -exp(wraw) with wraw ~ U(lo, hi)
DECAYS = {
    "weak": (-8.0, -1.0),     # w in [-0.37, -0.0003]
    "mixed": (-8.0, 1.5),     # w in [-4.5, -0.0003]
    "strong": (2.5, 3.0),     # w in [-20.1, -12.2]
    "cliff": (-8.0, -1.0),    # weak, but -30 for the first 40 steps and -45 at steps 70-74 (channel 0)
}


def make_inputs(B, T, H, K, V=None, decay="mixed", dtype=torch.float64, seed=0, with_state=True, device="cpu"):
    """Random (never zero) r,k,v,w,u,s0; w is a log-decay."""
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)
    lo, hi = DECAYS[decay]
    r = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    w = -torch.exp(torch.rand(B, T, H, K, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    if decay == "cliff":  # exponents are then small gaps of large chunk-local sums
        w[:, :40] = -30.0
        w[:, 70:75, :, 0] = -45.0
    u = torch.randn(H, K, generator=g, dtype=torch.float64) * 0.5
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64) if with_state else None
    out = [x.to(device=device, dtype=dtype) for x in (r, k, v, w, u)]
    out.append(None if s0 is None else s0.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype))
    return out


def forget_channels(w):
    """Set a few log-decays of ``w [B,T,H,K]`` to -inf in place (decay 0: the channel forgets)."""
    B, T, H, K = w.shape
    w[0, T // 2, 0, 0] = -float("inf")
    w[-1, T - 3, H - 1, K // 2] = -float("inf")
    w[0, 1, -1, :] = -float("inf")


def rel_rms(a, b):
    """RMS(a-b)/RMS(b), in float64 (fla's metric)."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def require_backend(backend):
    """Skip a test of the C++ ``cpu`` backend where its kernels cannot be built (no AVX-512 or compiler)."""
    if backend == "cpu":
        import pytest

        from multimodal_rwkv.kernels import cpu

        if cpu.extension() is None:
            pytest.skip(f"C++ CPU kernels unavailable: {cpu.status()}")
