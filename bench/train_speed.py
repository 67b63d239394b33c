"""Training speed and peak memory on CPU: RWKV-6 vs transformers' Llama (SDPA) of equal size.

A ~6 layer x 512 RWKV-6 (x060, head 64) and a LlamaForCausalLM whose MLP width is chosen so the
parameter counts match (within 1%), same vocabulary, trained for a few optimiser steps (forward,
cross-entropy over every position, backward, AdamW) on one sequence of ctx tokens, 2 threads.
Each (model, ctx) runs in its own subprocess so peak RSS is that run's alone.

    python bench/train_speed.py [--ctx 1024 4096] [--steps 3] [--threads 2] [--no-write]

Writes the table to BENCHMARKS.md under "## Training speed (CPU)".
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
    speed goal is reachable with fp32 GEMMs on this machine at all."""

    def __init__(self, layers, embd, vocab):
        import torch

        from multimodal_rwkv import RWKVConfig

        cfg = RWKVConfig(vocab_size=vocab, n_layer=layers, n_embd=embd, head_size=64)
        C, F_ = cfg.n_embd, cfg.dim_ffn
        lin = torch.nn.Linear
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

    def __call__(self, input_ids):
        x = self.net["emb"](input_ids)
        for r, k, v, g, o, fk, fv, fr in self.net["blocks"]:
            x = x + o(r(x) + k(x) + v(x) + g(x))  # 5 CxC products, as time mixing has
            x = x + fv(fk(x)) + fr(x)  # channel mixing: C->F, F->C, C->C
        return type("Out", (), {"logits": self.net["head"](x)})


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(kind: str, ctx: int, steps: int, layers: int, embd: int, vocab: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    model = GemmOnly(layers, embd, vocab) if kind == "rwkv_gemm" else build(kind, layers, embd, vocab)
    if kind == "rwkv_gc":
        model.gradient_checkpointing_enable()  # the engine's train.grad_checkpointing: same gradients
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (1, ctx + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    rss0 = _rss_mb()
    step()  # warm-up (allocates optimiser state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "ctx": ctx, "params": n_params(model), "tok_s": ctx / min(times),
            "step_s": min(times), "peak_mb": peak, "train_extra_mb": peak - rss0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-gc", dest="with_gc", action="store_false",
                    help="skip the extra RWKV-6 run with gradient checkpointing (train.grad_checkpointing)")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="also time only the RWKV-6's dense GEMMs at the same shapes (an upper bound on its speed)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "CTX"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), a.steps, a.layers, a.embd, a.vocab, a.threads)))
        return
    rows = {}
    load0 = os.getloadavg()[0]
    for ctx in a.ctx:
        for kind in ("rwkv", "llama") + (("rwkv_gc",) if a.with_gc else ()) + (("rwkv_gemm",) if a.gemm_floor else ()):
            cmd = [sys.executable, __file__, "--worker", kind, str(ctx), "--steps", str(a.steps), "--layers",
                   str(a.layers), "--embd", str(a.embd), "--vocab", str(a.vocab), "--threads", str(a.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads),
                       PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker {kind} ctx={ctx} failed")
            rows[kind, ctx] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  {kind:5s} ctx {ctx:5d}: {rows[kind, ctx]['tok_s']:.0f} tok/s, peak {rows[kind, ctx]['peak_mb']:.0f} MB",
                  file=sys.stderr)
    pr, pl = rows["rwkv", a.ctx[0]]["params"], rows["llama", a.ctx[0]]["params"]
    lines = [
        f"RWKV-6 (x060) L{a.layers} C{a.embd} head 64 ({pr / 1e6:.1f}M params) vs transformers LlamaForCausalLM "
        f"(SDPA, L{a.layers} C{a.embd}, MLP width matched: {pl / 1e6:.1f}M params), vocab {a.vocab}, fp32, batch 1, "
        f"{a.threads} threads; one optimiser step = forward + cross-entropy + backward + AdamW; best of {a.steps} "
        f"steps after a warm-up; each run in its own process (peak RSS); 1-min load average "
        f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs "
        f"(speeds from a shared machine vary run to run; peak memory does not). "
        f"Command: `python bench/train_speed.py`",
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
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        from _report import write_section

        write_section("Training speed (CPU)", table)


if __name__ == "__main__":
    main()
