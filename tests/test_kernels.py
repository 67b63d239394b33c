"""WKV-6 kernels on CPU: reference vs closed form; torch backend vs reference (forward, state, grads)."""
from __future__ import annotations

import itertools

import pytest
import torch

from multimodal_rwkv.errors import KernelError
from multimodal_rwkv.kernels import wkv6, wkv6_reference
from multimodal_rwkv.kernels.torch_chunked import wkv6_chunked, wkv6_recurrent
from kernel_helpers import forget_channels, make_inputs, rel_rms, require_backend


def closed_form(r, k, v, w, u, s0):
    """o_t = sum_{s<=t} sum_j r_tj D(s,t,j) k_sj v_s (+ decayed initial state), float64, double loop."""
    B, T, H, K = r.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    cw = torch.cumsum(w.double(), dim=1)  # inclusive
    for t in range(T):
        for s in range(t + 1):
            if s == t:
                d = u.double().expand(B, H, K)
            else:
                d = torch.exp(cw[:, t - 1] - cw[:, s])  # prod_{z=s+1}^{t-1} exp(w_z)
            a = (r[:, t].double() * d * k[:, s].double()).sum(-1)  # [B,H]
            o[:, t] += a.unsqueeze(-1) * v[:, s].double()
        if s0 is not None:
            dec0 = torch.exp(cw[:, t - 1]) if t > 0 else torch.ones(B, H, K, dtype=torch.float64)
            o[:, t] += torch.einsum("bhk,bhkv->bhv", r[:, t].double() * dec0, s0.double())
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if s0 is None else s0.double().clone()
    S = S * torch.exp(cw[:, -1]).unsqueeze(-1)
    for s in range(T):
        kv = k[:, s].double().unsqueeze(-1) * v[:, s].double().unsqueeze(-2)
        S += torch.exp(cw[:, -1] - cw[:, s]).unsqueeze(-1) * kv
    return o, S


@pytest.mark.parametrize("with_state", [False, True])
def test_reference_matches_closed_form(with_state):
    r, k, v, w, u, s0 = make_inputs(2, 9, 3, 5, V=4, decay="mixed", with_state=with_state, seed=1)
    o, s = wkv6_reference(r, k, v, w, u, s0, output_final_state=True)
    oc, sc = closed_form(r, k, v, w, u, s0)
    assert rel_rms(o, oc) < 1e-12
    assert rel_rms(s, sc) < 1e-12


def test_reference_hand_example():
    # B=H=K=V=1, T=2: o0 = r0 u k0 v0 ; o1 = r1 (k0 v0 + u k1 v1); S = e^{w1} k0 v0 + k1 v1
    t = lambda *x: torch.tensor(x, dtype=torch.float64).view(1, len(x), 1, 1)  # noqa: E731
    r, k, v, w = t(2.0, 3.0), t(5.0, 7.0), t(11.0, 13.0), t(-1.0, -0.5)
    u = torch.tensor([[0.25]], dtype=torch.float64)
    o, s = wkv6_reference(r, k, v, w, u, None, True)
    assert o.flatten().tolist() == pytest.approx([2 * 0.25 * 5 * 11, 3 * (5 * 11 + 0.25 * 7 * 13)])
    assert s.item() == pytest.approx(torch.exp(torch.tensor(-0.5)).item() * 55 + 91)


FWD_CASES = list(itertools.product([1, 17, 64, 130], [False, True], ["weak", "mixed", "strong"]))


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
@pytest.mark.parametrize("T,with_state,decay", FWD_CASES)
def test_forward_fp32_vs_fp64_reference(backend, T, with_state, decay):
    require_backend(backend)
    x64 = make_inputs(2, T, 3, 16, V=8, decay=decay, with_state=with_state, seed=T)
    o_ref, s_ref = wkv6_reference(*x64, output_final_state=True)
    x32 = [None if x is None else x.float() for x in x64]
    o, s = wkv6(*x32, output_final_state=True, backend=backend)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.shape == (2, T, 3, 8) and s.shape == (2, 3, 16, 8)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_rms(o, o_ref) <= 1e-5
    assert rel_rms(s, s_ref) <= 1e-5


@pytest.mark.parametrize("fn", [wkv6_chunked, wkv6_recurrent])
@pytest.mark.parametrize("T", [1, 17, 64, 130])
def test_torch_paths_fp64_exact(fn, T):
    x = make_inputs(2, T, 2, 8, V=6, decay="mixed", seed=3 + T)
    o_ref, s_ref = wkv6_reference(*x, output_final_state=True)
    o, s = fn(*x, output_final_state=True)
    assert rel_rms(o, o_ref) < 1e-12 and rel_rms(s, s_ref) < 1e-12


@pytest.mark.parametrize("L,C", [(32, 8), (64, 16), (16, 16), (48, 16)])
def test_chunked_chunk_sizes(L, C):
    x = make_inputs(1, 100, 2, 8, decay="mixed", seed=7)
    o_ref, s_ref = wkv6_reference(*x, output_final_state=True)
    o, s = wkv6_chunked(*x, output_final_state=True, chunk_size=L, sub_chunk=C)
    assert rel_rms(o, o_ref) < 1e-12 and rel_rms(s, s_ref) < 1e-12


@pytest.mark.parametrize("L,C", [(32, 1), (1, 1), (8, 2)])
@pytest.mark.parametrize("decay", ["strong", "weak"])
def test_chunked_sub_chunks_of_one_and_two_tokens(L, C, decay):
    """sub_chunk=1 (no pairs inside a sub-chunk) crashed in a reshape when the decay was strong
    (the unfactorised diagonal form), forward and backward."""
    x = make_inputs(2, 19, 2, 8, decay=decay, seed=5)
    o_ref, s_ref = wkv6_reference(*x, output_final_state=True)
    o, s = wkv6_chunked(*x, output_final_state=True, chunk_size=L, sub_chunk=C)
    assert rel_rms(o, o_ref) < 1e-12 and rel_rms(s, s_ref) < 1e-12
    fn = lambda *a: wkv6_chunked(*a, output_final_state=True, chunk_size=L, sub_chunk=C)  # noqa: E731
    ref = lambda *a: wkv6_reference(*a, output_final_state=True)  # noqa: E731
    for g, g_ref in zip(_grads(fn, x), _grads(ref, x)):
        assert rel_rms(g, g_ref) < 1e-10
    with pytest.raises(ValueError, match="1 <= sub_chunk <= chunk_size"):
        wkv6_chunked(*x, chunk_size=L, sub_chunk=0)


def _grads(fn, xs, seed=0):
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in xs]
    o, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    ((o * go).sum() + (s * gs).sum()).backward()
    return [None if x is None else x.grad for x in xs]


@pytest.mark.parametrize("fn_name", ["chunked", "recurrent", "wkv6_torch", "wkv6_cpu"])
@pytest.mark.parametrize("T,with_state,decay", [(1, True, "mixed"), (17, True, "strong"), (64, False, "weak"),
                                                (130, True, "mixed"), (130, True, "strong")])
def test_gradients_vs_reference(fn_name, T, with_state, decay):
    fns = {
        "chunked": lambda *a: wkv6_chunked(*a, output_final_state=True),
        "recurrent": lambda *a: wkv6_recurrent(*a, output_final_state=True),
        "wkv6_torch": lambda *a: wkv6(*a, output_final_state=True, backend="torch"),
        "wkv6_cpu": lambda *a: wkv6(*a, output_final_state=True, backend="cpu"),
    }
    xs = make_inputs(2, T, 2, 8, V=4, decay=decay, with_state=with_state, seed=11 + T)
    tol = 1e-8
    if fn_name == "wkv6_cpu":  # fp32 inside, fp64 gradients out
        require_backend("cpu")
        xs, tol = [None if x is None else x.float() for x in xs], 1e-5
    g_ref = _grads(lambda *a: wkv6_reference(*a, output_final_state=True), xs)
    g = _grads(fns[fn_name], xs)
    for name, a, b in zip("r k v w u s0".split(), g, g_ref):
        if b is None:
            continue
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b) < tol, name


def test_gradient_only_through_final_state():
    xs = make_inputs(1, 70, 2, 8, decay="mixed", seed=5)
    xs_ = [x.detach().clone().requires_grad_() for x in xs]
    _, s = wkv6_chunked(*xs_, output_final_state=True)
    s.square().sum().backward()
    xr = [x.detach().clone().requires_grad_() for x in xs]
    _, sr = wkv6_reference(*xr, output_final_state=True)
    sr.square().sum().backward()
    for name, a, b in zip("r k v w u s0".split(), xs_, xr):
        if name in ("r", "u"):  # the final state does not depend on r or u
            assert a.grad is None or not a.grad.any()
            continue
        assert b.grad.abs().sum() > 0
        assert rel_rms(a.grad, b.grad) < 1e-8


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fp32_gradients_strong_decay_finite_and_close(backend):
    require_backend(backend)
    xs = make_inputs(1, 200, 2, 16, decay="strong", seed=9)
    g_ref = _grads(lambda *a: wkv6_reference(*a, output_final_state=True), xs)
    g = _grads(lambda *a: wkv6(*a, output_final_state=True, backend=backend), [x.float() for x in xs])
    for name, a, b in zip("r k v w u s0".split(), g, g_ref):
        assert torch.isfinite(a).all(), name
        assert rel_rms(a, b) < 1e-4, name


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("T", [7, 40, 100])
def test_log_decay_minus_inf_forgets_without_nan(backend, T):
    """w = -inf (decay 0; -exp(wraw) for wraw > 88.7 in fp32) is a valid log-decay: the chunked
    form used to meet 0 * -inf and turn every output (even earlier ones) into NaN."""
    require_backend(backend)
    xs = make_inputs(2, T, 2, 16, decay="mixed", seed=21)
    forget_channels(xs[3])
    g_ref = _grads(lambda *a: wkv6_reference(*a, output_final_state=True), xs)
    o_ref, s_ref = wkv6_reference(*xs, output_final_state=True)
    x32 = [x.float() for x in xs]
    o, s = wkv6(*x32, output_final_state=True, backend=backend)
    assert rel_rms(o, o_ref) < 1e-5 and rel_rms(s, s_ref) < 1e-5
    g = _grads(lambda *a: wkv6(*a, output_final_state=True, backend=backend), x32)
    for name, a, b in zip("r k v w u s0".split(), g, g_ref):
        assert torch.isfinite(a).all() and rel_rms(a, b) < 1e-4, name


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_final_state_float32_unless_the_inputs_are_float64(backend):
    require_backend(backend)
    r, k, v, w, u, s0 = make_inputs(1, 20, 1, 16, seed=5)
    _, s = wkv6(r.float(), k.float(), v.float(), w.float(), u.float(), s0, True, backend=backend)  # s0 is fp64
    assert s.dtype == torch.float32
    if backend != "cpu":  # the C++ kernels are fp32 only
        _, s = wkv6(r, k, v, w, u, s0.float(), True, backend=backend)
        assert s.dtype == torch.float64


def test_split_state_equals_full():
    x = make_inputs(2, 90, 2, 8, decay="mixed", seed=2)
    r, k, v, w, u, s0 = [t.float() for t in x]
    o, s = wkv6(r, k, v, w, u, s0, True, backend="torch")
    o1, s1 = wkv6(r[:, :40], k[:, :40], v[:, :40], w[:, :40], u, s0, True, backend="torch")
    o2, s2 = wkv6(r[:, 40:], k[:, 40:], v[:, 40:], w[:, 40:], u, s1, True, backend="torch")
    # token-by-token decode path too
    st = s0
    outs = []
    for t in range(90):
        ot, st = wkv6(r[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], w[:, t:t + 1], u, st, True)
        outs.append(ot)
    assert rel_rms(torch.cat([o1, o2], 1), o) < 1e-5 and rel_rms(s2, s) < 1e-5
    assert rel_rms(torch.cat(outs, 1), o) < 1e-5 and rel_rms(st, s) < 1e-5


def test_final_state_none_unless_requested_and_inputs_unchanged():
    x = [t.float() for t in make_inputs(1, 20, 2, 8, seed=4)]
    before = [t.clone() for t in x]
    for backend in ("auto", "torch", "cpu", "reference"):
        require_backend(backend)
        o, s = wkv6(*x, backend=backend)
        assert s is None and o.shape == (1, 20, 2, 8)
        o, s = wkv6(*x[:5], backend=backend)
        assert s is None
    for a, b in zip(x, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_inputs_output_dtype_and_accuracy(backend):
    require_backend(backend)
    x64 = make_inputs(1, 40, 2, 16, seed=8)
    o_ref, s_ref = wkv6_reference(*x64, output_final_state=True)
    xb = [t.to(torch.bfloat16) for t in x64[:5]] + [x64[5].float()]
    o, s = wkv6(*xb, output_final_state=True, backend=backend)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_rms(o, o_ref) < 2e-2  # bf16 input rounding dominates


def test_validation_errors():
    r, k, v, w, u, s0 = [t.float() for t in make_inputs(1, 5, 2, 8, seed=0)]
    with pytest.raises(KernelError, match="unknown backend"):
        wkv6(r, k, v, w, u, backend="cuda")
    with pytest.raises(KernelError, match=r"r, k, w must share shape"):
        wkv6(r, k[:, :4], v, w, u)
    with pytest.raises(KernelError, match=r"u must be \[H,K\]"):
        wkv6(r, k, v, w, u.t())
    with pytest.raises(KernelError, match="initial_state must be"):
        wkv6(r, k, v, w, u, s0.transpose(0, 1))
    with pytest.raises(KernelError, match=r"v must be \[B,T,H,V\]"):
        wkv6(r, k, v[:, :3], w, u)
    with pytest.raises(KernelError, match="floating point"):
        wkv6(r, k, v.long(), w, u)
    with pytest.raises(KernelError, match=r"must be \[B,T,H,K\]"):
        wkv6(r[0], k[0], v[0], w[0], u)
    with pytest.raises(KernelError, match="backend 'cpu' cannot run here: it runs CPU tensors of float32"):
        wkv6(r.double(), k.double(), v.double(), w.double(), u.double(), backend="cpu")
    grow = w.clone()
    grow[0, 2, 1, 3] = 0.5  # a growing state: out of every chunked form's contract
    for backend in ("auto", "reference", "torch"):
        with pytest.raises(KernelError, match="must be <= 0; its largest value is 0.5"):
            wkv6(r, k, v, grow, u, backend=backend)
    grow[0, 0, 0, 0] = float("nan")  # a NaN beside it hid it: max() is NaN, and NaN > 0 is False
    with pytest.raises(KernelError, match="must be <= 0; its largest value is 0.5"):
        wkv6(r, k, v, grow, u)
    wkv6(r, k, v, torch.zeros_like(w), u)  # no decay at all is fine


def test_triton_backend_on_cpu_raises_outside_interpreter():
    # This process never sets TRITON_INTERPRET; the interpreter tests run in their own subprocess.
    r, k, v, w, u, s0 = [t.float() for t in make_inputs(1, 5, 2, 16, seed=0)]
    with pytest.raises(KernelError, match="triton"):
        wkv6(r, k, v, w, u, s0, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference"])
def test_constant_decay_expanded_and_noncontiguous_inputs(backend):
    require_backend(backend)
    # x052 (RWKV-5) style: one decay per head/channel, broadcast over B and T with expand (stride 0);
    # r, k, v as non-contiguous views of a fused projection.
    B, T, H, K = 2, 45, 3, 8
    g = torch.Generator().manual_seed(21)
    rkv = torch.randn(B, T, 3, H, K, generator=g)
    r, k, v = rkv[:, :, 0], rkv[:, :, 1], rkv[:, :, 2]
    assert not r.is_contiguous()
    w = (-torch.rand(H, K, generator=g) * 2).expand(B, T, H, K)
    u = torch.randn(H, K, generator=g)
    o, s = wkv6(r, k, v, w, u, None, True, backend=backend)
    o_ref, s_ref = wkv6_reference(*(x.contiguous().double() for x in (r, k, v, w, u)), output_final_state=True)
    assert rel_rms(o, o_ref) <= 1e-5 and rel_rms(s, s_ref) <= 1e-5


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "reference"])
def test_empty_sequence_returns_initial_state(backend):
    require_backend(backend)
    r, k, v, w, u, s0 = [t.float() for t in make_inputs(2, 3, 2, 8, seed=1)]
    o, s = wkv6(r[:, :0], k[:, :0], v[:, :0], w[:, :0], u, s0, True, backend=backend)
    assert o.shape == (2, 0, 2, 8) and torch.equal(s, s0)
    o, s = wkv6_chunked(r[:, :0], k[:, :0], v[:, :0], w[:, :0], u, None, True)
    assert o.shape == (2, 0, 2, 8) and not s.any()


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "reference"])
def test_empty_batch_long_sequence(backend):
    """B = 0 with T past the chunked forms' threshold: empty results, as for T = 0."""
    require_backend(backend)
    r, k, v, w, u, s0 = [t.float() for t in make_inputs(1, 40, 2, 8, seed=1)]
    o, s = wkv6(r[:0], k[:0], v[:0], w[:0], u, s0[:0], True, backend=backend)
    assert o.shape == (0, 40, 2, 8) and s.shape == (0, 2, 8, 8) and s.dtype == torch.float32


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "reference"])
def test_empty_sequence_stays_in_the_graph_and_returns_a_new_state(backend):
    """T = 0: the reference and torch backends returned an o outside autograd (a backward through
    it failed) and initial_state itself as the final state (changing one changed the other)."""
    require_backend(backend)
    xs = [t.float().requires_grad_() for t in make_inputs(2, 3, 2, 8, seed=1)]
    o, s = wkv6(*(x[:, :0] for x in xs[:4]), xs[4], xs[5], True, backend=backend)
    assert o.requires_grad and s.data_ptr() != xs[5].data_ptr() and torch.equal(s, xs[5])
    (o.sum() + s.sum()).backward()
    assert torch.equal(xs[5].grad, torch.ones_like(xs[5]))


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu", "reference"])
def test_empty_key_head_with_many_tokens(backend):
    """K = 0 past the step-loop threshold: zeros, as the reference (the torch backend raised)."""
    require_backend(backend)
    r, k, v, w, u, s0 = [t.float() for t in make_inputs(1, 40, 2, 8, seed=1)]
    o, s = wkv6(r[..., :0], k[..., :0], v, w[..., :0], u[:, :0], s0[:, :, :0], True, backend=backend)
    assert o.shape == (1, 40, 2, 8) and not o.any() and s.shape == (1, 2, 0, 8)


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_backends_compute_in_fp32_under_autocast(backend):
    """Under CPU bf16 autocast the reference and torch backends ran their products in bf16 (errors
    of ~3e-3 in o, the state and the gradients, against ~1e-7); they compute in fp32 as documented."""
    xs = [t.float() for t in make_inputs(1, 40, 2, 32, seed=4)]

    def run(autocast):
        x = [t.clone().requires_grad_() for t in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, s = wkv6(*x, output_final_state=True, backend=backend)
        (o.square().sum() + s.sum()).backward()  # outside autocast, as PyTorch recommends
        return [o, s] + [t.grad for t in x]

    for a, b in zip(run(True), run(False)):
        assert a.dtype == b.dtype == torch.float32 and rel_rms(a, b) < 1e-6


@pytest.mark.parametrize("which", [1, 2, 3])  # k, v or w alone in float64
def test_auto_on_cpu_with_one_float64_input_computes_in_float64(which):
    xs = make_inputs(1, 20, 1, 16, seed=6)
    mixed = [x.double() if i == which else x.float() for i, x in enumerate(xs[:5])]
    o, s = wkv6(*mixed, None, True, backend="auto")
    o_ref, s_ref = wkv6_reference(*mixed, None, True)
    assert s.dtype == torch.float64 and rel_rms(s, s_ref) < 1e-12
    with pytest.raises(KernelError, match="float32/bfloat16/float16 only"):
        wkv6(*mixed, None, True, backend="cpu")


# ---- chunked backward by group recompute (_ChunkedWKVFunction) vs the reference's autograd ----

def _loss_grads(fn, xs, needs, use_o=True, use_s=True, seed=0):
    """Gradients of sum(o*go) + sum(S*gs) w.r.t. the inputs flagged in ``needs`` (None elsewhere)."""
    xs = [None if x is None else x.detach().clone().requires_grad_(n) for x, n in zip(xs, needs)]
    o, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)
    loss = (o * go).sum() * use_o + (s * gs).sum() * use_s
    loss.backward()
    return [x.grad if (x is not None and n) else None for x, n in zip(xs, needs)]


RECOMPUTE_CASES = [(T, state, decay) for T in (17, 130) for state in ("none", "fixed", "grad")
                   for decay in ("mixed", "strong")]
RECOMPUTE_CASES += [(300, "grad", "strong"), (300, "none", "mixed")]
RECOMPUTE_CASES += [pytest.param(300, state, decay, marks=pytest.mark.slow)
                    for state, decay in [("fixed", "mixed"), ("fixed", "strong"), ("grad", "mixed"),
                                         ("none", "strong")]]


@pytest.mark.parametrize("T,state,decay", RECOMPUTE_CASES)
def test_recompute_backward_vs_reference(T, state, decay):
    """fp64 and fp32, one group per chunk (many groups) and the default group size."""
    xs = make_inputs(2, T, 2, 8, V=4, decay=decay, with_state=state != "none", seed=100 + T)
    needs = [True] * 5 + [state == "grad"]
    g_ref = _loss_grads(lambda *a: wkv6_reference(*a, output_final_state=True), xs, needs)
    for dtype, group_tokens in itertools.product([torch.float64, torch.float32], [32, 512]):
        xd = [None if x is None else x.to(dtype) for x in xs]
        fn = lambda *a: wkv6_chunked(*a, output_final_state=True, group_tokens=group_tokens)  # noqa: E731
        g = _loss_grads(fn, xd, needs)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for name, a, b in zip("r k v w u s0".split(), g, g_ref):
            if b is None:
                assert a is None, name
                continue
            assert a.dtype == dtype or name == "s0", name
            assert torch.isfinite(a).all(), name
            assert rel_rms(a, b) < tol, (name, dtype, group_tokens, rel_rms(a, b))


@pytest.mark.parametrize("use_o,use_s", [(True, False), (False, True)])
@pytest.mark.parametrize("needs", [(False, False, False, True, False, False), (False, False, False, False, False, True),
                                   (True, False, True, False, True, True)])
def test_recompute_backward_partial_inputs_and_losses(needs, use_o, use_s):
    xs = make_inputs(1, 150, 3, 8, V=8, decay="mixed", seed=31)
    g_ref = _loss_grads(lambda *a: wkv6_reference(*a, output_final_state=True), xs, needs, use_o, use_s)
    g = _loss_grads(lambda *a: wkv6_chunked(*a, output_final_state=True, group_tokens=64), xs, needs, use_o, use_s)
    for name, a, b in zip("r k v w u s0".split(), g, g_ref):
        if b is None:
            assert a is None, name
        else:
            assert rel_rms(a, b) < 1e-10, (name, rel_rms(a, b))


def test_recompute_backward_output_only_loss_without_final_state():
    xs = make_inputs(1, 100, 2, 8, decay="strong", seed=32)
    ref = lambda *a: (wkv6_reference(*a)[0], torch.zeros(()))  # noqa: E731
    new = lambda *a: (wkv6_chunked(*a, group_tokens=64)[0], torch.zeros(()))  # noqa: E731
    g_ref = _loss_grads(ref, xs, [True] * 6)
    g = _loss_grads(new, xs, [True] * 6)
    for name, a, b in zip("r k v w u s0".split(), g, g_ref):
        assert rel_rms(a, b) < 1e-10, (name, rel_rms(a, b))


def test_recompute_forward_matches_no_grad_forward():
    x = [t.float() for t in make_inputs(1, 300, 2, 16, decay="mixed", seed=33)]
    with torch.no_grad():
        o0, s0 = wkv6_chunked(*x, output_final_state=True)
    xg = [t.clone().requires_grad_() for t in x]
    o1, s1 = wkv6_chunked(*xg, output_final_state=True, group_tokens=64)
    assert o1.requires_grad and s1.requires_grad
    assert rel_rms(o1.detach(), o0) < 1e-6 and rel_rms(s1.detach(), s0) < 1e-6


def test_recompute_saves_only_inputs_and_group_states():
    """The graph keeps the (cast, padded) inputs and one state per group: far less than autograd
    through the whole chunked form (same function with group recompute made impossible)."""
    from multimodal_rwkv.kernels import torch_chunked as tc

    B, T, H, K = 1, 1000, 2, 16
    x = [t.float() for t in make_inputs(B, T, H, K, decay="mixed", seed=34)]

    def saved_bytes(fn):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        xg = [t.clone().requires_grad_() for t in x]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*xg)
        return total[0]

    new = saved_bytes(lambda *a: tc.wkv6_chunked(*a, output_final_state=True, group_tokens=256))
    Tp = -(-T // 32) * 32
    inputs = 4 * B * Tp * H * K * 4 + H * K * 4
    states = (-(-Tp // 256)) * B * H * K * K * 4
    assert new <= inputs + states + 4096
    # plain autograd through the same computation (the old behaviour) keeps many times more
    plain = saved_bytes(lambda *a: _plain_autograd_chunked(tc, *a))
    assert plain > 5 * new


def _plain_autograd_chunked(tc, r, k, v, w, u, s0):
    B, T, H, K = r.shape
    chunks = [tc._to_chunks(x, 32, x.dtype) for x in (r, k, v, w)]
    u_ = u.view(1, 1, H, 1, K).expand(1, B, H, 1, K).reshape(1, B * H, 1, K)
    return tc._chunked_core(*chunks, u_, s0.reshape(B * H, K, -1), 8)


def test_factorised_diagonal_blocks_equal_the_exact_pairs(monkeypatch):
    """Weak decay takes the factorised diagonal sub-blocks; they equal the exact pair form (fp64)
    and stay accurate in fp32 at the limit, where the column factor is largest (e^3)."""
    import multimodal_rwkv.kernels.torch_chunked as tc

    calls = []
    real = tc._diag_factorisable
    monkeypatch.setattr(tc, "_diag_factorisable", lambda *a: real(*a) and not calls.append(1))
    needs = [True] * 6
    weak = make_inputs(2, 77, 2, 8, decay="weak", seed=5)
    fast = _loss_grads(lambda *a: wkv6_chunked(*a, output_final_state=True), weak, needs)
    assert len(calls) == 2  # forward and backward
    _loss_grads(lambda *a: wkv6_chunked(*a, output_final_state=True), make_inputs(1, 20, 1, 8, decay="mixed"), needs)
    assert len(calls) == 2  # mixed decay (up to -4.5 per step) keeps the exact pairs
    monkeypatch.setattr(tc, "_DIAG_FACTOR_LIMIT", -1.0)  # force the exact pairs
    exact = _loss_grads(lambda *a: wkv6_chunked(*a, output_final_state=True), weak, needs)
    assert len(calls) == 2
    for name, a, b in zip("r k v w u s0".split(), fast, exact):
        assert rel_rms(a, b) < 1e-12, name
    monkeypatch.setattr(tc, "_DIAG_FACTOR_LIMIT", 3.0)
    edge = make_inputs(2, 64, 2, 8, decay="weak", seed=6)
    edge[3] = torch.full_like(edge[3], -2.99 / 8)  # every 8-step sub-chunk totals -2.99
    ref = _loss_grads(lambda *a: wkv6_reference(*a, output_final_state=True), edge, needs)
    got = _loss_grads(lambda *a: wkv6_chunked(*a, output_final_state=True),
                      [x.float() for x in edge], needs)
    assert len(calls) == 4
    for name, a, b in zip("r k v w u s0".split(), got, ref):
        assert rel_rms(a, b) < 2e-6, (name, rel_rms(a, b))


@pytest.mark.parametrize("backend", ["cpu", "torch", "reference"])
def test_a_second_derivative_is_an_error_not_silently_zero(backend):
    """Through the fast backends a gradient penalty (create_graph=True) silently lost their part of
    the second derivative; the reference differentiates twice."""
    require_backend(backend)
    xs = [t.float().requires_grad_() for t in make_inputs(1, 40, 2, 8, seed=4)[:5]]
    o, _ = wkv6(*xs, backend=backend)
    if backend == "reference":
        (dr,) = torch.autograd.grad(o.sum(), xs[0], create_graph=True)
        assert dr.requires_grad
        return
    with pytest.raises(RuntimeError, match=f"the '{backend}' backend gives first derivatives only"):
        torch.autograd.grad(o.sum(), xs[0], create_graph=True)
    (dr,) = torch.autograd.grad(o.sum(), xs[0])  # a plain gradient as before
    assert torch.isfinite(dr).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_meta_tensors_give_shapes(backend):
    """A model built on the meta device (accelerate's init_empty_weights) traces shapes: from T = 17
    the chunked torch backend asked the data (a .item() on meta tensors: a RuntimeError)."""
    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    for T in (8, 17, 100):
        r, k, w = (torch.empty(2, T, 3, 16, device="meta") for _ in range(3))
        v = torch.empty(2, T, 3, 8, device="meta")
        o, s = wkv6(r, k, v, w, torch.empty(3, 16, device="meta"), output_final_state=True, backend=backend)
        assert o.shape == (2, T, 3, 8) and s.shape == (2, 3, 16, 8) and o.is_meta and s.is_meta
    with torch.device("meta"):
        m = RWKVForCausalLM(RWKVConfig(vocab_size=97, n_layer=2, n_embd=64, head_size=16, wkv_backend=backend))
    out = m(torch.zeros(1, 40, dtype=torch.long, device="meta"))
    assert out.logits.shape == (1, 40, 97) and out.logits.is_meta
