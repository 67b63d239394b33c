"""FSDP2 with the shipped launch config (recipes/accelerate/fsdp.yaml) on 2 CPU gloo ranks.

accelerate only enables FSDP on accelerators; tests/fsdp_cpu_launch.py lets it run on CPU ranks so
the engine's FSDP path (every block sharded, sharded checkpoints, resume, full-state export) is
tested here. The losses must equal one process with the doubled batch, as for DDP."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from multimodal_rwkv.training import TrainConfig, train
from multimodal_rwkv.training.config import save_config
from test_training_loop import REPO, base_overrides, losses, make_corpus

pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def fsdp_train(recipe, overrides):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + 500) % 1000),
           str(REPO / "tests" / "fsdp_cpu_launch.py"), "train", str(recipe)]
    cmd += sum((["--set", o] for o in overrides), [])
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp_two_ranks_equal_one_process_and_resume(tmp_path):
    corpus = make_corpus(tmp_path / "tok.npy")
    # the reference: one process, batch 4, 4 steps, then extended to 6 (the schedule follows max_steps)
    one = base_overrides(corpus, tmp_path / "one", max_steps=4, checkpoint_every=2, **{"train.micro_batch_size": 4})
    train(TrainConfig(), one)
    ref_out = train(TrainConfig(), one + ["max_steps=6"])
    ref = losses(ref_out.parent)
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    out = tmp_path / "fsdp"
    ov = base_overrides(corpus, out, max_steps=4, checkpoint_every=2, **{"train.micro_batch_size": 2})
    fsdp_train(recipe, ov)
    ckpt = out / "checkpoints" / "step_00000004"
    # sharded FSDP checkpoint (model and optimiser), not the single-file DDP one
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    assert not (ckpt / "model.safetensors").exists()
    np.testing.assert_allclose(losses(out), ref[:4], rtol=0, atol=1e-5)
    # the same command with more steps resumes from the sharded checkpoint
    fsdp_train(recipe, ov + ["max_steps=6"])
    got = losses(out)
    assert len(got) == 6
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # the export gathered the full weights: the final model predicts like the one-process one
    from multimodal_rwkv import RWKVForCausalLM

    ids = torch.randint(1, 48, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = RWKVForCausalLM.from_pretrained(out / "final")(ids).logits
        b = RWKVForCausalLM.from_pretrained(ref_out)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
