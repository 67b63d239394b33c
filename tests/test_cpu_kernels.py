"""The C++ CPU kernels (kernels/cpu.py, cpu_kernels.cpp) against their plain twins, and where they apply."""
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


def test_switched_off_falls_back_to_the_plain_product():
    import os
    import subprocess
    import sys

    code = ("import torch; from multimodal_rwkv.kernels import cpu as cpu; from multimodal_rwkv.model.modeling import Linear\n"
            "x, w = torch.randn(4, 32), torch.randn(8, 32)\n"
            "assert cpu.few_rows_linear(x, w) is None\n"
            "lin = Linear(32, 8, bias=False)\n"
            "with torch.no_grad(): torch.testing.assert_close(lin(x), x @ lin.weight.t())\n"
            "print(cpu.status())")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MMRWKV_CPU_KERNEL="0"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "MMRWKV_CPU_KERNEL=0"
