"""CPU benchmark of the fused elementwise kernels against their PyTorch twins, at training shapes.

Run:  python bench/cpu_fused.py [--rows 4096] [--threads 2] [--no-write]

Shapes of the 6x512 RWKV-6 of bench/train_speed.py at ctx 4096 (B*T = 4096 rows, C = 512, 8 heads of
64, vocab 16384). Each row times one kernel of :mod:`multimodal_rwkv.kernels.cpu` and the PyTorch
expressions it replaces (its twin, differentiated by autograd for the backward rows), interleaved,
best of N, plus the largest relative difference between the two results. glibc's malloc runs
with the setting the model's first CPU forward applies (:func:`multimodal_rwkv.kernels.cpu.keep_freed_memory`).

- mix: ddlerp's five slots, ``x + (prev - x) * (maa_i + m_i)`` (forward), and its backward (the
  gradients of x, the carried-in shift, maa and the five offsets);
- gn_gate: ``GroupNorm(y) * silu(gate)`` and its backward;
- cross-entropy over [rows, vocab] logits, forward + backward;
- transpose of a [rows, C] activation (twin: ``x.t().contiguous()``);
- weight gradients ``d.T @ a`` of the C x C, C -> 3.5C, 3.5C -> C and head products
  (:func:`multimodal_rwkv.kernels.cpu.weight_grad`: both operands transposed, then oneDNN; twin:
  torch's product on the transposed view, which goes to MKL).

Writes the table to BENCHMARKS.md under "## Fused elementwise kernels (CPU)".
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _report import interleaved, publish  # noqa: E402  (bench/_report.py)
from multimodal_rwkv.kernels import cpu  # noqa: E402


def best_ms(fns, reps):
    """Warm each of ``fns`` up once, then :func:`_report.interleaved`, in ms."""
    for f in fns:
        f()
    return [t * 1e3 for t in interleaved(fns, reps)]


def rel_diff(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cpu.keep_freed_memory()  # what the model's first CPU forward sets (both sides reuse freed buffers)
    if cpu.extension() is None:
        raise SystemExit(f"the C++ kernels are not available here: {cpu.status()}")
    g = torch.Generator().manual_seed(0)
    R, C, H, V = a.rows, 512, 8, 16384
    x, shift = torch.randn(1, R, C, generator=g), torch.randn(1, C, generator=g)
    maa = torch.rand(5, C, generator=g)
    off = [torch.randn(R, C, generator=g) * 0.1 for _ in range(5)]
    d = [torch.randn(R, C, generator=g) for _ in range(5)]
    y, gp, dz = (torch.randn(R, C, generator=g) for _ in range(3))
    gw, gb = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    logits, tgt = torch.randn(R, V, generator=g) * 2, torch.randint(0, V, (R,), generator=g)
    rows = []

    k_out, t_out = cpu.mix(x, shift, maa, off), cpu.mix_reference(x, shift, maa, off)
    rows.append(("mix, 5 slots, forward",) + tuple(best_ms(
        [lambda: cpu.mix(x, shift, maa, off), lambda: cpu.mix_reference(x, shift, maa, off)], a.reps))
        + (max(rel_diff(p, q) for p, q in zip(k_out, t_out)),))

    def mix_twin_bwd():
        leaves = [t.clone().requires_grad_() for t in (x, shift, maa)] + [o.clone().requires_grad_() for o in off]
        outs = cpu.mix_reference(leaves[0], leaves[1], leaves[2], leaves[3:])
        return torch.autograd.grad(outs, leaves, d)

    kb = cpu.mix_backward(d, x, shift, maa, off, want_doff=True)
    tb = mix_twin_bwd()
    err = max(rel_diff(p, q) for p, q in zip([kb[0], kb[1], kb[2], *kb[3]], tb))
    rows.append(("mix, 5 slots, backward",) + tuple(best_ms(
        [lambda: cpu.mix_backward(d, x, shift, maa, off, want_doff=True), mix_twin_bwd], a.reps)) + (err,))

    rows.append(("gn_gate forward",) + tuple(best_ms(
        [lambda: cpu.gn_gate(y, gp, gw, gb, H, 64e-5), lambda: cpu.gn_gate_reference(y, gp, gw, gb, H, 64e-5)],
        a.reps)) + (rel_diff(cpu.gn_gate(y, gp, gw, gb, H, 64e-5), cpu.gn_gate_reference(y, gp, gw, gb, H, 64e-5)),))

    def gn_twin_bwd():
        leaves = [t.clone().requires_grad_() for t in (y, gp, gw, gb)]
        return torch.autograd.grad(cpu.gn_gate_reference(*leaves, H, 64e-5), leaves, dz)

    kb, tb = cpu.gn_gate_backward(y, gp, gw, gb, dz, H, 64e-5), gn_twin_bwd()
    rows.append(("gn_gate backward",) + tuple(best_ms(
        [lambda: cpu.gn_gate_backward(y, gp, gw, gb, dz, H, 64e-5), gn_twin_bwd], a.reps))
        + (max(rel_diff(p, q) for p, q in zip(kb[:4], tb)),))

    def ce(fn):
        lg = logits.clone().requires_grad_()
        loss = fn(lg, tgt)
        loss.backward()
        return loss.detach(), lg.grad

    (lk, gk), (lt, gt) = ce(cpu.cross_entropy), ce(F.cross_entropy)
    rows.append((f"cross-entropy [{R}, {V}], forward + backward",) + tuple(best_ms(
        [lambda: ce(cpu.cross_entropy), lambda: ce(F.cross_entropy)], a.reps)) + (max(rel_diff(lk, lt), rel_diff(gk, gt)),))

    rows.append((f"transpose [{R}, {C}]",) + tuple(best_ms([lambda: cpu.transpose(y), lambda: y.t().contiguous()],
                                                             a.reps)) + (rel_diff(cpu.transpose(y), y.t()),))
    F_ = C * 7 // 2
    for o, i in ((C, C), (C, F_), (F_, C), (V, C)):
        dd, aa = torch.randn(R, o, generator=g), torch.randn(R, i, generator=g)
        rows.append((f"weight gradient [{R}, {o}].T @ [{R}, {i}]",) + tuple(best_ms(
            [lambda: cpu.weight_grad(dd, aa), lambda: dd.t() @ aa], a.reps))
            + (rel_diff(cpu.weight_grad(dd, aa), dd.double().t() @ aa.double()),))

    lines = [f"B*T = {R} rows, C = {C}, {H} heads of 64, vocab {V}, fp32, {a.threads} threads, best of {a.reps} "
             f"interleaved runs; twin = the PyTorch expressions the kernel replaces (autograd for backward); "
             f"load average at start {os.getloadavg()[0]:.1f}. Command: `python bench/cpu_fused.py`.", "",
             "| operation | kernel ms | twin ms | speed-up | max rel. difference |", "|---|---:|---:|---:|---:|"]
    for name, k, t, e in rows:
        lines.append(f"| {name} | {k:.1f} | {t:.1f} | {t / k:.1f}x | {e:.1e} |")
    publish("Fused elementwise kernels (CPU)", lines, write=not a.no_write)


if __name__ == "__main__":
    main()
