"""The memory-lean training forms (model/lean.py) against the plain autograd forms they replace."""
import pytest
import torch

import multimodal_rwkv.model.lean as lean
import multimodal_rwkv.model.modeling as modeling
from multimodal_rwkv import RWKVConfig, RWKVForCausalLM
from multimodal_rwkv.model.state import RWKVState
from multimodal_rwkv.training.peft import apply_lora


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_model(version, dtype=torch.float64, seed=0, **kw):
    """Every parameter random and distinct (zero-initialised weights would hide a wrong gradient)."""
    torch.manual_seed(seed)
    cfg = RWKVConfig(vocab_size=50, n_layer=2, n_embd=32, head_size=8, version=version, d_mix_lora=4,
                     d_decay_lora=6, **kw)
    m = RWKVForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("time_decay"):
                p.copy_(torch.empty_like(p).uniform_(-3, 0.5))
            elif "time_mix" in name or "time_maa_" in name and p.dim() == 3 and p.shape[:2] == (1, 1):
                p.copy_(torch.rand_like(p))
            elif "ln" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return m


def grads(model, ids, mask, state, go):
    model.zero_grad(set_to_none=True)
    st = RWKVState([t.clone().requires_grad_() for t in state.att_shift], [t.clone().requires_grad_() for t in state.wkv],
                   [t.clone().requires_grad_() for t in state.ffn_shift])
    out = model(ids, attention_mask=mask, state=st)
    loss = (out.logits * go).sum() + sum((s * s).sum() for s in out.state.att_shift + out.state.ffn_shift)
    loss = loss + sum(s.sum() for s in out.state.wkv)
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for i in range(len(st.att_shift)):
        g[f"state.att_shift.{i}"] = st.att_shift[i].grad
        g[f"state.ffn_shift.{i}"] = st.ffn_shift[i].grad
        g[f"state.wkv.{i}"] = st.wkv[i].grad
    return out.logits.detach(), g


def count_calls(monkeypatch):
    calls = {"ddlerp": 0, "cmix": 0, "gate": 0}
    for key, cls in (("ddlerp", lean.DDLerpProject), ("cmix", lean.ChannelMixLean), ("gate", lean.NormGatedOutput)):
        real = cls.apply

        def wrapped(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)

        monkeypatch.setattr(cls, "apply", wrapped)
    return calls


@pytest.mark.parametrize("version,widths", [("x060", {}), ("x052", {}), ("x060", {"dim_att": 48, "dim_ffn": 80})])
@pytest.mark.parametrize("T", [1, 11])
def test_lean_forms_equal_plain_autograd(version, widths, T, monkeypatch):
    """Logits and the gradient of every parameter and every state input, fp64, with left padding
    (also with an attention and a channel-mix width other than n_embd)."""
    m = random_model(version, **widths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, : T // 2] = False  # left padding on one row
    state = RWKVState.zeros(m.config, 3, dtype=torch.float64)
    state = RWKVState([torch.randn(t.shape, generator=g, dtype=t.dtype) for t in state.att_shift],
                      [torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3 for t in state.wkv],
                      [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in state.ffn_shift])
    go = torch.randn(3, T, 50, generator=g, dtype=torch.float64)
    calls = count_calls(monkeypatch)
    logits, g_lean = grads(m, ids, mask, state, go)
    n_layer = m.config.n_layer
    assert calls == {"ddlerp": n_layer if version == "x060" else 0, "cmix": n_layer, "gate": n_layer}
    monkeypatch.setattr(modeling, "LEAN_TRAINING", False)
    logits_ref, g_ref = grads(m, ids, mask, state, go)
    assert calls["cmix"] == n_layer  # the plain forms ran
    assert rel(logits, logits_ref) < 1e-13
    assert set(g_lean) == set(g_ref)
    assert len(g_ref) == len(list(m.parameters())) + 3 * n_layer
    for name in g_ref:
        assert rel(g_lean[name], g_ref[name]) < 1e-10, (name, rel(g_lean[name], g_ref[name]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_forms_with_frozen_projections_equal_plain_autograd(dtype, monkeypatch):
    """State tuning's case: every projection weight frozen, so the lean backward skips the weight
    gradients (and the inputs they need); the remaining gradients still equal the plain forms'.
    fp32 takes the C++ kernels, fp64 their twins."""
    m = random_model("x060", dtype=dtype)
    for name, p in m.named_parameters():
        if name.endswith(("receptance.weight", "key.weight", "value.weight", "gate.weight", "output.weight")):
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    state = RWKVState.zeros(m.config, 2, dtype=dtype)
    state = RWKVState([torch.randn(t.shape, generator=g).to(t.dtype) for t in state.att_shift],
                      [torch.randn(t.shape, generator=g) * 0.3 for t in state.wkv],
                      [torch.randn(t.shape, generator=g).to(t.dtype) for t in state.ffn_shift])
    go = torch.randn(2, 9, 50, generator=g).to(dtype)
    calls = count_calls(monkeypatch)
    logits, g_lean = grads(m, ids, None, state, go)
    assert calls["ddlerp"] == m.config.n_layer
    monkeypatch.setattr(modeling, "LEAN_TRAINING", False)
    logits_ref, g_ref = grads(m, ids, None, state, go)
    assert set(g_lean) == set(g_ref) and not any(n.endswith("key.weight") for n in g_ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name in g_ref:
        assert rel(g_lean[name], g_ref[name]) < tol, (name, rel(g_lean[name], g_ref[name]))


def test_lean_forms_keep_less_for_backward():
    """What autograd keeps for backward in one training forward: about half of the plain forms'."""
    m = random_model("x060", dtype=torch.float32)
    ids = torch.randint(0, 50, (2, 64))

    def saved_bytes():
        seen = {}

        def pack(t):
            if not (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(ids)
        return sum(seen.values())

    lean_bytes = saved_bytes()
    modeling.LEAN_TRAINING = False
    try:
        plain_bytes = saved_bytes()
    finally:
        modeling.LEAN_TRAINING = True
    assert lean_bytes < 0.6 * plain_bytes, (lean_bytes, plain_bytes)


def test_lora_wrapped_projections_keep_the_plain_form(monkeypatch):
    m = random_model("x060")
    apply_lora(m, r=2, alpha=4, targets=["att.key", "ffn.value"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn_like(p))
    calls = count_calls(monkeypatch)
    ids = torch.randint(0, 50, (2, 7))
    state = RWKVState.zeros(m.config, 2, dtype=torch.float64)
    go = torch.randn(2, 7, 50, dtype=torch.float64)
    logits, g_lean = grads(m, ids, None, state, go)
    assert calls == {"ddlerp": 0, "cmix": 0, "gate": 2}  # the output projection is not wrapped
    monkeypatch.setattr(modeling, "LEAN_TRAINING", False)
    logits_ref, g_ref = grads(m, ids, None, state, go)
    assert rel(logits, logits_ref) < 1e-13
    for name in g_ref:
        assert rel(g_lean[name], g_ref[name]) < 1e-10, name


def test_no_lean_form_without_grad_or_under_autocast(monkeypatch):
    m = random_model("x060", dtype=torch.float32)
    calls = count_calls(monkeypatch)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(ids).logits.float().sum().backward()
    assert calls == {"ddlerp": 0, "cmix": 0, "gate": 0}
