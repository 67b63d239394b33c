"""WKV-6 kernels on CUDA (skipped without a GPU): Triton chunk/decode and the torch backend vs the reference."""
from __future__ import annotations

import pytest
import torch

from kernel_helpers import make_inputs, rel_rms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = "r k v w u s0".split()


def _run(fn, xs, go, gs):
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    o, s = fn(*xs)
    ((o.float() * go).sum() + (s.float() * gs).sum()).backward()
    return o, s, [None if x is None else x.grad for x in xs]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3), (torch.float16, 5e-3)])
@pytest.mark.parametrize("T,with_state,decay", [(1, True, "mixed"), (17, True, "strong"), (64, False, "weak"),
                                                (130, True, "mixed"), (130, True, "cliff"), (1000, True, "mixed")])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_backend_vs_reference(backend, dtype, tol, T, with_state, decay):
    from multimodal_rwkv.kernels import wkv6, wkv6_reference

    x = make_inputs(2, T, 4, 64, decay=decay, with_state=with_state, seed=T, device="cuda", dtype=torch.float64)
    xq = [None if t is None else (t if i == 5 else t.to(dtype)) for i, t in enumerate(x)]
    x_ref = [None if t is None else t.double() for t in xq]  # reference sees the rounded inputs
    g = torch.Generator(device="cuda").manual_seed(0)
    go = torch.randn(2, T, 4, 64, device="cuda", generator=g)
    gs = torch.randn(2, 4, 64, 64, device="cuda", generator=g)
    o, s, grads = _run(lambda *a: wkv6(*a, output_final_state=True, backend=backend),
                       [None if t is None else (t.float() if i == 5 else t) for i, t in enumerate(xq)], go, gs)
    o_r, s_r, g_r = _run(lambda *a: wkv6_reference(*a, output_final_state=True), x_ref, go.double(), gs.double())
    assert o.dtype == dtype and s.dtype == torch.float32
    # output rounding to a 16-bit dtype is part of the error budget
    assert rel_rms(o, o_r) <= tol and rel_rms(s, s_r) <= tol
    gtol = max(tol * 10, 1e-4) if dtype == torch.float32 else tol
    for n, a, b in zip(NAMES, grads, g_r):
        if b is None:
            continue
        assert torch.isfinite(a).all(), n
        assert rel_rms(a, b) <= gtol, (n, rel_rms(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_decode_kernel(dtype):
    from multimodal_rwkv.kernels import wkv6, wkv6_reference
    from multimodal_rwkv.kernels.triton_decode import wkv6_decode_

    x = make_inputs(3, 4, 8, 64, seed=5, device="cuda", dtype=torch.float64)
    xq = [t if i == 5 else t.to(dtype) for i, t in enumerate(x)]
    o_r, s_r = wkv6_reference(*[t.double() for t in xq], output_final_state=True)
    s0 = xq[5].float().contiguous()
    before = s0.clone()
    with torch.no_grad():
        o, s = wkv6(*xq[:5], s0, output_final_state=True)  # auto, small T, no grad -> decode kernel
    assert torch.equal(s0, before)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_rms(o, o_r) <= tol and rel_rms(s, s_r) <= 1e-5
    o2 = wkv6_decode_(*xq[:5], s0)
    assert rel_rms(o2, o_r) <= tol and rel_rms(s0, s_r) <= 1e-5


def test_cuda_auto_uses_triton_and_matches_torch(monkeypatch):
    from multimodal_rwkv.kernels import triton_chunk, wkv6

    calls = []
    real = triton_chunk.wkv6_triton
    monkeypatch.setattr(triton_chunk, "wkv6_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = [t.float() for t in make_inputs(2, 300, 4, 64, seed=9, device="cuda", dtype=torch.float64)]
    o_a, s_a = wkv6(*x, output_final_state=True)
    assert calls, "auto did not use the Triton chunk kernel on CUDA"
    o_t, s_t = wkv6(*x, output_final_state=True, backend="torch")
    assert rel_rms(o_a, o_t) < 1e-5 and rel_rms(s_a, s_t) < 1e-5
