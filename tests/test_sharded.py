"""FSDP2 and DeepSpeed ZeRO-2 with the shipped launch configs (recipes/accelerate/) on 2 CPU gloo ranks.

accelerate only enables these backends on accelerators; tests/cpu_launch.py lets them run on CPU
ranks, so the engine's sharded paths (sharded model / optimiser, sharded checkpoints, resume, full-state
export) are tested here. The losses must equal one process with the doubled batch, as for DDP."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from multimodal_rwkv.training import TrainConfig, train
from multimodal_rwkv.training.config import save_config
from test_training_loop import REPO, base_overrides, losses, make_corpus


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 4: 4 steps, then the same command extended to 6 (a resume; the schedule
    follows max_steps, so the sharded runs do exactly the same)."""
    d = tmp_path_factory.mktemp("ref")
    corpus = make_corpus(d / "tok.npy")
    torch.set_num_threads(1)
    one = base_overrides(corpus, d / "one", max_steps=4, checkpoint_every=2, **{"train.micro_batch_size": 4})
    train(TrainConfig(), one)
    final = train(TrainConfig(), one + ["max_steps=6"])
    return corpus, final, losses(final.parent)


def launch(config, recipe, overrides, env_extra):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2",
           "--main_process_port", str(29500 + (os.getpid() + 500) % 1000),
           str(REPO / "tests" / "cpu_launch.py"), "train", str(recipe)]
    cmd += sum((["--set", o] for o in overrides), [])
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1", **env_extra)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


BACKENDS = {
    # config, extra env, files a checkpoint of that backend has (and not the DDP model.safetensors)
    "fsdp": ("fsdp.yaml", {"ACCELERATE_USE_CPU": "1"}, ["pytorch_model_fsdp_0", "optimizer_0"]),
    "deepspeed": ("deepspeed_zero2.yaml", {}, ["pytorch_model", "latest"]),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_sharded_ranks_equal_one_process_and_resume(tmp_path, reference, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    config, env, ckpt_files = BACKENDS[backend]
    corpus, ref_final, ref = reference
    recipe = tmp_path / "r.yaml"
    save_config(TrainConfig(), recipe)
    out = tmp_path / backend
    ov = base_overrides(corpus, out, max_steps=4, checkpoint_every=2, **{"train.micro_batch_size": 2})
    launch(config, recipe, ov, env)
    ckpt = out / "checkpoints" / "step_00000004"
    assert all((ckpt / f).exists() for f in ckpt_files), sorted(p.name for p in ckpt.iterdir())
    assert not (ckpt / "model.safetensors").exists()
    np.testing.assert_allclose(losses(out), ref[:4], rtol=0, atol=1e-5)
    # the same command with more steps resumes from the sharded checkpoint
    launch(config, recipe, ov + ["max_steps=6"], env)
    got = losses(out)
    assert len(got) == 6
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # the export gathered the full weights: the final model predicts like the one-process one
    from multimodal_rwkv import RWKVForCausalLM

    ids = torch.randint(1, 48, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = RWKVForCausalLM.from_pretrained(out / "final")(ids).logits
        b = RWKVForCausalLM.from_pretrained(ref_final)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
