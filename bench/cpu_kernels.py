"""CPU benchmark of the WKV-6 kernels: B=1, H=4, T=1024, K=V=64, fp32, 2 threads.

Run:  python bench/cpu_kernels.py            (prints the table and writes it to BENCHMARKS.md,
                                              section "## WKV kernels (CPU)")
      python bench/cpu_kernels.py --no-write  (print only)

Rows: forward (no grad) and forward+backward (loss = sum(o * g) + sum(S_T * gs)), best of N interleaved runs,
ms and speed-up against the reference step recurrence with autograd, plus each backend's error
against a float64 reference run. Also the T=1 decode step (B=1, H=32, K=64, with state) and the
training speed of a small RWKV-6 model with the reference WKV vs the torch and C++ (cpu) backends. The C++
rows appear where its kernels build (AVX-512, a C++ compiler); `auto` picks it on CPU there.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _report import write_section  # noqa: E402  (bench/_report.py)
from multimodal_rwkv.kernels import wkv6_reference  # noqa: E402
from multimodal_rwkv.kernels.cpu import extension as cpu_extension  # noqa: E402
from multimodal_rwkv.kernels.cpu import wkv6_cpu  # noqa: E402
from multimodal_rwkv.kernels.torch_chunked import wkv6_chunked, wkv6_recurrent  # noqa: E402

SECTION = "## WKV kernels (CPU)"


def make(B, T, H, K, seed=0, dtype=torch.float32, wraw=(-8.0, 1.5)):
    """Random inputs; log-decay w = -exp(wraw), wraw ~ U(wraw): mixed by default (down to -4.5 per
    step); (-6, -1) is RWKV-6's initial decay range."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    lo, hi = wraw
    w = -torch.exp(torch.rand(B, T, H, K, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    u = torch.randn(H, K, generator=g, dtype=torch.float64) * 0.5
    s0 = torch.randn(B, H, K, K, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (r, k, v, w, u, s0)]


def best_ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def measure(backends, x32, go, gs, o64, s64, reps, threads):
    """Best wall time (and its process CPU time) of fwd and fwd+bwd per backend, interleaved."""
    torch.set_num_threads(threads)
    # interleaved: every repetition runs each backend once, so load spikes on this shared box hit
    # all of them alike; best (min) wall time and the matching process CPU time are kept
    jobs = {}
    errs = {}
    for name, fn in backends.items():
        with torch.no_grad():
            o, s = fn(*x32)
        errs[name] = max(rel_rms(o, o64), rel_rms(s, s64))

        def fwd(fn=fn):
            with torch.no_grad():
                fn(*x32)

        def fwd_bwd(fn=fn):
            xs = [x.clone().requires_grad_() for x in x32]
            o, s = fn(*xs)
            ((o * go).sum() + (s * gs).sum()).backward()

        jobs[(name, "f")] = fwd
        jobs[(name, "fb")] = fwd_bwd
    best = {key: (float("inf"), float("inf")) for key in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(reps):
        for key, job in jobs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            job()
            wall, cpu = (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3
            if wall < best[key][0]:
                best[key] = (wall, cpu)
    rows = [(name, best[(name, "f")], best[(name, "fb")], errs[name]) for name in backends]
    return rows


def model_training_speed(threads, steps=3, T=512):
    """Training tokens/s of a small RWKV-6 (4 layers x 256, head 64, vocab 256) with the WKV computed
    by the reference step loop vs the torch backend (forward, cross-entropy, backward, AdamW; B=1)."""
    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    torch.set_num_threads(threads)
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))
    runs = {}
    for backend in ("reference", "torch") + (("cpu",) if cpu_extension() else ()):
        torch.manual_seed(0)
        model = RWKVForCausalLM(RWKVConfig(vocab_size=256, n_layer=4, n_embd=256, head_size=64, wkv_backend=backend))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            out = model(ids)
            loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.item()

        runs[backend] = step
    best = {}
    losses = {}
    for backend, step in runs.items():
        losses[backend] = step()  # warm-up (same first-step loss expected from both)
    for _ in range(steps):
        for backend, step in runs.items():
            t0 = time.perf_counter()
            step()
            best[backend] = min(best.get(backend, float("inf")), time.perf_counter() - t0)
    return {b: T / t for b, t in best.items()}, losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--no-model", action="store_true", help="skip the small-model training-speed table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, T, H, K = 1, args.T, 4, 64
    x32 = make(B, T, H, K)
    x64 = [x.double() for x in x32]
    o64, s64 = wkv6_reference(*x64, output_final_state=True)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(o64.shape, generator=g)
    gs = torch.randn(s64.shape, generator=g)

    backends = {
        "reference (step loop)": lambda *a: wkv6_reference(*a, output_final_state=True),
        "torch step loop (wkv6_recurrent)": lambda *a: wkv6_recurrent(*a, output_final_state=True),
        "torch chunked (wkv6_chunked)": lambda *a: wkv6_chunked(*a, output_final_state=True),
    }
    if cpu_extension() is not None:
        backends["C++ step loop (cpu backend)"] = lambda *a: wkv6_cpu(*a, output_final_state=True)
    rows = measure(backends, x32, go, gs, o64, s64, args.reps, args.threads)
    ref_f, ref_fb = rows[0][1][0], rows[0][2][0]

    # the same backend on RWKV-6's initial decay range, where the diagonal sub-blocks are factorised,
    # side by side with the exact pair form forced on the same inputs
    import multimodal_rwkv.kernels.torch_chunked as tc

    xw = make(B, T, H, K, seed=3, wraw=(-6.0, -1.0))
    ow64, sw64 = wkv6_reference(*[x.double() for x in xw], output_final_state=True)

    def exact_pairs(*a):
        old, tc._DIAG_FACTOR_LIMIT = tc._DIAG_FACTOR_LIMIT, -1.0
        try:
            return wkv6_chunked(*a, output_final_state=True)
        finally:
            tc._DIAG_FACTOR_LIMIT = old

    weak = {"torch chunked, exact diagonal pairs": exact_pairs,
            "torch chunked, factorised diagonal": lambda *a: wkv6_chunked(*a, output_final_state=True)}
    if cpu_extension() is not None:
        weak["C++ step loop (cpu backend)"] = lambda *a: wkv6_cpu(*a, output_final_state=True)
    rows_w = measure(weak, xw, go, gs, ow64, sw64, args.reps, args.threads)

    # decode: one token, B=1, H=32, K=64, with state (the model's per-layer decode call)
    xd = make(1, 1, 32, 64, seed=2)
    dec = {
        "reference": lambda: wkv6_reference(*xd, output_final_state=True),
        "torch step loop": lambda: wkv6_recurrent(*xd, output_final_state=True),
    }
    if cpu_extension() is not None:
        dec["C++ step loop (cpu backend)"] = lambda: wkv6_cpu(*xd, output_final_state=True)
    dec_us = {}
    for name, fn in dec.items():
        with torch.no_grad():
            dec_us[name] = best_ms(fn, 200) * 1e3

    torch.set_num_threads(args.threads)
    lines = [
        f"B={B}, T={T}, H={H}, K=V=64, fp32, torch.set_num_threads({args.threads}), best wall time of {args.reps} "
        "interleaved runs (CPU ms = process CPU time of that run, both threads); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
        f"load average at start {os.getloadavg()[0]:.1f} (the box is shared; absolute ms are noisy, ratios less so); "
        "speed-up = reference time / this time; err = max rel. RMS of (o, S_T) vs a float64 reference. "
        "Command: `python bench/cpu_kernels.py`.",
        "",
        "| backend | fwd ms | fwd+bwd ms | fwd speed-up vs ref | fwd+bwd speed-up vs ref (autograd) "
        "| fwd / fwd+bwd CPU ms | err fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (f, fc), (fb, fbc), err in rows:
        lines.append(f"| {name} | {f:.1f} | {fb:.1f} | {ref_f / f:.1f}x | {ref_fb / fb:.1f}x | {fc:.0f} / {fbc:.0f} "
                     f"| {err:.1e} |")
    if args.threads != 1:  # the same with one thread: far less sensitive to other load on a shared box
        rows1 = measure(backends, x32, go, gs, o64, s64, args.reps, 1)
        torch.set_num_threads(args.threads)
        r1f, r1fb = rows1[0][1][0], rows1[0][2][0]
        lines += ["", "Same, torch.set_num_threads(1):", "",
                  "| backend | fwd ms | fwd+bwd ms | fwd speed-up vs ref | fwd+bwd speed-up vs ref (autograd) "
                  "| fwd / fwd+bwd CPU ms |", "|---|---:|---:|---:|---:|---:|"]
        for name, (f, fc), (fb, fbc), _ in rows1:
            lines.append(f"| {name} | {f:.1f} | {fb:.1f} | {r1f / f:.1f}x | {r1fb / fb:.1f}x | {fc:.0f} / {fbc:.0f} |")
    lines += ["", f"Weak decay (w = -exp(U(-6, -1)), RWKV-6's initial range: every 8-step sub-chunk totals >= -3), "
              f"{args.threads} threads, same timing:", "",
              "| backend | fwd ms | fwd+bwd ms | fwd+bwd speed-up vs exact pairs | err fp32 |", "|---|---:|---:|---:|---:|"]
    for name, (f, _), (fb, _), err in rows_w:
        lines.append(f"| {name} | {f:.1f} | {fb:.1f} | {rows_w[0][2][0] / fb:.2f}x | {err:.1e} |")
    lines += ["", f"Decode step (T=1, B=1, H=32, K=V=64, with state, no grad, {args.threads} threads), best of 200:", "",
              "| backend | us/step | speed-up |", "|---|---:|---:|"]
    for name, us in dec_us.items():
        lines.append(f"| {name} | {us:.0f} | {dec_us['reference'] / us:.1f}x |")
    if not args.no_model:
        tps, losses = model_training_speed(args.threads)
        lines += ["", f"Training a small RWKV-6 (4 layers x 256, head 64, vocab 256; T=512, B=1; forward, cross-entropy, "
                  f"backward, AdamW; {args.threads} threads, best of 3 interleaved steps):", "",
                  "| WKV backend | tokens/s | speed-up | first-step loss |", "|---|---:|---:|---:|"]
        for b, v in tps.items():
            lines.append(f"| {b} | {v:.0f} | {v / tps['reference']:.1f}x | {losses[b]:.6f} |")
    text = "\n".join(lines)
    print(SECTION)
    print()
    print(text)
    if not args.no_write:
        write_section(SECTION[3:], text)  # bench/_report.py: replaces only this section
        print(f"\nwrote {os.path.join(ROOT, 'BENCHMARKS.md')} ({SECTION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
