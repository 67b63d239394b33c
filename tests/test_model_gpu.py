"""The whole model on CUDA (skipped without a GPU): CUDA == CPU, parallel == recurrent, training grads, generation.

The kernels under the model differ by device (Triton chunk and decode kernels on CUDA, the chunked torch
path on CPU), so these tests check that the model built on them gives the CPU numbers.
"""
from __future__ import annotations

import pytest
import torch

from multimodal_rwkv import RWKVForCausalLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_cuda_fp32_equals_cpu_parallel_and_recurrent(tiny_pth, version):
    p = tiny_pth(version=version, n_layer=3, n_embd=128, vocab_size=256)
    cpu = RWKVForCausalLM.from_pretrained(p)
    gpu = RWKVForCausalLM.from_pretrained(p).cuda()
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(ids)
        full = gpu(ids.cuda())
        assert rel(full.logits, ref.logits) < 1e-4
        for a, b in zip(full.state.wkv, ref.state.wkv):
            assert a.dtype == torch.float32 and rel(a, b) < 1e-4
        # split: a long chunk (Triton chunk kernel) then token by token (Triton decode kernel)
        a = gpu(ids[:, :190].cuda())
        s, steps = a.state, [a.logits]
        for t in range(190, 200):
            o = gpu(ids[:, t:t + 1].cuda(), state=s)
            s, _ = o.state, steps.append(o.logits)
        assert rel(torch.cat(steps, 1), ref.logits) < 1e-4
        for x, y in zip(s.wkv, ref.state.wkv):
            assert rel(x, y) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_close_to_fp32(tiny_pth, dtype):
    p = tiny_pth(version="x060", n_layer=2, n_embd=128, vocab_size=256)
    ref = RWKVForCausalLM.from_pretrained(p)
    gpu = RWKVForCausalLM.from_pretrained(p, dtype=dtype).cuda()
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = gpu(ids.cuda())
        want = ref(ids)
    assert out.logits.dtype == dtype and out.state.wkv[0].dtype == torch.float32
    assert rel(out.logits.float(), want.logits) < 0.05


def test_cuda_training_gradients_equal_cpu(tiny_pth):
    p = tiny_pth(version="x060", n_layer=2, n_embd=128, vocab_size=256)
    cpu = RWKVForCausalLM.from_pretrained(p)
    gpu = RWKVForCausalLM.from_pretrained(p).cuda()
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(3))
    cpu(ids, labels=ids).loss.backward()
    gpu(ids.cuda(), labels=ids.cuda()).loss.backward()
    gp = dict(gpu.named_parameters())
    for name, q in cpu.named_parameters():
        if q.grad is None:
            continue
        g = gp[name].grad
        assert g is not None and torch.isfinite(g).all(), name
        assert rel(g, q.grad) < 1e-3, (name, rel(g, q.grad))


def test_cuda_greedy_generation_equals_cpu(tiny_pth):
    p = tiny_pth(version="x060", n_layer=2, n_embd=128, vocab_size=256)
    cpu = RWKVForCausalLM.from_pretrained(p)
    gpu = RWKVForCausalLM.from_pretrained(p).cuda()
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    a = cpu.generate(ids, max_new_tokens=12, eos_token_id=None)
    b = gpu.generate(ids.cuda(), max_new_tokens=12, eos_token_id=None)
    assert torch.equal(a, b.cpu())
