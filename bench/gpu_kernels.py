"""GPU check and benchmark of the WKV-6 kernels (one command, a few minutes on one GPU).

Run:  python bench/gpu_kernels.py            (needs CUDA; exits 2 with a message otherwise)
      python bench/gpu_kernels.py --quick    (smaller timing shapes)

1. Correctness on CUDA: every backend (our triton, our torch, fla chunk_rwkv6 / fused_recurrent_rwkv6
   if fla imports) against the reference step recurrence in float64 on the same (rounded) inputs,
   several shapes and dtypes: rel. RMS error of o, final state and all gradients (loss uses o and S_T).
2. Timings (CUDA events, median): forward and forward+backward for B=8, H=32, K=V=64, bf16,
   T=4096 and T=1024: triton, torch, fla chunk_rwkv6 (scale=1.0, w=-exp(wraw)); decode step
   (T=1, with state) triton decode vs fla fused_recurrent_rwkv6 vs torch step loop.
3. One table of ms and ratios (fla time / ours), printed and written to BENCHMARKS.md,
   section "## WKV kernels (GPU)".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTION = "## WKV kernels (GPU)"
DEV = "cuda"  # "cpu" only for --smoke-cpu (a check of this script under the Triton interpreter)


class Lines(list):
    """Table lines, each printed (flushed) as it is added, so a run cut off by a time limit still shows its rows."""

    def append(self, line):
        print(line, flush=True)
        super().append(line)

    def extend(self, more):
        for line in more:
            self.append(line)
        return self

    __iadd__ = extend


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-300)).item()


def make(torch, B, T, H, K, dtype, decay="mixed", seed=0, state=True):
    g = torch.Generator(device=DEV).manual_seed(seed)
    lo, hi = {"mixed": (-8.0, 1.5), "strong": (2.5, 3.0), "weak": (-8.0, -1.0), "cliff": (-8.0, -1.0)}[decay]
    r = torch.randn(B, T, H, K, device=DEV, generator=g)
    k = torch.randn(B, T, H, K, device=DEV, generator=g) * 0.5
    v = torch.randn(B, T, H, K, device=DEV, generator=g)
    wraw = torch.rand(B, T, H, K, device=DEV, generator=g) * (hi - lo) + lo
    w = -torch.exp(wraw)
    if decay == "cliff":  # -30 for 40 steps, then weak: exponents are small gaps of large chunk sums
        w[:, :40] = -30.0
    u = torch.randn(H, K, device=DEV, generator=g) * 0.5
    s0 = torch.randn(B, H, K, K, device=DEV, generator=g) if state else None
    return [x.to(dtype) for x in (r, k, v, w, u)] + [s0]


def load_fla():
    try:
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
    except Exception as exc:  # noqa: BLE001 - report any import failure and go on without fla
        print(f"fla not available ({type(exc).__name__}: {exc}); skipping fla rows")
        return None, None
    return chunk_rwkv6, fused_recurrent_rwkv6


def backends(torch, fla_chunk, fla_rec):
    from multimodal_rwkv.kernels import wkv6

    out = {
        "triton": lambda *a: wkv6(*a, output_final_state=True, backend="triton"),
        "torch": lambda *a: wkv6(*a, output_final_state=True, backend="torch"),
    }
    if fla_chunk is not None:
        out["fla_chunk"] = lambda r, k, v, w, u, s: fla_chunk(r, k, v, w, u, scale=1.0, initial_state=s,
                                                               output_final_state=True)
        out["fla_recurrent"] = lambda r, k, v, w, u, s: fla_rec(r, k, v, w, u, scale=1.0, initial_state=s,
                                                                 output_final_state=True)
    return out


def correctness(torch, fns, lines):
    from multimodal_rwkv.kernels import wkv6_reference

    if DEV == "cpu":
        cases = [(1, 1, 2, torch.float32, "mixed"), (1, 20, 2, torch.float32, "strong"), (1, 70, 1, torch.float32, "cliff")]
    else:
        cases = [(2, 1, 4, torch.float32, "mixed"), (2, 17, 4, torch.bfloat16, "strong"), (2, 130, 4, torch.float32, "mixed"),
                 (2, 130, 4, torch.bfloat16, "mixed"), (1, 1000, 8, torch.bfloat16, "weak"),
                 (2, 300, 4, torch.float16, "mixed"), (2, 130, 4, torch.float32, "cliff")]
    lines += ["### Correctness vs float64 reference (rel. RMS; grads from loss = <o,go> + <S_T,gs>; fla rows bf16 only)", "",
              "| backend | B,T,H | dtype | decay | o | S_T | dr | dk | dv | dw | du | ds0 |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = {}
    for B, T, H, dtype, decay in cases:
        x = make(torch, B, T, H, 64, dtype, decay, seed=T)
        xr = [t.double().requires_grad_() for t in x]
        o_r, s_r = wkv6_reference(*xr, output_final_state=True)
        go = torch.randn_like(o_r)
        gs = torch.randn_like(s_r)
        ((o_r * go).sum() + (s_r * gs).sum()).backward()
        if T <= 16:  # the decode kernel (auto picks it for small T without gradients); forward only
            from multimodal_rwkv.kernels import wkv6

            with torch.no_grad():
                o, s = wkv6(*x, output_final_state=True, backend="triton")
            errs = [rel_rms(o, o_r), rel_rms(s, s_r)]
            worst["triton_decode"] = max(worst.get("triton_decode", 0.0), *errs)
            lines.append(f"| triton_decode | {B},{T},{H} | {str(dtype).replace('torch.', '')} | {decay} | "
                         + " | ".join(f"{e:.1e}" for e in errs) + " | - | - | - | - | - | - |")
        for name, fn in fns.items():
            if name.startswith("fla") and dtype != torch.bfloat16:
                continue  # fla autotunes per dtype; with every dtype this section did not end in 335 s on an H200
            xs = [t.detach().clone().requires_grad_() for t in x]
            try:
                o, s = fn(*xs)
                ((o.float() * go.float()).sum() + (s.float() * gs.float()).sum()).backward()
                errs = [rel_rms(o, o_r), rel_rms(s, s_r)] + [rel_rms(a.grad, b.grad) if a.grad is not None else float("nan")
                                                             for a, b in zip(xs, xr)]
                cells = [f"{e:.1e}" for e in errs]
                worst[name] = max(worst.get(name, 0.0), max(e for e in errs if e == e))
            except Exception as exc:  # noqa: BLE001 - a failing backend is a table entry, not a crash
                cells = [f"error: {type(exc).__name__}"] + [""] * 7
                worst[name] = float("inf")
            lines.append(f"| {name} | {B},{T},{H} | {str(dtype).replace('torch.', '')} | {decay} | " + " | ".join(cells) + " |")
    lines.append("")
    return worst


def cuda_ms(torch, fn, warmup=3, reps=10):
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def fwd_and_fwd_bwd(torch, fn, x):
    """Two closures to time: ``fn`` on inputs ``x`` without autograd, and with a backward of a
    random output gradient (inputs' gradients cleared after each)."""
    xs = [t.detach().clone().requires_grad_() for t in x]
    go = torch.randn(x[2].shape, device=DEV, dtype=x[0].dtype)

    def f():
        with torch.no_grad():
            fn(*x)

    def fb():
        o, _ = fn(*xs)
        o.backward(go)
        for t in xs:
            t.grad = None

    return f, fb


def timings(torch, fns, lines, quick):
    from multimodal_rwkv.kernels.torch_chunked import wkv6_recurrent
    from multimodal_rwkv.kernels.triton_decode import wkv6_decode_

    lines += ["### Timings (bf16, K=V=64, median of 10, CUDA events; ratio = fla_chunk ms / this ms)", "",
              "| shape | backend | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio |", "|---|---|---:|---:|---:|---:|"]
    shapes = [(8, 1024, 32), (8, 4096, 32)] if not quick else [(2, 1024, 8)]
    if DEV == "cpu":
        shapes = [(1, 20, 2)]
    for B, T, H in shapes:
        x = make(torch, B, T, H, 64, torch.bfloat16, "mixed", state=True)
        x[5] = x[5].float()
        res = {}
        for name, fn in fns.items():
            if name == "fla_recurrent":
                continue
            f, fb = fwd_and_fwd_bwd(torch, fn, x)
            try:
                res[name] = (cuda_ms(torch, f), cuda_ms(torch, fb))
                print(f"  B={B},T={T},H={H} {name}: {res[name][0]:.3f} / {res[name][1]:.3f} ms", flush=True)
            except torch.cuda.OutOfMemoryError:
                res[name] = (float("nan"), float("nan"))
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                print(f"{name} failed at B={B},T={T},H={H}: {type(exc).__name__}: {exc}")
                res[name] = (float("nan"), float("nan"))
        base = res.get("fla_chunk")
        for name, (f, fb) in res.items():
            rf = f"{base[0] / f:.2f}x" if base else "-"
            rfb = f"{base[1] / fb:.2f}x" if base else "-"
            lines.append(f"| B={B},T={T},H={H} | {name} | {f:.3f} | {fb:.3f} | {rf} | {rfb} |")
        del x
        torch.cuda.empty_cache()
    # decode step
    B, H = (8, 32) if not quick else (2, 8)
    if DEV == "cpu":
        B, H = 1, 2
    x = make(torch, B, 1, H, 64, torch.bfloat16, "mixed", state=True)
    st = x[5].float().contiguous()
    dec = {"triton decode (in place)": lambda: wkv6_decode_(*x[:5], st),
           "torch step loop": lambda: wkv6_recurrent(*x[:5], st, True)}
    if "fla_recurrent" in fns:
        dec["fla fused_recurrent"] = lambda: fns["fla_recurrent"](*x[:5], st)
    lines += ["", f"Decode step T=1, B={B}, H={H}, K=V=64, bf16 inputs, fp32 state (no grad):", "",
              "| backend | us | ratio (fla / this) |", "|---|---:|---:|"]
    dres = {}
    with torch.no_grad():
        for name, fn in dec.items():
            dres[name] = cuda_ms(torch, fn, warmup=5, reps=50) * 1e3
    for name, us in dres.items():
        ratio = f"{dres['fla fused_recurrent'] / us:.2f}x" if "fla fused_recurrent" in dres else "-"
        lines.append(f"| {name} | {us:.1f} | {ratio} |")


def sweep(torch, lines):
    """Launch settings of the Triton chunk kernels, one changed at a time from the shipped ones, then the
    best of each together; plus where a forward+backward spends its GPU time (torch.profiler)."""
    from multimodal_rwkv.kernels import triton_chunk as tc, wkv6

    def fn(*a):
        return wkv6(*a, output_final_state=True, backend="triton")

    def measure(B, T, H):
        x = make(torch, B, T, H, 64, torch.bfloat16, "mixed", state=True)
        x[5] = x[5].float()
        f, fb = fwd_and_fwd_bwd(torch, fn, x)
        return cuda_ms(torch, f), cuda_ms(torch, fb), fb

    shipped = {k: dict(v) for k, v in tc.LAUNCH.items()}
    shipped_bv = tc.STATE_BV
    B, T, H = (8, 4096, 32) if DEV == "cuda" else (1, 20, 2)
    lines += [f"### Launch-setting sweep (triton, bf16, B={B},T={T},H={H}; one change at a time)", "",
              "| change | fwd ms | fwd+bwd ms |", "|---|---:|---:|"]
    f0, fb0, fb_fn = measure(B, T, H)
    lines.append(f"| shipped {shipped} BV={shipped_bv} | {f0:.3f} | {fb0:.3f} |")
    if DEV == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fb_fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
    best = {}
    variants = [(k, {"num_warps": w}) for k in shipped for w in (2, 8)]
    variants += [(k, {"num_warps": 4, "num_stages": s}) for k in shipped for s in (1, 2)]
    variants += [("BV", bv) for bv in (16, 64)] if DEV == "cuda" else []
    for key, val in variants:
        try:
            if key == "BV":
                tc.STATE_BV = val
            else:
                tc.LAUNCH[key] = val
            f, fb, _ = measure(B, T, H)
            lines.append(f"| {key} {val} | {f:.3f} | {fb:.3f} |")
            if fb < best.get(key, (fb0, None))[0] * 0.97:
                best[key] = (fb, val)
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile is a row, not a crash
            lines.append(f"| {key} {val} | error: {type(exc).__name__} | |")
        finally:
            tc.LAUNCH = {k: dict(v) for k, v in shipped.items()}
            tc.STATE_BV = shipped_bv
    if best:
        for key, (_, val) in best.items():
            if key == "BV":
                tc.STATE_BV = val
            else:
                tc.LAUNCH[key] = val
        for shape in ((B, T, H), (8, 1024, 32) if DEV == "cuda" else (1, 40, 2)):
            f, fb, _ = measure(*shape)
            lines.append(f"| best of each together at B,T,H={shape}: {tc.LAUNCH} BV={tc.STATE_BV} | {f:.3f} | {fb:.3f} |")
        tc.LAUNCH = shipped
        tc.STATE_BV = shipped_bv
    lines.append("")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small timing shapes")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--sweep", action="store_true",
                    help="only time other launch settings of the Triton chunk kernels (and profile one step)")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="check this script on CPU at tiny shapes (needs TRITON_INTERPRET=1 in the environment)")
    args = ap.parse_args(argv)
    import torch

    global DEV
    if args.smoke_cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("bench/gpu_kernels.py: --smoke-cpu needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        DEV = "cpu"
        args.no_write = True
    elif not torch.cuda.is_available():
        print("bench/gpu_kernels.py: CUDA is not available on this machine; nothing to run", file=sys.stderr)
        return 2
    t0 = time.time()
    # fla's autotuned kernels cannot run under the interpreter: no fla rows in the smoke test
    fla_chunk, fla_rec = load_fla() if DEV == "cuda" else (None, None)
    fns = backends(torch, fla_chunk, fla_rec)
    dev_name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke test, Triton interpreter)"
    print(SECTION + "\n", flush=True)
    lines = Lines([f"Device: {dev_name}, torch {torch.__version__}, command `python bench/gpu_kernels.py`", ""])
    if args.sweep:
        sweep(torch, lines)
        return 0
    # timings first: the GPU tests (tests/test_kernels_gpu.py) already check correctness, so a run cut short
    # by its time limit keeps the part nothing else measures
    timings(torch, fns, lines, args.quick)
    lines.append("")
    worst = correctness(torch, fns, lines)
    lines += ["", "Worst correctness error per backend: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()),
              f"Total wall time {time.time() - t0:.0f} s."]
    text = "\n".join(lines)
    if not args.no_write:
        from _report import write_section  # bench/_report.py: replaces only this section

        write_section(SECTION[3:], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
