"""Runs the Triton WKV kernels under the Triton interpreter (CPU) and prints one JSON line of errors.

Started in a subprocess by tests/test_kernels_triton_interp.py: TRITON_INTERPRET=1 must be set before
the kernels are defined, which a fresh process guarantees. Every kernel is wrapped in a launch counter
so the test can prove the Triton code really ran (no fallback).
"""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from kernel_helpers import forget_channels, make_inputs, rel_rms  # noqa: E402
from multimodal_rwkv.kernels import triton_chunk, triton_decode, wkv6, wkv6_reference  # noqa: E402

LAUNCHES: dict = {}


class _Counted:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __getitem__(self, grid):
        LAUNCHES[self.name] = LAUNCHES.get(self.name, 0) + 1
        return self.fn[grid]


for mod, names in ((triton_chunk, ("_fwd_h", "_fwd_o", "_bwd_dh", "_bwd_main")), (triton_decode, ("_decode",))):
    for n in names:
        setattr(mod, n, _Counted(n, getattr(mod, n)))

NAMES = "r k v w u s0".split()


def chunk_case(T, with_state, decay, dtype=torch.float32, B=2, H=2, K=16, V=16, final_only=False, forget=False):
    x64 = make_inputs(B, T, H, K, V=V, decay=decay, with_state=with_state, seed=100 + T)
    if forget:  # log-decay -inf (decay 0) in a few channels: they forget at once, nothing turns NaN
        forget_channels(x64[3])
    # the reference sees the same (rounded) inputs, so the error measures the kernel only
    x64 = [None if x is None else (x if i == 5 else x.to(dtype).double()) for i, x in enumerate(x64)]
    xs = [None if x is None else (x.float() if i == 5 else x.to(dtype)).requires_grad_() for i, x in enumerate(x64)]
    xr = [None if x is None else x.clone().requires_grad_() for x in x64]
    o, s = wkv6(*xs, output_final_state=True, backend="triton")
    o_r, s_r = wkv6_reference(*xr, output_final_state=True)
    g = torch.Generator().manual_seed(T)
    go = torch.randn(o_r.shape, generator=g, dtype=torch.float64)
    gs = torch.randn(s_r.shape, generator=g, dtype=torch.float64)
    if final_only:
        go = go * 0
    ((o.float() * go.float()).sum() + (s * gs.float()).sum()).backward()
    ((o_r * go).sum() + (s_r * gs).sum()).backward()
    res = {"o": rel_rms(o, o_r), "s": rel_rms(s, s_r), "o_dtype": str(o.dtype), "s_dtype": str(s.dtype),
           "finite": bool(torch.isfinite(o).all() and torch.isfinite(s).all())}
    for n, a, b in zip(NAMES, xs, xr):
        if b is None or b.grad is None or not b.grad.any():
            continue
        res["d" + n] = rel_rms(a.grad, b.grad)
        res["finite"] &= bool(torch.isfinite(a.grad).all())
    return res


def no_final_case(T):
    """output_final_state=False: the loss uses o only; final_state must be None. The initial state
    does not require grad here (the backward skips its gradient)."""
    x64 = make_inputs(2, T, 2, 16, decay="mixed", with_state=True, seed=300 + T)
    xs = [x.float().requires_grad_(i < 5) for i, x in enumerate(x64)]
    xr = [x.clone().requires_grad_(i < 5) for i, x in enumerate(x64)]
    o, s = wkv6(*xs, backend="triton")
    o_r, _ = wkv6_reference(*xr)
    go = torch.randn(o_r.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (o * go.float()).sum().backward()
    (o_r * go).sum().backward()
    res = {"state_is_none": s is None, "o": rel_rms(o, o_r), "s0_grad_is_none": xs[5].grad is None}
    for n, a, b in zip(NAMES[:5], xs, xr):
        res["d" + n] = rel_rms(a.grad, b.grad)
    return res


def mixed_dtype_case(T):
    """r in fp16, k and v in fp32 (gradients recorded, so the chunk kernels run): k and v must not
    be rounded to r's dtype, so the final state (which r does not touch) keeps fp32 accuracy."""
    x64 = make_inputs(1, T, 2, 16, decay="mixed", with_state=True, seed=400 + T)
    x64[0] = x64[0].half().double()
    xs = [(x.half() if i == 0 else x.float()).requires_grad_() for i, x in enumerate(x64)]
    o, s = wkv6(*xs, output_final_state=True, backend="triton")
    o_r, s_r = wkv6_reference(*x64, output_final_state=True)
    s.sum().backward()
    return {"o": rel_rms(o, o_r), "s": rel_rms(s, s_r), "o_dtype": str(o.dtype), "s_dtype": str(s.dtype),
            "dk_dtype": str(xs[1].grad.dtype), "dr_dtype": str(xs[0].grad.dtype)}


def decode_case(T, with_state):
    # V=64: two value blocks of 32
    x = [None if t is None else t.float() for t in make_inputs(2, T, 2, 16, V=64, seed=200 + T, with_state=with_state)]
    o_r, s_r = wkv6_reference(*x, output_final_state=True)
    o, s = wkv6(*x, output_final_state=True, backend="triton")  # no grad -> decode kernel
    res = {"o": rel_rms(o, o_r), "s": rel_rms(s, s_r)}
    if with_state:
        st = x[5].clone()
        before = x[5].clone()
        o2 = triton_decode.wkv6_decode_(*x[:5], st)
        res["inplace_o"] = rel_rms(o2, o_r)
        res["inplace_s"] = rel_rms(st, s_r)
        res["functional_left_input"] = bool(torch.equal(x[5], before))
    return res


def errors_case():
    """Bad inputs the kernels must refuse: the in-place decode read past mis-shaped r/k/v/w/u (a
    [B,1,H,K] decay, a shorter k, u of [K]) and float64 k/w/u went through as fp32 under TF32
    products; a second derivative through the chunk kernel was silently 0."""
    from multimodal_rwkv.errors import KernelError

    x = [t.float() for t in make_inputs(1, 4, 2, 16, seed=9, with_state=True)]
    r, k, v, w, u, s0 = x
    refused = {}
    for name, args in (("w_one_step", (r, k, v, w[:, :1], u)), ("k_shorter", (r, k[:, :2], v, w, u)),
                       ("u_flat", (r, k, v, w, u[0]))):
        st = s0.clone()
        try:
            triton_decode.wkv6_decode_(*args, st)
            refused[name] = False
        except KernelError:
            refused[name] = bool(torch.equal(st, s0))  # and the state untouched
    for i, name in enumerate(("k64", "w64", "u64")):
        args = list(x[:5])
        args[1 + i] = args[1 + i].double()
        try:
            wkv6(*args, backend="triton")
            refused[name] = False
        except KernelError:
            refused[name] = True
    xs = [t.float().requires_grad_() for t in make_inputs(1, 20, 1, 16, seed=3)[:5]]
    o, _ = wkv6(*xs, backend="triton")
    try:
        torch.autograd.grad(o.sum(), xs[0], create_graph=True)
        refused["double_backward"] = False
    except RuntimeError as e:
        refused["double_backward"] = "gives first derivatives only" in str(e)
    return refused


def main(which):
    out = {"interpreted": triton_chunk.kernels_interpreted()}
    cases = {
        "chunk_T1_state_mixed": lambda: chunk_case(1, True, "mixed"),
        "chunk_T17_state_strong": lambda: chunk_case(17, True, "strong"),
        "chunk_T64_nostate_weak": lambda: chunk_case(64, False, "weak"),
        "chunk_T130_state_mixed": lambda: chunk_case(130, True, "mixed"),
        "chunk_T130_state_strong": lambda: chunk_case(130, True, "strong"),
        "chunk_T40_final_only": lambda: chunk_case(40, True, "mixed", final_only=True, V=128),  # 2 value blocks (STATE_BV 64)
        "chunk_T17_bf16": lambda: chunk_case(17, True, "mixed", dtype=torch.bfloat16),
        "chunk_T70_K32_V16": lambda: chunk_case(70, True, "mixed", B=1, H=2, K=32, V=16),
        "chunk_T20_no_final": lambda: no_final_case(20),
        "chunk_T40_forget": lambda: chunk_case(40, True, "mixed", forget=True),
        "chunk_T130_cliff": lambda: chunk_case(130, True, "cliff", B=1),
        "chunk_T40_mixed_dtypes": lambda: mixed_dtype_case(40),
        "decode_T1_state": lambda: decode_case(1, True),
        "decode_T5_nostate": lambda: decode_case(5, False),
        "errors": errors_case,
    }
    for name in which or cases:
        out[name] = cases[name]()
    out["launches"] = LAUNCHES
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
