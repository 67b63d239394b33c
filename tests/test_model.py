"""The core model against the official `rwkv` package, and its own invariants."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_rwkv import CheckpointError, ConfigError, RWKVConfig, RWKVForCausalLM, RWKVState
from multimodal_rwkv.model.checkpoint import load_raw, ours_to_blink
from multimodal_rwkv.model.random_checkpoint import blink_state_dict

TOKS = [1, 5, 77, 200, 3, 9, 42, 128, 17, 0, 255, 64, 31]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def official_forward(pth, toks, strategy="cpu fp32"):
    """Run the official package in a subprocess (it reads env vars at import)."""
    code = f"""
import os, torch
os.environ['RWKV_JIT_ON'] = '0'; os.environ['RWKV_CUDA_ON'] = '0'
from rwkv.model import RWKV
m = RWKV(model={str(pth)[:-4]!r}, strategy={strategy!r}, verbose=False)
logits, state = m.forward({toks!r}, None, full_output=True)
torch.save({{'logits': logits, 'state': state}}, {str(pth) + '.out'!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return torch.load(str(pth) + ".out", weights_only=True)


CASES = {
    "x060": dict(version="x060"),
    "x060_r64_128": dict(version="x060", d_mix_lora=64, d_decay_lora=128),
    "x052": dict(version="x052"),
    "x060_state": dict(version="x060", time_state=True),
    "x060_lowvar": dict(version="x060", low_var=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_official_package(tmp_path, case):
    kw = dict(CASES[case])
    low_var = kw.pop("low_var", False)
    sd = blink_state_dict(n_layer=2, n_embd=128, head_size=64, vocab_size=256, seed=3, **kw)
    if low_var:  # heads with variance ~1e-4 separate GroupNorm eps 64e-5 from 1e-5
        for i in range(2):
            sd[f"blocks.{i}.att.value.weight"] *= 1e-2
    pth = tmp_path / "m.pth"
    torch.save(sd, pth)
    ref = official_forward(pth, TOKS)
    model = RWKVForCausalLM.from_pretrained(pth)
    out = model(torch.tensor([TOKS]))
    assert rel(out.logits[0], ref["logits"]) <= 1e-5
    for i in range(2):
        assert rel(out.state.att_shift[i][0], ref["state"][3 * i]) <= 1e-5
        assert rel(out.state.wkv[i][0], ref["state"][3 * i + 1]) <= 1e-5  # key-major both
        assert rel(out.state.ffn_shift[i][0], ref["state"][3 * i + 2]) <= 1e-5
    assert out.state.wkv[0].dtype == torch.float32


def _random_model(version="x060", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = RWKVConfig(**{"vocab_size": 97, "n_layer": 3, "n_embd": 64, "head_size": 16, "version": version, **kw})
    m = RWKVForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_parallel_equals_recurrent_and_split(version):
    m = _random_model(version)
    ids = torch.randint(0, 97, (2, 37))
    with torch.no_grad():
        full = m(ids)
        s, steps = None, []
        for t in range(ids.shape[1]):
            o = m(ids[:, t:t + 1], state=s)
            s = o.state
            steps.append(o.logits)
        assert rel(torch.cat(steps, 1), full.logits) < 1e-5
        for k in (1, 16, 36):
            a = m(ids[:, :k])
            b = m(ids[:, k:], state=a.state)
            assert rel(torch.cat([a.logits, b.logits], 1), full.logits) < 1e-5
            for x, y in zip(b.state.wkv, full.state.wkv):
                assert rel(x, y) < 1e-5


def test_state_is_not_modified_and_supports_batch_ops():
    m = _random_model()
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        st = m(ids).state
        before = st.clone()
        m(ids[:, :2], state=st)
        assert st.equal(before)
        row = st[1]
        assert row.batch_size == 1
        cat = RWKVState.cat([st[0], st[1], st[2]])
        assert cat.equal(st)
        rep = st[2].expand(4)
        assert rep.batch_size == 4 and torch.equal(rep.wkv[0][3], st.wkv[0][2])
        assert st[-1].equal(st[2]) and st[-3].equal(st[0])
        for bad in (3, -4):
            with pytest.raises(IndexError, match=f"state row {bad} out of range for batch 3"):
                st[bad]
        # one row however the integer comes (st[logits.argmax()]), always with its batch dimension
        for i in (torch.tensor(1), np.int64(1), torch.tensor([1]), np.array([1]), [1], slice(1, 2),
                  [torch.tensor(1)], np.array([1], dtype=np.uint8), torch.tensor([1], dtype=torch.uint8)):
            assert st[i].equal(row) and st[i].att_shift[0].shape == (1, 64), repr(i)
        rows02 = RWKVState.cat([st[0], st[2]])
        for i in (torch.tensor([True, False, True]), [True, False, True], np.array([True, False, True]),
                  [np.int64(0), torch.tensor(2)], range(0, 3, 2), [np.True_, np.False_, np.True_],
                  np.array([2, 1, 0])[::2][::-1]):
            assert rows02.equal(st[i]), repr(i)
        assert st[np.uint64(1)].equal(row) and st[np.array(1)].equal(row)
        for bad in (True, torch.tensor(True), np.True_, (0, 1), 1.5, torch.tensor(1.0), [1.0],
                    torch.zeros(2, 2, dtype=torch.long)):
            with pytest.raises(TypeError):
                st[bad]
        one_layer = RWKVState(st.att_shift[:1], st.wkv[:1], st.ffn_shift[:1])
        for states in ([one_layer, st], [st, one_layer]):
            with pytest.raises(ValueError, match="layers"):
                RWKVState.cat(states)
    L, C, H, N = 3, 64, 4, 16
    assert st.nbytes_per_stream() == L * (2 * C * 4 + H * N * N * 4)


@pytest.mark.parametrize("version,B,state_tuned,kw", [
    ("x060", 1, False, {}), ("x060", 5, True, {}), ("x060", 2, False, {"n_embd": 128, "head_size": 32}),
    ("x060", 3, False, {"n_embd": 40, "head_size": 8}), ("x060", 17, False, {}), ("x052", 1, False, {}),
    ("x052", 4, True, {"n_embd": 128, "head_size": 32})])
def test_fused_decode_block_equals_block_forward(monkeypatch, version, B, state_tuned, kw):
    """Decoding runs each block as one C++ call (Block.decode_step, fp32 CPU); the blocks' own
    forward is its twin: the same logits and states step after step, from no state (a tuned
    initial state or zeros) and onwards. Sizes that are not multiples of 16, or more than 16 rows,
    take the block's forward."""
    from multimodal_rwkv.kernels import cpu
    from multimodal_rwkv.model import modeling

    m = _random_model(version, has_initial_state=state_tuned, **kw)
    real, used = cpu.decode_block, []
    monkeypatch.setattr(cpu, "decode_block", lambda *a: used.append(real(*a) is not None) or real(*a))
    ids = torch.randint(0, 97, (B, 6))
    runs = {}
    with torch.no_grad():
        for fast in (True, False):
            monkeypatch.setattr(modeling, "FAST_DECODE", fast)
            s, logits = None, []
            for t in range(ids.shape[1]):
                o = m(ids[:, t:t + 1], state=s, logits_to_keep=1)
                s, logits = o.state, logits + [o.logits]
            runs[fast] = torch.cat(logits, 1), s
    fits = m.config.n_embd % 16 == 0 and m.config.head_size % 16 == 0 and B <= 16
    assert used == [fits and cpu.extension() is not None] * (6 * m.config.n_layer)
    (got, s1), (want, s0) = runs[True], runs[False]
    assert rel(got, want) < 1e-5  # both as close to an fp64 run (summation orders differ)
    for a, b in zip(s1.att_shift + s1.wkv + s1.ffn_shift, s0.att_shift + s0.wkv + s0.ffn_shift):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_fused_decode_block_bf16(monkeypatch, version):
    """A bf16 model decodes through the fused block too (bf16 weight products on AVX512-BF16, the
    rest in fp32): against the same bf16-rounded weights run in fp32, it is at least as close as
    the bf16 model's own forward; the shifts keep the model's dtype, the wkv state fp32."""
    import copy

    from multimodal_rwkv.kernels import cpu
    from multimodal_rwkv.model import modeling

    mb = _random_model(version).to(torch.bfloat16)
    m32 = copy.deepcopy(mb).float()
    real, used = cpu.decode_block, []
    monkeypatch.setattr(cpu, "decode_block", lambda *a: used.append(real(*a) is not None) or real(*a))
    ids = torch.randint(0, 97, (3, 6))

    def decode(m, fast):
        monkeypatch.setattr(modeling, "FAST_DECODE", fast)
        s, logits = None, []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                o = m(ids[:, t:t + 1], state=s)
                s, logits = o.state, logits + [o.logits.float()]
        return torch.cat(logits, 1), s

    want, _ = decode(m32, False)
    plain, _ = decode(mb, False)
    used.clear()
    got, s = decode(mb, True)
    kernel = cpu.extension()
    assert used == [kernel is not None and bool(kernel.has_avx512_bf16())] * (6 * 3)
    assert rel(got, want) < 2e-2 and rel(got, want) <= 1.2 * rel(plain, want)
    assert s.att_shift[0].dtype == s.ffn_shift[0].dtype == torch.bfloat16 and s.wkv[0].dtype == torch.float32


def _skip_without_bf16_decode_kernel() -> None:
    from multimodal_rwkv.kernels import cpu

    kernel = cpu.extension()
    if kernel is None or not kernel.has_avx512_bf16():
        pytest.skip("needs the C++ kernels on a CPU with AVX512-BF16")


def test_bf16_batched_decode_rows_equal_rows_alone():
    """More than 16 rows of a bf16 model decode in groups of 16 through the fused block: each row's
    logits are those of the row decoded alone (the plain bf16 forward was 0.6% off)."""
    _skip_without_bf16_decode_kernel()
    m = _random_model().to(torch.bfloat16)
    ids = torch.randint(1, 97, (20, 5))
    with torch.no_grad():
        st = m(ids[:, :4]).state
        both = m(ids[:, 4:], state=st).logits.float()
        for i in (0, 15, 16, 19):
            alone = m(ids[i:i + 1, 4:], state=st[i]).logits.float()
            assert rel(both[i], alone[0]) < 1e-6


def test_fused_decode_block_skips_lora(monkeypatch):
    """A LoRA-wrapped projection (training.peft) decodes through the block's forward."""
    from multimodal_rwkv.kernels import cpu
    from multimodal_rwkv.training.peft import apply_lora

    called = []
    monkeypatch.setattr(cpu, "decode_block", lambda *a: called.append(1))
    lora = _random_model()
    apply_lora(lora, r=4, alpha=8, targets=["att.key"])
    with torch.no_grad():
        lora(torch.randint(0, 97, (2, 1)))
    assert not called


def test_state_save_load(tmp_path):
    m = _random_model()
    st = m(torch.randint(0, 97, (2, 5))).state
    st.save(tmp_path / "s.safetensors")
    assert RWKVState.load(tmp_path / "s.safetensors").equal(st)
    mask = os.umask(0)
    os.umask(mask)  # the usual mode of a new file (safetensors alone wrote 0600)
    assert (tmp_path / "s.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="bad"):
        RWKVState.load(tmp_path / "bad")
    from safetensors.torch import save_file

    save_file({"head.weight": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # safetensors, not a state
    with pytest.raises(CheckpointError, match="weights.safetensors: not a saved RWKV state"):
        RWKVState.load(tmp_path / "weights.safetensors")


def test_state_api_takes_what_tensors_take_and_refuses_the_rest(tmp_path):
    """load took mixed batch sizes, int tensors and NaN (failing later, the file unnamed); to(dtype)
    positional, ==, expand(-1) / expand(2.5) and empty_state(2.5) / empty_state(-1) misbehaved."""
    from safetensors.torch import save_file

    m = _random_model()
    st = m(torch.randint(0, 97, (2, 5))).state
    assert st == st.clone() and not (st == st[:1]) and st != m.empty_state(2)
    half = st.to(torch.bfloat16)
    assert half.att_shift[0].dtype == torch.bfloat16 and half.wkv[0].dtype == torch.float32
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="n must be an integer >= 0"):
            st[:1].expand(bad)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 0"):
            m.empty_state(bad)
    assert st[:1].expand(3).batch_size == 3 and m.empty_state(0).batch_size == 0
    for key, value, why in (("1.att_shift", torch.zeros(3, 64), r"1\.att_shift has shape \(3, 64\)"),
                            ("0.wkv", None, "0.wkv holds int32 values"),
                            ("0.ffn_shift", None, "0.ffn_shift holds NaN")):
        d = {k: v.clone() for k, v in st.state_dict().items()}
        if key == "0.wkv":
            d[key] = d[key].int()
        elif value is None:
            d[key][0, 0] = float("nan")
        else:
            d[key] = value
        save_file(d, str(tmp_path / "s.st"))
        with pytest.raises(CheckpointError, match=f"s\\.st: {why}"):
            RWKVState.load(tmp_path / "s.st")


@pytest.mark.parametrize("T", [1, 3])
def test_a_state_of_other_sizes_is_refused(T):
    """A state whose tensors do not have this model's sizes (another model's, a hand-made one) is
    a clear error before any kernel reads it (the C++ kernels read by the model's sizes)."""
    m = _random_model()
    ids = torch.randint(0, 97, (1, T))
    ok = m.empty_state(1)
    H, N = m.config.n_head, m.config.head_size
    for wkv in (torch.zeros(1, 1, 1, 1), torch.zeros(1, H, N, N // 2), torch.zeros(1, H + 1, N, N)):
        bad = RWKVState(ok.att_shift, [wkv] * m.config.n_layer, ok.ffn_shift)
        with pytest.raises(ValueError, match=r"state layer 0 wkv has shape .*needs"):
            m(ids, state=bad)
    bad = RWKVState([torch.zeros(1, 3)] * m.config.n_layer, ok.wkv, ok.ffn_shift)
    with pytest.raises(ValueError, match="att_shift"):
        m(ids, state=bad)


def test_input_checks():
    m = _random_model()
    ids = torch.randint(0, 97, (2, 4))
    want = m(ids).logits
    assert torch.equal(m(ids.to(torch.uint8)).logits, want)  # any integer dtype
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        m(ids, logits_to_keep=-1)
    with pytest.raises(ValueError, match="no rows"):
        m(ids[:0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\)"):
        m(ids, attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_logits_to_keep():
    m = _random_model()
    ids = torch.randint(0, 97, (2, 11))
    full = m(ids)
    last = m(ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 97)
    assert torch.allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-6)


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_logits_to_keep_inference_computes_only_the_tail_and_keeps_the_state_exact(version):
    """Without autograd, the last block runs its r/gate/output products and channel mix on the kept
    positions only; logits there and the whole state equal the full forward's."""
    m = _random_model(version, seed=3)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        st = m(torch.randint(0, 97, (2, 4))).state
        full = m(ids, state=st.clone())
        calls = []
        hook = m.rwkv.blocks[-1].ffn.key.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[1]))
        for k in (1, 2, 8, 9, 12):
            part = m(ids, state=st.clone(), logits_to_keep=k)
            kk = min(k, 9)
            assert part.logits.shape == (2, kk, 97)
            torch.testing.assert_close(part.logits, full.logits[:, -kk:], rtol=1e-5, atol=1e-5)
            for a, b in zip(part.state._tensors(), full.state._tensors()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        hook.remove()
    assert calls == [1, 2, 8, 9, 9]  # the channel mix saw only the kept positions


def test_loss_with_ignore_index():
    m = _random_model()
    ids = torch.randint(0, 97, (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100
    out = m(ids, labels=labels)
    lp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    keep = tgt != -100
    manual = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1))[..., 0][keep].mean()
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_left_padding_mask_matches_unpadded():
    m = _random_model()
    a = torch.randint(1, 97, (1, 9))
    b = torch.randint(1, 97, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 5 + [1] * 4])
    with torch.no_grad():
        out = m(batch, attention_mask=mask)
        ob = m(b)
        assert rel(out.logits[1, 5:], ob.logits[0]) < 1e-5
        for x, y in zip(out.state.wkv, ob.state.wkv):
            assert rel(x[1], y[0]) < 1e-5


@pytest.mark.parametrize("kw", [{}, {"version": "x052"}, {"has_initial_state": True}, {"dim_att": 64},
                                {"has_initial_state": True, "version": "x052"}])
def test_the_parameter_estimate_counts_every_parameter(kw):
    """The estimate left out a trained initial state (time_state, H x N x N per layer)."""
    cfg = RWKVConfig(vocab_size=97, n_layer=2, n_embd=128, head_size=32, **kw)
    assert cfg.num_parameters_estimate() == sum(p.numel() for p in RWKVForCausalLM(cfg).parameters())


def test_a_state_saved_to_a_folder_or_into_a_missing_one_is_an_oserror_naming_it(tmp_path):
    """safetensors' own error named a hidden temporary file; a folder as the target said
    'Is a directory: <temp> -> <path>'."""
    st = _random_model()(torch.tensor([[1, 2, 3]])).state
    with pytest.raises(FileNotFoundError) as e:
        st.save(tmp_path / "nodir" / "s.st")
    assert e.value.filename == str(tmp_path / "nodir") and ".tmp" not in str(e.value)
    with pytest.raises(IsADirectoryError) as e:
        st.save(tmp_path)
    assert e.value.filename == str(tmp_path) and ".tmp" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind
    st.save(tmp_path / "s.st")
    assert RWKVState.load(tmp_path / "s.st").wkv[0].shape == st.wkv[0].shape


def test_generate_refuses_a_mask_of_the_wrong_shape_whatever_its_values():
    """transformers drops an attention_mask of all ones before the forward's shape check: one
    built for another batch passed unnoticed (one holding a zero was refused)."""
    m = _random_model()
    ids = torch.tensor([[5, 17, 20, 3, 9]])
    for bad in (torch.ones(3, 9), torch.ones(1, 3), torch.ones(5)):
        with pytest.raises(ValueError, match=r"attention_mask has shape .*the input is \(1, 5\)"):
            m.generate(ids, attention_mask=bad, max_new_tokens=2)
    want = m.generate(ids, max_new_tokens=2)
    assert torch.equal(m.generate(ids, attention_mask=torch.ones(1, 5), max_new_tokens=2), want)
    st = m(ids[:, :3]).state  # with a state, a mask over the cached tokens too
    got = m.generate(ids[:, 3:], state=st, attention_mask=torch.ones(1, 5), max_new_tokens=2)
    assert torch.equal(got[:, -2:], want[:, -2:])


@pytest.mark.parametrize("version", ["x060", "x052"])
@pytest.mark.parametrize("where", ["left", "right", "middle", "everywhere"])
def test_padding_anywhere_equals_the_tokens_alone(version, where):
    """Pads leave the state as it was wherever they are: the tokens' logits and the whole state
    (token shifts included) are those of the row's tokens alone, from a given state too."""
    m = _random_model(version=version)
    toks = torch.randint(1, 97, (1, 6))
    keep = {"left": [0, 0, 0, 1, 1, 1, 1, 1, 1], "right": [1, 1, 1, 1, 1, 1, 0, 0, 0],
            "middle": [1, 1, 0, 0, 1, 1, 1, 1, 0], "everywhere": [0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1]}[where]
    mask = torch.tensor([keep])
    ids = torch.zeros(1, mask.shape[1], dtype=torch.long)
    ids[mask.bool()] = toks[0]
    ids[~mask.bool()] = torch.randint(1, 97, (int((~mask.bool()).sum()),))  # pads hold real-looking ids
    with torch.no_grad():
        st = m(torch.randint(1, 97, (1, 3))).state
        for state in (None, st):
            out = m(ids, attention_mask=mask, state=state)
            alone = m(toks, state=state)
            assert rel(out.logits[0, mask[0].bool()], alone.logits[0]) < 1e-5
            for part in ("att_shift", "wkv", "ffn_shift"):
                for x, y in zip(getattr(out.state, part), getattr(alone.state, part)):
                    assert rel(x, y) < 1e-5, part


def test_scan_order_must_be_a_permutation():
    m = _random_model()
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="permutation of 0..4"):
        m(ids, scan_order=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\] = \[2, 5\] integer tensor"):
        m(ids, scan_order=torch.arange(5))
    with pytest.raises(ValueError, match="integer tensor"):
        m(ids, scan_order=torch.arange(5.0).expand(2, 5))
    order = torch.stack([torch.arange(5).flip(0), torch.randperm(5)])
    assert torch.isfinite(m(ids, scan_order=order).logits).all()


def test_batched_generation_equals_single_rows():
    m = _random_model()
    prompts = [torch.randint(1, 97, (n,)) for n in (7, 3, 5)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
        for i, p in enumerate(prompts):
            single = m.generate(p.unsqueeze(0), max_new_tokens=6, eos_token_id=None)
            assert torch.equal(out[i, T:], single[0, len(p):])


def test_generate_matches_manual_greedy_and_prefix_reuse():
    m = _random_model()
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        gen = m.generate(ids, max_new_tokens=5, eos_token_id=None)
        seq = ids
        for _ in range(5):
            nxt = m(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        assert torch.equal(gen, seq)
        # prefix reuse: prefill once, continue two ways from clones
        pre = m(ids[:, :4]).state
        cont = m.generate(ids[:, 4:], state=pre.clone(), max_new_tokens=5, eos_token_id=None)
        assert torch.equal(cont[0, 2:], gen[0, 6:])
        other = m.generate(torch.tensor([[5, 6]]), state=pre.clone(), max_new_tokens=3, eos_token_id=None)
        assert other.shape == (1, 5)


def test_sampling_seed_reproducible():
    m = _random_model()
    ids = torch.randint(1, 97, (1, 4))
    a = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=7, eos_token_id=None)
    b = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=7, eos_token_id=None)
    assert torch.equal(a, b)
    # no top-k unless asked (RWKV's samplers and the CLI; transformers alone would apply top-k 50)
    off = m.generate(ids, max_new_tokens=8, do_sample=True, top_p=0.9, seed=7, eos_token_id=None, top_k=0)
    assert torch.equal(a, off)
    from transformers import GenerationConfig

    k1 = m.generate(ids, max_new_tokens=8, do_sample=True, seed=7, eos_token_id=None, top_k=1)
    gk1 = m.generate(ids, max_new_tokens=8, seed=7, eos_token_id=None,
                     generation_config=GenerationConfig(do_sample=True, top_k=1))
    assert torch.equal(k1, gk1)  # a top_k given in a generation_config is kept
    assert torch.equal(k1, m.generate(ids, max_new_tokens=8, eos_token_id=None))  # top-k 1 is greedy
    # do_sample and the sampling settings of a generation_config apply (do_sample was overridden to False)
    hot = dict(do_sample=True, temperature=3.0, top_k=5)
    kw = m.generate(ids, max_new_tokens=8, seed=3, eos_token_id=None, **hot)
    gc = m.generate(ids, max_new_tokens=8, seed=3, eos_token_id=None, generation_config=GenerationConfig(**hot))
    assert torch.equal(kw, gc) and not torch.equal(kw, m.generate(ids, max_new_tokens=8, eos_token_id=None))


def test_generate_defaults_raise_no_transformers_warnings(capfd):
    """Our defaults (pad id, cache, greedy, no top-k when sampling) are not flagged by transformers:
    no "flags are not valid: top_k" on greedy calls, no "generation_config together with
    generation-related arguments" when a config is given (they go into a copy of it)."""
    from transformers import GenerationConfig

    m = _random_model()
    ids = torch.randint(1, 97, (1, 4))
    user = GenerationConfig(max_new_tokens=3, do_sample=True, top_p=0.9)
    capfd.readouterr()
    outs = [m.generate(ids, max_new_tokens=3), m.generate(ids, max_new_tokens=3, do_sample=True, seed=1),
            m.generate(ids, generation_config=GenerationConfig(max_new_tokens=3)),
            m.generate(ids, generation_config=user, seed=1)]
    err = capfd.readouterr().err
    assert "not valid" not in err and "deprecated" not in err, err
    assert all(o.shape == (1, 7) for o in outs)
    assert user.top_k is None and user.pad_token_id is None  # the caller's config is not modified
    # sampling from a config without top_k: no top-k (same draw as top_k=0 given explicitly)
    same = m.generate(ids, max_new_tokens=3, do_sample=True, top_p=0.9, top_k=0, seed=1)
    assert torch.equal(outs[3], same)


def test_penalty_processor_changes_scores():
    from multimodal_rwkv.model.generation import RWKVPenaltyProcessor

    proc = RWKVPenaltyProcessor(presence=0.5, frequency=0.25, decay=1.0, prompt_len=1)
    ids = torch.tensor([[9, 3, 3, 5]])
    scores = torch.zeros(1, 10)
    out = proc(ids, scores)
    assert out[0, 3].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert out[0, 5].item() == pytest.approx(-(0.5 + 0.25))
    assert out[0, 9].item() == 0  # prompt tokens are not penalised


def test_penalties_follow_the_official_pipeline_on_spaces_and_digits():
    """rwkv.utils.PIPELINE.generate counts a token whose text is part of ' \\t0123456789' with
    weight 0 (presence penalty only); ours counted it 1, so a frequency penalty pushed spaces and
    digits down where the official sampler does not. Both samplers run here on the same logits."""
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.model.generation import RWKVPenaltyProcessor, uncounted_ids

    tok = WorldTokenizer()
    fixed = torch.full((65536,), -10.0)
    space, a, digit, word = tok.encode(" ")[0], tok.encode("a")[0], tok.encode("7")[0], tok.encode(" the")[0]
    fixed[[space, a, digit, word]] = torch.tensor([10.0, 9.5, 9.9, 9.0])
    assert {space, digit, tok.encode("01")[0]} <= set(uncounted_ids(tok, 65536)) and a not in uncounted_ids(tok, 65536)

    class Fixed:  # the official pipeline's model interface
        def forward(self, tokens, state):
            return fixed.clone(), state

    for presence, frequency in ((0.0, 1.0), (0.3, 0.6), (0.0, 0.05)):
        args = PIPELINE_ARGS(temperature=1.0, top_p=0.0, alpha_presence=presence, alpha_frequency=frequency,
                             alpha_decay=0.996, token_stop=[0])
        pipe = PIPELINE(Fixed(), "rwkv_vocab_v20230424")  # the official TRIE_TOKENIZER
        official = pipe.generate("x", token_count=12, args=args)
        proc = RWKVPenaltyProcessor(presence, frequency, 0.996, prompt_len=1, uncounted=uncounted_ids(tok, 65536))
        seq = torch.tensor([[1]])
        for _ in range(12):
            seq = torch.cat([seq, proc(seq, fixed[None].clone()).argmax(-1, keepdim=True)], 1)
        assert tok.decode(seq[0, 1:].tolist()) == official, (presence, frequency)


def test_generate_leaves_the_callers_processor_lists_alone():
    """generate appended its penalty processor and stop criterion to the caller's lists, so a
    later call with the same lists ran them again (wrong penalties, an early stop)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from multimodal_rwkv import WorldTokenizer

    m = _random_model(vocab_size=65536)
    tok = WorldTokenizer()
    procs, crit = LogitsProcessorList(), StoppingCriteriaList()
    ids = torch.tensor([tok.encode("ab")])
    m.generate(ids, max_new_tokens=3, presence_penalty=100.0, stop="x", tokenizer=tok,
               logits_processor=procs, stopping_criteria=crit)
    assert len(procs) == 0 and len(crit) == 0
    again = m.generate(ids, max_new_tokens=4, logits_processor=procs, stopping_criteria=crit, eos_token_id=None)
    assert torch.equal(again, m.generate(ids, max_new_tokens=4, eos_token_id=None))


def test_generate_transformers_names_for_stops_and_the_cache():
    from multimodal_rwkv import WorldTokenizer

    m = _random_model(vocab_size=65536)
    tok = WorldTokenizer()
    ids = torch.tensor([tok.encode("Hello there")])
    free = m.generate(ids, max_new_tokens=8, eos_token_id=None)
    new_text = tok.decode(free[0, ids.shape[1]:].tolist())
    stop = new_text[len(new_text) // 2:][:2] or new_text  # text the free run produces, so it stops there
    a = m.generate(ids, max_new_tokens=8, eos_token_id=None, stop=stop, tokenizer=tok)
    b = m.generate(ids, max_new_tokens=8, eos_token_id=None, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(a, b) and a.shape[1] < free.shape[1]
    # past_key_values= / cache= (transformers' names) continue from the state like state=
    st = m(ids[:, :-1]).state
    for name in ("state", "past_key_values", "cache"):
        cont = m.generate(ids[:, -1:], max_new_tokens=5, eos_token_id=None, **{name: st.clone()})
        assert torch.equal(cont[0, 1:], free[0, ids.shape[1]:ids.shape[1] + 5]), name
    # inputs_embeds with penalties and stops (no prompt ids)
    emb = m.rwkv.emb(ids)
    out = m.generate(inputs_embeds=emb, max_new_tokens=4, presence_penalty=0.5, stop="\n\n", tokenizer=tok,
                     eos_token_id=None)
    assert out.shape == (1, 4)


def test_a_row_of_a_batch_that_meets_its_stop_string_is_finished_and_padded():
    """Without an EOS id, a row that met its stop string kept generating until every row had met
    one: its output held the text past the stop (alone, it stopped there)."""
    from multimodal_rwkv import WorldTokenizer

    m = _random_model(vocab_size=65536)
    tok = WorldTokenizer()
    a, b = tok.encode("The quick brown fox"), tok.encode("Hello world again!")
    ids = torch.tensor([a, b[:len(a)]])
    T = ids.shape[1]
    free = m.generate(ids, max_new_tokens=10, eos_token_id=None)
    text0 = tok.decode(free[0, T:T + 2].tolist())
    text1 = tok.decode(free[1, T:].tolist())
    # text row 0 writes by its second token, and row 1 never
    stop = next(text0[i:j] for j in range(len(text0), 0, -1) for i in range(j) if text0[i:j] not in text1)
    alone = m.generate(ids[:1], max_new_tokens=10, eos_token_id=None, stop=stop, tokenizer=tok)
    batch = m.generate(ids, max_new_tokens=10, eos_token_id=None, stop=stop, tokenizer=tok)
    n = alone.shape[1] - T
    assert n <= 2 and torch.equal(batch[0, :T + n], alone[0])
    assert (batch[0, T + n:] == m.config.pad_token_id).all() and batch.shape[1] == T + 10
    assert torch.equal(batch[1], free[1])  # the other row as without a stop
    # a model without pad and EOS ids: the stop works, the batch's rows go on (no id to pad with;
    # it was transformers' TypeError on None * tensor)
    m.config.pad_token_id = m.config.eos_token_id = None
    m.generation_config.pad_token_id = m.generation_config.eos_token_id = None
    one = m.generate(ids[:1], max_new_tokens=10, stop=stop, tokenizer=tok)
    assert torch.equal(one, alone)
    assert torch.equal(m.generate(ids, max_new_tokens=10, stop=stop, tokenizer=tok), free)


def test_a_weight_beyond_fp16s_range_is_refused_when_loading_as_fp16(tmp_path):
    """A finite 1e5 became inf in fp16: the model's logits were NaN, and mmrwkv convert --dtype fp16
    wrote a folder its own loader then called corrupt."""
    from multimodal_rwkv.errors import CheckpointError
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    f = make_blink_checkpoint(tmp_path / "w.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=256)
    sd = torch.load(f, weights_only=True)
    sd["blocks.1.ffn.value.weight"][0, 0] = 1e5
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.value\.weight holds 1e\+05, beyond fp16's range"):
        RWKVForCausalLM.from_pretrained(f, dtype="fp16")
    m = RWKVForCausalLM.from_pretrained(f, dtype="bf16")  # bf16 has fp32's range
    assert torch.isfinite(m(torch.tensor([[1, 2]])).logits.float()).all()


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_fp16_rescales_the_residual_stream_as_the_official_package(tmp_path, version):
    """A deep model's residual stream outgrew fp16 (65504): the logits were NaN. As the official
    package's fp16 strategies (RESCALE_LAYER 6), it is halved every 6 blocks: finite, close to
    fp32 and to the official fp16; the recurrent form agrees and hidden states keep their scale."""
    L = 12
    sd = blink_state_dict(version=version, n_layer=L, n_embd=64, head_size=32, vocab_size=128, seed=1)
    for i in range(L):  # one large channel mix in every layer: the stream grows past 1e5 with depth
        for k in ("value", "key", "receptance"):
            sd[f"blocks.{i}.ffn.{k}.weight"] = sd[f"blocks.0.ffn.{k}.weight"] * (70.0 if k == "value" else 1.0)
    pth = tmp_path / "big.pth"
    torch.save(sd, pth)
    toks = list(range(1, 17))
    ids = torch.tensor([toks])
    ref = RWKVForCausalLM.from_pretrained(pth, dtype="fp32")
    half = RWKVForCausalLM.from_pretrained(pth, dtype="fp16")
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        h = half(ids, output_hidden_states=True)
        assert max(float(x.abs().max()) for x in r.hidden_states) > 65504  # the case needs the rescaling
        assert torch.isfinite(h.logits).all()
        assert (h.logits.float() - r.logits).abs().max() < 0.1
        for a, b in zip(h.hidden_states[:-1], r.hidden_states[:-1]):  # (inf where fp16 cannot hold them)
            ok = torch.isfinite(a)
            assert ok.float().mean() > 0.9 and rel(a.float()[ok], b[ok]) < 0.01
        st, steps = None, []
        for t in toks:  # token by token (the decode path)
            o = half(torch.tensor([[t]]), state=st)
            st = o.state
            steps.append(o.logits[0, -1].float())
        assert (torch.stack(steps) - h.logits[0].float()).abs().max() < 0.05
    off = official_forward(pth, toks, "cpu fp16")["logits"].float()
    assert (h.logits[0].float() - off).abs().max() < 0.05


def test_fp16_keeps_the_wkv_output_and_its_norm_in_fp32(tmp_path):
    """The WKV output was cast to fp16 before its GroupNorm: past 65504 it became inf, the logits
    NaN, where the official fp16 (which norms in fp32) stays within 0.01 of fp32."""
    sd = blink_state_dict(version="x060", n_layer=2, n_embd=64, head_size=32, vocab_size=128, seed=2)
    for i in range(2):
        for k in ("key", "value"):
            sd[f"blocks.{i}.att.{k}.weight"] = sd[f"blocks.{i}.att.{k}.weight"] * 20
    pth = tmp_path / "bigwkv.pth"
    torch.save(sd, pth)
    toks = list(range(1, 17))
    with torch.no_grad():
        ref = RWKVForCausalLM.from_pretrained(pth, dtype="fp32")(torch.tensor([toks])).logits[0]
        half = RWKVForCausalLM.from_pretrained(pth, dtype="fp16")(torch.tensor([toks])).logits[0].float()
    assert torch.isfinite(half).all() and (half - ref).abs().max() < 0.05
    off = official_forward(pth, toks, "cpu fp16")["logits"].float()
    assert (half - off).abs().max() < 0.05


def test_generate_text_cuts_at_transformers_stop_strings_too():
    """stop_strings (argument or generation config) stopped the generation but stayed in the text
    with the rest of their token; stop= was cut."""
    from transformers import GenerationConfig

    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.model.generation import generate_text

    m = _random_model(vocab_size=65536)
    tok = WorldTokenizer()
    free = generate_text(m, tok, "Hello there", max_new_tokens=10, eos_token_id=None)
    stop = free[len(free) // 2:][:2] or free
    want = free[:free.index(stop)]
    assert generate_text(m, tok, "Hello there", max_new_tokens=10, eos_token_id=None, stop=stop) == want
    assert generate_text(m, tok, "Hello there", max_new_tokens=10, eos_token_id=None, stop_strings=[stop]) == want
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, stop_strings=stop)
    assert generate_text(m, tok, "Hello there", eos_token_id=None, generation_config=gc) == want
    m.generation_config.stop_strings = [stop]
    assert generate_text(m, tok, "Hello there", max_new_tokens=10, eos_token_id=None) == want


def test_a_tokenizers_added_tokens_can_be_generated():
    """transformers' vocab_size leaves out added tokens: an added end-of-text token just past it was
    banned, even when a processor made it the only choice."""
    from transformers import LogitsProcessor

    class HFLike:  # as a PreTrainedTokenizer with 250 base ids and one added token (id 250)
        vocab_size = 250

        def __len__(self):
            return 251

        def encode(self, s):
            return [1, 2]

        def decode(self, ids, **kw):
            return " ".join(map(str, ids))

    class Boost(LogitsProcessor):
        def __call__(self, ids, scores):
            scores = scores.clone()
            scores[:, 250] += 100
            return scores

    m = _random_model(vocab_size=256)
    out = m.generate(torch.tensor([[1, 2]]), max_new_tokens=2, tokenizer=HFLike(), eos_token_id=250,
                     logits_processor=[Boost()])
    assert out[0, 2:].tolist() == [250]
    out = m.generate(torch.tensor([[1, 2]]), max_new_tokens=3, tokenizer=HFLike(), eos_token_id=None,
                     logits_processor=[Boost()], bad_words_ids=[[250]])
    assert all(i < 250 for i in out[0, 2:].tolist())  # ids 251-255 still never generated


def test_forward_refuses_unknown_keywords_and_returns_hidden_states():
    m = _random_model()
    ids = torch.randint(0, 97, (2, 9))
    with pytest.raises(TypeError, match="attention_mak"):
        m(ids, attention_mak=torch.ones_like(ids))
    with pytest.raises(TypeError, match="logits_to_keep"):
        m(ids, num_logits_to_keep=1)
    with pytest.raises(ValueError, match="no attention weights"):
        m(ids, output_attentions=True)
    with torch.no_grad():
        out = m(ids, output_hidden_states=True, logits_to_keep=1)
        hs = out.hidden_states
        assert len(hs) == m.config.n_layer + 1 and all(h.shape == (2, 9, 64) for h in hs)
        assert torch.equal(hs[0], m.rwkv.emb(ids))
        x = hs[0]  # each entry is the previous one through one block
        for i, block in enumerate(m.rwkv.blocks[:-1]):
            z = torch.zeros(2, 64)
            x, *_ = block(x, z, None, z)
            torch.testing.assert_close(x, hs[i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.head(hs[-1][:, -1:]), out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, m(ids, logits_to_keep=1).logits, rtol=1e-5, atol=1e-5)
        assert m(ids).hidden_states is None
    g = m.generate(ids[:1], max_new_tokens=3, eos_token_id=None, output_hidden_states=True,
                   return_dict_in_generate=True)
    assert len(g.hidden_states) == 3 and g.hidden_states[0][0].shape == (1, 9, 64)
    with pytest.raises(ValueError, match="no attention weights"):
        m.generate(ids[:1], max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_with_fp32_state(tiny_pth, dtype):
    p = tiny_pth(version="x060")
    m32 = RWKVForCausalLM.from_pretrained(p)
    m = RWKVForCausalLM.from_pretrained(p, dtype=dtype)
    ids = torch.tensor([TOKS])
    out = m(ids)
    ref = m32(ids)
    assert out.logits.dtype == dtype and out.state.wkv[0].dtype == torch.float32
    assert rel(out.logits.float(), ref.logits) < 0.05


def test_save_load_roundtrip_bit_exact(tiny_pth, tmp_path):
    m = RWKVForCausalLM.from_pretrained(tiny_pth(version="x060", time_state=True))
    m.save_pretrained(tmp_path / "saved")
    m2 = RWKVForCausalLM.from_pretrained(tmp_path / "saved")
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    ids = torch.tensor([TOKS])
    assert torch.equal(m(ids).logits, m2(ids).logits)
    from transformers import AutoModelForCausalLM

    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(m3, RWKVForCausalLM)
    # in a fresh interpreter: AutoConfig once RWKVConfig is imported, AutoModelForCausalLM once RWKVForCausalLM is
    code = ("import sys; from transformers import AutoConfig, AutoModelForCausalLM; "
            "from multimodal_rwkv import RWKVConfig; print(type(AutoConfig.from_pretrained(sys.argv[1])).__name__); "
            "from multimodal_rwkv import RWKVForCausalLM; "
            "print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved")], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["RWKVConfig", "RWKVForCausalLM"], out.stderr[-2000:]


def test_hf_layout_folder_loads(tmp_path):
    from safetensors.torch import save_file

    sd = blink_state_dict(n_layer=2, n_embd=128, vocab_size=256, seed=5)
    torch.save(sd, tmp_path / "m.pth")
    hf = {}
    for k, v in sd.items():
        k2 = k.replace("emb.", "embeddings.").replace("blocks.0.ln0", "blocks.0.pre_ln")
        k2 = k2.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        hf[k2 if k == "head.weight" else "rwkv." + k2] = v.contiguous()
    d = tmp_path / "hf"
    d.mkdir()
    save_file(hf, str(d / "model.safetensors"))
    (d / "config.json").write_text('{"model_type": "rwkv6", "hidden_size": 128}')
    a = RWKVForCausalLM.from_pretrained(tmp_path / "m.pth")
    b = RWKVForCausalLM.from_pretrained(d)
    ids = torch.tensor([TOKS])
    assert torch.equal(a(ids).logits, b(ids).logits)
    # its config.json is read: sizes that disagree with the tensors are refused, eps is taken
    for cfg, why in (('{"model_type": "rwkv6", "num_hidden_layers": 24}', "num_hidden_layers is 24, but the "
                      "weights have n_layer 2"), ('{"model_type": "rwkv5"}', "model_type 'rwkv5', but the weights "
                      "are RWKV-6"), ('{"model_type": "rwkv6", "vocab_size": 65536}', "vocab_size is 65536")):
        (d / "config.json").write_text(cfg)
        with pytest.raises(CheckpointError, match=re.escape(f"{d / 'config.json'}: {why}")):
            RWKVForCausalLM.from_pretrained(d)
    (d / "config.json").write_text('{"model_type": "rwkv6", "layer_norm_epsilon": 0.001}')
    assert RWKVForCausalLM.from_pretrained(d).config.layer_norm_eps == 0.001
    # one weight under its HF name and ours: which is meant?
    save_file({**hf, "rwkv.blocks.1.att.key.weight": torch.zeros_like(hf["rwkv.blocks.1.attention.key.weight"])},
              str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="are the same weight under two names"):
        RWKVForCausalLM.from_pretrained(d)
    # float8 storage loads as bf16 (a model cannot compute in float8)
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in hf.items()}, str(d / "model.safetensors"))
    m8 = RWKVForCausalLM.from_pretrained(d)
    assert m8.dtype == torch.bfloat16 and torch.isfinite(m8(ids).logits.float()).all()


def test_transformers_size_names_as_overrides_are_config_errors(tmp_path):
    """AutoConfig / from_pretrained(dir, num_hidden_layers=2) was an AttributeError (no setter)."""
    from transformers import AutoConfig

    m = _random_model()
    m.save_pretrained(tmp_path / "m")
    for key, ours in (("num_hidden_layers", "n_layer"), ("hidden_size", "n_embd")):
        with pytest.raises(ConfigError, match=f"no key '{key}': use {ours}"):
            AutoConfig.from_pretrained(tmp_path / "m", **{key: 2})
        with pytest.raises(ConfigError, match=f"no key '{key}': use {ours}"):
            RWKVConfig.from_pretrained(tmp_path / "m", **{key: 2})
    for bad in (-5, True, "-1GB", float("nan")):
        with pytest.raises(ValueError, match="max_shard_size must be a size in bytes"):
            m.save_pretrained(tmp_path / "s", max_shard_size=bad)


def test_shapes_inferred_not_hardcoded(tiny_pth):
    m = RWKVForCausalLM.from_pretrained(tiny_pth(d_mix_lora=64, d_decay_lora=128, n_layer=3, dim_ffn=320))
    c = m.config
    assert (c.d_mix_lora, c.d_decay_lora, c.n_layer, c.dim_ffn, c.n_head) == (64, 128, 3, 320, 2)


# ---- error paths ----------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_errors(tmp_path, tiny_pth):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pth.*not a PyTorch checkpoint"):
        RWKVForCausalLM.from_pretrained(junk)

    good = tiny_pth()
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth.*(truncated|corrupt)"):
        RWKVForCausalLM.from_pretrained(trunc)

    evil = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2), "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth.*pickled code"):
        RWKVForCausalLM.from_pretrained(evil)

    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth.*empty"):
        RWKVForCausalLM.from_pretrained(empty)

    with pytest.raises(CheckpointError, match="nope.pth.*no such"):
        RWKVForCausalLM.from_pretrained(tmp_path / "nope.pth")


def test_unsupported_versions(tmp_path):
    v4 = {"emb.weight": torch.zeros(4, 8), "blocks.0.att.time_mix_k": torch.zeros(1, 1, 8),
          "blocks.0.att.time_first": torch.zeros(8), "blocks.0.att.key.weight": torch.zeros(8, 8)}
    torch.save(v4, tmp_path / "v4.pth")
    with pytest.raises(CheckpointError, match="v4.pth.*RWKV-4"):
        RWKVForCausalLM.from_pretrained(tmp_path / "v4.pth")
    v7 = {"emb.weight": torch.zeros(4, 8), "blocks.0.att.w0": torch.zeros(1, 1, 8),
          "blocks.0.att.a0": torch.zeros(1, 1, 8), "blocks.0.att.k_k": torch.zeros(1, 1, 8)}
    torch.save(v7, tmp_path / "v7.pth")
    with pytest.raises(CheckpointError, match="v7.pth.*RWKV-7"):
        RWKVForCausalLM.from_pretrained(tmp_path / "v7.pth")


def test_missing_unexpected_misshaped_keys_listed(tmp_path):
    sd = blink_state_dict(n_layer=2, n_embd=128, vocab_size=256)
    bad = dict(sd)
    del bad["blocks.1.ffn.key.weight"]
    bad["blocks.1.att.surprise"] = torch.zeros(3)
    bad["blocks.1.att.gate.weight"] = torch.zeros(128, 64)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        RWKVForCausalLM.from_pretrained(tmp_path / "bad.pth")
    msg = str(e.value)  # the names as the file spells them
    assert "bad.pth" in msg and "missing keys: blocks.1.ffn.key.weight" in msg
    assert "unexpected keys: blocks.1.att.surprise" in msg
    assert "mis-shaped keys: blocks.1.att.gate.weight" in msg
    assert "rwkv." not in msg
    # mmrwkv info refuses what loading refuses
    with pytest.raises(CheckpointError, match="missing keys: blocks.1.ffn.key.weight"):
        load_raw(tmp_path / "bad.pth", check=True)
    # a Hugging Face-layout folder: its own names, also for a key it lacks
    from safetensors.torch import save_file

    hf_names = {"emb.weight": "rwkv.embeddings.weight", "head.weight": "head.weight"}
    hf = {hf_names.get(k) or "rwkv." + k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
          .replace("blocks.0.ln0.", "blocks.0.pre_ln."): v.contiguous() for k, v in sd.items()}
    del hf["rwkv.blocks.1.attention.key.weight"]
    hf["rwkv.blocks.0.attention.time_mix_gate"] = torch.zeros(3)
    (tmp_path / "hf").mkdir()
    save_file(hf, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "rwkv6"}')
    with pytest.raises(CheckpointError) as e:
        RWKVForCausalLM.from_pretrained(tmp_path / "hf")
    msg = str(e.value)
    assert "missing keys: rwkv.blocks.1.attention.key.weight" in msg
    assert "unexpected keys: rwkv.blocks.0.attention.time_mix_gate" in msg


def test_the_odd_layer_out_is_named_and_odd_sizes_and_configs_are_checkpoint_errors(tmp_path):
    """Sizes were read from layer 0 alone: a file whose layer 0 differed was refused naming the
    other layers' keys, never the bad one. An embedding of 0 rows was a ConfigError without the
    file's name; a config.json that is not UTF-8 a UnicodeDecodeError traceback."""
    from multimodal_rwkv.model.random_checkpoint import blink_state_dict

    sd = blink_state_dict(n_layer=3, n_embd=64, head_size=32, vocab_size=100)
    cases = {"blocks.0.ffn.key.weight": (200, 64), "blocks.0.att.time_maa_w2": (5, 8, 64),
             "blocks.0.att.time_decay_w1": (64, 8), "blocks.0.att.key.weight": (96, 64)}
    for key, shape in cases.items():
        bad = dict(sd)
        bad[key] = torch.zeros(shape)
        torch.save(bad, tmp_path / "odd.pth")
        with pytest.raises(CheckpointError) as e:
            RWKVForCausalLM.from_pretrained(tmp_path / "odd.pth")
        assert f"mis-shaped keys: {key} {shape}!=" in str(e.value) and "blocks.1." not in str(e.value), str(e.value)
    torch.save({**sd, "emb.weight": torch.zeros(100, 128)}, tmp_path / "odd.pth")  # the odd one: the embedding
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: emb\.weight \(100, 128\)!=\(100, 64\)$"):
        RWKVForCausalLM.from_pretrained(tmp_path / "odd.pth")
    tuned = blink_state_dict(n_layer=3, n_embd=64, head_size=32, vocab_size=100, time_state=True)
    del tuned["blocks.0.att.time_state"]  # layer 0's state missing: that one named
    torch.save(tuned, tmp_path / "tuned.pth")
    with pytest.raises(CheckpointError, match="missing keys: blocks.0.att.time_state$"):
        RWKVForCausalLM.from_pretrained(tmp_path / "tuned.pth")
    v5 = blink_state_dict(n_layer=3, n_embd=64, head_size=32, vocab_size=100, version="x052")
    v5["blocks.0.att.time_decay"] = torch.zeros(64)  # not "an RWKV-5.0/5.1 checkpoint"
    torch.save(v5, tmp_path / "v5.pth")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: blocks\.0\.att\.time_decay \(64,\)!=\(2, 32\)$"):
        RWKVForCausalLM.from_pretrained(tmp_path / "v5.pth")
    two = blink_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=100)
    two["blocks.0.ffn.key.weight"] = torch.zeros(200, 64)  # one layer of two: its value product breaks the tie
    torch.save(two, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match=r"two.pth: mis-shaped keys: blocks\.0\.ffn\.key\.weight \(200, 64\)!=\(224, 64\)$"):
        RWKVForCausalLM.from_pretrained(tmp_path / "two.pth")
    empty = dict(sd)
    empty["emb.weight"], empty["head.weight"] = torch.zeros(0, 64), torch.zeros(0, 64)
    torch.save(empty, tmp_path / "v0.pth")
    with pytest.raises(CheckpointError, match="v0.pth: .*vocab_size must be positive"):
        RWKVForCausalLM.from_pretrained(tmp_path / "v0.pth")
    torch.save(sd, tmp_path / "ok.pth")
    RWKVForCausalLM.from_pretrained(tmp_path / "ok.pth").save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(CheckpointError, match="config.json: unreadable config .*utf-8"):
        RWKVForCausalLM.from_pretrained(tmp_path / "ours")


def test_bad_folder_configs_and_truncated_legacy_files(tmp_path):
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    src = make_blink_checkpoint(tmp_path / "m.pth", n_layer=1, n_embd=64, vocab_size=64)
    m = RWKVForCausalLM.from_pretrained(src)
    m.save_pretrained(tmp_path / "ours")
    cfg = tmp_path / "ours" / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: not a JSON object"):
        RWKVForCausalLM.from_pretrained(tmp_path / "ours")
    cfg.write_text(json.dumps({**good, "version": "x070"}))
    with pytest.raises(CheckpointError, match="config.json: invalid config .*x070"):
        RWKVForCausalLM.from_pretrained(tmp_path / "ours")
    # RWKV-4 in Hugging Face naming is named as such
    (tmp_path / "hf4").mkdir()
    from safetensors.torch import save_file

    save_file({"rwkv.embeddings.weight": torch.zeros(4, 8), "rwkv.blocks.0.attention.time_mix_key": torch.zeros(1, 1, 8),
               "rwkv.blocks.0.attention.time_first": torch.zeros(8)}, str(tmp_path / "hf4" / "model.safetensors"))
    (tmp_path / "hf4" / "config.json").write_text('{"model_type": "rwkv"}')
    with pytest.raises(CheckpointError, match="RWKV-4"):
        RWKVForCausalLM.from_pretrained(tmp_path / "hf4")
    # a legacy (non-zip) file cut short: "truncated", whatever torch's message (even an empty EOFError)
    sd = {k: v for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pth").read_bytes()
    for cut in (100, 3000, len(data) // 2):
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.pth: truncated or corrupt"):
            RWKVForCausalLM.from_pretrained(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        RWKVForCausalLM.from_pretrained(src, dtype=torch.int8)


def test_blink_export_roundtrip(tiny_pth, tmp_path):
    from multimodal_rwkv.model.checkpoint import save_blink_pth

    m = RWKVForCausalLM.from_pretrained(tiny_pth(version="x052"))
    save_blink_pth(m, tmp_path / "out.pth")
    sd = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(sd) == set(ours_to_blink(m.state_dict()))
    m2 = RWKVForCausalLM.from_pretrained(tmp_path / "out.pth")
    assert torch.equal(m(torch.tensor([TOKS])).logits, m2(torch.tensor([TOKS])).logits)


def test_fresh_model_init_is_finite_and_trains():
    cfg = RWKVConfig(vocab_size=50, n_layer=2, n_embd=64, head_size=16)
    m = RWKVForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 16))
    out = m(ids, labels=ids)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    out.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_config_rejects_bad_values():
    from multimodal_rwkv import ConfigError

    with pytest.raises(ConfigError, match="version"):
        RWKVConfig(version="x070")
    with pytest.raises(ConfigError, match="head_size"):
        RWKVConfig(n_embd=100, head_size=64)


def test_config_refuses_misnamed_sizes_and_tied_head(tmp_path):
    from transformers import AutoConfig

    from multimodal_rwkv import ConfigError

    with pytest.raises(ConfigError, match="'n_layers': use n_layer"):
        RWKVConfig(n_layers=2)
    with pytest.raises(ConfigError, match="'hidden_size': use n_embd"):
        RWKVConfig(hidden_size=128)
    with pytest.raises(ConfigError, match="did you mean 'n_embd'"):
        RWKVConfig(n_embed=128)
    with pytest.raises(ConfigError, match="tie_word_embeddings=True is not supported"):
        RWKVConfig(tie_word_embeddings=True)
    # transformers' own settings and other tools' keys are kept, as PretrainedConfig keeps them
    c = RWKVConfig(n_layer=2, n_embd=64, head_size=32, num_labels=3, my_tool_note="x")
    assert c.n_layer == 2 and c.my_tool_note == "x"
    c.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).n_embd == 64
    # a config.json with a misnamed size is named in the loading error
    m = _random_model()
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg.pop("n_layer")
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: invalid config .*num_hidden_layers"):
        RWKVForCausalLM.from_pretrained(tmp_path / "m")


def test_stop_strings_and_transformers_streamer(tmp_path, capsys):
    from transformers import TextStreamer

    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.model.generation import generate_text

    tok = WorldTokenizer()
    torch.manual_seed(1)
    m = RWKVForCausalLM(RWKVConfig(vocab_size=65536, n_layer=1, n_embd=32, head_size=16)).eval()
    nl = tok.encode("\n\n")[0]
    with torch.no_grad():  # make "\n\n" the most likely next token after a few steps
        m.head.weight.zero_()
        m.head.weight[nl] = 1.0
        m.rwkv.ln_out.bias.fill_(1.0)
        m.rwkv.ln_out.weight.zero_()
    ids = torch.tensor([tok.encode("Hello")])
    out = m.generate(ids, max_new_tokens=10, stop="\n\n", tokenizer=tok)
    assert out.shape[1] == ids.shape[1] + 1 and out[0, -1].item() == nl  # stopped right after the stop string
    assert generate_text(m, tok, "Hello", max_new_tokens=10, stop="\n\n") == ""
    streamer = TextStreamer(tok, skip_prompt=True)
    m.generate(ids, max_new_tokens=3, streamer=streamer, eos_token_id=None)
    assert capsys.readouterr().out.count("\n") >= 3


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 64), (2, 8, 64), (17, 64), (4, 5, 64), (0, 64)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("out_features", [96, 4096])
def test_linear_few_row_split_equals_f_linear(shape, threads, out_features):
    """The decode-time path (rows cut into one block per thread, one bmm) against F.linear,
    forward and backward, for row counts on both sides of the threshold and thread counts that
    do and do not divide the output size (4096 outputs: 4 row blocks of 1024 for 2+ rows)."""
    import torch.nn.functional as F

    from multimodal_rwkv.model.modeling import Linear

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        lin = Linear(64, out_features, bias=False)
        x = torch.randn(*shape, requires_grad=True)
        y = lin(x)
        x2 = x.detach().clone().requires_grad_()
        w2 = lin.weight.detach().clone().requires_grad_()
        y2 = F.linear(x2, w2)
        assert y.shape == y2.shape == (*shape[:-1], out_features)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y2)
        (y * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.weight.grad, w2.grad, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_bad_inputs_are_clear_value_errors():
    torch.manual_seed(0)
    m = RWKVForCausalLM(RWKVConfig(vocab_size=50, n_layer=1, n_embd=32, head_size=16))
    ok = torch.tensor([[1, 2, 3]])
    for ids, msg in ((torch.tensor([[1, 50]]), "id 50, outside the model's vocabulary [0, 50)"),
                     (torch.tensor([[-1, 2]]), "id -1, outside"),
                     (torch.tensor([[1.0, 2.0]]), "must hold integer ids"),
                     (torch.zeros(1, 0, dtype=torch.long), "T >= 1, got (1, 0)"),
                     (torch.tensor([1, 2]), "[B, T] tensor with T >= 1, got (2,)")):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            m(ids)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        m(inputs_embeds=torch.zeros(1, 0, 32))
    with pytest.raises(ValueError, match=rf"inputs_embeds must be \[B, T, C={m.config.n_embd}\].*got shape \(1, 3, 10\)"):
        m(inputs_embeds=torch.zeros(1, 3, 10))  # (it was LayerNorm's 'Given normalized_shape')
    with pytest.raises(ValueError, match=r"labels must have the input's shape \(1, 3\), got \(1, 2\)"):
        m(ok, labels=ok[:, :2])
    with pytest.raises(ValueError, match="T >= 1"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    assert m(ok.int()).logits.shape == (1, 3, 50)  # int32 ids are fine


def test_stop_aware_streamer_refuses_a_batch():
    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.model.generation import StopAwareStreamer

    m = _random_model()
    with pytest.raises(ValueError, match="streams one row"):
        m.generate(torch.randint(1, 97, (2, 3)), max_new_tokens=2, streamer=StopAwareStreamer(WorldTokenizer()))


def test_a_hugging_face_layout_rwkv5_folder_loads(tmp_path):
    """transformers' RWKV-5 names (rwkv.blocks.N.attention.time_mix_key, feed_forward, embeddings,
    pre_ln) load as the same model as the BlinkDL file."""
    from safetensors.torch import save_file

    sd = blink_state_dict(version="x052", n_layer=2, n_embd=64, head_size=32, vocab_size=97)
    torch.save(sd, tmp_path / "b.pth")
    long = {"k": "key", "v": "value", "r": "receptance", "g": "gate"}

    def hf_name(k):
        if k == "head.weight":
            return k
        k = k.replace("emb.", "embeddings.", 1) if k.startswith("emb.") else k.replace("blocks.0.ln0.", "blocks.0.pre_ln.")
        k = k.replace(".att.", ".attention.").replace(".ffn.", ".feed_forward.")
        for s, l in long.items():
            if k.endswith(".time_mix_" + s):
                k = k[: -len(s)] + l
        return "rwkv." + k

    (tmp_path / "hf5").mkdir()
    save_file({hf_name(k): v.contiguous() for k, v in sd.items()}, str(tmp_path / "hf5" / "model.safetensors"))
    (tmp_path / "hf5" / "config.json").write_text('{"model_type": "rwkv5"}')
    a = RWKVForCausalLM.from_pretrained(tmp_path / "b.pth")
    b = RWKVForCausalLM.from_pretrained(tmp_path / "hf5")
    assert b.config.version == "x052"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_beam_search_is_exact_and_a_state_follows_beams_and_returned_sequences(tmp_path):
    """Beam search reorders the RNN state by beam (here with as many beams as tokens, so the best
    two-token continuation it returns is the exhaustive search's); a prefix state is repeated for
    num_return_sequences / num_beams as transformers repeats the rows."""
    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=50)
    torch.save(sd, tmp_path / "m.pth")
    m = RWKVForCausalLM.from_pretrained(tmp_path / "m.pth")
    ids = torch.tensor([[3, 7, 11]])
    out = m.generate(ids, max_new_tokens=2, num_beams=50, bad_words_ids=[[0]], length_penalty=0.0)
    with torch.no_grad():
        cand = torch.tensor([[a, b] for a in range(1, 50) for b in range(1, 50)])
        lp = m(torch.cat([ids.expand(len(cand), -1), cand], 1)).logits.log_softmax(-1)
        score = lp[:, 2].gather(1, cand[:, :1]).squeeze(1) + lp[:, 3].gather(1, cand[:, 1:]).squeeze(1)
    assert out[0, 3:].tolist() == cand[score.argmax()].tolist()
    st = m(ids).state
    two = m.generate(torch.tensor([[5]]), state=st, max_new_tokens=3, num_return_sequences=2, do_sample=True, seed=1)
    assert two.shape == (2, 4)
    kw = dict(max_new_tokens=3, num_beams=3, bad_words_ids=[[0]], length_penalty=0.0)  # scores: log-probs alone
    full = m.generate(torch.tensor([[3, 7, 11, 5]]), **kw)
    cont = m.generate(torch.tensor([[5]]), state=st, **kw)
    assert cont[0, 1:].tolist() == full[0, 4:].tolist()  # beams from a prefix state == from the whole prompt


def test_generate_input_checks():
    m = _random_model()
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, T\] tensor"):
        m.generate(torch.tensor([1, 2, 3]), max_new_tokens=2)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="pad on the left"):
        m.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] of the batch hold no token"):
        m.generate(ids, attention_mask=torch.tensor([[0, 1, 1], [0, 0, 0]]), max_new_tokens=2)


def test_past_key_values_is_the_state():
    m = _random_model()
    ids = torch.randint(0, 97, (1, 4))
    st = m(ids[:, :2]).state
    want = m(ids[:, 2:], state=st).logits
    assert torch.equal(m(ids[:, 2:], past_key_values=st).logits, want)
    with pytest.raises(ValueError, match="past_key_values"):
        m(ids, past_key_values=(torch.zeros(1),))


def test_sharded_safetensors_folder_loads_each_key_from_its_shard(tmp_path):
    from safetensors.torch import save_file

    m = _random_model()
    m.save_pretrained(tmp_path / "one")
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    keys = sorted(sd)

    def sharded(name, parts, wmap=None, index_text=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
        for shard, ks in parts.items():
            save_file({k: sd[k] if not k.startswith("!") else torch.zeros_like(sd[k[1:]]) for k in ks},
                      str(d / shard))
        if index_text is None:
            wmap = wmap if wmap is not None else {k.lstrip("!"): s for s, ks in parts.items() for k in ks}
            index_text = json.dumps({"metadata": {}, "weight_map": wmap})
        (d / "model.safetensors.index.json").write_text(index_text)
        return d

    a, b = keys[:20], keys[20:]
    good = sharded("good", {"s1.safetensors": a, "s2.safetensors": b})
    loaded = RWKVForCausalLM.from_pretrained(good)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in keys)
    # the same as pytorch_model-*.bin shards with pytorch_model.bin.index.json (how large HF checkpoints come)
    d = tmp_path / "bins"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    for i, ks in enumerate((a, b)):
        torch.save({k: sd[k] for k in ks}, d / f"pytorch_model-0000{i + 1}-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 + (k in b)}-of-00002.bin" for k in keys}}))
    loaded = RWKVForCausalLM.from_pretrained(d)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in keys)
    # a hub cache snapshot: every file is a link into ../../blobs (where the link points does not matter)
    snap = tmp_path / "hub" / "snapshots" / "rev"
    (tmp_path / "hub" / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in good.iterdir():
        blob = tmp_path / "hub" / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    loaded = RWKVForCausalLM.from_pretrained(snap)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in keys)
    wm = {k: "s1.safetensors" for k in a} | {k: "s2.safetensors" for k in b}
    bad = {
        # shard 2 also holds a (zeroed) copy of a key the index puts in shard 1: it used to win
        "dup": ({"s1.safetensors": a, "s2.safetensors": b + ["!" + a[0]]}, wm, None, "also holds"),
        "wrong_shard": ({"s1.safetensors": a, "s2.safetensors": b}, wm | {a[0]: "s2.safetensors"}, None, "does not hold what"),
        "unmapped": ({"s1.safetensors": a, "s2.safetensors": b}, {k: v for k, v in wm.items() if k != b[0]}, None,
                     "also holds"),
        "outside": ({"s1.safetensors": a, "s2.safetensors": b}, wm | {b[0]: "../good/s2.safetensors"}, None,
                    "not a file of this folder"),
        "missing": ({"s1.safetensors": a}, wm, None, "shard s2.safetensors is missing"),
        "notjson": ({"s1.safetensors": a}, None, "{weight_map: ", "not a readable JSON index"),
        "nomap": ({"s1.safetensors": a}, None, "{}", "weight_map"),
    }
    for name, (parts, wmap, text, needle) in bad.items():
        d = sharded(name, parts, wmap, text)
        with pytest.raises(CheckpointError, match=needle) as e:
            RWKVForCausalLM.from_pretrained(d)
        assert name in str(e.value), name
    broken = sharded("broken", {"s1.safetensors": a, "s2.safetensors": b})
    (broken / "s2.safetensors").write_bytes(b"garbage-garbage")
    with pytest.raises(CheckpointError, match=r"s2.safetensors: unreadable shard"):  # the shard named, not the folder
        RWKVForCausalLM.from_pretrained(broken)


# ----------------------------------------------------------------------------- checkpoint review fixes
def test_non_float_tensors_are_refused_naming_the_key(tmp_path):
    """An int32 checkpoint loaded as fp32 (garbage; generate then crashed with a traceback)."""
    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=64)
    sd["blocks.0.att.key.weight"] = sd["blocks.0.att.key.weight"].to(torch.int32)
    torch.save(sd, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"int.pth: blocks.0.att.key.weight holds int32 values"):
        RWKVForCausalLM.from_pretrained(tmp_path / "int.pth")
    sd["blocks.0.att.key.weight"] = torch.zeros(64, 64, dtype=torch.complex64)
    torch.save(sd, tmp_path / "complex.pth")
    with pytest.raises(CheckpointError, match="holds complex64 values"):
        RWKVForCausalLM.from_pretrained(tmp_path / "complex.pth")


def test_default_dtype_is_that_of_most_weights_and_the_state_stays_fp32(tmp_path):
    """The first tensor's dtype used to decide (a bf16 model with an fp32 time_state came out bf16
    or fp32 by key order, the state rounded); float64 files gave float64 models."""
    from multimodal_rwkv.model.checkpoint import weights_dtype

    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=64, time_state=True)
    state = sd["blocks.0.att.time_state"].clone()
    mixed = {k: (v if k.endswith("time_state") else v.to(torch.bfloat16)) for k, v in sd.items()}
    for order, name in ((sorted(mixed), "a.pth"), (sorted(mixed, key=lambda k: not k.endswith("time_state")), "b.pth")):
        torch.save({k: mixed[k] for k in order}, tmp_path / name)
        m = RWKVForCausalLM.from_pretrained(tmp_path / name)
        assert m.rwkv.emb.weight.dtype == torch.bfloat16
        assert torch.equal(m.rwkv.blocks[0].att.time_state, state)  # fp32, exact
        m.save_pretrained(tmp_path / f"saved-{name}")
        again = RWKVForCausalLM.from_pretrained(tmp_path / f"saved-{name}")
        assert torch.equal(again.rwkv.blocks[0].att.time_state, state)
    torch.save({k: v.double() for k, v in sd.items()}, tmp_path / "f64.pth")
    assert RWKVForCausalLM.from_pretrained(tmp_path / "f64.pth").dtype == torch.float32
    assert weights_dtype({"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(2)}) == torch.float16


def test_from_pretrained_keywords(tmp_path, tiny_pth):
    from transformers import AutoModelForCausalLM

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    with pytest.raises(TypeError, match="dtpye"):
        RWKVForCausalLM.from_pretrained(p, dtpye="bf16")
    with pytest.raises(ValueError, match="disagree"):
        RWKVForCausalLM.from_pretrained(p, dtype="bf16", torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="revision='v2'"):
        RWKVForCausalLM.from_pretrained(p, revision="v2")
    with pytest.raises(ValueError, match="device_map"):
        RWKVForCausalLM.from_pretrained(p, device_map={"": "cpu", "head": "cuda"})
    m = RWKVForCausalLM.from_pretrained(p, dtype="bf16", torch_dtype="bfloat16", device_map="cpu", revision="main")
    assert m.dtype == torch.bfloat16
    m.save_pretrained(tmp_path / "f")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f", dtype="auto").dtype == torch.bfloat16


def test_a_state_file_loads_onto_its_model_and_is_named_alone(tmp_path, tiny_pth, capsys):
    from multimodal_rwkv.cli import main

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=65536)  # the World vocabulary, for generate
    tuned = blink_state_dict(n_embd=64, head_size=32, vocab_size=64, time_state=True, seed=5)
    states = {k: v for k, v in tuned.items() if k.endswith("time_state")}
    torch.save(states, tmp_path / "state.pth")
    whole = {**torch.load(p, weights_only=True), **states}  # the same model, state-tuned in one file
    torch.save(whole, tmp_path / "whole.pth")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        a = RWKVForCausalLM.from_pretrained(p, state_file=tmp_path / "state.pth")(ids).logits
        b = RWKVForCausalLM.from_pretrained(tmp_path / "whole.pth")(ids).logits
    assert torch.equal(a, b)
    for args in (["info", str(tmp_path / "state.pth")], ["generate", "--model", str(tmp_path / "state.pth"),
                                                        "--prompt", "x"]):
        assert main(args) == 2
        assert "a state-tuning file (blocks.N.att.time_state only)" in capsys.readouterr().err
    assert main(["generate", "--model", p, "--state", str(tmp_path / "state.pth"), "--prompt", "a",
                 "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    torch.save({k: v for k, v in states.items() if ".0." in k}, tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match="half.pth: holds the states of layers \\[0\\]; the model has 2"):
        RWKVForCausalLM.from_pretrained(p, state_file=tmp_path / "half.pth")


def test_folders_rwkv7_and_blinkdl_weights_under_our_config(tmp_path, tiny_pth):
    from multimodal_rwkv.model.checkpoint import save_blink_pth

    (tmp_path / "r7").mkdir()
    (tmp_path / "r7" / "config.json").write_text(json.dumps({"model_type": "rwkv7"}))
    with pytest.raises(CheckpointError, match="RWKV-7 model folder detected"):
        RWKVForCausalLM.from_pretrained(tmp_path / "r7")
    m = RWKVForCausalLM.from_pretrained(tiny_pth(n_embd=64, head_size=32, vocab_size=64))
    m.save_pretrained(tmp_path / "f")
    save_blink_pth(m, tmp_path / "f" / "model.pth")  # what a training run's export.pth writes beside it
    (tmp_path / "f" / "model.safetensors").unlink()
    again = RWKVForCausalLM.from_pretrained(tmp_path / "f")
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), again.state_dict().values()))


def test_convert_redoes_a_conversion_killed_before_its_config(tmp_path, tiny_pth, capsys):
    from multimodal_rwkv.cli import main

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    assert main(["convert", p, str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "config.json").unlink()  # killed between the two files
    assert main(["convert", p, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    (tmp_path / "mine").mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "mine" / "model.safetensors"))  # someone's own weights
    assert main(["convert", p, str(tmp_path / "mine")]) == 2
    capsys.readouterr()


def _as_a_user(args):
    """Run the CLI without root's power to read and write any file (setpriv drops it)."""
    import shutil

    cmd = [sys.executable, "-m", "multimodal_rwkv", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file permissions do not apply")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_unwritable_and_unreadable_files_are_one_line_errors(tmp_path, tiny_pth):
    """convert into a read-only folder: a safetensors error traceback (exit 1); an unreadable
    model.safetensors was reported as missing."""
    from multimodal_rwkv.cli import main

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = _as_a_user(["convert", p, str(ro)])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write" in r.stderr, r.stderr
    assert main(["convert", p, str(tmp_path / "ok")]) == 0
    (tmp_path / "ok" / "model.safetensors").chmod(0)
    r = _as_a_user(["info", str(tmp_path / "ok")])
    assert r.returncode == 2 and "model.safetensors: cannot read it (permission denied)" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- re-check fixes
def test_transformers_trainer_runs_a_step(tmp_path):
    """forward refusing unknown keywords broke transformers' Trainer, which passes
    num_items_in_batch to models whose forward takes **kwargs (accepts_loss_kwargs)."""
    from transformers import Trainer, TrainingArguments

    m = _random_model()
    data = [{"input_ids": torch.randint(1, 97, (12,)), "labels": torch.randint(1, 97, (12,))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    out = Trainer(model=m, args=args, train_dataset=data).train()
    assert np.isfinite(out.training_loss)


def test_loading_configs_devices_and_generation_settings(tmp_path, tiny_pth):
    from transformers import AutoModelForCausalLM

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    m = RWKVForCausalLM.from_pretrained(p)
    m.save_pretrained(tmp_path / "f")
    # config keywords: the kernel choice is taken, a size must be the checkpoint's
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f", wkv_backend="reference").config.wkv_backend == "reference"
    assert RWKVForCausalLM.from_pretrained(p, wkv_backend="torch").config.wkv_backend == "torch"
    with pytest.raises(CheckpointError, match="n_layer 7 \\(the checkpoint has 2\\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "f", n_layer=7)
    cfg = RWKVConfig.from_pretrained(tmp_path / "f")
    cfg.wkv_backend = "reference"
    assert RWKVForCausalLM.from_pretrained(p, config=cfg).config.wkv_backend == "reference"
    # one device, however transformers spells it
    for kw in ({"device_map": {"": "cpu"}}, {"device": "cpu", "device_map": "cpu"}, {"device_map": "auto"}):
        assert RWKVForCausalLM.from_pretrained(p, **kw).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # device 0 is the first GPU (it used to load on the CPU)
        with pytest.raises((RuntimeError, AssertionError)):
            RWKVForCausalLM.from_pretrained(p, device=0)
    # the config's output_hidden_states; the model's own generation config's stop strings
    m.config.output_hidden_states = True
    ids = torch.tensor([[1, 2, 3]])
    assert len(m(ids).hidden_states) == m.config.n_layer + 1
    m.config.output_hidden_states = False
    from multimodal_rwkv.training.data import ByteTokenizer

    tok = ByteTokenizer()
    free = m.generate(ids, max_new_tokens=6, eos_token_id=None)
    stop = tok.decode(free[0, 3:5].tolist())
    m.generation_config.stop_strings = [stop]
    got = m.generate(ids, max_new_tokens=6, eos_token_id=None, tokenizer=tok)
    assert m.generation_config.stop_strings == [stop] and got.shape[1] <= 5
    m.generation_config.stop_strings = None
    # inputs_embeds with a state and several returned sequences
    st = m(ids).state
    out = m.generate(inputs_embeds=m.rwkv.emb(ids[:, -1:]), state=st, max_new_tokens=2, do_sample=True,
                     num_return_sequences=2, seed=0)
    assert out.shape == (2, 2)


def test_temp_names_fit_and_convert_redoes_a_half_written_folder(tmp_path, tiny_pth):
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.fileio import atomic_write_text, temp_name

    long = tmp_path / ("a" * 250 + ".mid")
    assert len(temp_name(long).name) <= 255 and temp_name(long).parent == tmp_path
    atomic_write_text(long, "x")
    assert long.read_text() == "x"
    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".tmp-model.safetensors-99999").write_bytes(b"half")  # a convert killed mid-write
    assert main(["convert", p, str(tmp_path / "out")]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


def test_nan_or_inf_weights_are_refused_naming_the_key(tmp_path):
    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=64)
    sd["blocks.0.ffn.value.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="nan.pth: blocks.0.ffn.value.weight holds NaN or infinite values"):
        RWKVForCausalLM.from_pretrained(tmp_path / "nan.pth")


def test_config_given_to_from_pretrained_is_checked_like_a_config(tmp_path, tiny_pth):
    from transformers import AutoModelForCausalLM

    from multimodal_rwkv.errors import ConfigError

    p = tiny_pth(n_embd=64, head_size=32, vocab_size=65536)
    m = RWKVForCausalLM.from_pretrained(p)
    m.save_pretrained(tmp_path / "f")
    tuned = blink_state_dict(n_embd=64, head_size=32, vocab_size=64, time_state=True, seed=5)
    torch.save({k: v for k, v in tuned.items() if k.endswith("time_state")}, tmp_path / "state.pth")
    # the Auto class passes the folder's config (no initial state): a state file is no clash
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "f", state_file=tmp_path / "state.pth")
    assert auto.config.has_initial_state and auto.rwkv.blocks[0].att.time_state.dtype == torch.float32
    with pytest.raises(ConfigError, match="'n_layers': use n_layer"):
        RWKVForCausalLM.from_pretrained(p, config={"n_layers": 3})
    with pytest.raises(ConfigError, match="wkv_backend 'nonsense'"):
        RWKVForCausalLM.from_pretrained(p, wkv_backend="nonsense")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        RWKVForCausalLM.from_pretrained(p, config=str(tmp_path / "nope.json"))
    assert RWKVForCausalLM.from_pretrained(p, config=str(tmp_path / "f"), dim_att=None, n_layer="2").config.n_layer == 2
    assert RWKVForCausalLM.from_pretrained(p, device_map="balanced").device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device_map='gpu7': not a device"):
        RWKVForCausalLM.from_pretrained(p, device_map="gpu7")


def test_float8_checkpoints_are_checked_and_bad_config_arguments_refused(tmp_path, tiny_pth):
    """isfinite is not implemented for float8_e4m3fn: the NaN check crashed with a traceback."""
    sd = blink_state_dict(n_layer=1, n_embd=64, head_size=32, vocab_size=64)
    sd["blocks.0.ffn.value.weight"] = sd["blocks.0.ffn.value.weight"].to(torch.float8_e4m3fn)
    torch.save(sd, tmp_path / "f8.pth")
    assert RWKVForCausalLM.from_pretrained(tmp_path / "f8.pth").dtype == torch.float32
    sd["blocks.0.ffn.value.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "f8nan.pth")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        RWKVForCausalLM.from_pretrained(tmp_path / "f8nan.pth")
    p = tiny_pth(n_embd=64, head_size=32, vocab_size=64)
    with pytest.raises(TypeError, match="config= takes a config"):
        RWKVForCausalLM.from_pretrained(p, config=5)
    with pytest.raises(ValueError, match="contradicts state_file"):
        RWKVForCausalLM.from_pretrained(p, has_initial_state=False, state_file=p)


def test_logits_to_keep_takes_transformers_forms():
    """transformers' logits_to_keep: an int (the last k) or a 1-D tensor of positions. A tensor used
    to be read as a count (tensor([5]) kept the last 5), a longer one or a float raised deep inside."""
    m = _random_model()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        full = m(ids).logits
        for keep, want in ((torch.tensor([5]), full[:, [5]]), (torch.tensor([0, 3]), full[:, [0, 3]]),
                           (torch.tensor([-1, 2]), full[:, [6, 2]]), (torch.tensor(2), full[:, -2:]),
                           (np.int64(3), full[:, -3:]), (torch.tensor([], dtype=torch.long), full[:, :0])):
            got = m(ids, logits_to_keep=keep).logits
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), keep
        for bad, err in ((torch.tensor([7]), ValueError), (torch.tensor([[1]]), TypeError), (2.5, TypeError),
                         ("2", TypeError), (True, TypeError), (torch.tensor([1.0]), TypeError), (-1, ValueError)):
            with pytest.raises(err, match="logits_to_keep"):
                m(ids, logits_to_keep=bad)
        with pytest.raises(ValueError, match="labels need the logits of every position"):
            m(ids, labels=ids, logits_to_keep=torch.tensor([1]))


def test_penalties_of_opposite_sign_beyond_fp32_sum_as_the_official_floats():
    """presence -1e39 with frequency +1e39 became -inf + inf = NaN in fp32: sampling crashed in
    torch.multinomial, greedy decoding picked by NaN. The official sampler sums Python floats."""
    from multimodal_rwkv.model.generation import RWKVPenaltyProcessor

    ids, scores = torch.tensor([[9, 3, 3, 4]]), torch.randn(1, 10)
    for pres, freq in ((-1e39, 1e39), (1e300, -1e300), (-1e39, 1.5e39), (2.0, -0.5)):
        out = RWKVPenaltyProcessor(presence=pres, frequency=freq, decay=0.9, prompt_len=1)(ids, scores.clone())
        want = scores.double().clone()
        counts = {3: 0.9 + 0.9 ** 2, 4: 1.0}  # the latest token weighs 1, older ones decay
        for t, c in counts.items():
            want[0, t] -= pres + c * freq  # Python floats, as rwkv.utils.PIPELINE.generate
        assert not out.isnan().any()
        if want.float().max() == float("inf"):  # a reward beyond float range: the row shifted, same choice
            assert out.argmax() == want.argmax() and out.max() == 0, (pres, freq)
        else:
            torch.testing.assert_close(out, want.float(), rtol=1e-6, atol=1e-6)  # (fp32 decay weights)
    banned = torch.zeros(1, 10)
    banned[0, 3] = -float("inf")  # another processor's ban stays under a reward beyond float range
    out = RWKVPenaltyProcessor(presence=-1e39, frequency=-1e39, decay=1.0, prompt_len=1)(ids, banned)
    assert out[0, 3] == -float("inf") and out.argmax() == 4 and not out.isnan().any()
    m = _random_model()
    for sample in ({}, {"do_sample": True, "seed": 0}):
        out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, presence_penalty=-1e39,
                         frequency_penalty=1e39, eos_token_id=None, **sample)
        assert out.shape == (1, 9)


def test_sampling_takes_the_nucleus_before_the_temperature_as_the_official_sampler():
    """transformers divides by the temperature before top-p: with T=2, generate drew tokens outside
    rwkv.utils.PIPELINE.sample_logits' nucleus (taken from the untempered probabilities)."""
    m = _random_model()
    ids = torch.tensor([[5, 17, 33]])
    with torch.no_grad():
        logits = m(ids).logits[0, -1].double()
    for T, top_p, top_k in ((2.0, 0.5, 0), (0.5, 0.5, 0), (1.5, 0.3, 0), (2.0, 0.9, 4), (1.0, 0.7, 0)):
        # the official sampler, written out (numpy, as rwkv.utils does)
        probs = torch.softmax(logits, -1).numpy()
        desc = np.sort(probs)[::-1]
        cutoff = desc[np.argmax(np.cumsum(desc) >= top_p)]
        want = np.where(probs >= cutoff, probs, 0.0)
        if top_k:
            want[np.argsort(probs)[:-top_k]] = 0
        want = want ** (1.0 / T)
        want /= want.sum()
        out = m.generate(ids, max_new_tokens=1, do_sample=True, temperature=T, top_p=top_p, top_k=top_k, seed=0,
                         eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        got = torch.softmax(out.scores[0][0].double(), -1).numpy()
        assert np.array_equal(got > 0, want > 0), (T, top_p, top_k)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_sample_logits_draws_from_the_official_samplers_distribution(monkeypatch):
    """The package's own sampler (vision answers, music) is RWKV's: nucleus and top-k from the
    untempered probabilities, then the temperature (they applied the temperature first)."""
    from multimodal_rwkv.model import generation

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    logits[1, 7] = -float("inf")  # a ban stays a ban
    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: seen.append(probs) or real(
        probs, n, generator=generator))
    for T, top_p, top_k in ((2.0, 0.5, 0), (0.5, 0.7, 0), (1.5, 0.9, 5), (1.0, 1.0, 3)):
        seen.clear()
        ids = generation.sample_logits(logits, T, top_k, top_p, torch.Generator().manual_seed(0))
        for row in range(3):
            probs = torch.softmax(logits[row].double(), -1).numpy()
            desc = np.sort(probs)[::-1]
            want = np.where(probs >= desc[np.argmax(np.cumsum(desc) >= top_p)], probs, 0.0)
            if top_k:
                want[np.argsort(probs)[:-top_k]] = 0
            want = want ** (1.0 / T)
            want /= want.sum()
            np.testing.assert_allclose(seen[0][row].double().numpy(), want, atol=1e-6)
            assert want[int(ids[row])] > 0
    gens = [torch.Generator().manual_seed(s) for s in range(3)]  # one generator per row
    assert generation.sample_logits(logits, 1.0, 0, 0.9, gens).shape == (3,)
    assert generation.sample_logits(logits, 0.0).tolist() == logits.argmax(-1).tolist()


def test_sampling_edges_warpers_of_the_callers_list_ties_and_extreme_temperatures(tmp_path):
    """A warper in the caller's logits_processor pulled top-p and the temperature ahead of the RWKV
    penalties; transformers' top-p cut a tie at the nucleus' edge (the official sampler keeps it);
    temperatures of 1e-300 or 1e39 (fp32 0 and inf) made NaN probabilities; a bad dtype in
    config.json was an AttributeError traceback, and a model loaded as another dtype kept the
    saved one in config.dtype."""
    from transformers import LogitsProcessorList, TopKLogitsWarper

    from multimodal_rwkv.errors import CheckpointError
    from multimodal_rwkv.model.generation import RWKVTopP, sample_logits

    m = _random_model()
    ids = torch.tensor([[5, 17, 33]])
    for extra in ({"top_k": 50}, {"logits_processor": LogitsProcessorList([TopKLogitsWarper(50)])}):
        out = m.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.01, presence_penalty=100.0, seed=0,
                         eos_token_id=None, **extra)[0, 3:].tolist()
        assert len(set(out)) == len(out), (extra, out)  # the penalty bans every token seen
    tied = torch.log(torch.tensor([[0.4, 0.3, 0.3, 1e-9]]))
    assert torch.isfinite(RWKVTopP(0.5)(None, tied.clone())).tolist() == [[True, True, True, False]]
    logits = torch.randn(2, 40)
    for t in (1e-300, 1e-45, 1e39, 1e300):
        assert sample_logits(logits, t, 0, 0.5, torch.Generator().manual_seed(0)).shape == (2,)
        m.generate(ids, max_new_tokens=2, do_sample=True, temperature=t, top_p=0.5, seed=0)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_logits(torch.randn(3, 9), 1.0, 0, 1.0, [torch.Generator(), torch.Generator()])
    m.save_pretrained(tmp_path / "m")
    assert RWKVForCausalLM.from_pretrained(tmp_path / "m", dtype="bf16").config.dtype == torch.bfloat16
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat61"}))
    with pytest.raises(CheckpointError, match="config.json: invalid config .*bfloat61"):
        RWKVForCausalLM.from_pretrained(tmp_path / "m")


def test_huge_penalties_ban_seen_tokens_and_bad_generate_settings_are_named():
    """A penalty of 1e39 (beyond fp32) made every unseen token's score 0 x inf = NaN, so token 0
    won; NaN / negative decays, a float seed and non-string stops went through (or crashed deep)."""
    from multimodal_rwkv.model.generation import RWKVPenaltyProcessor

    proc = RWKVPenaltyProcessor(presence=1e39, frequency=1e39, decay=1.0, prompt_len=1, uncounted=(5,))
    out = proc(torch.tensor([[9, 3, 3, 5]]), torch.zeros(1, 10))
    assert not out.isnan().any() and out[0, 3] == out[0, 5] == -float("inf")
    assert (out[0, [0, 1, 2, 4, 6, 7, 8, 9]] == 0).all()
    m = _random_model()
    ids = torch.randint(1, 97, (1, 3))
    plain = m.generate(ids, max_new_tokens=6, eos_token_id=None)[0, 3:].tolist()
    banned = m.generate(ids, max_new_tokens=6, eos_token_id=None, presence_penalty=1e39)[0, 3:].tolist()
    assert len(set(banned)) == 6 and banned[0] == plain[0]  # each token once: seen ones are banned
    for kw, match in (({"presence_penalty": float("nan")}, "presence_penalty must be a finite number"),
                      ({"frequency_penalty": float("inf")}, "frequency_penalty must be a finite number"),
                      ({"presence_penalty": 1, "penalty_decay": float("nan")}, "penalty_decay must be a finite"),
                      ({"presence_penalty": 1, "penalty_decay": -3}, r"penalty_decay must be in \[0, 1\]"),
                      ({"seed": 1.5}, "seed must be an integer"), ({"seed": True}, "seed must be an integer"),
                      ({"stop": [1, 2]}, "stop strings must be a string or a list of strings")):
        with pytest.raises(ValueError, match=match):
            m.generate(ids, max_new_tokens=2, **kw)
    # a temperature whose logits / temperature would overflow samples as the top token
    for t in (1e-38, np.float32(1e-40)):
        tiny = m.generate(ids, max_new_tokens=6, eos_token_id=None, do_sample=True, temperature=t, seed=0)
        assert tiny[0, 3:].tolist() == plain
    # numpy and tensor numbers are numbers; a huge reward (negative penalty) is capped, not NaN
    a = m.generate(ids, max_new_tokens=4, eos_token_id=None, presence_penalty=np.float32(0.5),
                   frequency_penalty=torch.tensor(0.25), penalty_decay=np.float64(0.99))
    assert torch.equal(a, m.generate(ids, max_new_tokens=4, eos_token_id=None, presence_penalty=0.5,
                                     frequency_penalty=0.25, penalty_decay=0.99))
    # a large reward keeps the official sampler's choice and probabilities (a shift, not a cap)
    from multimodal_rwkv.model.generation import RWKVPenaltyProcessor as P

    big = P(presence=-2e4, frequency=0.0, decay=1.0, prompt_len=1)(torch.tensor([[9, 0, 1]]),
                                                                    torch.tensor([[5.0, 10.0, 0.0, 7.0]]))
    assert big.tolist() == [[20005.0, 20010.0, 0.0, 7.0]]  # as the official sampler (beam scores too)
    huge = P(presence=-2e8, frequency=0.0, decay=1.0, prompt_len=1)(torch.tensor([[9, 0, 1]]),
                                                                     torch.tensor([[0.0, 64.0, 0.0, 7.0]]))
    assert huge[0, :2].tolist() == [-64.0, 0.0] and (huge[0, 2:] < -1.9e8).all()  # shifted: no overflow
    for kw in ({"presence_penalty": -1e39}, {"frequency_penalty": -1e38}):
        for sample in ({}, {"do_sample": True, "temperature": 1e-30, "seed": 0}):
            out = m.generate(ids, max_new_tokens=5, eos_token_id=None, **kw, **sample)[0, 3:].tolist()
            assert out[1:] == [out[0]] * 4  # the first token is rewarded again and again


def test_generation_config_json_is_saved_and_loaded(tmp_path):
    """transformers keeps a model's generation defaults in generation_config.json: it was neither
    written nor read, so a folder's defaults (max_new_tokens, sampling) were dropped."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    m = _random_model()
    m.save_pretrained(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.safetensors"]
    m.generation_config.max_new_tokens = 4
    m.generation_config.top_p = 0.5
    m.save_pretrained(tmp_path / "gc")
    assert GenerationConfig.from_pretrained(tmp_path / "gc").max_new_tokens == 4
    for back in (RWKVForCausalLM.from_pretrained(tmp_path / "gc"), AutoModelForCausalLM.from_pretrained(tmp_path / "gc")):
        assert back.generation_config.max_new_tokens == 4 and back.generation_config.top_p == 0.5
        assert back.generate(torch.tensor([[1, 2]]), eos_token_id=None).shape == (1, 6)
    m.generation_config = GenerationConfig.from_model_config(m.config)  # defaults again: the stale file goes
    m.save_pretrained(tmp_path / "gc")
    assert not (tmp_path / "gc" / "generation_config.json").exists()
    (tmp_path / "gc" / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json: not a readable generation config"):
        RWKVForCausalLM.from_pretrained(tmp_path / "gc")


def test_classifier_free_guidance_with_the_cache():
    """transformers' guidance_scale runs the model with a mask over the cached tokens too and reads
    the cache back as out['cache']: it failed with use_cache=True (the default)."""
    m = _random_model()
    ids = torch.randint(1, 97, (1, 3))
    a = m.generate(ids, max_new_tokens=4, guidance_scale=3.0, eos_token_id=None)
    b = m.generate(ids, max_new_tokens=4, guidance_scale=3.0, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b)
    st = m(ids).state
    out = m(torch.tensor([[4]]), state=st, attention_mask=torch.ones(1, 4, dtype=torch.long), use_cache=True)
    assert torch.equal(out.logits, m(torch.tensor([[4]]), state=st).logits) and out.cache is not None
    with pytest.raises(ValueError, match="attention_mask has shape"):
        m(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))  # no cache: the mask must fit the input


def test_a_bad_size_is_one_error_without_transformers_warnings(capfd):
    """vocab_size=0 printed three transformers warnings about token ids beyond the vocabulary
    before the one-line error."""
    from multimodal_rwkv import ConfigError

    capfd.readouterr()
    with pytest.raises(ConfigError, match="vocab_size must be positive, got 0"):
        RWKVConfig(vocab_size=0)
    assert "transformers" not in capfd.readouterr().err


def test_fused_decode_sees_parameters_changed_in_place(monkeypatch):
    """A bf16 model's fused decode kept fp32 copies of its small parameters until their version
    changed; an edit through .data (or a fused AdamW step) leaves it alone, so the next decode ran
    the old values. A prefill, train()/eval() or generate() now read them afresh."""
    _skip_without_bf16_decode_kernel()
    m = _random_model().to(torch.bfloat16)
    ids = torch.randint(1, 97, (1, 4))
    with torch.no_grad():
        st = m(ids[:, :3]).state
        m(ids[:, 3:], state=st.clone())  # fills the copies
        m.rwkv.blocks[1].ln1.weight.data.mul_(3)  # no version bump
        for refresh in (lambda: m(ids[:, :3]), lambda: m.eval()):
            refresh()
            fused = m(ids[:, 3:], state=st.clone()).logits
            monkeypatch.setattr("multimodal_rwkv.model.modeling.FAST_DECODE", False)
            plain = m(ids[:, 3:], state=st.clone()).logits
            monkeypatch.setattr("multimodal_rwkv.model.modeling.FAST_DECODE", True)
            assert rel(fused.float(), plain.float()) < 2e-2
            m.rwkv.blocks[1].ln1.weight.data.mul_(0.5)


def test_a_named_wkv_backend_decodes_through_that_backend(monkeypatch):
    """wkv_backend='reference' (or 'torch', 'triton') ran one-token decoding through the fused C++
    block anyway; a backend named explicitly runs or raises."""
    from multimodal_rwkv.kernels import cpu

    m = _random_model(wkv_backend="reference")
    used = []
    monkeypatch.setattr(cpu, "decode_block", lambda *a: used.append(1))
    with torch.no_grad():
        m(torch.randint(1, 97, (1, 1)))
    assert used == []


def test_save_pretrained_takes_transformers_keywords(tmp_path):
    """state_dict= and is_main_process= (accelerate's FSDP/DeepSpeed idiom) used to be ignored, as
    was every other keyword; max_shard_size writes transformers' sharded layout."""
    m = _random_model()
    sd = {k: torch.zeros_like(v) if k == "head.weight" else v for k, v in m.state_dict().items()}
    m.save_pretrained(tmp_path / "sd", state_dict=sd, save_function=torch.save)
    assert torch.equal(RWKVForCausalLM.from_pretrained(tmp_path / "sd").head.weight, torch.zeros_like(m.head.weight))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not a folder"):  # (it said only 'File exists')
        m.save_pretrained(tmp_path / "afile")
    with pytest.raises(FileExistsError, match="a file, not a folder"):  # (transformers logged, saved nothing)
        m.rwkv.save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"
    m.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(TypeError, match="bogus"):
        m.save_pretrained(tmp_path / "x", bogus=1)
    # transformers 4's safe_serialization= is taken (a TypeError before): safetensors either way
    for safe in (True, False):
        m.save_pretrained(tmp_path / f"safe{safe}", safe_serialization=safe)
        assert sorted(p.name for p in (tmp_path / f"safe{safe}").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(ValueError, match="variant .* not supported"):
        m.save_pretrained(tmp_path / "x", variant="fp16")
    import copy

    copy.deepcopy(m).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # config.json's dtype was null
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "safeTrue" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(ValueError, match="variant: weights variants .* not supported"):
        RWKVForCausalLM.from_pretrained(tmp_path / "safeTrue", variant="fp16")
    with pytest.raises(ValueError, match="push_to_hub"):
        m.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match="missing keys.*head.weight"):
        m.save_pretrained(tmp_path / "x", state_dict={k: v for k, v in sd.items() if k != "head.weight"})
    assert not (tmp_path / "x").exists()
    ids = torch.tensor([[1, 5, 9, 2]])
    want = m(ids).logits
    d = tmp_path / "sharded"
    m.save_pretrained(d, max_shard_size=40_000)
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    assert torch.equal(RWKVForCausalLM.from_pretrained(d)(ids).logits, want)
    m.save_pretrained(d)  # one file again: the shards and their index go
    assert sorted(p.name for p in d.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert torch.equal(RWKVForCausalLM.from_pretrained(d)(ids).logits, want)
    # a generation config transformers would not load back is refused before anything is written
    m.generation_config.num_beams, m.generation_config.num_return_sequences = 2, 3
    with pytest.raises(ValueError, match="num_return_sequences"):
        m.save_pretrained(tmp_path / "badgc")
    assert not (tmp_path / "badgc").exists()


def test_return_dict_false_gives_a_tuple_and_generation_still_works():
    m = _random_model()
    ids = torch.tensor([[1, 5, 9, 2]])
    out = m(ids, labels=ids)
    loss, logits, state = m(ids, labels=ids, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits) and isinstance(state, RWKVState)
    m.config.return_dict = False
    assert isinstance(m(ids), tuple)
    assert torch.equal(m.generate(ids, max_new_tokens=4), m.generate(input_ids=ids, max_new_tokens=4))


def test_generate_takes_transformers_positional_arguments():
    from transformers import GenerationConfig

    m = _random_model()
    ids = torch.tensor([[1, 5, 9, 2]])
    want = m.generate(ids, max_new_tokens=3)
    assert torch.equal(m.generate(inputs=ids, max_new_tokens=3), want)
    assert torch.equal(m.generate(ids, GenerationConfig(max_new_tokens=3, do_sample=False)), want)
    with pytest.raises(ValueError, match="pass the prompt once"):
        m.generate(ids, input_ids=ids, max_new_tokens=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_fresh_model_builds_in_low_precision(dtype):
    from transformers import AutoModelForCausalLM

    cfg = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64, head_size=16)
    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    assert m.head.weight.dtype == dtype and torch.isfinite(m.head.weight.float()).all()
    w = m.head.weight.float()  # still orthogonal rows (up to rounding), as in fp32
    gram = w.T @ w
    assert torch.allclose(gram / gram.diagonal().mean(), torch.eye(gram.shape[0]), atol=0.05)


def test_generate_text_cuts_at_whichever_end_of_text_id_ended_it():
    from multimodal_rwkv.model.generation import generate_text

    class Bytes:  # a byte-level tokenizer: id i < 256 is byte i
        vocab_size = 97

        def encode(self, s):
            return list(s.encode())

        def decode(self, ids, errors="replace"):
            return bytes(ids).decode("latin-1")

    m = _random_model()
    free = m.generate(torch.tensor([[65, 66]]), max_new_tokens=8)[0, 2:].tolist()
    eos = free[3]
    want = Bytes().decode(free[: free.index(eos)])
    assert generate_text(m, Bytes(), "AB", max_new_tokens=8, eos_token_id=eos) == want
    assert generate_text(m, Bytes(), "AB", max_new_tokens=8, eos_token_id=[96, eos]) == want
    from transformers import GenerationConfig

    assert generate_text(m, Bytes(), "AB", generation_config=GenerationConfig(max_new_tokens=8, eos_token_id=eos,
                                                                             do_sample=False)) == want
    # the generation_config's max_new_tokens holds (generate_text's own default of 100 overrode it)
    short = generate_text(m, Bytes(), "AB", generation_config=GenerationConfig(max_new_tokens=2, do_sample=False,
                                                                              eos_token_id=None))
    assert short == Bytes().decode(free[:2])
    # an empty prompt is the same clear error for any batch size (batch 2 with a state: IndexError)
    for rows in (1, 2):
        with pytest.raises(ValueError, match="T >= 1"):
            m.generate(torch.zeros(rows, 0, dtype=torch.long), state=m.empty_state(rows), max_new_tokens=2)
    # ... but not with the prompt given as embeddings (transformers' own empty ids beside them)
    emb = m.get_input_embeddings()(torch.tensor([[65, 66]]))
    assert torch.equal(m.generate(torch.zeros(1, 0, dtype=torch.long), inputs_embeds=emb, max_new_tokens=3),
                       m.generate(inputs_embeds=emb, max_new_tokens=3))
    # a length set elsewhere holds: max_length, or the model's own generation_config
    assert len(generate_text(m, Bytes(), "AB", max_length=4, eos_token_id=None)) <= 2
    m.generation_config.max_new_tokens = 3
    assert len(generate_text(m, Bytes(), "AB", eos_token_id=None)) == 3
    m.generation_config.eos_token_id = [96, eos]
    assert generate_text(m, Bytes(), "AB", max_new_tokens=8) == want


def test_the_base_model_initialises_loads_and_is_an_auto_model(tmp_path):
    """RWKVModel (exported) skipped RWKV's init, could not load (no post_init) and AutoModel did not know it."""
    from transformers import AutoModel

    from multimodal_rwkv import RWKVModel

    cfg = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64, head_size=16)
    base = RWKVModel(cfg)
    decay = base.blocks[0].att.time_decay.detach().flatten()
    assert float(decay[0]) == pytest.approx(-6.0) and float(base.emb.weight.detach().abs().max()) <= 1e-4
    m = _random_model()
    m.save_pretrained(tmp_path / "lm")
    ids = torch.tensor([[1, 5, 9, 2]])
    want = m.rwkv(ids)[0]
    for loaded in (RWKVModel.from_pretrained(tmp_path / "lm"), AutoModel.from_pretrained(tmp_path / "lm")):
        assert isinstance(loaded, RWKVModel) and torch.equal(loaded.eval()(ids)[0], want)
    m.rwkv.save_pretrained(tmp_path / "base")
    assert torch.equal(RWKVModel.from_pretrained(tmp_path / "base").eval()(ids)[0], want)
    # a BlinkDL .pth (transformers' loader said its config was not valid JSON), with the same errors
    from multimodal_rwkv.errors import CheckpointError
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    pth = make_blink_checkpoint(tmp_path / "w.pth", n_layer=2, n_embd=64, head_size=32, vocab_size=97)
    full = RWKVForCausalLM.from_pretrained(pth)
    base_pth = RWKVModel.from_pretrained(pth, dtype="fp32")
    assert isinstance(base_pth, RWKVModel) and not base_pth.training
    assert torch.equal(base_pth(ids)[0], full.rwkv(ids)[0])
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        RWKVModel.from_pretrained(tmp_path / "bad.pth")
    # transformers' base-model output: last_hidden_state and return_dict (a bare tuple before)
    out = m.rwkv(ids, output_hidden_states=True)
    assert torch.equal(out.last_hidden_state, want) and out.state.equal(m(ids).state)
    assert len(out.hidden_states) == m.config.n_layer + 1 and torch.equal(out.hidden_states[-1], want)
    hidden, state = m.rwkv(ids, return_dict=False)
    assert torch.equal(hidden, want) and state.equal(out.state)


def test_generate_keeps_id_0_prompt_tokens_whatever_the_eos():
    """With eos_token_id other than the pad id 0 and no mask, transformers inferred a mask that
    dropped every 0 of the prompt (World's end of text, a real token): other logits, other text."""
    m = _random_model()
    ids = torch.tensor([[5, 17, 42, 0, 0, 0, 9, 0]])
    with torch.no_grad():
        state, want, x = None, [], ids
        for _ in range(6):  # a manual greedy loop on the state
            out = m(x, state=state)
            state = out.state
            want.append(int(out.logits[0, -1].argmax()))
            x = torch.tensor([[want[-1]]])
    for eos in (96, None, [95, 96]):
        got = m.generate(ids, max_new_tokens=6, eos_token_id=eos, min_new_tokens=6)[0, ids.shape[1]:].tolist()
        assert got == want, eos


def test_empty_state_is_a_copy_of_the_trained_initial_state():
    """empty_state() of a state-tuned model returned views of time_state: a state changed in place
    changed the model's trained initial state."""
    m = _random_model(has_initial_state=True)
    before = [b.att.time_state.detach().clone() for b in m.rwkv.blocks]
    with torch.no_grad():
        st = m.empty_state(2)
        for w in st.wkv:
            w.mul_(0.5)
    assert all(torch.equal(b.att.time_state, t) for b, t in zip(m.rwkv.blocks, before))
    assert torch.equal(m.empty_state(1).wkv[0][0], before[0].transpose(1, 2).float())  # stored value-major


def test_save_pretrained_refuses_a_config_it_could_not_load_back(tmp_path):
    """config.update({"n_layers": 3}) (a typo of n_layer) or config.version = "x070" was saved
    silently; from_pretrained then refused the folder. Refused before anything is written."""
    from multimodal_rwkv.errors import ConfigError

    for i, (edit, match) in enumerate([(lambda c: c.update({"n_layers": 3}), "no key 'n_layers': use n_layer"),
                                       (lambda c: setattr(c, "version", "x070"), "x070"),
                                       (lambda c: setattr(c, "n_layer", 5), "config does not describe its weights"),
                                       (lambda c: setattr(c, "head_size", 32), "time_faaaa: the config gives"),
                                       (lambda c: setattr(c, "version", "x052"), "config does not describe"),
                                       (lambda c: setattr(c, "dim_ffn", 96), "ffn.key.weight: the config gives"),
                                       (lambda c: setattr(c, "has_initial_state", True), "time_state")]):
        m = _random_model()
        edit(m.config)
        with pytest.raises(ConfigError, match=match):
            m.save_pretrained(tmp_path / f"m{i}")
        assert not (tmp_path / f"m{i}").exists()
    m = _random_model()
    m.config.update({"my_tool_note": "kept"})  # another tool's own key: transformers keeps it, and so do we
    m.save_pretrained(tmp_path / "ok")
    assert RWKVForCausalLM.from_pretrained(tmp_path / "ok").config.my_tool_note == "kept"


def test_transformers_own_bans_are_not_taken_for_an_overflow():
    """transformers runs its own processors before the caller's list, which held the finite-logits
    guard: once no_repeat_ngram_size / bad_words_ids banned every id, the guard raised NumericsError
    ("activations overflowed") for a model whose logits were finite. The guard now runs first."""
    m = _random_model(vocab_size=8)
    ids = torch.tensor([[1, 2]])
    out = m.generate(ids, max_new_tokens=8, do_sample=False, no_repeat_ngram_size=1, eos_token_id=None)
    assert out.shape == (1, 10)  # what transformers does once every id is banned: its own business
    out = m.generate(ids, max_new_tokens=3, do_sample=False, bad_words_ids=[[i] for i in range(1, 8)],
                     min_new_tokens=3, eos_token_id=0)
    assert out.shape == (1, 3)  # every id banned: argmax picks 0, the end of text (as for any model)


def test_base_model_reads_output_hidden_states_from_its_config_and_meta_masks():
    from multimodal_rwkv import RWKVModel

    m = _random_model()
    m.config.output_hidden_states = True
    base = m.rwkv
    assert len(base(torch.tensor([[1, 2, 3]])).hidden_states) == m.config.n_layer + 1
    assert base(torch.tensor([[1, 2, 3]]), output_hidden_states=False).hidden_states is None
    with torch.device("meta"):  # a tokenizer's attention_mask on the meta device (it asked for its values)
        meta = RWKVForCausalLM(RWKVConfig(vocab_size=97, n_layer=2, n_embd=64, head_size=16))
    ids = torch.zeros(2, 20, dtype=torch.long, device="meta")
    assert meta(ids, attention_mask=torch.ones(2, 20, device="meta")).logits.shape == (2, 20, 97)
    assert isinstance(base, RWKVModel)


def test_a_sharded_save_interrupted_over_an_earlier_one_is_refused_not_mixed(tmp_path):
    """Each shard was written atomically but not the set: a save killed halfway over an earlier
    sharded save loaded silently as a mix of old and new weights."""
    import shutil

    from multimodal_rwkv.errors import CheckpointError

    a, b = _random_model(seed=1), _random_model(seed=2)
    a.save_pretrained(tmp_path / "a", max_shard_size="100KB")
    b.save_pretrained(tmp_path / "b", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "a").glob("model-*.safetensors"))
    assert len(shards) > 1
    for p in (tmp_path / "a", tmp_path / "b"):  # each save whole: loads as itself
        RWKVForCausalLM.from_pretrained(p)
    shutil.copy(tmp_path / "b" / shards[0], tmp_path / "a" / shards[0])  # as a kill after the first new shard
    with pytest.raises(CheckpointError, match=f"{shards[0]}: a shard of another save than "
                                              "model.safetensors.index.json"):
        RWKVForCausalLM.from_pretrained(tmp_path / "a")
    # over a folder an older version (or transformers) wrote, whose index has no save id: refused too
    import json

    index = tmp_path / "a" / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    del meta["metadata"]["save_id"]
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="a shard of another save"):
        RWKVForCausalLM.from_pretrained(tmp_path / "a")


def test_a_generation_config_argument_with_a_folder_that_has_stop_strings(tmp_path):
    """A folder whose generation_config.json held stop_strings could not take generation_config=:
    transformers copied the model's stop strings into it and asked for a tokenizer of its own type."""
    from transformers import GenerationConfig

    from multimodal_rwkv import WorldTokenizer

    m = _random_model(vocab_size=65536)
    m.generation_config.stop_strings = ["STOP"]
    m.save_pretrained(tmp_path / "m")
    m = RWKVForCausalLM.from_pretrained(tmp_path / "m")
    tok = WorldTokenizer()
    out = m.generate(torch.tensor([tok.encode("Hi")]), generation_config=GenerationConfig(max_new_tokens=4),
                     tokenizer=tok)
    assert out.shape[0] == 1 and m.generation_config.stop_strings == ["STOP"]
    # a given config that sets no stop strings takes the model's (transformers fills its unset values)
    from multimodal_rwkv.model.generation import joined_stops

    assert joined_stops(m, generation_config=GenerationConfig(max_new_tokens=4)) == ["STOP"]
    assert joined_stops(m, generation_config=GenerationConfig(stop_strings=["X"])) == ["X"]


def test_a_failed_sharded_save_removes_the_new_shards_nothing_names(tmp_path, monkeypatch):
    """A save failing at its second shard left the first one (of another layout, -of-0000N) beside
    the earlier save's, and later saves never removed it."""
    import safetensors.torch as st

    m = _random_model()
    m.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    real, calls = st.save_file, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError):
        m.save_pretrained(tmp_path / "m", max_shard_size="300KB")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before
    RWKVForCausalLM.from_pretrained(tmp_path / "m")  # the earlier save, whole


def test_training_checkpoint_dicts_and_wrapper_prefixes_load(tmp_path):
    """Only {"state_dict": ...} was unwrapped: {"model": sd, "optimizer": ...} and DeepSpeed's
    {"module": sd} were 'not a state dict of tensors', DDP's 'module.' keys 'missing key emb.weight'."""
    from multimodal_rwkv.errors import CheckpointError
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    f = make_blink_checkpoint(tmp_path / "w.pth", n_layer=1, n_embd=64, head_size=32, vocab_size=64)
    sd = torch.load(f, weights_only=True)
    ids = torch.tensor([[1, 5, 9]])
    want = RWKVForCausalLM.from_pretrained(f)(ids).logits
    for name, obj in (("model", {"model": sd, "optimizer": {"x": torch.zeros(2)}, "step": 3}),
                      ("module", {"module": sd}), ("ddp", {f"module.{k}": v for k, v in sd.items()}),
                      ("lightning", {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1}),
                      ("compiled", {f"_orig_mod.{k}": v for k, v in sd.items()}),
                      ("stacked", {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}})):
        torch.save(obj, tmp_path / f"{name}.pth")
        assert torch.equal(RWKVForCausalLM.from_pretrained(tmp_path / f"{name}.pth")(ids).logits, want), name
    torch.save({"weights": sd, "step": 3}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other.pth: not a state dict of tensors \(a dict of weights, step; "
                                              r"no dict of tensors under 'state_dict', 'model' or 'module' either\)"):
        RWKVForCausalLM.from_pretrained(tmp_path / "other.pth")
    torch.save({f"net.inner.{k}": v for k, v in sd.items()}, tmp_path / "net.pth")
    with pytest.raises(CheckpointError, match=r"missing key emb.weight needed to infer the model size \(every key "
                                              r"starts with 'net.inner.': a wrapper's prefix\?"):
        RWKVForCausalLM.from_pretrained(tmp_path / "net.pth")


def test_a_config_json_that_disagrees_with_its_weights_is_named(tmp_path):
    """n_layer 3 in a saved folder's config.json (2 layers of weights) was reported as the weights'
    missing keys; the Hugging Face layout already named config.json and the setting."""
    from multimodal_rwkv.errors import CheckpointError

    m = _random_model()
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value in (("n_layer", cfg["n_layer"] + 1), ("version", "x052"), ("dim_ffn", cfg["dim_ffn"] + 32)):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(CheckpointError, match=rf"m/config.json: {key} is {value!r}, but the weights have"):
            RWKVForCausalLM.from_pretrained(tmp_path / "m")
