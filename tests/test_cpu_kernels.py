"""The C++ CPU kernels (kernels/cpu.py, cpu_kernels.cpp) against their plain twins, and where they apply."""
import os
import subprocess
import sys

import pytest
import torch

from multimodal_rwkv.kernels import cpu
from multimodal_rwkv.model.modeling import Linear


@pytest.fixture(scope="module")
def kernel():
    x, w = torch.randn(2, 16), torch.randn(4, 16)
    if cpu.few_rows_linear(x, w) is None:
        pytest.skip(f"CPU few-rows kernel not available here: {cpu.status()}")
    return cpu


@pytest.mark.parametrize("m", range(2, 17))
def test_equals_plain_product(kernel, m):
    g = torch.Generator().manual_seed(m)
    for n in (1, 3, 4, 5, 130, 1027):  # tails of the 4- and 2-row blocks
        for k in (16, 48, 768):
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
            want = (x.double() @ w.double().t()).float()
            torch.testing.assert_close(kernel.few_rows_linear(x, w), want, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_applies_only_where_it_should(kernel):
    x, w = torch.randn(4, 32), torch.randn(8, 32)
    assert kernel.few_rows_linear(x, w) is not None
    assert kernel.few_rows_linear(x[:1], w) is None  # one row: modeling.Linear's row-blocked bmm
    assert kernel.few_rows_linear(torch.randn(17, 32), w) is None
    assert kernel.few_rows_linear(torch.randn(4, 40), torch.randn(8, 40)) is None  # K % 16
    assert kernel.few_rows_linear(x.double(), w.double()) is None
    assert kernel.few_rows_linear(x, w.t().contiguous().t()) is None  # weight not contiguous
    assert kernel.few_rows_linear(x.requires_grad_(), w) is None  # autograd records: plain product
    y = kernel.few_rows_linear(torch.randn(32, 4).t(), w)  # a non-contiguous x is fine
    assert y is not None and y.shape == (4, 8)


def test_linear_module_uses_it_and_matches_f_linear(kernel):
    lin = Linear(768, 2688, bias=False)
    x = torch.randn(2, 4, 768)
    with torch.no_grad():
        y = lin(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight), rtol=1e-5, atol=1e-4)
    y.sum()  # and with autograd, the same numbers through the differentiable path
    x.requires_grad_()
    z = lin(x)
    z.sum().backward()
    torch.testing.assert_close(z.detach(), y, rtol=1e-5, atol=1e-4)
    assert x.grad is not None


@pytest.fixture(scope="module")
def bf16_kernel(kernel):
    if not cpu._has_bf16_dot(cpu.extension()):
        pytest.skip("this CPU has no AVX512-BF16 dot products")
    return cpu


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16])
def test_bf16_equals_plain_product_of_the_bf16_values(bf16_kernel, m):
    """bf16 operands, fp32 sums: the kernel's fp32 result against fp64 sums of the same bf16
    values (exact products), then rounded to bf16 by the wrapper; row-block tails as above."""
    g = torch.Generator().manual_seed(100 + m)
    for n in (1, 7, 8, 9, 130, 1027):
        for k in (32, 96, 768):
            x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
            want = x.double() @ w.double().t()
            got = cpu.extension().few_rows_linear(x, w)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6 * k ** 0.5)
            assert torch.equal(bf16_kernel.few_rows_linear(x, w), got.bfloat16())


def test_bf16_applies_only_where_it_should(bf16_kernel, monkeypatch):
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    assert bf16_kernel.few_rows_linear(x[:1], w) is not None  # one row too, in bf16
    assert bf16_kernel.few_rows_linear(torch.randn(4, 48).bfloat16(), torch.randn(8, 48).bfloat16()) is None  # K % 32
    assert bf16_kernel.few_rows_linear(x, w.float()) is None  # mixed dtypes
    assert bf16_kernel.few_rows_linear(x.half(), w.half()) is None
    monkeypatch.setitem(cpu._state, "bf16_dot", False)  # a CPU without AVX512-BF16
    assert bf16_kernel.few_rows_linear(x, w) is None
    lin = Linear(64, 8, bias=False).bfloat16()
    with torch.no_grad():  # then the module's plain product
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight))


def test_bf16_linear_module_uses_it(bf16_kernel, monkeypatch):
    lin = Linear(768, 2688, bias=False).bfloat16()
    calls = []
    monkeypatch.setattr(cpu, "few_rows_linear", lambda x, w, f=cpu.few_rows_linear: calls.append(x.shape) or f(x, w))
    for shape in ((1, 1, 768), (8, 1, 768)):
        x = torch.randn(*shape).bfloat16()
        with torch.no_grad():
            y = lin(x)
        assert y.dtype == torch.bfloat16 and y.shape == (*shape[:-1], 2688)
        want = (x.double() @ lin.weight.double().t()).to(torch.bfloat16)
        torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)  # one bf16 rounding apart at most
    assert calls == [(1, 768), (8, 768)]


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_switched_off_falls_back_to_the_plain_product():
    code = ("import torch; from multimodal_rwkv.kernels import cpu as cpu; from multimodal_rwkv.model.modeling import Linear\n"
            "x, w = torch.randn(4, 32), torch.randn(8, 32)\n"
            "assert cpu.few_rows_linear(x, w) is None\n"
            "lin = Linear(32, 8, bias=False)\n"
            "with torch.no_grad(): torch.testing.assert_close(lin(x), x @ lin.weight.t())\n"
            "print(cpu.status())")
    r = _run_python(code, MMRWKV_CPU_KERNEL="0")
    assert r.stdout.strip() == "MMRWKV_CPU_KERNEL=0"


@pytest.mark.parametrize("save_every", [32, 256])
@pytest.mark.parametrize("T", [31, 33, 255, 256, 257, 600])
def test_wkv_backward_across_saved_segments(kernel, T, save_every, monkeypatch):
    """The forward keeps the state every ``save_every`` steps (32 by default; 256: segments of
    several 32-step chunks whose starts the backward recomputes first), the backward recomputes
    32-step chunks from it: gradients of every input (and of the initial state) vs the reference
    step loop's autograd, at lengths around and across those boundaries, strong and weak decay."""
    monkeypatch.setattr(kernel, "WKV_SAVE_EVERY", save_every)
    from kernel_helpers import make_inputs, rel_rms

    from multimodal_rwkv.kernels import wkv6_reference

    xs = [x.float().requires_grad_() for x in make_inputs(1, T, 2, 16, V=16, decay="mixed", seed=T)]
    g = torch.Generator().manual_seed(1)
    do, ds = torch.randn(1, T, 2, 16, generator=g), torch.randn(1, 2, 16, 16, generator=g)

    def grads(fn):
        ys = [x.detach().clone().requires_grad_() for x in xs]
        o, s = fn(*ys)
        ((o * do).sum() + (s * ds).sum()).backward()
        return o.detach(), s.detach(), [y.grad for y in ys]

    o, s, gr = grads(lambda *a: kernel.wkv6_cpu(*a, output_final_state=True))
    o_ref, s_ref, gr_ref = grads(lambda *a: wkv6_reference(*a, output_final_state=True))
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    for name, a, b in zip("r k v w u s0".split(), gr, gr_ref):
        assert rel_rms(a, b) < 1e-5, name


@pytest.mark.parametrize("K,V", [(32, 16), (32, 32), (32, 48), (32, 64), (32, 40), (16, 64), (48, 32), (64, 64),
                                 (40, 24)])
def test_wkv_key_and_value_widths(kernel, K, V):
    """Widths of 16/32/48/64 take the AVX-512 register paths of the step loops (the forward's by the
    value width, the backward's by the key width), others the plain loops: forward, final state and
    every gradient vs the reference step loop's autograd."""
    from kernel_helpers import make_inputs, rel_rms

    from multimodal_rwkv.kernels import wkv6_reference

    T = 300
    xs = [x.float().requires_grad_() for x in make_inputs(1, T, 2, K, V=V, decay="mixed", seed=K + V)]
    g = torch.Generator().manual_seed(K * V)
    do, ds = torch.randn(1, T, 2, V, generator=g), torch.randn(1, 2, K, V, generator=g)
    res = []
    for fn in (kernel.wkv6_cpu, wkv6_reference):
        ys = [x.detach().clone().requires_grad_() for x in xs]
        o, s = fn(*ys, output_final_state=True)
        ((o * do).sum() + (s * ds).sum()).backward()
        res.append([o.detach(), s.detach()] + [y.grad for y in ys])
    for name, a, b in zip("o s r k v w u s0".split(), *res):
        assert rel_rms(a, b) < 1e-5, name


@pytest.mark.parametrize("V", [64, 40])
@pytest.mark.parametrize("T", [1, 3])
def test_wkv_decode_reads_the_given_state_without_changing_it(kernel, V, T):
    """The first step reads the initial state where it is and writes the new state elsewhere (no
    copy first): the caller's state tensor stays as it was, and the results equal the reference's."""
    from kernel_helpers import make_inputs, rel_rms

    from multimodal_rwkv.kernels import wkv6_reference

    x = [t.float() for t in make_inputs(3, T, 2, 64, V=V, decay="mixed", seed=7 + T)]
    before = x[5].clone()
    with torch.no_grad():
        o, s = kernel.wkv6_cpu(*x, output_final_state=True)
        o_ref, s_ref = wkv6_reference(*x, output_final_state=True)
    assert torch.equal(x[5], before)
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5


# ------------------------------------------------------------------ oneDNN dense products
onednn = pytest.mark.skipif(not cpu._onednn_available(), reason="oneDNN linear op not available in this torch")


def _ref_linear(x, w, b=None):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@onednn
@pytest.mark.parametrize("shape", [(17, 64), (3, 40, 96), (2, 300, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_forward_and_gradients_match_fp64(shape, bias):
    g = torch.Generator().manual_seed(len(shape) * 7 + bias)
    K, N = shape[-1], 80
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    y = cpu.linear(x, w, b)
    assert type(y.grad_fn).__name__ == "_LinearBackward"  # the oneDNN route, not F.linear
    tol = dict(rtol=1e-5, atol=1e-5 * K ** 0.5)
    torch.testing.assert_close(y, _ref_linear(x, w, b), **tol)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    yd = xd @ wd.t() + (bd if bias else 0)
    yd.backward(gy.double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad)) + (((b.grad, bd.grad),) if bias else ()):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-4 * shape[0] ** 0.5)
    with torch.no_grad():  # no autograd: the op directly, same numbers
        torch.testing.assert_close(cpu.linear(x, w, b), y.detach(), rtol=0, atol=0)


@onednn
def test_onednn_linear_strided_operands():
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randn(64, 40, generator=g).t(), torch.randn(30, 64, generator=g)),  # transposed input
             (torch.randn(3, 40, 64, generator=g).transpose(0, 1), torch.randn(30, 64, generator=g)),
             (torch.randn(2, 80, 64, generator=g)[:, ::2], torch.randn(30, 64, generator=g)),  # every other row
             (torch.randn(40, 64, generator=g), torch.randn(64, 30, generator=g).t())]  # transposed weight
    for x, w in cases:
        assert cpu._onednn_ok(x, w)
        torch.testing.assert_close(cpu.linear(x, w), _ref_linear(x, w), rtol=1e-5, atol=1e-5)


@onednn
def test_onednn_input_gradient_product():
    g = torch.Generator().manual_seed(3)
    d, w = torch.randn(2, 50, 96, generator=g), torch.randn(96, 40, generator=g)
    torch.testing.assert_close(cpu.linear_t(d, w), (d.double() @ w.double()).float(), rtol=1e-5, atol=1e-4)
    small = torch.randn(4, 96, generator=g)  # few rows: the plain product
    torch.testing.assert_close(cpu.linear_t(small, w), small @ w, rtol=0, atol=0)


def test_onednn_route_applies_only_where_it_should():
    w = torch.randn(8, 32)
    assert not cpu._onednn_ok(torch.randn(16, 32), w)  # 16 rows or fewer: decoding's paths
    assert not cpu._onednn_ok(torch.randn(40, 32).double(), w.double())
    assert not cpu._onednn_ok(torch.randn(40, 32).bfloat16(), w.bfloat16())
    assert not cpu._onednn_ok(torch.randn(40, 32), w, torch.zeros(8, dtype=torch.float64))  # F.linear decides
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear
        assert not cpu._onednn_ok(torch.randn(40, 32), w)
        assert cpu.linear(torch.randn(40, 32), w).dtype == torch.bfloat16

    class Sub(torch.Tensor):  # a tensor subclass (e.g. a sharded DTensor) keeps F.linear's dispatch
        pass

    assert not cpu._onednn_ok(torch.randn(40, 32).as_subclass(Sub), w)
    if cpu._onednn_available():
        assert cpu._onednn_ok(torch.randn(40, 32), w)
        torch.backends.mkldnn.enabled = False  # torch's own switch is respected
        try:
            assert not cpu._onednn_ok(torch.randn(40, 32), w)
        finally:
            torch.backends.mkldnn.enabled = True


def test_onednn_switched_off_uses_f_linear():
    code = ("import torch; from multimodal_rwkv.kernels import cpu\n"
            "x = torch.randn(40, 32, requires_grad=True); w = torch.randn(8, 32)\n"
            "assert not cpu._onednn_ok(x, w)\n"
            "assert type(cpu.linear(x, w).grad_fn).__name__ != '_LinearBackward'\n"
            "assert cpu.onednn_status() == 'MKL (MMRWKV_ONEDNN_LINEAR=0)'\n")
    _run_python(code, MMRWKV_ONEDNN_LINEAR="0")


def test_onednn_linear_of_mismatched_shapes_says_what_f_linear_says():
    """oneDNN's error was 'could not create a primitive descriptor ... ONEDNN_VERBOSE'."""
    from multimodal_rwkv.kernels import cpu

    x = torch.randn(40, 64)
    for w, b in ((torch.randn(32, 48), None), (torch.randn(32, 64), torch.randn(7))):
        with pytest.raises(RuntimeError) as want:
            torch.nn.functional.linear(x, w, b)
        with pytest.raises(RuntimeError) as got:
            cpu.linear(x, w, b)
        assert str(got.value) == str(want.value) and "primitive" not in str(got.value)


# ------------------------------------------------------------------ fused elementwise parts
def _f64(ts):
    return [t.double().requires_grad_() for t in ts]


@pytest.mark.parametrize("B,T,C,n,with_off", [(1, 1, 16, 1, False), (2, 7, 48, 2, False), (3, 70, 40, 5, True),
                                               (1, 130, 64, 4, True)])
def test_mix_forward_and_backward_match_fp64(kernel, B, T, C, n, with_off):
    """Every row-block boundary (64 rows), sequence start (t=0 takes the shift) and width tail."""
    g = torch.Generator().manual_seed(B * 100 + T)
    x, shift, mu = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g), torch.rand(n, C, generator=g)
    off = [torch.randn(B * T, C, generator=g) for _ in range(n)] if with_off else None
    d = [torch.randn(B * T, C, generator=g) for _ in range(n)]
    x64, s64, mu64, *off64 = _f64([x, shift, mu, *(off or [])])
    want = cpu.mix_reference(x64, s64, mu64, off64 or None)
    got = cpu.mix(x, shift, mu, off)
    assert len(got) == n
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float().detach(), rtol=1e-6, atol=1e-6)
    gw = torch.autograd.grad(want, [x64, s64, mu64, *off64], [t.double() for t in d])
    dx, dshift, dmu, doff = cpu.mix_backward(d, x, shift, mu, off, want_doff=with_off)
    for a, b in zip([dx, dshift, dmu, *(doff or [])], gw):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
    # accumulating into given gradients
    dx0, ds0 = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    dx1, ds1, _, _ = cpu.mix_backward(d, x, shift, mu, off, dx=dx0.clone(), dshift=ds0.clone())
    torch.testing.assert_close(dx1, dx0 + gw[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds1, ds0 + gw[1].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,T,C,n,R", [(1, 1, 16, 5, 32), (2, 7, 48, 5, 32), (3, 13, 96, 5, 7), (1, 130, 176, 1, 64),
                                       (2, 9, 768, 5, 32)])
def test_mix_lora_matches_fp64(kernel, B, T, C, n, R):
    """ddlerp's mixing with its LoRA offsets in registers: row tiles of 6 with ragged ends, sequence
    starts inside a tile, column blocks of 64 with 16/32/48-wide tails, odd ranks; against fp64."""
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + n)
    x, shift, mu = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g), torch.rand(n, C, generator=g)
    th, w2 = torch.randn(B * T, n * R, generator=g).tanh(), torch.randn(n, R, C, generator=g) * 0.2
    want = cpu.mix_lora_reference(x.double(), shift.double(), mu.double(), th.double(), w2.double())
    got = cpu.mix_lora(x, shift, mu, th, w2)
    assert len(got) == n
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5 * R ** 0.5)
    # the twin where the kernel does not apply: a width that is not a multiple of 16, autograd recording
    x2, s2, mu2 = torch.randn(B, T, 40, generator=g), torch.randn(B, 40, generator=g), torch.rand(n, 40, generator=g)
    w22 = torch.randn(n, R, 40, generator=g)
    got = cpu.mix_lora(x2, s2, mu2, th, w22)
    want = cpu.mix_reference(x2, s2, mu2, [th[:, i * R:(i + 1) * R] @ w22[i] for i in range(n)])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    out = cpu.mix_lora(xg, shift, mu, th, w2)
    assert out[0].grad_fn is not None
    sum(o.sum() for o in out).backward()
    assert xg.grad is not None


@pytest.mark.parametrize("R,G,N", [(1, 1, 16), (5, 3, 32), (130, 8, 64), (200, 2, 48)])
def test_gn_gate_forward_and_backward_match_fp64(kernel, R, G, N):
    g = torch.Generator().manual_seed(R + G)
    A = G * N
    y = torch.randn(R, A, generator=g) * 3 + 1
    gp = torch.randn(R, A, generator=g) * 4  # sigmoid tails
    w, b = torch.randn(A, generator=g), torch.randn(A, generator=g)
    dz = torch.randn(R, A, generator=g)
    for eps in (64e-5, 1e-5 * 64):
        y64, gp64, w64, b64 = _f64([y, gp, w, b])
        want = cpu.gn_gate_reference(y64, gp64, w64, b64, G, eps)
        torch.testing.assert_close(cpu.gn_gate(y, gp, w, b, G, eps), want.float().detach(), rtol=1e-5, atol=1e-5)
        gw = torch.autograd.grad(want, [y64, gp64, w64, b64], dz.double())
        dy, dgp, dw, db, z = cpu.gn_gate_backward(y, gp, w, b, dz, G, eps)
        torch.testing.assert_close(z, want.float().detach(), rtol=1e-5, atol=1e-5)
        for a, b_ in zip((dy, dgp, dw, db), gw):
            torch.testing.assert_close(a, b_.float(), rtol=1e-5, atol=1e-4)


def test_fused_parts_fall_back_to_their_twins_where_the_kernels_do_not_apply(kernel):
    x, shift, mu = torch.randn(2, 5, 32), torch.randn(2, 32), torch.rand(3, 32)
    # fp64 or recorded by autograd: the reference, which autograd can differentiate
    out = cpu.mix(x.double(), shift.double(), mu.double())
    assert out[0].dtype == torch.float64
    xr = x.clone().requires_grad_()
    out = cpu.mix(xr, shift, mu)
    assert out[0].grad_fn is not None
    y, gp = torch.randn(4, 48), torch.randn(4, 48)
    w, b = torch.randn(48), torch.randn(48)
    z = cpu.gn_gate(y, gp, w, b, 2, 1e-5)  # group size 24: not a multiple of 16
    torch.testing.assert_close(z, cpu.gn_gate_reference(y, gp, w, b, 2, 1e-5))
    dy, dgp, dw, db, z2 = cpu.gn_gate_backward(y, gp, w, b, torch.ones(4, 48), 2, 1e-5)
    assert dy.shape == y.shape and dw.shape == w.shape


@pytest.mark.parametrize("N,V", [(1, 16), (7, 100), (33, 1031), (64, 4096)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_fp64(kernel, N, V, reduction):
    g = torch.Generator().manual_seed(N + V)
    x = torch.randn(N, V, generator=g) * 5
    x[0, :3] = 60.0  # large logits: the log-sum-exp must not overflow
    t = torch.randint(0, V, (N,), generator=g)
    t[N // 2] = -100  # ignored
    if N == 1:
        t[0] = V - 1
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(x64, t, ignore_index=-100, reduction=reduction)
    xr = x.clone().requires_grad_()
    got = cpu.cross_entropy(xr, t, reduction=reduction)
    torch.testing.assert_close(got, want.float().detach(), rtol=1e-5, atol=1e-5)
    (want * 3).backward()
    (got * 3).backward()
    torch.testing.assert_close(xr.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_edge_cases(kernel):
    x = torch.randn(4, 32)
    t = torch.full((4,), -100)
    assert torch.isnan(cpu.cross_entropy(x, t))  # no target at all: nan, as F.cross_entropy
    assert float(cpu.cross_entropy(x, t, reduction="sum")) == 0.0
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.cross_entropy(x, torch.tensor([0, 1, 32, 2]))
    # a NaN or an infinite logit anywhere in a row: the loss is not finite either (a diverged
    # model must not look healthy), as with F.cross_entropy
    for bad in (float("nan"), float("inf")):
        y = torch.randn(3, 40)
        y[1, 7] = bad
        t = torch.tensor([0, 3, 5])
        got, want = cpu.cross_entropy(y, t), torch.nn.functional.cross_entropy(y, t)
        assert not torch.isfinite(got) and not torch.isfinite(want)
    # other dtypes: F.cross_entropy itself
    torch.testing.assert_close(cpu.cross_entropy(x.double(), torch.tensor([0, 1, 2, 3])),
                               torch.nn.functional.cross_entropy(x.double(), torch.tensor([0, 1, 2, 3])))


@pytest.mark.parametrize("n", [16, 4096 * 3, 17 * 16])
def test_channel_mix_elementwise_backward_matches_fp64(kernel, n):
    g = torch.Generator().manual_seed(n)
    rr, vo, dout = torch.randn(n, generator=g) * 4, torch.randn(n, generator=g), torch.randn(n, generator=g)
    rr64, vo64 = rr.double().requires_grad_(), vo.double().requires_grad_()
    want = torch.autograd.grad(torch.sigmoid(rr64) * vo64, [vo64, rr64], dout.double())
    for got, w in zip(cpu.sigmoid_gate_backward(dout, rr, vo), want):
        torch.testing.assert_close(got, w.float(), rtol=1e-5, atol=1e-6)
    h = torch.randn(n, generator=g)
    h64 = h.double().requires_grad_()
    want = torch.autograd.grad(torch.relu(h64).square(), h64, dout.double())[0]
    got = cpu.relu_square_backward_(dout.clone(), torch.relu(h).square())
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    # the twins where the kernel does not apply (15 elements)
    dv, dr = cpu.sigmoid_gate_backward(dout[:15], rr[:15], vo[:15])
    torch.testing.assert_close(dv, dout[:15] * torch.sigmoid(rr[:15]))


# ------------------------------------------------------------ transpose and weight gradients
@pytest.mark.parametrize("R,C", [(1, 1), (16, 16), (33, 50), (64, 64), (100, 37), (130, 200), (5, 0)])
def test_transpose_equals_torch(kernel, R, C):
    """Whole 16x16 tiles, the 64x64 block edges, and ragged tails on both sides."""
    x = torch.randn(R, C, generator=torch.Generator().manual_seed(R * 1000 + C))
    assert torch.equal(cpu.transpose(x), x.t())
    assert cpu.transpose(x).is_contiguous()
    wide = torch.randn(R, C + 24)[:, 7:7 + C]  # rows further apart than C (a column slice)
    assert torch.equal(cpu.transpose(wide), wide.t())


def test_transpose_twin_where_the_kernel_does_not_apply(kernel):
    x = torch.randn(40, 30)
    for t in (x.double(), x.t(), x.requires_grad_()):  # another dtype; non-unit column stride; recorded
        got = cpu.transpose(t)
        assert torch.equal(got, t.t()) and got.is_contiguous()


@onednn
@pytest.mark.parametrize("N,O,I", [(256, 256, 256), (300, 272, 260), (4096, 512, 64), (100, 512, 512),
                                   (1200, 3000, 256)])
def test_weight_grad_matches_fp64(kernel, N, O, I, monkeypatch):
    """d.T @ a; (1200, 3000, 256) with a 1 MB block runs the row-blocked path (ragged last block);
    a narrow side or few rows take the plain product."""
    monkeypatch.setattr(cpu, "_WGRAD_BLOCK", 1 << 18)
    monkeypatch.setattr(cpu, "_WGRAD_MIN_WIDE", 256)  # the kernel path at these small widths too
    g = torch.Generator().manual_seed(N + O + I)
    d, a = torch.randn(1, N, O, generator=g), torch.randn(1, N, I, generator=g)
    want = (d.double().reshape(N, O).t() @ a.double().reshape(N, I)).float()
    calls = []
    monkeypatch.setattr(cpu, "transpose", lambda t, f=cpu.transpose: calls.append(t.shape) or f(t))
    got = cpu.weight_grad(d, a)
    assert got.shape == (O, I) and got.is_contiguous()
    kernel_path = N >= 256 and min(O, I) >= 256
    assert len(calls) == ((1 + -(-O // max(16, min(O, (1 << 18) // N)))) if kernel_path else 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5 * N ** 0.5)
    wider = torch.randn(N, I + 16, generator=g)[:, 16:]  # a strided operand (e.g. a column slice)
    torch.testing.assert_close(cpu.weight_grad(d, wider), (d.double().reshape(N, O).t() @ wider.double()).float(),
                               rtol=1e-5, atol=2e-5 * N ** 0.5)


def test_decay_factors_and_the_wkv_given_them_match_their_twins(kernel):
    """Inference forms the decay factors exp(-exp(decay + y)) in one pass and hands them to the WKV
    kernel as they are; twins: the torch expression, and the reference WKV given the log-decay."""
    from multimodal_rwkv.kernels import wkv6_reference

    g = torch.Generator().manual_seed(0)
    y, decay = torch.randn(2, 7, 48, generator=g) * 2, torch.randn(1, 1, 48, generator=g)
    e = cpu.decay_factors(y, decay)
    torch.testing.assert_close(e, torch.exp(-torch.exp(y.double() + decay.double())).float(), rtol=1e-6, atol=1e-7)
    assert cpu.decay_factors(y[..., :40], decay[..., :40]) is None  # a width that is not a multiple of 16
    B, T, H, K = 2, 37, 3, 16
    r, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    u, s0 = torch.randn(H, K, generator=g), torch.randn(B, H, K, K, generator=g)
    w = -torch.exp(torch.randn(B, T, H, K, generator=g))
    with torch.no_grad():
        o, s = cpu.wkv6_cpu_decayed(r, k, v, torch.exp(w), u, s0)
    ro, rs = wkv6_reference(r.double(), k.double(), v.double(), w.double(), u.double(), s0.double(), True)
    torch.testing.assert_close(o, ro.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, rs.float(), rtol=1e-5, atol=1e-5)
    assert cpu.wkv6_cpu_decayed(r.requires_grad_(), k, v, torch.exp(w), u, s0) is None  # recorded by autograd


def test_kernels_refuse_shapes_they_would_read_past():
    """Every tensor the WKV kernel reads by r's sizes must have them; the gated norm's weight and
    bias must have the width: an error, never a read past the end."""
    from multimodal_rwkv.errors import KernelError

    if cpu.extension() is None:
        pytest.skip(cpu.status())
    r, k, e, u = torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16), torch.rand(1, 5, 1, 16), torch.randn(1, 16)
    v = torch.randn(1, 5, 1, 8)
    for args, name in (((r, k, v[:, :1], e, u), "v"), ((r, k, v, e, torch.randn(1, 1)), "u"),
                       ((r, k, v, e, u, torch.randn(1, 1, 16, 16)), "initial_state")):
        with pytest.raises(KernelError, match=f"wkv6: {name} has shape"):
            cpu.wkv6_cpu_decayed(*args)
    with pytest.raises(KernelError, match="u has shape"):
        cpu.wkv6_cpu(r, k, v, -e, torch.randn(1, 3), None, True)
    y, gp = torch.randn(4, 64), torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="weight"):
        cpu.gn_gate(y, gp, torch.randn(32), torch.randn(32), 2, 1e-5)


def test_environment_switches_read_the_usual_off_values(monkeypatch, caplog):
    """MMRWKV_CPU_KERNEL=false (or off, no, 0) left the kernels on: only "0" counted, silently."""
    from multimodal_rwkv.kernels import cpu

    monkeypatch.setitem(cpu._state, "warned_env", set())
    for value, on in (("0", False), ("false", False), (" OFF ", False), ("no", False), ("1", True), ("", True),
                      ("yes", True), ("True", True)):
        monkeypatch.setenv("MMRWKV_ONEDNN_LINEAR", value)
        assert cpu.env_switch("MMRWKV_ONEDNN_LINEAR") is on, value
    monkeypatch.delenv("MMRWKV_ONEDNN_LINEAR")
    assert cpu.env_switch("MMRWKV_ONEDNN_LINEAR") is True and not caplog.records
    monkeypatch.setenv("MMRWKV_MALLOC", "abc")
    with caplog.at_level("WARNING", logger="multimodal_rwkv.kernels.cpu"):
        assert cpu.env_switch("MMRWKV_MALLOC") is True and cpu.env_switch("MMRWKV_MALLOC") is True
    assert [r.getMessage() for r in caplog.records].count(
        "MMRWKV_MALLOC='abc' is not a switch value (0/false/off/no or 1/true/on/yes); it stays on") == 1


def test_a_built_extension_is_loaded_without_running_ninja():
    """torch's load() ran ninja in every process, and two ninja versions on one machine (a venv's
    and the system's) each took the other's build for out of date: a 35 s rebuild, in turn."""
    if cpu.extension() is None:
        pytest.skip(f"C++ kernels not available: {cpu.status()}")
    code = ("import torch.utils.cpp_extension as c\n"
            "def no_ninja(*a, **k): raise AssertionError('ninja ran')\n"
            "c._run_ninja_build = no_ninja\n"
            "from multimodal_rwkv.kernels import cpu\n"
            "assert cpu.extension() is not None, cpu.status()\n")
    _run_python(code)


def test_a_failed_build_is_not_reported_ready():
    """A cached build that would not import, then a load() that failed too, left cpu.status()
    'ready' (the failed import had stored None as the module)."""
    code = ("import torch.utils.cpp_extension as c\n"
            "from multimodal_rwkv.kernels import cpu\n"
            "cpu._load_built = lambda name: None\n"
            "def failed(*a, **k): raise RuntimeError('Error building extension')\n"
            "c.load = failed\n"
            "assert cpu.extension() is None\n"
            "assert cpu.status() != 'ready' and 'build failed' in cpu.status(), cpu.status()\n")
    if cpu.extension() is None and "build failed" not in cpu.status():
        pytest.skip(f"C++ kernels not available here: {cpu.status()}")
    _run_python(code)
