"""Training engine pieces that need a model but no full run: optimiser groups, L2Wrap, LoRA, state export."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal_rwkv import RWKVConfig, RWKVForCausalLM
from multimodal_rwkv.errors import ConfigError
from multimodal_rwkv.training.config import TrainConfig
from multimodal_rwkv.training.loop import build_optimizer, param_groups
from multimodal_rwkv.training.lm import L2Wrap
from multimodal_rwkv.training.peft import (
    LoRALinear, apply_lora, enable_state_tuning, merge_lora, select_trainable, time_state_dict,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def tiny(**kw):
    torch.manual_seed(0)
    return RWKVForCausalLM(RWKVConfig(vocab_size=50, n_layer=2, n_embd=64, head_size=32, **kw))


def test_rwkv_lm_parameter_groups():
    m = tiny()
    groups = param_groups(m, TrainConfig().optim)
    by_name = {n: g for g in groups for n in g["names"]}
    assert set(by_name) == {n for n, _ in m.named_parameters()}
    decayed = {n for n, g in by_name.items() if g["weight_decay"] > 0}
    assert decayed == {n for n, p in m.named_parameters()
                       if p.ndim >= 2 and n.endswith(".weight") and "time_" not in n}
    assert "rwkv.emb.weight" in decayed and "head.weight" in decayed and "rwkv.blocks.0.att.key.weight" in decayed
    for n, g in by_name.items():
        leaf = n.rsplit(".", 1)[-1]
        fast = leaf == "time_decay"
        assert (g["lr_scale"] == 2.0) == fast, n
        if leaf.startswith("time_") or "ln" in n:
            assert g["weight_decay"] == 0.0, n
    # frozen parameters are left out
    for p in m.rwkv.blocks[0].parameters():
        p.requires_grad_(False)
    assert not any(n.startswith("rwkv.blocks.0.") for g in param_groups(m, TrainConfig().optim) for n in g["names"])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_l2wrap_gradient_matches_formula(reduction):
    torch.manual_seed(1)
    y = torch.randn(3, 5, 11, requires_grad=True)
    t = torch.randint(0, 11, (3, 5))
    ce = torch.nn.functional.cross_entropy(y.reshape(-1, 11), t.reshape(-1), reduction=reduction)
    (L2Wrap.apply(ce, y, reduction=reduction) * 0.5).backward()
    # by hand: d(0.5 * CE)/dy = 0.5 (softmax - onehot) [/ 15 for the mean]; plus RWKV-LM's
    # 1e-4 [/ (B*T) for the mean] * 0.5 * max at each position's argmax
    n = 15 if reduction == "mean" else 1
    expect = 0.5 * (torch.softmax(y.detach(), -1) - torch.nn.functional.one_hot(t, 11).float()) / n
    mx, idx = y.detach().max(-1)
    for i in range(3):
        for j in range(5):
            expect[i, j, idx[i, j]] += 1e-4 / n * 0.5 * mx[i, j]
    torch.testing.assert_close(y.grad, expect, rtol=1e-6, atol=1e-8)



def test_lm_l2wrap_pushes_every_position_by_rwkv_lm_factor_on_masked_data():
    """With chat masking (fewer targets than positions), each position's push was 1e-4 / n_targets:
    B*T / n_targets times RWKV-LM's 1e-4 / (B*T) (its masked training keeps that factor)."""
    from multimodal_rwkv.training.lm import LMTask
    from multimodal_rwkv.training.task import StepContext

    def logits_grad(l2wrap):
        cfg = TrainConfig()
        cfg.train.l2wrap = l2wrap
        m = tiny()
        cap = []
        real = RWKVForCausalLM.forward

        def keep(self, *a, **k):
            out = real(self, *a, **k)
            out.logits.retain_grad()
            cap.append(out.logits)
            return out

        ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(3))
        tgt = torch.full_like(ids, -100)
        tgt[0, 8:] = ids[0, 8:]  # 4 + 2 of 24 positions are targets
        tgt[1, 10:] = ids[1, 10:]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(RWKVForCausalLM, "forward", keep)
            task = LMTask.__new__(LMTask)
            task.cfg = cfg
            task.training_step(m, {"input_ids": ids, "targets": tgt},
                               StepContext(lambda loss: loss.backward(), None, scale=1 / 6, token_scale=1 / 24))
        return cap[0].grad, cap[0].detach()

    with_wrap, logits = logits_grad(True)
    without, _ = logits_grad(False)
    mx, idx = logits.max(-1)
    push = (with_wrap - without).gather(-1, idx[..., None])[..., 0] / mx
    torch.testing.assert_close(push, torch.full_like(push, 1e-4 / 24), rtol=1e-3, atol=0)


def test_lora_starts_as_identity_and_merge_is_exact_on_random_adapters():
    for bad in (0, -1, 2.5, True):  # a ZeroDivisionError / torch RuntimeError before
        with pytest.raises(ConfigError, match="peft.lora_r: LoRA needs a rank >= 1"):
            apply_lora(tiny(), r=bad, alpha=8.0, targets=["att.key"])
    m = tiny()
    ids = torch.randint(0, 50, (2, 13))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    names = apply_lora(m, r=3, alpha=6.0, targets=["att.receptance", "ffn.value", "head"])
    assert len(names) == 2 * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref)  # B = 0 at start
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.normal_(0, 0.3)
        lora_out = m(input_ids=ids).logits
    assert (lora_out - ref).abs().max() > 1e-2
    cfg = TrainConfig().peft
    cfg.lora_r = 3
    select_trainable(m, cfg)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if n.endswith("lora_A") or n.endswith("lora_B")}
    assert merge_lora(m) == 5
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, lora_out, rtol=1e-5, atol=1e-5)


def test_a_lora_target_that_matches_nothing_is_an_error():
    """A misspelt target beside a good one was dropped silently (LoRA on att.key only)."""
    m = tiny()
    with pytest.raises(ConfigError, match=r"peft\.lora_targets \['ffn\.values'\] match no linear layer"):
        apply_lora(m, r=2, alpha=4.0, targets=["att.key", "ffn.values"])
    assert not any(isinstance(x, LoRALinear) for x in m.modules())  # nothing half-applied
    with pytest.raises(ConfigError, match="match no linear layer"):
        apply_lora(m, r=2, alpha=4.0, targets=[])


def test_a_task_that_overrides_an_explicit_peft_setting_is_an_error():
    """VisualRWKV stage 2 froze what peft.trainable named (train_encoder false), trained what
    peft.freeze named (train_projector) and froze LoRA adapters it then exported as zeros."""
    class Task:
        trainable_options = "model.options train_encoder"

        def trainable_filter(self, name, param):
            return False if ".att." in name else None

    m = tiny()
    cfg = TrainConfig().peft
    cfg.trainable = ["*.att.key.*"]
    with pytest.raises(ConfigError, match=r"peft\.trainable asks for rwkv\.blocks\.0\.att\.key\.weight to be "
                                          r"trained, but the task freezes it \(model\.options train_encoder decide"):
        select_trainable(m, cfg, Task().trainable_filter)
    cfg.trainable = ["*.ffn.*"]  # what the task leaves alone follows the patterns
    select_trainable(m, cfg, Task().trainable_filter)
    assert not any(p.requires_grad for n, p in m.named_parameters() if ".att." in n)
    cfg.trainable, cfg.lora_r = [], 2
    apply_lora(m, r=2, alpha=4.0, targets=["att.key"])
    with pytest.raises(ConfigError, match=r"peft\.lora_r \(a LoRA adapter\) asks for .*att\.key\.lora_A"):
        select_trainable(m, cfg, Task().trainable_filter)


def test_freeze_and_trainable_patterns():
    m = tiny()
    cfg = TrainConfig().peft
    cfg.freeze = ["rwkv.blocks.*", "rwkv.emb.*"]
    cfg.trainable = ["*.ln_x.*"]
    select_trainable(m, cfg)
    on = {n for n, p in m.named_parameters() if p.requires_grad}
    assert on == {n for n, _ in m.named_parameters()
                  if not n.startswith("rwkv.blocks.") and not n.startswith("rwkv.emb.") or ".ln_x." in n}


def test_state_tuning_state_is_official_value_major():
    """The tuned state equals feeding a prefix: export it, check layout against the core's own state."""
    m = tiny()
    enable_state_tuning(m)
    prefix = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        st = RWKVForCausalLM.forward(m, input_ids=prefix).state
        for i, b in enumerate(m.rwkv.blocks):  # our state is key-major [B,H,K,V]; time_state is [H,V,K]
            b.att.time_state.copy_(st.wkv[i][0].transpose(-1, -2))
    sd = time_state_dict(m)
    for i in range(2):
        torch.testing.assert_close(sd[f"blocks.{i}.att.time_state"], st.wkv[i][0].transpose(-1, -2))
    # the model now starts from that wkv state: equals continuing from the prefix state with zero shifts
    ids = torch.randint(0, 50, (1, 7))
    zero_shift = type(st)([torch.zeros_like(t) for t in st.att_shift], st.wkv, [torch.zeros_like(t) for t in st.ffn_shift])
    with torch.no_grad():
        a = m(input_ids=ids).logits
        m.config.has_initial_state = False
        b = m(input_ids=ids, state=zero_shift).logits
        m.config.has_initial_state = True
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_train_cli_set_takes_several_values_per_flag(capsys):
    from multimodal_rwkv.cli import main

    rc = main(["train", "recipes/lm_tiny.yaml", "--set", "data.train_file=a.txt", "output_dir=/tmp/x1",
               "--set", "max_steps=7", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0 and "train_file: a.txt" in out and "output_dir: /tmp/x1" in out and "max_steps: 7" in out


def test_train_cli_takes_a_recipe_given_after_set(capsys):
    """--set takes every value up to the next flag, the recipe too: it is taken back from there."""
    from multimodal_rwkv.cli import main

    rc = main(["train", "--set", "max_steps=7", "output_dir=/tmp/x1", "recipes/lm_tiny.yaml", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0 and "max_steps: 7" in out and "output_dir: /tmp/x1" in out and "n_embd: 128" in out
    assert main(["train", "--set", "max_steps=7", "nothere.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothere.yaml: cannot read recipe" in err[0]
    assert main(["train", "--set", "max_steps=7"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required: recipe (put the recipe before --set" in err[0]


def test_train_cli_prints_the_final_folder_on_the_main_process_only(monkeypatch, capsys):
    """Under torchrun every rank runs the command: the final/ line comes once, from rank 0."""
    from pathlib import Path

    from multimodal_rwkv.cli import main
    from multimodal_rwkv.training import loop

    def run(self, main_process):
        self.is_main_process = main_process
        return Path(self.cfg.output_dir) / "final"

    for main_process, expect in ((True, "/tmp/x2/final\n"), (False, "")):
        monkeypatch.setattr(loop.Trainer, "run", lambda self, m=main_process: run(self, m))
        assert main(["train", "recipes/lm_tiny.yaml", "--set", "output_dir=/tmp/x2"]) == 0
        assert capsys.readouterr().out == expect


def test_out_of_memory_is_one_line_naming_the_settings_to_lower(monkeypatch, capsys):
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.training import loop

    torch_cpu = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 65536000000 bytes. Error code 12 (Cannot allocate memory)")

    def fail(phase, e):
        def _run(self):
            self._phase = phase
            raise e
        monkeypatch.setattr(loop.Trainer, "_run", _run)
        rc = main(["train", "recipes/lm_tiny.yaml", "--set", "output_dir=/tmp/x3", "train.micro_batch_size=1000000"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        return err[0]

    err = fail("steps", RuntimeError(torch_cpu))
    assert "out of memory for a training step (tried to allocate 61.0 GiB)" in err
    assert "train.micro_batch_size=1000000" in err and "data.ctx_len=128" in err
    small = torch_cpu.replace("65536000000", "3145728")  # below 1 GiB: not "0.0 GiB"
    assert "(tried to allocate 3.0 MiB)" in fail("steps", RuntimeError(small))
    err = fail("eval", MemoryError("Unable to allocate 7.45 GiB for an array"))
    assert "out of memory evaluating" in err and "train.micro_batch_size" in err
    err = fail("model", RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has ..."))
    assert "out of memory building the model (tried to allocate 20.00 GiB): use a smaller model" in err
    with pytest.raises(RuntimeError, match="something else"):  # not an allocation failure: left alone
        fail("steps", RuntimeError("something else"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/meminfo: Linux")
def test_a_step_too_large_for_the_free_memory_fails_as_an_allocation_not_by_the_oom_killer(tmp_path):
    """Linux overcommits: a batch too large for the machine was granted its memory, and the kernel
    killed the process (exit 137, no message) once it touched more than there was. The guard caps
    the address space at what is free, so the allocation fails and the run says what to lower."""
    # in a fresh process: memory an earlier test freed, kept by glibc for reuse, needs no new mapping
    (tmp_path / "c.txt").write_text("some text to train on. " * 400)
    script = r'''
import resource, sys, torch
from multimodal_rwkv.cli import main
from multimodal_rwkv.training import loop

out, corpus = sys.argv[1], sys.argv[2]
before = resource.getrlimit(resource.RLIMIT_AS)
real = loop._available_memory
loop._available_memory = lambda: 32 * 2**20  # a machine with 32 MiB free
with loop._memory_guard(True):
    try:
        torch.empty(2**30, dtype=torch.uint8)  # 1 GiB: granted without the guard (never touched)
        raise SystemExit("allocated under the guard")
    except RuntimeError as e:
        assert "can't allocate memory" in str(e), e
assert resource.getrlimit(resource.RLIMIT_AS) == before  # put back
torch.empty(2**30, dtype=torch.uint8)
with loop._memory_guard(False):
    torch.empty(2**30, dtype=torch.uint8)
args = ["train", "recipes/lm_tiny.yaml", "--set", f"output_dir={out}", f"data.train_file={corpus}",
        "data.tokenizer=bytes", "data.ctx_len=64", "max_steps=1", "train.micro_batch_size=128",
        "model.config.vocab_size=257", "model.config.n_layer=1", "model.config.n_embd=64",
        "model.config.head_size=32", "progress_bar=false"]
assert main(args) == 2
assert resource.getrlimit(resource.RLIMIT_AS) == before
loop._available_memory = real
assert main(args + ["train.cpu_memory_guard=false"]) == 0  # the same run, unguarded, fits the real machine
'''
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "c.txt")],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(err) == 1 and "out of memory for a training step" in err[0] and "micro_batch_size=128" in err[0], err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_page_faulting_big_buffers_in_again():
    """A step-like loop that allocates and frees 16-48 MB buffers: by default glibc returns them to
    the OS and every step page-faults them in again; with either setting (the engine's full one,
    the model's bounded one) the memory is reused (measured: ~150-250k minor faults over 5 steps
    without, under 40k with)."""
    script = r'''
import resource, sys, torch
from multimodal_rwkv.kernels.cpu import keep_freed_memory
if sys.argv[1] != "off":
    assert keep_freed_memory(bounded=sys.argv[1] == "bounded")
def step():
    a = torch.ones(12 * 1024 * 1024)
    b = torch.ones(4 * 1024 * 1024)
    c = a[: 4 * 1024 * 1024] + b
    d = torch.ones(10 * 1024 * 1024)
    return float(c[0] + d[0])
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''
    out = {}
    for mode in ("off", "full", "bounded"):
        r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out[mode] = int(r.stdout.split()[-1])
    assert out["off"] > 100000, out
    assert out["full"] < out["off"] / 3 and out["bounded"] < out["off"] / 3, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_model_forward_sets_the_bounded_malloc_setting_once_unless_switched_off():
    script = r'''
import torch
from multimodal_rwkv import RWKVConfig, RWKVForCausalLM
from multimodal_rwkv.kernels import cpu
m = RWKVForCausalLM(RWKVConfig(vocab_size=64, n_layer=1, n_embd=64, head_size=32))
before = cpu._state.get("malloc")
m(torch.zeros(1, 3, dtype=torch.long))
after = cpu._state.get("malloc")
cpu.keep_freed_memory(bounded=False)  # the engine widens it...
full = cpu._state.get("malloc")
cpu.keep_freed_memory(bounded=True)  # ...and a bounded call does not narrow it again
print(before, after, full, cpu._state.get("malloc"))
'''
    for env, want in (("1", "None bounded full full"), ("0", "None None full full")):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, MMRWKV_MALLOC=env))
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split("\n")[-2] == want


def test_atomic_write_gives_saved_files_the_usual_mode(tmp_path):
    """safetensors creates its files 0600; a saved model must be readable like any new file."""
    import os

    from safetensors.torch import save_file

    from multimodal_rwkv.fileio import atomic_write

    mask = os.umask(0)
    os.umask(mask)
    atomic_write(tmp_path / "m.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_atomic_write_names_the_file_on_a_full_disk(tmp_path):
    """A resume on a full disk said "No space left on device" and no file (metrics.jsonl's rewrite)."""
    from multimodal_rwkv.fileio import atomic_write_text

    (tmp_path / "metrics.jsonl").write_text("old\n")

    def full(p):
        raise OSError(28, "No space left on device")  # as Path.write_text raises it: no file name

    from multimodal_rwkv import fileio

    with pytest.raises(OSError) as e:
        fileio.atomic_write(tmp_path / "metrics.jsonl", full)
    assert e.value.filename == str(tmp_path / "metrics.jsonl") and e.value.errno == 28
    assert (tmp_path / "metrics.jsonl").read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1
    atomic_write_text(tmp_path / "metrics.jsonl", "new\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "new\n"


@pytest.mark.skipif(not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
                    reason="needs the /dev/full device")
def test_array_writers_raise_when_the_disk_fills():
    """numpy's tofile/np.save on a real file ignore the error at the close of their own stdio
    handle: a short last block was lost silently (music tokenize replaced a good .npy with a
    truncated one, exit 0). /dev/full fails every write as a full disk does."""
    import numpy as np

    from multimodal_rwkv.fileio import save_npy, write_array

    a = np.arange(100, dtype=np.uint32)
    with pytest.raises(OSError, match="No space"):
        save_npy("/dev/full", a)
    with pytest.raises(OSError, match="No space"):
        with open("/dev/full", "wb") as fh:
            write_array(fh, a)


def test_package_writes_arrays_only_through_the_checked_writers():
    """Every array the package writes goes through fileio.write_array/save_npy (see above)."""
    import re
    from pathlib import Path

    import multimodal_rwkv

    root = Path(multimodal_rwkv.__file__).parent
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if p.name != "fileio.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\.tofile\(|np\.save\(|np\.savez", line.split("#")[0])]
    assert offenders == []


def test_fused_adamw_by_default_and_equal_to_the_per_tensor_loop():
    from accelerate.utils import DistributedType

    optim = TrainConfig().optim
    assert build_optimizer(tiny(), optim).defaults["fused"]
    assert build_optimizer(tiny(), optim, DistributedType.MULTI_CPU).defaults["fused"]
    assert not build_optimizer(tiny(), optim, DistributedType.FSDP).defaults["fused"]
    assert not build_optimizer(tiny(), optim, DistributedType.DEEPSPEED).defaults["fused"]
    models, opts = [], []
    for fused in (True, False):
        optim.fused = fused
        m = tiny()
        torch.manual_seed(0)
        for p in m.parameters():
            p.data.normal_()
        models.append(m)
        opts.append(build_optimizer(m, optim))
        assert opts[-1].defaults["fused"] is fused
    for step in range(3):
        for m, opt in zip(models, opts):
            g = torch.Generator().manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), n
        assert not torch.equal(a, torch.zeros_like(a)), n
