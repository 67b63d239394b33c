"""Shared test setup: 2 threads, deterministic seeds, small official-layout checkpoints."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _child_tmpdir(tmp_path_factory):
    """Processes the tests start (accelerate launch, torchrun) keep their temporary folders
    (torchelastic_*) under pytest's own temporary folder, not in /tmp, where they stayed."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("child_tmp"))
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


@pytest.fixture
def one_thread():
    """Tiny models are op-overhead bound: one thread is faster, and the same in subprocesses.
    Modules of tiny training runs use it for all their tests (``pytestmark``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_pth(tmp_path):
    """Factory: write a random BlinkDL-layout checkpoint and return its path."""
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    def make(name="tiny.pth", **kw):
        kw.setdefault("n_layer", 2)
        kw.setdefault("n_embd", 128)
        kw.setdefault("head_size", 64)
        kw.setdefault("vocab_size", 256)
        return make_blink_checkpoint(tmp_path / name, **kw)

    return make
