"""Training engine end to end on CPU with tiny RWKV-6 models (n_layer=2, n_embd=64, head_size=32)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.training import TrainConfig, TrainingError, train
from multimodal_rwkv.training.config import apply_overrides, save_config

REPO = Path(__file__).resolve().parents[1]
TINY = "model.config={n_layer: 2, n_embd: 64, head_size: 32, vocab_size: 64}"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def make_corpus(path: Path, n_docs=150, seed=0):
    """Learnable token documents: arithmetic runs of ids in [1, 47], separated by 0."""
    rng = np.random.default_rng(seed)
    toks = []
    for _ in range(n_docs):
        a = int(rng.integers(1, 40))
        step = int(rng.integers(1, 3))
        toks += [(a + step * j) % 47 + 1 for j in range(int(rng.integers(5, 30)))] + [0]
    np.save(path, np.asarray(toks, np.int32))
    return path


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path / "tok.npy")


def base_overrides(corpus, out, **kw):
    o = {"output_dir": str(out), "data.train_file": str(corpus), "data.ctx_len": 16, "train.micro_batch_size": 4,
         "optim.lr": 5e-3, "optim.warmup_steps": 2, "progress_bar": False, "max_steps": 8, "checkpoint_every": 4,
         "seed": 7}
    o.update(kw)
    return [TINY] + [f"{k}={v}" for k, v in o.items()]


def losses(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def fresh_base(path, vocab=64, **kw):
    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    torch.manual_seed(3)
    m = RWKVForCausalLM(RWKVConfig(vocab_size=vocab, n_layer=2, n_embd=64, head_size=32, **kw))
    with torch.no_grad():  # RWKV's init zeroes output projections; make every layer matter
        for n, p in m.named_parameters():
            if p.ndim == 2 and float(p.abs().max()) == 0:
                p.normal_(0, 0.05)
    m.save_pretrained(path)
    return m


def test_loss_goes_down_and_run_folder(tmp_path, corpus):
    valid = make_corpus(tmp_path / "valid.npy", n_docs=20, seed=1)
    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=12, **{"data.valid_file": valid}))
    L = losses(tmp_path / "run")
    assert len(L) == 12
    assert np.mean(L[-3:]) < 0.7 * np.mean(L[:3]), L
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for k in ("step", "loss", "lr", "tokens_per_s", "grad_norm"):
        assert k in rows[0]
    assert rows[-1]["valid_loss"] < L[0]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    ck = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ck == ["step_00000008", "step_00000012"]  # keep_last = 2
    from multimodal_rwkv import RWKVForCausalLM

    m = RWKVForCausalLM.from_pretrained(out)
    ids = torch.randint(1, 48, (2, 9))
    assert m(input_ids=ids).logits.shape == (2, 9, 64)
    assert (out / "training_info.json").is_file() and (tmp_path / "run" / "recipe.yaml").is_file()
    # a finished run is not re-run; raising max_steps extends it from the last checkpoint
    assert train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=12)) == out
    train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=14))
    assert len(losses(tmp_path / "run")) == 14


def test_grad_accum_and_bptt_equal_plain_big_batch(tmp_path, corpus):
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "a", max_steps=4, **{
        "train.micro_batch_size": 4})).parent)
    acc = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "b", max_steps=4, **{
        "train.micro_batch_size": 2, "train.grad_accum": 2})).parent)
    np.testing.assert_allclose(acc, ref, rtol=0, atol=1e-5)
    # truncated BPTT: the forward (loss) is the same as the full sequence; only gradients are cut
    bp = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "c", max_steps=3, **{
        "train.bptt_chunk": 5})).parent)
    assert abs(bp[0] - ref[0]) < 1e-5
    # step 1's gradients are the same either way: RWKV's init zeroes the output products, through
    # which alone the cut paths reach the loss; from step 2 on the truncated gradient differs
    assert abs(bp[2] - ref[2]) > 1e-6


def _fork_cli(recipe, overrides):
    """``mmrwkv train`` in a forked child (a real process to signal, without re-importing torch)."""
    import multiprocessing

    argv = ["train", str(recipe)] + sum((["--set", o] for o in overrides), [])

    def target():
        code = 1
        try:
            from multimodal_rwkv.cli import main

            code = main(argv)
        finally:
            os._exit(code)

    p = multiprocessing.get_context("fork").Process(target=target)
    p.start()
    return p


def _wait_for_step(out, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        m = Path(out) / "metrics.jsonl"
        if m.exists() and len(losses(out)) >= step:
            return
        if not proc.is_alive():
            raise AssertionError(f"run ended early with exit code {proc.exitcode}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run")


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus):
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "ref", max_steps=8)).parent)
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    out = tmp_path / "run"
    ov = base_overrides(corpus, out, max_steps=8, checkpoint_every=1)
    # 1) SIGTERM: saves a checkpoint at the current step and exits with 128+15
    p = _fork_cli(recipe, ov)
    _wait_for_step(out, 2, p)
    os.kill(p.pid, signal.SIGTERM)
    p.join(120)
    assert p.exitcode == 128 + signal.SIGTERM
    n = len(losses(out))
    assert n < 8 and (out / "checkpoints" / f"step_{n:08d}" / "trainer_state.json").is_file()
    # 2) SIGKILL at a random moment (checkpoint_every=1: often in the middle of writing one)
    p = _fork_cli(recipe, ov)
    _wait_for_step(out, n + 1, p)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.05))
    os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    # 3) resume to the end
    train(TrainConfig(), ov)
    got = losses(out)
    assert len(got) == 8
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_sigterm_through_the_real_cli_process(tmp_path, corpus):
    """The installed entry point in a fresh interpreter: SIGTERM -> checkpoint, exit 143, a hint."""
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "multimodal_rwkv", "train", str(recipe)]
    cmd += sum((["--set", o] for o in base_overrides(corpus, out, max_steps=200)), [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((out / "metrics.jsonl").exists() and losses(out)):
        assert p.poll() is None and time.time() - t0 < 180, "run did not start"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "rerun the same command to resume" in err
    n = len(losses(out))
    assert (out / "checkpoints" / f"step_{n:08d}" / "trainer_state.json").is_file()


def test_half_written_checkpoint_is_never_loaded(tmp_path, corpus):
    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=4, checkpoint_every=2))
    # simulate a kill during the save of step 6: a temp folder, and a folder without trainer_state.json
    ck = out / "checkpoints"
    (ck / ".tmp-step_00000006").mkdir()
    (ck / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"garbage")
    (ck / "step_00000008").mkdir()
    (ck / "step_00000008" / "model.safetensors").write_bytes(b"garbage")
    train(TrainConfig(), base_overrides(corpus, out, max_steps=6, checkpoint_every=2))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert not (ck / ".tmp-step_00000006").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    from multimodal_rwkv.training import lm

    orig = lm.LMTask._chunk_loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        loss, logits, st = orig(self, *a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 6 else loss), logits, st

    monkeypatch.setattr(lm.LMTask, "_chunk_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as e:
        train(TrainConfig(), base_overrides(corpus, out, max_steps=10, checkpoint_every=2))
    msg = str(e.value)
    assert "non-finite loss" in msg and "step 6" in msg and "step_00000004" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert not (out / "final").exists()


def test_an_update_that_ruins_the_weights_is_neither_checkpointed_nor_exported(tmp_path, corpus):
    """lr 1e39: step 1's loss is finite, its update makes the weights inf. That checkpoint was saved
    (a resume started from it and failed again, whatever the new lr), and with max_steps 1 an
    all-NaN final/ was exported with exit 0 and a NaN (not JSON) valid_loss."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"the update of step 1 made the weights non-finite \(.*\): stopped "
                                            r"without saving them; no checkpoint yet: rerunning starts again"):
        train(TrainConfig(), base_overrides(corpus, out, max_steps=3, checkpoint_every=1,
                                            **{"optim.lr": 1e39, "optim.warmup_steps": 0}))
    assert not list(out.glob("checkpoints/step_*"))
    with pytest.raises(TrainingError, match="made the weights non-finite"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "one", max_steps=1, checkpoint_every=0,
                                            **{"optim.lr": 1e39, "optim.warmup_steps": 0, "data.valid_file": corpus,
                                               "eval_every": 1}))
    assert not (tmp_path / "one" / "final").exists()
    from multimodal_rwkv.training.loop import _json_row

    assert json.loads(_json_row({"step": 1, "valid_loss": float("nan"), "loss": float("inf"), "lr": 0.5})) == {
        "step": 1, "valid_loss": None, "loss": None, "lr": 0.5,  # metrics.jsonl stays JSON, and a diverged
        "nonfinite": ["loss", "valid_loss"]}                     # number is not taken for a missing one


def test_the_latest_checkpoint_is_exported_after_an_interrupted_extension(tmp_path, corpus, caplog):
    """A finished run extended, killed after a checkpoint past the old max_steps, then rerun with the
    old command: it said 'already finished' and kept the old final/ (the documented behaviour is a
    warning and the checkpoint's model exported)."""
    import shutil

    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=4, checkpoint_every=2))
    shutil.copytree(out / "final", tmp_path / "final4")
    train(TrainConfig(), base_overrides(corpus, out, max_steps=6, checkpoint_every=2))
    shutil.rmtree(out / "final")  # as if the extension was killed after its step-6 checkpoint
    shutil.copytree(tmp_path / "final4", out / "final")
    caplog.set_level("WARNING", logger="multimodal_rwkv.training.loop")
    train(TrainConfig(), base_overrides(corpus, out, max_steps=4, checkpoint_every=2))
    assert "past max_steps=4" in caplog.text
    assert json.loads((out / "final" / "training_info.json").read_text())["step"] == 6


def test_a_failed_reexport_is_tried_again(tmp_path, corpus, monkeypatch):
    """A finished run re-exported with a changed recipe (export.pth) failed (a full disk), and the
    next run said 'already finished': recipe.yaml had been saved before the export."""
    from multimodal_rwkv.training import loop

    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=2))
    real = loop.Trainer._export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(out / ".tmp-final" / "model.pth"))

    monkeypatch.setattr(loop.Trainer, "_export", full_disk)
    with pytest.raises(OSError):
        train(TrainConfig(), base_overrides(corpus, out, max_steps=2, **{"export.pth": "true"}))
    monkeypatch.setattr(loop.Trainer, "_export", real)
    train(TrainConfig(), base_overrides(corpus, out, max_steps=2, **{"export.pth": "true"}))
    assert (out / "final" / "model.pth").is_file()


def test_lora_trains_only_lora_and_merge_reproduces_outputs(tmp_path, corpus):
    from safetensors.torch import load_file

    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.training.peft import LoRALinear, apply_lora

    base = fresh_base(tmp_path / "base")
    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, **{
        "model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.lora_r": 4, "optim.lr": 1e-2,
        "peft.lora_targets": "[att.key, att.value, att.output, ffn.key, ffn.value]"}))
    sd = load_file(out.parent / "checkpoints" / "step_00000006" / "model.safetensors")
    base_sd = base.state_dict()
    lora_keys = [k for k in sd if k.endswith("lora_A") or k.endswith("lora_B")]
    assert len(lora_keys) == 2 * 2 * 5
    for k, v in sd.items():
        if k in lora_keys:
            continue
        assert torch.equal(v, base_sd[k]), f"{k} changed but only LoRA weights should train"
    assert all(float(sd[k].abs().max()) > 0 for k in lora_keys if k.endswith("lora_B"))
    # the LoRA model rebuilt from the checkpoint == the merged export
    lora_model = RWKVForCausalLM.from_pretrained(tmp_path / "base")
    apply_lora(lora_model, 4, 16.0, ["att.key", "att.value", "att.output", "ffn.key", "ffn.value"])
    lora_model.load_state_dict(sd)
    merged = RWKVForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    ids = torch.randint(1, 48, (2, 37))
    with torch.no_grad():
        a, b, c = lora_model(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapters did change the model
    # peft.merge_lora: false -> final/ still loads (merged weights) and the adapters come alone too
    out2 = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=7, **{
        "model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.lora_r": 4, "optim.lr": 1e-2,
        "peft.lora_targets": "[att.key, att.value, att.output, ffn.key, ffn.value]", "peft.merge_lora": "false"}))
    merged2 = RWKVForCausalLM.from_pretrained(out2)
    adapter = load_file(out2 / "lora_adapter.safetensors")
    mask = os.umask(0)
    os.umask(mask)  # every file of final/ has the usual mode (safetensors made the adapter 0600)
    assert {f.name: f.stat().st_mode & 0o777 for f in out2.iterdir()} == {
        f.name: 0o666 & ~mask for f in out2.iterdir()}
    info = json.loads((out2 / "lora_adapter.json").read_text())
    assert sorted(adapter) == sorted(lora_keys) and info["r"] == 4 and info["scaling"] == 16.0 / 4
    w = base_sd["rwkv.blocks.0.att.key.weight"] + info["scaling"] * (
        adapter["rwkv.blocks.0.att.key.lora_B"] @ adapter["rwkv.blocks.0.att.key.lora_A"])
    torch.testing.assert_close(merged2.rwkv.blocks[0].att.key.weight, w, rtol=1e-5, atol=1e-6)


def test_a_damaged_checkpoint_is_named_not_a_traceback(tmp_path, corpus, caplog):
    from multimodal_rwkv.errors import CheckpointError

    train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=4, checkpoint_every=2))
    ck = tmp_path / "run" / "checkpoints" / "step_00000004"
    state = (ck / "trainer_state.json").read_text()
    (ck / "trainer_state.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="step_00000004/trainer_state.json: damaged trainer state"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2))
    (ck / "trainer_state.json").write_text(state)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "run_rng")
    rng = next((tmp_path / "run_rng" / "checkpoints" / "step_00000004").glob("random_states_*.pkl"))
    rng.write_bytes(b"garbage")  # accelerate only logs this at INFO: a warning says it, training goes on
    with caplog.at_level("WARNING"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run_rng", max_steps=6, checkpoint_every=2))
    assert "random states (random_states_*.pkl) are missing or damaged" in caplog.text
    assert len(losses(tmp_path / "run_rng")) == 6
    # torch.distributed.checkpoint (FSDP) raises a CheckpointException, a BaseException: named too
    import accelerate

    class CheckpointException(BaseException):
        pass

    def fail(self, *a, **kw):
        raise CheckpointException("CheckpointException ranks:dict_keys([1])")

    real = accelerate.Accelerator.load_state
    accelerate.Accelerator.load_state = fail
    try:
        with pytest.raises(CheckpointError, match="step_00000004: cannot resume .*another launch config"):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2))
    finally:
        accelerate.Accelerator.load_state = real
    weights = ck / "model.safetensors"
    # weights of another shape: torch's message is "Error(s) in loading state_dict for X:" and the
    # reason on the next line, which the one-line error left out
    from safetensors.torch import load_file, save_file

    sd = load_file(weights)
    sd["rwkv.emb.weight"] = sd["rwkv.emb.weight"][:-1].clone()
    save_file(sd, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"cannot resume .*Error\(s\) in loading state_dict for .*: "
                                              r"size mismatch for rwkv\.emb\.weight"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="step_00000004: cannot resume .*damaged; delete this checkpoint"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2))


def test_accelerate_launch_cpu_asked_for_several_processes_is_refused():
    """accelerate launch --cpu --num_processes 2 starts one process (MASTER_ADDR set, no WORLD_SIZE):
    the run trained alone with half the batch, exit 0."""
    from multimodal_rwkv.training.loop import _single_process_cpu_launch

    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
              "ACCELERATE_DYNAMO_BACKEND": "no", "ACCELERATE_MIXED_PRECISION": "no"}
    assert _single_process_cpu_launch(simple)
    # a job script that exports MASTER_ADDR, without accelerate launch: a plain run
    assert not _single_process_cpu_launch({"ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "10.0.0.5"})
    assert not _single_process_cpu_launch({"ACCELERATE_USE_CPU": "True"})  # --num_processes 1
    assert not _single_process_cpu_launch({**simple, "WORLD_SIZE": "2"})  # torchrun
    assert not _single_process_cpu_launch({**simple, "OMPI_COMM_WORLD_SIZE": "2"})  # mpirun
    assert not _single_process_cpu_launch({**simple, "ACCELERATE_USE_CPU": "False"})


def test_one_run_per_output_dir_and_export_files_checked_first(tmp_path, corpus):
    from multimodal_rwkv.training.loop import Trainer

    cfg = apply_overrides(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2))
    holder = Trainer(cfg)
    (tmp_path / "run").mkdir()
    holder._lock_output_dir()  # another run holds the folder
    with pytest.raises(ConfigError, match="output_dir is in use by another training run"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2))
    os.close(holder._lock_fd)
    with pytest.raises(ConfigError, match="export.include_files: .*nope.txt is not a file"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run2", max_steps=2,
                                            **{"export.include_files": f"[{tmp_path / 'nope.txt'}]"}))
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()  # refused before any training


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_new_folder(tmp_path, corpus, caplog):
    """A failed start removes the output_dir it created (and its new parents), unless a finished
    token cache is in it; a folder that existed before is left as it was found."""
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "shard_00000.npy", np.zeros((2, 3), np.int32))  # a bad file
    new = tmp_path / "new" / "run"
    with pytest.raises(DataError, match="shard_00000.npy: expected a 1-D integer token array"):
        train(TrainConfig(), base_overrides(shards, new, max_steps=1))
    assert not (tmp_path / "new").exists()
    # a path through "..": the folders it created are still found (a/.. is not one of them)
    (tmp_path / "n3").mkdir()
    with pytest.raises(DataError):
        train(TrainConfig(), base_overrides(shards, f"{tmp_path}/n3/a/../b", max_steps=1))
    assert os.listdir(tmp_path / "n3") == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train(TrainConfig(), base_overrides(shards, old, max_steps=1))
    assert (old / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(old)) == ["notes.txt"]  # the lock, recipe and empty caches it added are gone
    # tokenized text, then a bad validation file: the token cache stays for the rerun
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 50)
    cached = tmp_path / "cached"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty file"):
        train(TrainConfig(), base_overrides(text, cached, max_steps=1, **{
            "data.tokenizer": "bytes", "data.valid_file": tmp_path / "empty.txt"}) + [
            "model.config={n_layer: 1, n_embd: 64, head_size: 32}"])
    assert [p.name for p in (cached / "token_cache").iterdir() if not p.name.startswith(".")]
    # another run's folder (locked) is never removed by a run refused because of it
    from multimodal_rwkv.training.loop import Trainer

    holder = Trainer(apply_overrides(TrainConfig(), base_overrides(corpus, tmp_path / "held")))
    (tmp_path / "held").mkdir()
    holder._lock_output_dir()
    with pytest.raises(ConfigError, match="in use"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "held", max_steps=1))
    assert (tmp_path / "held" / ".lock").is_file()
    os.close(holder._lock_fd)


def test_a_model_too_large_to_build_is_one_line_not_a_traceback(tmp_path, corpus, capsys):
    from multimodal_rwkv.cli import main

    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    ov = base_overrides(corpus, tmp_path / "run", max_steps=1)
    ov[0] = "model.config={n_layer: 1, n_embd: 64, head_size: 32, vocab_size: 1099511627776}"  # 256 TiB
    assert main(["train", str(recipe), "--set", *ov]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory building the model (tried to allocate" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_cpu_run_does_not_import_deepspeed(tmp_path, corpus):
    """accelerate's unwrap_model imports DeepSpeed whenever it is installed, which printed DeepSpeed's
    "Setting accelerator to CPU" warning in every CPU run; without a DeepSpeed config it is not imported."""
    code = ("import sys; from multimodal_rwkv.training import TrainConfig, train; "
            f"train(TrainConfig(), {base_overrides(corpus, tmp_path / 'run', max_steps=1)!r}); "
            "print('deepspeed imported:', 'deepspeed' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "deepspeed imported: False" in r.stdout and "Setting accelerator" not in r.stderr


def _official_logits(pth, ids):
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    m = RWKV(model=str(pth), strategy="cpu fp32", verbose=False)
    out, _ = m.forward(ids, None, full_output=True)
    return out


def test_state_tuning_trains_only_state_and_official_package_agrees(tmp_path, corpus):
    from safetensors.torch import load_file

    from multimodal_rwkv import RWKVForCausalLM

    base = fresh_base(tmp_path / "base")
    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, **{
        "model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.train_state": "true",
        "optim.lr": 0.05, "optim.warmup_steps": 0, "export.pth": "true"}))
    sd = load_file(out.parent / "checkpoints" / "step_00000006" / "model.safetensors")
    base_sd = base.state_dict()
    states = [k for k in sd if k.endswith("time_state")]
    assert states == [] or len(states) == 2
    for k, v in sd.items():
        if k.endswith("time_state"):
            assert float(v.abs().max()) > 0
        else:
            assert torch.equal(v, base_sd[k]), f"{k} changed but only the state should train"
    tuned = RWKVForCausalLM.from_pretrained(out)
    assert tuned.config.has_initial_state
    ids = [int(i) for i in torch.randint(1, 48, (23,))]
    with torch.no_grad():
        ours = tuned(input_ids=torch.tensor([ids])).logits[0]
        plain = base(input_ids=torch.tensor([ids])).logits[0]
    assert (ours - plain).abs().max() > 1e-3  # the state matters
    # the official package loads the exported file (time_state value-major) and agrees
    official = _official_logits(out / "model.pth", ids)
    torch.testing.assert_close(official.float(), ours, rtol=1e-4, atol=1e-4)
    ts = torch.load(out / "time_state.pth", weights_only=True)
    assert sorted(ts) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    full = torch.load(out / "model.pth", weights_only=True)
    for k, v in ts.items():
        assert torch.equal(v, full[k].float())


def test_unknown_keys_and_bad_data_through_the_cli(tmp_path, corpus, capsys):
    from multimodal_rwkv.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: lm\nmax_steps: 2\noptim: {lr: 1e-3, momentum: 0.9}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.momentum" in err and len(err.splitlines()) == 1
    recipe.write_text("task: lm\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    rc = main(["train", str(recipe), "--set", f"output_dir={tmp_path / 'o'}", "--set", "data.tokenizer=bytes",
               "--set", f"data.train_file={bad}", "--set", "model.config={n_layer: 1, n_embd: 64, head_size: 32}",
               "--set", "progress_bar=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and f"{bad}:2" in err[-1] and "invalid JSON" in err[-1]
    with pytest.raises(ConfigError, match="model.config.n_layers"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'p'}", f"data.train_file={corpus}", "model.config={n_layers: 2}"])


def test_max_minutes_ends_the_run_on_time_and_finishes_the_schedule(tmp_path, corpus):
    from multimodal_rwkv.training.loop import lr_at

    budget_min = 0.02  # 1.2 s of training steps; max_steps far out of reach
    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=100000, max_minutes=budget_min,
                                              checkpoint_every=0))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    budget = budget_min * 60
    assert 1 <= len(rows) < 100000 and rows[-1]["elapsed_s"] >= budget
    assert all(r["elapsed_s"] <= budget for r in rows[:-1])  # stopped at the first step past the budget
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{len(rows):08d}" / "trainer_state.json").read_text())
    assert state["step"] == len(rows)
    cfg = TrainConfig().optim
    cfg.lr, cfg.lr_final, cfg.warmup_steps = 5e-3, TrainConfig().optim.lr_final, 2
    if len(rows) > 3:  # each lr follows the training time before its step, not the step count
        for prev, r in zip(rows[2:], rows[3:]):
            want = lr_at(r["step"] - 1, cfg, 100000, prev["elapsed_s"] / budget)
            assert r["lr"] == pytest.approx(want, rel=2e-2, abs=1e-6)
        assert rows[-1]["lr"] < rows[2]["lr"]
    assert (out / "config.json").is_file()
    assert train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=100000,
                                               max_minutes=budget_min)) == out  # finished: not re-run
    with pytest.raises(ConfigError, match="max_minutes"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "bad", max_minutes=0))


def test_two_processes_equal_one_process_with_doubled_batch(tmp_path, corpus):
    """gloo on CPU: torchrun starts 2 ranks, accelerate sees MULTI_CPU (ACCELERATE_USE_CPU=1)."""
    scored = {"data.valid_file": str(corpus), "eval_every": 5, "eval_batches": 1}  # the same windows either way
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "one", max_steps=5, **{
        "train.micro_batch_size": 4, **scored})).parent)
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    # 2 ranks x micro-batch 1 x grad_accum 2 (DDP no_sync on the first micro-batch) == 1 rank x batch 4
    ov = base_overrides(corpus, tmp_path / "two", max_steps=5, **{"train.micro_batch_size": 1, "train.grad_accum": 2,
                                                                  **scored})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "multimodal_rwkv", "train", str(recipe)]
    cmd += sum((["--set", o] for o in ov), [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(tmp_path / "two")
    assert len(got) == 5
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    valid = [[json.loads(x).get("valid_loss") for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()][-1]
             for d in ("one", "two")]
    assert valid[0] is not None and valid[1] == pytest.approx(valid[0], abs=1e-5), valid
    # a wall-clock budget: the ranks agree on the time (mean over ranks) and stop at the same step
    ov = base_overrides(corpus, tmp_path / "timed", max_steps=100000, max_minutes=0.01, checkpoint_every=0,
                        **{"train.micro_batch_size": 1})
    assert r.stdout.splitlines() == [str(tmp_path / "two" / "final")]  # printed by rank 0 only
    cmd = cmd[:cmd.index("train") + 2] + sum((["--set", o] for o in ov), [])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max_minutes=0.01 reached" in r.stderr and (tmp_path / "timed" / "final" / "config.json").is_file()
    assert r.stderr.count("max_minutes=0.01 reached") == 1  # warned by rank 0 alone (each rank said it)
    # data missing: rank 0 says so in one line; the other rank, whose peer left, in one line too
    # (it printed a gloo "Connection closed by peer" traceback); torchrun's own report aside
    ov = base_overrides(tmp_path / "missing.npy", tmp_path / "gone", max_steps=2)
    cmd = cmd[:cmd.index("train") + 2] + sum((["--set", o] for o in ov), [])
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "missing.npy" in r.stderr
    assert f'File "{REPO / "multimodal_rwkv"}' not in r.stderr, r.stderr[-3000:]


def test_two_processes_train_a_state_and_other_weights_in_bptt_chunks(tmp_path, corpus):
    """DDP stopped after step 1 ("parameters that were not used in producing loss") when time_state
    trained beside other weights with train.bptt_chunk: the last chunk starts from a detached state,
    so the initial state was not in the graph of the backward that synchronises."""
    fresh_base(tmp_path / "base")
    common = {"model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.train_state": "true",
              "peft.trainable": "['*.ln_x.*']", "train.bptt_chunk": 4, "max_steps": 3, "checkpoint_every": 0,
              "optim.warmup_steps": 0}
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "one", **common)).parent)
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    ov = base_overrides(corpus, tmp_path / "two", **common, **{"train.micro_batch_size": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + (os.getpid() + 7) % 1000), "-m", "multimodal_rwkv", "train", str(recipe)]
    cmd += sum((["--set", o] for o in ov), [])
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(losses(tmp_path / "two"), ref, rtol=0, atol=1e-5)


def test_precision_checkpointing_l2wrap_and_eval_every(tmp_path, corpus, monkeypatch):
    valid = make_corpus(tmp_path / "valid.npy", n_docs=10, seed=2)
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "a", max_steps=3)).parent)
    gc = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "b", max_steps=3, **{
        "train.grad_checkpointing": "true"})).parent)
    np.testing.assert_allclose(gc, ref, rtol=0, atol=1e-5)  # recomputation does not change the math
    l2 = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "c", max_steps=3, **{
        "train.l2wrap": "true"})).parent)
    assert l2[0] == pytest.approx(ref[0], abs=1e-6) and l2[2] != ref[2]  # same forward, extra gradient
    bf = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "d", max_steps=3, **{
        "train.precision": "bf16", "eval_every": 2, "data.valid_file": valid})).parent)
    assert all(np.isfinite(bf)) and 0 < abs(bf[0] - ref[0]) < 0.05  # bf16 autocast: close, not equal
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "valid_loss" in r] == [2, 3]
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ConfigError, match="log_with: tensorboard needs"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "e", max_steps=1, log_with="[tensorboard]"))
    import accelerate.utils

    if not accelerate.utils.is_wandb_available():  # accelerate only warned, and trained without it
        with pytest.raises(ConfigError, match=r"log_with: wandb needs the 'wandb' package.*pip install wandb"):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "f", max_steps=1, log_with="[wandb]"))


def test_tensorboard_tracker_logs_the_metrics(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=3, log_every=1, log_with="[tensorboard]"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    dirs = sorted({p.parent for p in (out / "logs").rglob("events.out.tfevents.*")})
    assert dirs, "no TensorBoard event file under output_dir/logs"
    accs = [EventAccumulator(str(d)) for d in dirs]
    for a in accs:
        a.Reload()
    ea = next((a for a in accs if "loss" in a.Tags()["scalars"]), None)
    assert ea is not None, "no 'loss' scalar in the TensorBoard logs"
    logged = {e.step: e.value for e in ea.Scalars("loss")}
    assert logged.keys() == {r["step"] for r in rows} == {1, 2, 3}
    for r in rows:
        assert logged[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    assert "lr" in ea.Tags()["scalars"]


def test_a_valid_file_that_is_the_train_file_counts_its_bad_records_once(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " * 3}) + "\n" for i in range(30)) + "{broken\n[1\n")
    train(TrainConfig(), [f"output_dir={tmp_path / 'run'}", f"data.train_file={data}", f"data.valid_file={data}",
                          "data.tokenizer=bytes", "data.ctx_len=24", "max_steps=1", "progress_bar=false",
                          "data.on_bad_record=skip", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_records"] == 2  # it said 4
    info = json.loads((tmp_path / "run" / "final" / "training_info.json").read_text())
    assert info["skipped_records"] == 2
    # a valid file inside the train folder: its records are train records too (13 was said for 11)
    folder = tmp_path / "js"
    folder.mkdir()
    (folder / "a.jsonl").write_text(data.read_text() + "{x\n")
    (folder / "b.jsonl").write_text(data.read_text())
    train(TrainConfig(), [f"output_dir={tmp_path / 'run2'}", f"data.train_file={folder}",
                          f"data.valid_file={folder / 'b.jsonl'}", "data.tokenizer=bytes", "data.ctx_len=24",
                          "max_steps=1", "progress_bar=false", "data.on_bad_record=skip",
                          "model.config={n_layer: 1, n_embd: 32, head_size: 16}"])
    info = json.loads((tmp_path / "run2" / "final" / "training_info.json").read_text())
    assert info["skipped_records"] == 5


def test_bf16_training_runs_the_backward_outside_autocast(tmp_path, corpus, monkeypatch):
    """The backward ran inside autocast: the WKV reference backend's (and any fp32 operation's)
    backward products were taken in bf16 (gradients off by ~3e-3)."""
    from multimodal_rwkv.training import lm

    seen = []
    real = lm.LMTask._chunk_loss

    def spy(self, *a, **k):
        loss, logits, state = real(self, *a, **k)
        seen.append(("forward", torch.is_autocast_enabled("cpu")))
        loss.register_hook(lambda g: seen.append(("backward", torch.is_autocast_enabled("cpu"))))
        return loss, logits, state

    monkeypatch.setattr(lm.LMTask, "_chunk_loss", spy)
    train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=1, **{"train.precision": "bf16"}))
    assert ("forward", True) in seen and ("backward", False) in seen and ("backward", True) not in seen


def test_text_training_refuses_a_model_smaller_than_its_tokenizer(tmp_path):
    """data.tokenizer bytes with vocab_size 256 trained (the corpus happened to hold no id 256) and
    mmrwkv generate then refused the model; text data needs a row for every id of its tokenizer."""
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50)
    with pytest.raises(ConfigError, match="vocab_size 256 is smaller than the bytes tokenizer's 257"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'run'}", f"data.train_file={data}", "data.tokenizer=bytes",
                              "max_steps=1", "progress_bar=false",
                              "model.config={n_layer: 1, n_embd: 32, head_size: 16, vocab_size: 256}"])


def test_text_and_binidx_sources_train(tmp_path):
    from multimodal_rwkv.training.data import write_binidx

    chat = tmp_path / "chat.jsonl"
    recs = [{"messages": [{"role": "user", "content": f"what is {i}+{i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]
    chat.write_text("\n".join(json.dumps(r) for r in recs) + "\n{broken\n")
    common = [f"output_dir={tmp_path / 'chat'}", f"data.train_file={chat}", "data.tokenizer=bytes",
              "data.ctx_len=24", "train.micro_batch_size=2", "max_steps=2", "progress_bar=false",
              "data.on_bad_record=skip", f"data.cache_dir={tmp_path / 'cache'}",
              "model.config={n_layer: 1, n_embd: 64, head_size: 32}"]
    train(TrainConfig(), common)
    rows = [json.loads(x) for x in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_records"] == 1 for r in rows) and np.isfinite(rows[-1]["loss"])
    train(TrainConfig(), common + ["max_steps=3"])  # restart: the token cache is reused, not rebuilt
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1
    write_binidx(tmp_path / "d", [list(range(1, 40)) + [0]] * 5)
    train(TrainConfig(), [f"output_dir={tmp_path / 'bin'}", f"data.train_file={tmp_path / 'd.bin'}",
                          "data.ctx_len=16", "train.micro_batch_size=2", "max_steps=1", "progress_bar=false", TINY])
    assert len(losses(tmp_path / "bin")) == 1
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'big'}", f"data.train_file={tmp_path / 'd.bin'}",
                              "progress_bar=false", "model.config={n_layer: 1, n_embd: 64, head_size: 32, vocab_size: 20}"])


def test_resume_with_a_different_model_is_a_clear_error(tmp_path, corpus):
    from multimodal_rwkv.errors import CheckpointError

    train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2, checkpoint_every=1))
    other = ["model.config={n_layer: 1, n_embd: 64, head_size: 32, vocab_size: 64}"]
    with pytest.raises(ConfigError, match="step_00000002.*model.config.n_layer: 2 -> 1.*new output_dir"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=4) + other)
    (tmp_path / "run" / "recipe.yaml").unlink()  # no recipe to compare with: the checkpoint's shapes tell
    with pytest.raises(CheckpointError, match="step_00000002.*new output_dir"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=4) + other)


def test_resume_restores_rng_exactly_with_dropout(tmp_path, corpus):
    """LoRA dropout draws random numbers every step: the resumed losses match only if the RNG
    state is restored with the optimiser, the weights and the data position."""
    import shutil

    fresh_base(tmp_path / "base")
    ov = {"model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.lora_r": 4,
          "peft.lora_dropout": 0.5, "optim.lr": 1e-2, "checkpoint_every": 3}
    ref = losses(train(TrainConfig(), base_overrides(corpus, tmp_path / "ref", max_steps=6, **ov)).parent)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    shutil.copy(tmp_path / "ref" / "metrics.jsonl", out / "metrics.jsonl")  # rows after step 3 are dropped
    got = losses(train(TrainConfig(), base_overrides(corpus, out, max_steps=6, **ov)).parent)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    other = tmp_path / "other_seed"
    shutil.copytree(out / "checkpoints", other / "checkpoints", ignore=shutil.ignore_patterns("step_00000006"))
    for f in (other / "checkpoints" / "step_00000003").glob("random_states_*.pkl"):
        f.unlink()  # without the saved RNG state the dropout masks differ
    diff = losses(train(TrainConfig(), base_overrides(corpus, other, max_steps=6, **ov)).parent)
    assert len(diff) == 3 and max(abs(a - b) for a, b in zip(diff, ref[3:])) > 1e-5


def test_a_step_without_targets_is_no_update_not_a_nan_stop(tmp_path):
    """Chat windows that fall inside a user turn have no target token: the step is logged with
    loss null and makes no update; the run goes on (it used to stop as a 'non-finite loss')."""
    chat = tmp_path / "chat.jsonl"
    long_q = "please summarise this long passage about rivers and mountains in a few words " * 2
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{long_q}{i}"},
                                                     {"role": "assistant", "content": "Rivers."}]}) + "\n"
                            for i in range(6)))
    out = tmp_path / "run"
    train(TrainConfig(), [f"output_dir={out}", f"data.train_file={chat}", "data.tokenizer=bytes", "data.ctx_len=16",
                          "train.micro_batch_size=1", "data.shuffle=false", "max_steps=14", "progress_bar=false",
                          "model.config={n_layer: 1, n_embd: 64, head_size: 32}", "optim.weight_decay=0.1",
                          # the first validation window lies in a user turn too: no valid_loss, no null
                          f"data.valid_file={chat}", "eval_every=4", "eval_batches=1"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("valid_loss", 0.0) is not None for r in rows)
    empty = [r for r in rows if r.get("no_targets")]
    assert empty and all(r["loss"] is None and r["grad_norm"] is None for r in empty)
    assert any(isinstance(r["loss"], float) and np.isfinite(r["loss"]) for r in rows)
    assert empty[0]["step"] == 1  # the first window lies inside the first user turn
    # no update on such a step: not even weight decay moves the weights
    from safetensors.torch import load_file

    base = fresh_base(tmp_path / "base", vocab=257)
    train(TrainConfig(), [f"output_dir={tmp_path / 'one'}", f"data.train_file={chat}", "data.tokenizer=bytes",
                          "data.ctx_len=16", "train.micro_batch_size=1", "data.shuffle=false", "max_steps=1",
                          "progress_bar=false", "model.config={}", f"model.from_pretrained={tmp_path / 'base'}",
                          "optim.weight_decay=0.1", "checkpoint_every=1"])
    after = load_file(tmp_path / "one" / "checkpoints" / "step_00000001" / "model.safetensors")
    init = base.state_dict()
    assert all(torch.equal(after[k], init[k]) for k in after)
    assert (out / "loss.png").is_file()


def test_state_tuning_with_truncated_bptt_trains_the_state(tmp_path, corpus):
    """Past the first chunk only the detached state feeds the loss: those chunks add nothing to the
    gradient (they used to crash the backward), the first chunk still trains the state."""
    from safetensors.torch import load_file

    fresh_base(tmp_path / "base")
    common = {"model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.train_state": "true",
              "optim.lr": 0.05, "optim.warmup_steps": 0, "max_steps": 2, "checkpoint_every": 2}
    train(TrainConfig(), base_overrides(corpus, tmp_path / "bptt", **common, **{"train.bptt_chunk": 4}))
    sd = load_file(tmp_path / "bptt" / "checkpoints" / "step_00000002" / "model.safetensors")
    states = [v for k, v in sd.items() if k.endswith("time_state")]
    assert len(states) == 2 and all(float(v.abs().max()) > 0 for v in states)
    assert len(losses(tmp_path / "bptt")) == 2 and all(np.isfinite(losses(tmp_path / "bptt")))


def test_a_finished_run_checks_a_changed_recipe_and_exports_again(tmp_path, corpus, caplog):
    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=2, checkpoint_every=2))
    with pytest.raises(ConfigError, match="model.config.no_such_key"):
        train(TrainConfig(), base_overrides(corpus, out, max_steps=2) + ["model.config.no_such_key=1"])
    assert not (out / "final" / "model.pth").exists()
    train(TrainConfig(), base_overrides(corpus, out, max_steps=2, **{"export.pth": "true"}))
    assert (out / "final" / "model.pth").is_file()
    assert len(losses(out)) == 2  # nothing trained again
    caplog.set_level("INFO", logger="multimodal_rwkv.training.loop")
    caplog.clear()
    train(TrainConfig(), base_overrides(corpus, out, max_steps=1, checkpoint_every=1, **{"export.pth": "true"}))
    assert "already finished" in caplog.text  # the same recipe but for the run length: nothing to do
    # a checkpoint past max_steps (an interrupted longer run) says so when exported
    (out / "final" / "config.json").unlink()
    caplog.clear()
    train(TrainConfig(), base_overrides(corpus, out, max_steps=1, **{"export.pth": "true"}))
    assert "past max_steps=1" in caplog.text


def test_negative_ids_in_a_signed_binidx_are_named(tmp_path):
    from multimodal_rwkv.training.data import write_binidx

    write_binidx(tmp_path / "d", [list(range(1, 40)), [5, -5, 7, 0]], dtype=np.int16)
    with pytest.raises(DataError, match=r"d.bin: token 40 has id -5, outside the model's vocabulary \[0, 64\) "
                                        r"\(set data.on_bad_record=skip to skip the documents"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'o'}", f"data.train_file={tmp_path / 'd.bin'}",
                              "data.ctx_len=16", "progress_bar=false", TINY])
    # skip: the document is skipped and counted, the run trains on the other one
    final = train(TrainConfig(), [f"output_dir={tmp_path / 'o2'}", f"data.train_file={tmp_path / 'd.bin'}",
                                  "data.ctx_len=16", "progress_bar=false", "max_steps=1", "data.on_bad_record=skip",
                                  TINY])
    assert json.loads((final / "training_info.json").read_text())["skipped_records"] == 1
    (tmp_path / "e.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 5)
    (tmp_path / "e.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match="truncated index header"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'p'}", f"data.train_file={tmp_path / 'e.bin'}",
                              "progress_bar=false", TINY])


def test_a_killed_tokenization_leaves_no_temp_behind(tmp_path):
    import socket

    from multimodal_rwkv.training.data import load_stream

    cache = tmp_path / "cache"
    cache.mkdir()
    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".tmp-abc-{host}-{dead.pid}"  # what a killed process of this host leaves
    live = cache / f".tmp-abc-{host}-{os.getpid()}x"  # not a pid: left alone
    other = cache / f".tmp-abc-otherhost-{dead.pid}"  # another host's: left alone
    for p in (stale, live, other):
        p.mkdir()
        (p / "tokens.u32").write_bytes(b"\x00" * 8)
    (tmp_path / "t.txt").write_text("hello world\n")
    load_stream(tmp_path / "t.txt", "auto", "bytes", cache, "fail")
    assert not stale.exists() and live.exists() and other.exists()


def test_a_training_checkpoint_folder_is_named_when_loaded_as_a_model(tmp_path, corpus):
    from multimodal_rwkv import CheckpointError, RWKVForCausalLM
    from multimodal_rwkv.vision import VisualRWKV

    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=2, checkpoint_every=1))
    ckpt = out / "checkpoints" / "step_00000002"
    for load in (RWKVForCausalLM.from_pretrained, VisualRWKV.from_pretrained):
        with pytest.raises(CheckpointError, match=f"a training checkpoint .*the run's model is {out / 'final'}"):
            load(ckpt)
    with pytest.raises(CheckpointError, match="a training checkpoint"):  # as a recipe's starting model
        train(TrainConfig(), base_overrides(corpus, tmp_path / "next", max_steps=1) + [
            "model.config={}", f"model.from_pretrained={ckpt}"])


def test_a_broken_link_in_a_data_folder_is_an_unreadable_file(tmp_path):
    from multimodal_rwkv.training.data import load_stream

    d = tmp_path / "data"
    d.mkdir()
    (d / "good.txt").write_text("hello world\n")
    (d / "lost.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="lost.txt: cannot read"):
        load_stream(d, "auto", "bytes", tmp_path / "c1", "fail")
    st = load_stream(d, "auto", "bytes", tmp_path / "c2", "skip")
    assert st.skipped == 1 and len(st) == len("hello world\n") + 1


def test_a_shard_outside_the_vocabulary_is_a_bad_record(tmp_path):
    """A .npy shard of a folder holding an id >= vocab_size stopped the run under on_bad_record=skip,
    and the error named the folder and a position in the joined stream, not the shard."""
    d = tmp_path / "shards"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(d / f"s{i}.npy", rng.integers(1, 48, size=300).astype(np.uint16))
    bad = rng.integers(1, 48, size=300)
    bad[123] = 64  # the tiny model's vocab_size
    np.save(d / "s3_bad.npy", bad.astype(np.uint16))
    with pytest.raises(DataError, match=r"s3_bad.npy: token 123 has id 64, outside the model's vocabulary \[0, 64\)"):
        train(TrainConfig(), base_overrides(d, tmp_path / "fail", max_steps=1))
    out = tmp_path / "skip"
    train(TrainConfig(), base_overrides(d, out, max_steps=2, **{"data.on_bad_record": "skip"}))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["skipped_records"] == 1


def test_text_folders_skip_hidden_entries_follow_linked_folders_and_survive_link_loops(tmp_path, caplog):
    """A link loop named *.txt crashed the run with a traceback (Path.resolve in the output_dir
    check); hidden files (.ipynb_checkpoints copies) became training data; a linked subfolder was
    dropped silently; .npy shards in subfolders were dropped silently."""
    import logging

    from multimodal_rwkv.training.data import load_stream

    d = tmp_path / "data"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    (d / "a.txt").write_text("alpha\n")
    (d / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("alpha\n")
    (d / ".draft.txt").write_text("hidden\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "b.txt").write_text("beta\n")
    (d / "linked").symlink_to(tmp_path / "shared")
    (d / "up").symlink_to(d)  # a folder link loop: each real folder is read once
    st = load_stream(d, "auto", "bytes", tmp_path / "c0", "fail", skip=[tmp_path / "run"])
    assert bytes(int(i) - 1 for i in st.ids if i).decode() == "alpha\nbeta\n"
    (d / "loop1.txt").symlink_to(d / "loop2.txt")
    (d / "loop2.txt").symlink_to(d / "loop1.txt")
    with pytest.raises(DataError, match="loop1.txt: cannot read"):
        load_stream(d, "auto", "bytes", tmp_path / "c1", "fail", skip=[tmp_path / "run"])
    assert load_stream(d, "auto", "bytes", tmp_path / "c2", "skip", skip=[tmp_path / "run"]).skipped == 2
    t = tmp_path / "tokens"
    (t / "more").mkdir(parents=True)
    np.save(t / "s0.npy", np.arange(1, 9, dtype=np.uint16))
    np.save(t / "more" / "s1.npy", np.arange(1, 9, dtype=np.uint16))
    with caplog.at_level(logging.WARNING):
        load_stream(t, "auto", "bytes", tmp_path / "c3", "fail")
    assert "1 .npy file(s) in its subfolders are not read" in caplog.text and "s1.npy" in caplog.text
    (t / "s0.npy").unlink()
    with pytest.raises(DataError, match=r"holds no .npy token files \(1 lie in subfolders, e.g. .*s1.npy"):
        load_stream(t, "auto", "bytes", tmp_path / "c4", "fail")
    (tmp_path / "t.txt").write_text("not numpy")
    with pytest.raises(DataError, match=r"t.txt: not a .npy file \(no NumPy header\)"):
        load_stream(tmp_path / "t.txt", "tokens", "bytes", tmp_path / "c5", "fail")


def test_processes_that_formed_no_group_are_refused(tmp_path, corpus, monkeypatch):
    """Two processes of a multi-GPU launch on a machine without GPUs each train alone: refused with
    the reason (it used to surface as 'output_dir is in use by another training run')."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="formed no process group.*ACCELERATE_USE_CPU"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=1))


class _DropsWindowOne(torch.utils.data.Dataset):
    """Packed windows of which window 1 turns out bad when read (as a truncated image does in a
    LlavaDataset): dropped once per process, listed in ``bad_records``; the next window stands in."""

    def __init__(self, ds, name):
        self.ds, self.name, self.bad_records, self.failed = ds, name, [], False

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == 1:
            if not self.failed:
                self.failed = True
                self.bad_records.append(f"{self.name} window 1: turned out bad")
            i = 2
        return self.ds[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_records_dropped_while_reading_are_counted_everywhere(tmp_path, monkeypatch, workers):
    """A record dropped in a dataset's __getitem__ never reached metrics.jsonl's skipped_records,
    and with DataLoader workers (which read copies of the dataset) not training_info.json either."""
    from multimodal_rwkv.training.lm import LMTask
    from multimodal_rwkv.training.loop import list_checkpoints

    build = LMTask.build_datasets

    def dropping(self, model):
        tr, va, coll = build(self, model)
        self.skipped += 15  # as if 15 bad records were skipped while building
        return _DropsWindowOne(tr, "train"), _DropsWindowOne(va, "valid"), coll

    monkeypatch.setattr(LMTask, "build_datasets", dropping)
    corpus = make_corpus(tmp_path / "tok.npy", n_docs=6)  # 7 windows: several epochs, each worker meets window 1
    out = tmp_path / "run"
    ov = base_overrides(corpus, out, max_steps=6, log_every=1, checkpoint_every=3, **{
        "data.num_workers": workers, "data.valid_file": corpus, "eval_every": 100, "eval_batches": 1})
    train(TrainConfig(), ov)

    def counts():
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((out / "final" / "training_info.json").read_text())["skipped_records"]
        state = json.loads(list_checkpoints(out / "checkpoints")[-1][1].joinpath("trainer_state.json").read_text())
        return [r["skipped_records"] for r in rows], info, state

    seen, info, state = counts()
    # train window 1 dropped at some step (16 from then on); the valid one in the final evaluation
    assert set(seen[:-1]) <= {15, 16} and seen[-2] == 16 and seen == sorted(seen)
    assert seen[-1] == info == state["skipped_records"] == 17
    assert state["dropped_records"] == ["train window 1: turned out bad", "valid window 1: turned out bad"]
    # resumed, the new processes drop the same records again: still each counted once
    train(TrainConfig(), ov + ["max_steps=8"])
    seen, info, _ = counts()
    assert len(seen) == 8 and seen[5:] == [17, 17, 17] and info == 17


def test_a_resume_keeps_the_runs_model_and_peft_settings(tmp_path, corpus, monkeypatch):
    """A rerun that changed a setting the weights depend on but not their shapes (lora_alpha, a
    model.config key) used to go on, and re-exported final/ as another model."""
    fresh_base(tmp_path / "base")
    ov = {"model.config": "{}", "model.from_pretrained": tmp_path / "base", "peft.lora_r": 4, "max_steps": 4,
          "checkpoint_every": 2}
    run = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, run, **ov))
    final = {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()}
    for change, needle in (({"peft.lora_alpha": 32}, "peft.lora_alpha: 16.0 -> 32.0"),
                           ({"max_steps": 6, "peft.lora_r": 8}, "peft.lora_r: 4 -> 8")):
        with pytest.raises(ConfigError, match="trained with other model/PEFT settings.*" + needle):
            train(TrainConfig(), base_overrides(corpus, run, **{**ov, **change}))
    assert {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()} == final
    assert len(losses(run)) == 4  # nothing trained by the refused reruns
    # an export-only setting may change: final/ is written again, unmerged; so may what does not
    # change the weights' meaning (dropout, the source path spelled another way, a default given)
    train(TrainConfig(), base_overrides(corpus, run, **{**ov, "peft.merge_lora": "false"}))
    monkeypatch.chdir(tmp_path)
    train(TrainConfig(), base_overrides(corpus, run, **{**ov, "max_steps": 5, "peft.lora_dropout": 0.1,
                                                        "model.from_pretrained": "./base"}))
    assert len(losses(run)) == 5
    # a fresh model: a model.config key that keeps every shape
    tiny = [f"model.config={{n_layer: 2, n_embd: 64, head_size: 32, vocab_size: 64, head_size_divisor: {d}}}"
            for d in (8, 1)]
    train(TrainConfig(), base_overrides(corpus, tmp_path / "fresh", max_steps=2, checkpoint_every=2) + tiny[:1])
    # the same sizes written out (the default divisor, another kernel, no LoRA's settings): resumed
    train(TrainConfig(), base_overrides(corpus, tmp_path / "fresh", max_steps=3, checkpoint_every=2,
                                        **{"peft.lora_alpha": 3}) + [tiny[0][:-1] + ", wkv_backend: torch}"])
    with pytest.raises(ConfigError, match="model.config.head_size_divisor: 8 -> 1"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "fresh", max_steps=4, checkpoint_every=2) + tiny[1:])


def test_dataloader_workers_do_not_keep_the_output_dir_lock(tmp_path, corpus):
    """flock belongs to the open file, which a forked DataLoader worker shares: after a kill -9
    of the run its workers (alive a few seconds more) kept output_dir "in use" and the rerun was
    refused. A worker closes its copy when it starts."""
    import fcntl

    from multimodal_rwkv.training.loop import Trainer, _drop_inherited_lock

    (tmp_path / "run").mkdir()
    run = Trainer(apply_overrides(TrainConfig(), base_overrides(corpus, tmp_path / "run")))
    run._lock_output_dir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker, as the DataLoader starts it
        try:
            _drop_inherited_lock(run._lock_fd, run._lock_id, 0)
            _drop_inherited_lock(w, run._lock_id, 0)  # another file under that number: left open
            os.write(w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        assert os.read(r, 1) == b"x"
        os.close(run._lock_fd)  # the run dies; its worker lives on
        fd = os.open(tmp_path / "run" / ".lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the worker still held the lock
        os.close(fd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)


def test_metrics_have_every_step_and_launch_mismatches_are_refused(tmp_path, corpus, monkeypatch, caplog):
    """log_every thinned metrics.jsonl (the contract is one row per optimiser step); a 2-process
    run resumed by 1 process went on with half the batch; an FSDP launch config on CPUs trained
    plain DDP without a word; max_steps=0 exported the untrained model silently."""
    import logging

    out = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=6, log_every=4, checkpoint_every=3))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    state = out / "checkpoints" / "step_00000006" / "trainer_state.json"
    st = json.loads(state.read_text())
    state.write_text(json.dumps({**st, "world_size": 2}))  # as a 2-process run leaves it
    with pytest.raises(ConfigError, match="checkpointed by 2 process\\(es\\), resumed with 1"):
        train(TrainConfig(), base_overrides(corpus, out, max_steps=8))
    # finished: nothing is resumed, so any number of processes may rerun it or export it again
    assert train(TrainConfig(), base_overrides(corpus, out, max_steps=6)) == out / "final"
    train(TrainConfig(), base_overrides(corpus, out, max_steps=6, **{"export.pth": "true"}))
    assert (out / "final" / "model.pth").is_file()
    # a misspelt model.config key on a resume: named as such, not as changed settings
    state.write_text(json.dumps(st))
    with pytest.raises(ConfigError, match="n_layers") as e:
        train(TrainConfig(), base_overrides(corpus, out, max_steps=8) + ["model.config.n_layers=2"])
    assert "other model/PEFT settings" not in str(e.value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="asks for FSDP, but accelerate runs"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "fsdp", max_steps=1))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "zero", max_steps=0))
    assert "max_steps=0: nothing is trained" in caplog.text


def test_a_resumed_run_takes_the_recipes_optimiser_settings(tmp_path, corpus):
    """optim.weight_decay / betas / eps / decay_lr_scale changed when extending a run: the saved
    optimiser groups used to overwrite them silently (recipe.yaml said otherwise)."""
    from multimodal_rwkv.training.loop import list_checkpoints

    run = tmp_path / "run"
    train(TrainConfig(), base_overrides(corpus, run, max_steps=2, checkpoint_every=1))
    train(TrainConfig(), base_overrides(corpus, run, max_steps=3, checkpoint_every=1, **{
        "optim.weight_decay": 0.5, "optim.decay_lr_scale": 5, "optim.betas": "[0.5,0.6]", "optim.eps": 0.1}))
    saved = torch.load(list_checkpoints(run / "checkpoints")[-1][1] / "optimizer.bin", weights_only=True)
    groups = saved["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0, 0.0]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 5.0]
    assert all(tuple(g["betas"]) == (0.5, 0.6) and g["eps"] == 0.1 for g in groups)
    assert groups[2]["lr"] == pytest.approx(5 * groups[0]["lr"])
    assert len(losses(run)) == 3


def test_include_files_never_replace_what_the_export_writes(tmp_path, corpus):
    """An included model.safetensors / config.json replaced final/'s own (final/ then held a 2-byte
    'model'); two includes of one name kept only the second."""
    inc = tmp_path / "inc"
    (inc / "b").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tok.json", "b/tok.json"):
        (inc / name).write_text("{}")
    for files, match in (([inc / "model.safetensors"], "would replace final/model.safetensors"),
                         ([inc / "config.json"], "would replace final/config.json"),
                         ([inc / "tok.json", inc / "b" / "tok.json"], "would both be final/tok.json")):
        with pytest.raises(ConfigError, match=match):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=1,
                                                **{"export.include_files": "[" + ", ".join(map(str, files)) + "]"}))
        assert not (tmp_path / "run").exists()  # refused before any training
    # a file the export does not write in this run is taken: its own generation defaults (which
    # also take the place of those a starting model brings)
    (inc / "generation_config.json").write_text('{"max_new_tokens": 3}')
    final = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=1, **{
        "export.include_files": f"[{inc / 'tok.json'}, {inc / 'generation_config.json'}]"}))
    assert (final / "tok.json").read_text() == "{}" and (final / "model.safetensors").stat().st_size > 1000
    from multimodal_rwkv import RWKVForCausalLM

    assert RWKVForCausalLM.from_pretrained(final).generation_config.max_new_tokens == 3
    # checked before training, as from_pretrained will read it
    bad = tmp_path / "badgc"
    bad.mkdir()
    for text, why in (("{not json", "not a readable generation config"),
                      ('{"stop_strings": 5}', "stop_strings must be a string or a list of strings"),
                      ('{"temperature": "hot"}', "temperature must be a finite number"),  # (failed at generate)
                      ('{"do_sample": true, "top_p": 2}', r"top_p must be in \(0, 1\]"),
                      ('{"do_sample": "yes"}', "do_sample must be true or false"),
                      ('{"do_sample": true, "temperature": 0}', "temperature 0 with do_sample true"),
                      ('{"repetition_penalty": -1}', "repetition_penalty must be a number > 0")):
        (bad / "generation_config.json").write_text(text)
        with pytest.raises(ConfigError, match=why):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "gcbad", max_steps=1, **{
                "export.include_files": f"[{bad / 'generation_config.json'}]"}))
        assert not (tmp_path / "gcbad").exists()
    # ... also over those a starting model brings (the export writes them too)
    fresh_base(tmp_path / "base")
    base = RWKVForCausalLM.from_pretrained(tmp_path / "base")
    base.generation_config.max_new_tokens = 9
    base.save_pretrained(tmp_path / "base")
    final = train(TrainConfig(), base_overrides(corpus, tmp_path / "ft", max_steps=1, **{
        "model.config": "{}", "model.from_pretrained": tmp_path / "base",
        "export.include_files": f"[{inc / 'generation_config.json'}]"}))
    assert RWKVForCausalLM.from_pretrained(final).generation_config.max_new_tokens == 3


def test_a_rerun_keeps_the_runs_tokenizer(tmp_path, corpus):
    """data.tokenizer changed on a finished run re-exported final/ saying 'bytes' for weights
    trained on World ids (generate then decoded them byte by byte)."""
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 50)
    run = tmp_path / "run"
    small = ["model.config={n_layer: 1, n_embd: 64, head_size: 32, vocab_size: 257}"]
    train(TrainConfig(), base_overrides(text, run, max_steps=2, **{"data.tokenizer": "bytes"}) + small)
    for steps in (2, 3):  # finished (re-export) and extended
        with pytest.raises(ConfigError, match='data.tokenizer: "bytes" -> "world"'):
            train(TrainConfig(), base_overrides(text, run, max_steps=steps, **{"data.tokenizer": "world"}) + small)
    assert len(losses(run)) == 2
    # token files were tokenized elsewhere: data.tokenizer means nothing for them and may change
    tok_run = tmp_path / "tokens"
    train(TrainConfig(), base_overrides(corpus, tok_run, max_steps=2, **{"data.tokenizer": "bytes"}))
    train(TrainConfig(), base_overrides(corpus, tok_run, max_steps=3, **{"data.tokenizer": "world"}))
    assert len(losses(tok_run)) == 3


def test_an_output_dir_inside_the_data_folder_is_not_read_as_data(tmp_path):
    """output_dir = the folder of jsonl files: the rerun (extend) read the run's own
    trainer_state.json, metrics.jsonl, configs and cache meta as training records."""
    data = tmp_path / "data"
    data.mkdir()
    for name in "ab":
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} the quick brown fox {i}"}) + "\n"
                                                    for i in range(30)))
    over = [f"output_dir={data}", f"data.train_file={data}", "data.tokenizer=bytes", "data.ctx_len=16",
            "model.config={n_layer: 1, n_embd: 64, head_size: 32}", "progress_bar=false", "checkpoint_every=2",
            "train.micro_batch_size=2"]
    train(TrainConfig(), over + ["max_steps=2"])
    out = train(TrainConfig(), over + ["max_steps=4"])  # extends the run
    assert len(losses(data)) == 4
    info = json.loads((out / "training_info.json").read_text())
    assert info.get("skipped_records", 0) == 0, info


def test_another_runs_output_inside_the_data_folder_is_not_read_as_data(tmp_path):
    """A run kept inside a folder of jsonl files: a second run on that folder (its own output_dir
    elsewhere in it) read the first run's metrics, configs and trainer states as bad records."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(40)))
    over = [f"data.train_file={data}", "data.tokenizer=bytes", "data.ctx_len=16", "max_steps=2",
            "model.config={n_layer: 1, n_embd: 64, head_size: 32}", "progress_bar=false", "checkpoint_every=1",
            "train.micro_batch_size=2"]
    train(TrainConfig(), over + [f"output_dir={data / 'run'}"])
    out = train(TrainConfig(), over + [f"output_dir={data / 'run2'}"])  # on_bad_record=fail: nothing bad
    info = json.loads((out / "training_info.json").read_text())
    assert info.get("skipped_records", 0) == 0, info
    (data / "notes").mkdir()  # a folder with a recipe.yaml alone is not a run: still read
    (data / "notes" / "recipe.yaml").write_text("task: lm\n")
    (data / "notes" / "b.jsonl").write_text(json.dumps({"text": "more text"}) + "\n")
    from multimodal_rwkv.training.data import folder_files

    assert folder_files(data, (".jsonl", ".json")) == [data / "a.jsonl", data / "notes" / "b.jsonl"]


def test_a_full_disk_while_logging_names_metrics_jsonl(tmp_path, corpus, monkeypatch, capsys):
    """A failed append to metrics.jsonl said only 'No space left on device'."""
    import builtins

    from multimodal_rwkv.cli import main
    from multimodal_rwkv.training import loop

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, *a, **k):
        f = builtins.open(path, *a, **k)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in (a[0] if a else k.get("mode", "")) else f

    monkeypatch.setattr(loop, "open", fake_open, raising=False)
    out = tmp_path / "run"
    args = ["train", "recipes/lm_tiny.yaml", "--set"] + base_overrides(corpus, out, max_steps=2)
    assert main(args) == 2
    assert f"{out / 'metrics.jsonl'}: No space left on device" in capsys.readouterr().err


def test_a_failed_export_leaves_no_tmp_final_and_a_rerun_exports(tmp_path, corpus, monkeypatch):
    """A full disk during the export of final/ left an empty .tmp-final/ in output_dir."""
    from multimodal_rwkv.training.lm import LMTask

    real = LMTask.save_pretrained

    def full(self, model, out_dir):
        (Path(out_dir) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LMTask, "save_pretrained", full)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2, checkpoint_every=1))
    assert not (tmp_path / "run" / ".tmp-final").exists() and not (tmp_path / "run" / "final").exists()
    monkeypatch.setattr(LMTask, "save_pretrained", real)
    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2, checkpoint_every=1))
    assert (out / "model.safetensors").is_file()


def test_a_finished_run_without_checkpoints_is_not_trained_again_silently(tmp_path, corpus):
    """checkpoints/ deleted to save disk: the same command retrained from step 0 and replaced final/."""
    import shutil

    from multimodal_rwkv.errors import ConfigError

    out = train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=2, checkpoint_every=1))
    before = (out / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    for steps in (2, 4):
        with pytest.raises(ConfigError, match="holds a finished run's final/ but no checkpoints"):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=steps))
    assert (out / "model.safetensors").read_bytes() == before


def test_a_missing_checkpoint_file_and_a_full_disk_say_so(tmp_path, corpus, monkeypatch):
    """A checkpoint missing optimizer.bin was blamed on changed recipe settings ("use a new
    output_dir"); a full disk while saving one was a 52-line traceback from torch.save."""
    import accelerate

    from multimodal_rwkv.errors import CheckpointError

    train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=4, checkpoint_every=2))
    (tmp_path / "run" / "checkpoints" / "step_00000004" / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="a file of it is missing; delete this checkpoint folder"):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2))

    def full(self, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(OSError) as e:
        train(TrainConfig(), base_overrides(corpus, tmp_path / "new", max_steps=2, checkpoint_every=1))
    assert "step_00000001" in e.value.filename and "is the disk full?" in e.value.strerror
    assert not list((tmp_path / "new" / "checkpoints").glob(".tmp-*"))


def test_the_recipe_file_inside_output_dir_is_not_overwritten(tmp_path, corpus):
    from multimodal_rwkv.cli import main

    run = tmp_path / "run"
    run.mkdir()
    mine = "# my notes about this experiment\nmax_steps: 2\n"
    (run / "recipe.yaml").write_text(mine)
    rc = main(["train", str(run / "recipe.yaml")] + [
        x for o in base_overrides(corpus, run, max_steps=2) for x in ("--set", o)])
    assert rc == 2 and (run / "recipe.yaml").read_text() == mine


def test_an_output_dir_that_is_a_file_is_refused_saying_so(tmp_path):
    """It said only '.../f.pth: File exists'."""
    (tmp_path / "f.pth").write_bytes(b"x")
    (tmp_path / "c.txt").write_text("hello world " * 20)
    common = [f"data.train_file={tmp_path / 'c.txt'}", "data.tokenizer=bytes", "data.ctx_len=8", "max_steps=1",
              "progress_bar=false", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"]
    with pytest.raises(ConfigError, match="output_dir: .*f.pth is a file, not a folder"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'f.pth'}"] + common)
    # below a file, and a data.cache_dir that is a file: a bare FileExistsError / NotADirectoryError
    with pytest.raises(ConfigError, match="output_dir: .*f.pth/run cannot be a folder: .*f.pth is a file"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'f.pth' / 'run'}"] + common)
    with pytest.raises(ConfigError, match="data.cache_dir: .*f.pth is a file, not a folder"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'f.pth'}"] + common)
    assert (tmp_path / "f.pth").read_bytes() == b"x" and not (tmp_path / "run").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError, match="output_dir: .*dangling is a broken link"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'dangling'}"] + common)
    with pytest.raises(ConfigError, match="data.cache_dir: .*loop"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'loop' / 'c'}"] + common)
    # overrides as one string were read character by character ("override 'm': expected KEY=VALUE")
    with pytest.raises(ConfigError, match="overrides must be a list of KEY=VALUE strings"):
        train(TrainConfig(), "max_steps=2")


def test_a_rerun_removes_the_old_final_an_interrupted_export_kept(tmp_path):
    """An interrupt between final/ -> .old-final and the new final/ left the whole old model in
    .old-final for good (reruns removed .tmp-* only)."""
    (tmp_path / "c.txt").write_text("hello world " * 20)
    args = [f"output_dir={tmp_path / 'run'}", f"data.train_file={tmp_path / 'c.txt'}", "data.tokenizer=bytes",
            "data.ctx_len=8", "max_steps=1", "progress_bar=false", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"]
    train(TrainConfig(), args)
    old = tmp_path / "run" / ".old-final"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"x" * 100)
    train(TrainConfig(), args)
    assert not old.exists() and (tmp_path / "run" / "final" / "config.json").is_file()


def test_an_old_final_that_cannot_be_removed_does_not_block_the_next_export(tmp_path, monkeypatch, caplog):
    """A read-only old final/ stayed as .old-final (silently), and every later export failed with
    'final: Directory not empty' (the rename onto it). Root ignores permissions, so the failure to
    remove is simulated."""
    import logging

    from multimodal_rwkv import fileio
    from multimodal_rwkv.training import loop

    real = fileio.remove_tree
    stuck = lambda p: None if Path(p).name.startswith(".old-final") else real(p)  # noqa: E731
    monkeypatch.setattr(fileio, "remove_tree", stuck)
    monkeypatch.setattr(loop, "remove_tree", stuck)
    (tmp_path / "c.txt").write_text("hello world " * 20)
    args = [f"output_dir={tmp_path / 'run'}", f"data.train_file={tmp_path / 'c.txt'}", "data.tokenizer=bytes",
            "data.ctx_len=8", "progress_bar=false", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"]
    for steps in (1, 2, 3):
        with caplog.at_level(logging.WARNING, logger="multimodal_rwkv.fileio"):
            train(TrainConfig(), args + [f"max_steps={steps}"])
        info = json.loads((tmp_path / "run" / "final" / "training_info.json").read_text())
        assert info["step"] == steps
    assert "could not remove" in caplog.text and ".old-final" in caplog.text


def test_exports_and_pruning_survive_what_they_cannot_remove_and_token_folders_skip_odd_entries(
        tmp_path, monkeypatch, caplog, corpus):
    """An old checkpoint that could not be renamed (immutable) failed every later save at its
    keep_last pruning; an export killed after final/ went aside left the old model until a later
    run; a FIFO named *.npy in a token folder hung the run; a broken link named *.npy stopped it
    under on_bad_record=skip."""
    import logging
    import threading

    from multimodal_rwkv.training import loop

    real = loop.discard_tree

    def stuck(p):
        if Path(p).name == "step_00000002":
            raise PermissionError(1, "Operation not permitted", str(p))
        real(p)

    monkeypatch.setattr(loop, "discard_tree", stuck)
    with caplog.at_level(logging.WARNING):
        train(TrainConfig(), base_overrides(corpus, tmp_path / "run", max_steps=6, checkpoint_every=2,
                                            keep_last=1))
    assert "could not remove the old checkpoint" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()
    monkeypatch.undo()
    run = tmp_path / "run"
    (run / "final").rename(run / ".old-final")  # an export killed with final/ set aside
    train(TrainConfig(), base_overrides(corpus, run, max_steps=6, checkpoint_every=2, keep_last=1))
    assert (run / "final" / "config.json").is_file() and not list(run.glob(".old-final*"))
    d = tmp_path / "shards"
    d.mkdir()
    np.save(d / "a.npy", np.arange(1, 40, dtype=np.uint16))
    os.mkfifo(d / "pipe.npy")
    (d / "gone.npy").symlink_to(tmp_path / "nothing.npy")
    (d / "dir.npy").mkdir()
    from multimodal_rwkv.training.data import load_stream

    got = []
    t = threading.Thread(target=lambda: got.append(load_stream(d, "tokens", "bytes", tmp_path / "c", "skip")),
                         daemon=True)
    t.start()
    t.join(60)
    assert got and got[0].skipped == 1 and len(got[0]) == 40  # the FIFO and the folder are no shards


def test_a_re_export_over_a_final_that_is_a_link(tmp_path):
    """final/ linked to a folder elsewhere: the re-export left a stray .old-final link, and the next
    re-export failed ('final: Not a directory')."""
    (tmp_path / "c.txt").write_text("hello world " * 20)
    args = [f"output_dir={tmp_path / 'run'}", f"data.train_file={tmp_path / 'c.txt'}", "data.tokenizer=bytes",
            "data.ctx_len=8", "max_steps=1", "progress_bar=false", "model.config={n_layer: 1, n_embd: 32, head_size: 16}"]
    train(TrainConfig(), args)
    final = tmp_path / "run" / "final"
    final.rename(tmp_path / "big_disk_final")
    final.symlink_to(tmp_path / "big_disk_final")
    for pth in ("true", "false"):
        train(TrainConfig(), args + [f"export.pth={pth}"])
    assert final.is_dir() and not (tmp_path / "run" / ".old-final").exists()
    assert (final / "config.json").is_file() and not (final / "model.pth").exists()


def test_missing_data_is_refused_before_the_model_is_built(tmp_path, corpus, monkeypatch):
    """A data path with a typo, or none at all (an empty recipe), was found only after the model was
    built (a from_pretrained model loaded, the 0.2B default built: 12 s and 2 GB for a typo)."""
    from multimodal_rwkv.training.lm import LMTask

    def no_model(self):
        raise AssertionError("the model was built")

    monkeypatch.setattr(LMTask, "build_model", no_model)
    for over, msg in (({"data.train_file": str(tmp_path / "typo.npy")}, r"typo.npy: no such file or folder \(data.train_file\)"),
                      ({"data.valid_file": str(tmp_path / "v.txt")}, r"v.txt: no such file or folder \(data.valid_file\)")):
        with pytest.raises(DataError, match=msg):
            train(TrainConfig(), base_overrides(corpus, tmp_path / "o", **over))
    with pytest.raises(ConfigError, match=r"data.train_file is not set \(e.g. --set data.train_file=corpus.txt\)"):
        train(TrainConfig(), [f"output_dir={tmp_path / 'o'}"])
    from multimodal_rwkv.training.data import write_binidx

    write_binidx(tmp_path / "d", [[1, 2, 0]])  # a binidx prefix names files that exist
    with pytest.raises(AssertionError, match="the model was built"):
        train(TrainConfig(), base_overrides(tmp_path / "d", tmp_path / "o"))
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_data_folder_that_cannot_be_listed_says_so_whatever_the_vocabulary(tmp_path, corpus, monkeypatch):
    """With a vocabulary smaller than the World tokenizer's, the unlistable folder was taken for
    text and refused for the tokenizer's size."""
    locked = tmp_path / "locked"
    locked.mkdir()
    np.save(locked / "a.npy", np.load(corpus))
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder of mode 000 gives a user who is not root
        if not isinstance(path, int) and os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"locked: cannot list the folder \(Permission denied\)"):
        train(TrainConfig(), base_overrides(locked, tmp_path / "o", max_steps=1))


def test_a_finished_run_reruns_without_its_data(tmp_path, corpus):
    """Rerunning a finished run does nothing, also once its data is gone (the check that the data
    exists, made before the model is built, comes after the finished run is recognised)."""
    import shutil

    data = tmp_path / "data.npy"
    shutil.copy(corpus, data)
    final = train(TrainConfig(), base_overrides(data, tmp_path / "o", max_steps=1, checkpoint_every=0))
    data.unlink()
    assert train(TrainConfig(), base_overrides(data, tmp_path / "o", max_steps=1, checkpoint_every=0)) == final
