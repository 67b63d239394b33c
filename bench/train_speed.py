"""Training speed and peak memory on CPU: RWKV-6 vs transformers' Llama (SDPA) of equal size.

A ~6 layer x 512 RWKV-6 (x060, head 64) and a LlamaForCausalLM whose MLP width is chosen so the
parameter counts match (within 1%), same vocabulary, trained for a few optimiser steps (forward,
cross-entropy over every position, backward, AdamW) on one sequence of ctx tokens, 2 threads.
Each model computes its loss itself, as in training: ``model(input_ids=ids, labels=ids).loss``
(transformers' convention, the labels shifted inside).
Speed: all models in one process, their steps interleaved, so load on the shared machine hits
them alike. Peak memory: each (model, ctx) again in its own subprocess, so peak RSS is its alone.

    python bench/train_speed.py [--ctx 1024 4096] [--steps 3] [--threads 2] [--no-write]
                                [--precision fp32|bf16] [--default-malloc [--malloc-mmap-threshold BYTES]]

``--precision bf16`` runs every model's forward and loss under ``torch.autocast("cpu", bfloat16)``,
what ``train.precision: bf16`` (accelerate's ``mixed_precision="bf16"``) does on a CPU: products in
bf16, weights, optimiser and the rest in fp32. The default is fp32.

Every worker process first applies the training engine's CPU malloc setting
(``train.cpu_retain_memory``, on by default: glibc keeps freed memory for reuse instead of
page-faulting the step's big buffers in again every step), so both models train under the
conditions of ``mmrwkv train``; ``--default-malloc`` leaves glibc's defaults instead.
Peak RSS includes what glibc's allocator keeps after frees, so the figure depends on the order of
allocations as well as on what the model keeps. ``--malloc-mmap-threshold 131072`` (with
``--default-malloc``; sets ``MALLOC_MMAP_THRESHOLD_`` for both models' processes) returns every
large block on free, so peak RSS then follows the tensors actually alive.

Writes the table to BENCHMARKS.md under "## Training speed (CPU)" (bf16: "## Training speed (CPU),
bf16 autocast").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build(kind: str, layers: int, embd: int, vocab: int):
    import torch

    torch.manual_seed(0)
    if kind in ("rwkv", "rwkv_gc"):
        from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

        return RWKVForCausalLM(RWKVConfig(vocab_size=vocab, n_layer=layers, n_embd=embd, head_size=64))
    from transformers import LlamaConfig, LlamaForCausalLM

    target = n_params(build("rwkv", layers, embd, vocab))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=embd, num_hidden_layers=layers, num_attention_heads=embd // 64,
                      num_key_value_heads=embd // 64, intermediate_size=32, max_position_embeddings=8192,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    per_unit = 3 * embd * layers  # params per unit of intermediate_size
    base = n_params(LlamaForCausalLM(cfg)) - 32 * per_unit
    cfg.intermediate_size = max(32, round((target - base) / per_unit))
    return LlamaForCausalLM(cfg)


class GemmOnly:
    """Only the dense matrix products of an RWKV-6 block stack + head, at the same shapes.

    Its training tok/s is an upper bound for the real RWKV-6 of this size (everything else -- the
    WKV recurrence, ddlerp/LoRA, norms, activations -- costs extra), so it says how far a given
    speed goal is reachable with this machine's GEMMs at all (fp32, or bf16 under autocast)."""

    def __init__(self, layers, embd, vocab):
        import torch

        from multimodal_rwkv import RWKVConfig
        from multimodal_rwkv.model.modeling import Linear

        cfg = RWKVConfig(vocab_size=vocab, n_layer=layers, n_embd=embd, head_size=64)
        C, F_ = cfg.n_embd, cfg.dim_ffn
        lin = Linear  # the model's own layer: the same product routes (oneDNN / MKL) as the real model
        blocks = []
        for _ in range(layers):
            blocks.append(torch.nn.ModuleList([lin(C, C, bias=False) for _ in range(5)]
                                              + [lin(C, F_, bias=False), lin(F_, C, bias=False), lin(C, C, bias=False)]))
        self.net = torch.nn.ModuleDict({"emb": torch.nn.Embedding(vocab, C), "blocks": torch.nn.ModuleList(blocks),
                                        "head": lin(C, vocab, bias=False)})

    def parameters(self):
        return self.net.parameters()

    def train(self):
        self.net.train()

    def __call__(self, input_ids, labels):
        import torch

        from multimodal_rwkv.kernels.cpu import cross_entropy

        x = self.net["emb"](input_ids)
        for r, k, v, g, o, fk, fv, fr in self.net["blocks"]:
            x = x + o(r(x) + k(x) + v(x) + g(x))  # 5 CxC products, as time mixing has
            x = x + fv(fk(x)) + fr(x)  # channel mixing: C->F, F->C, C->C
        logits = self.net["head"](x)
        targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # as the model's own loss
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return type("Out", (), {"loss": loss})


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trainer(kind: str, ctx: int, layers: int, embd: int, vocab: int, precision: str = "fp32"):
    """``(step, n_params)``: one optimiser step of ``kind`` on a fixed random sequence of ``ctx`` tokens."""
    import torch

    model = GemmOnly(layers, embd, vocab) if kind == "rwkv_gemm" else build(kind, layers, embd, vocab)
    if kind == "rwkv_gc":
        model.gradient_checkpointing_enable()  # the engine's train.grad_checkpointing: same gradients
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the engine's default (optim.fused)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (1, ctx), generator=g)

    def step():
        # each model's own loss (transformers' convention: labels = input_ids, shifted inside)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, n_params(model)


def engine_malloc() -> None:
    """The training engine's CPU malloc setting (``train.cpu_retain_memory``), process-wide."""
    if os.environ.get("BENCH_DEFAULT_MALLOC") != "1":
        from multimodal_rwkv.kernels.cpu import keep_freed_memory

        keep_freed_memory(bounded=False)


def memory_worker(kind: str, ctx: int, layers: int, embd: int, vocab: int, threads: int, precision: str) -> dict:
    """Own process: a warm-up step (allocates the optimiser state) and one more; peak RSS."""
    import torch

    engine_malloc()
    torch.set_num_threads(threads)
    step, n = trainer(kind, ctx, layers, embd, vocab, precision)
    step()
    step()
    return {"kind": kind, "params": n, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed_worker(kinds, ctx: int, steps: int, layers: int, embd: int, vocab: int, threads: int,
                 precision: str) -> dict:
    """All ``kinds`` in one process, their steps interleaved round-robin after a warm-up each, so
    that load on the shared machine hits every model alike; best of ``steps`` per kind."""
    import torch

    engine_malloc()
    torch.set_num_threads(threads)
    runs = {k: trainer(k, ctx, layers, embd, vocab, precision)[0] for k in kinds}
    for step in runs.values():
        step()
    times = {k: [] for k in kinds}
    for _ in range(steps):
        for k, step in runs.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    return {k: ctx / min(ts) for k, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: forward and loss under CPU autocast (train.precision: bf16) for every model")
    ap.add_argument("--no-gc", dest="with_gc", action="store_false",
                    help="skip the extra RWKV-6 run with gradient checkpointing (train.grad_checkpointing)")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="also time only the RWKV-6's dense GEMMs at the same shapes (an upper bound on its speed)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc defaults instead of the engine's train.cpu_retain_memory setting")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=None,
                    help="with --default-malloc: set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for every worker")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    shape = (a.layers, a.embd, a.vocab, a.threads, a.precision)
    if a.worker:
        mode, ctx, kinds = a.worker[0], int(a.worker[1]), a.worker[2:]
        out = (memory_worker(kinds[0], ctx, *shape) if mode == "memory"
               else speed_worker(kinds, ctx, a.steps, *shape))
        print(json.dumps(out))
        return

    def run_worker(*args):
        cmd = [sys.executable, __file__, "--worker", *map(str, args), "--steps", str(a.steps), "--layers",
               str(a.layers), "--embd", str(a.embd), "--vocab", str(a.vocab), "--threads", str(a.threads),
               "--precision", a.precision]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads),
                   PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if a.default_malloc:
            env["BENCH_DEFAULT_MALLOC"] = "1"
            env["MMRWKV_MALLOC"] = "0"  # nor the model's own bounded setting
        if a.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker {args} failed")
        return json.loads(r.stdout.strip().splitlines()[-1])

    rows = {}
    load0 = os.getloadavg()[0]
    kinds = ("rwkv", "llama") + (("rwkv_gc",) if a.with_gc else ()) + (("rwkv_gemm",) if a.gemm_floor else ())
    for ctx in a.ctx:
        speed = run_worker("speed", ctx, *kinds)
        for kind in kinds:
            rows[kind, ctx] = dict(run_worker("memory", ctx, kind), tok_s=speed[kind])
            print(f"  {kind:5s} ctx {ctx:5d}: {rows[kind, ctx]['tok_s']:.0f} tok/s, "
                  f"peak {rows[kind, ctx]['peak_mb']:.0f} MB", file=sys.stderr)
    pr, pl = rows["rwkv", a.ctx[0]]["params"], rows["llama", a.ctx[0]]["params"]
    lines = [
        f"RWKV-6 (x060) L{a.layers} C{a.embd} head 64 ({pr / 1e6:.1f}M params) vs transformers LlamaForCausalLM "
        f"(SDPA, L{a.layers} C{a.embd}, MLP width matched: {pl / 1e6:.1f}M params), vocab {a.vocab}, "
        + ("fp32" if a.precision == "fp32" else "bf16 autocast (products in bf16; weights and optimiser fp32)")
        + ", batch 1, "
        f"{a.threads} threads; one optimiser step = forward + the model's own loss (labels=) + backward + AdamW (fused, both "
        f"models); best of {a.steps} "
        f"steps after a warm-up, all models in one process with their steps interleaved (speed); each model "
        f"again in its own process for its peak RSS; 1-min load average "
        f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs "
        f"(speeds from a shared machine vary run to run; peak memory does not). "
        + ("glibc malloc defaults. " if a.default_malloc else "Both models under the engine's CPU malloc setting "
           "(train.cpu_retain_memory: freed memory kept for reuse). ")
        + (f"glibc MALLOC_MMAP_THRESHOLD_={a.malloc_mmap_threshold}. " if a.malloc_mmap_threshold is not None else "")
        + "Command: `python bench/train_speed.py" + (" --precision bf16" if a.precision == "bf16" else "")
        + (" --default-malloc" if a.default_malloc else "")
        + (f" --malloc-mmap-threshold {a.malloc_mmap_threshold}" if a.malloc_mmap_threshold is not None else "") + "`",
        "",
        "| ctx | RWKV-6 tok/s | Llama tok/s | speed ratio (RWKV/Llama) | RWKV-6 peak MB | Llama peak MB | memory ratio (RWKV/Llama) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ctx in a.ctx:
        r, l = rows["rwkv", ctx], rows["llama", ctx]
        lines.append(f"| {ctx} | {r['tok_s']:.0f} | {l['tok_s']:.0f} | {r['tok_s'] / l['tok_s']:.2f}x | "
                     f"{r['peak_mb']:.0f} | {l['peak_mb']:.0f} | {r['peak_mb'] / l['peak_mb']:.2f}x |")
    if a.with_gc:
        lines += ["", "RWKV-6 with gradient checkpointing (`train.grad_checkpointing: true`; identical gradients, "
                  "blocks recomputed in backward):", "",
                  "| ctx | RWKV-6+GC tok/s | vs Llama | RWKV-6+GC peak MB | vs Llama |", "|---|---|---|---|---|"]
        for ctx in a.ctx:
            r, l = rows["rwkv_gc", ctx], rows["llama", ctx]
            lines.append(f"| {ctx} | {r['tok_s']:.0f} | {r['tok_s'] / l['tok_s']:.2f}x | {r['peak_mb']:.0f} | "
                         f"{r['peak_mb'] / l['peak_mb']:.2f}x |")
    if a.gemm_floor:
        lines += ["", "Upper bound: only the RWKV-6's dense GEMMs (5 CxC time-mix, C->F->C and CxC channel-mix, "
                  "head) at the same shapes, nothing else (`--gemm-floor`):", "",
                  "| ctx | GEMM-only tok/s | vs Llama | real RWKV-6 / GEMM-only |", "|---|---|---|---|"]
        for ctx in a.ctx:
            r, l, m = rows["rwkv_gemm", ctx], rows["llama", ctx], rows["rwkv", ctx]
            lines.append(f"| {ctx} | {r['tok_s']:.0f} | {r['tok_s'] / l['tok_s']:.2f}x | {m['tok_s'] / r['tok_s']:.2f} |")
    from _report import publish

    title = "Training speed (CPU)" + (", bf16 autocast" if a.precision == "bf16" else "")
    publish(title, lines, write=not a.no_write)


if __name__ == "__main__":
    main()
