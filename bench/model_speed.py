"""Core model speed and memory, side by side with the official `rwkv` package (same process).

Same random checkpoint in the official layout (default L12 / C768 / V65536, fp32), 2 threads:
prefill of 512 tokens, single-stream decode, batched decode of 8 streams; then the recurrent
state's bytes per stream and peak memory while generating at 8k context, beside a transformers
LlamaForCausalLM of equal parameter count with its KV cache.

    python bench/model_speed.py [--layers 12 --embd 768 --prefill 512 --decode 32 --ctx 8192]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

# the official package as its README sets it up: TorchScript on (its prefill runs 10-17% faster
# here than with RWKV_JIT_ON=0), no CUDA kernel (a CPU run)
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import interleaved, publish  # noqa: E402


def best(fn, reps=3):
    return interleaved([fn], reps)[0]


def speed_rows(official, ours, prompt, args):
    """(name, official value, our value) rows: prefill tok/s, decode tok/s, batched decode tok/s,
    and decode tok/s without the fused decode block."""
    from multimodal_rwkv.model import modeling

    rows = []
    with torch.no_grad():
        t_off, t_our = interleaved([lambda: official.forward(prompt, None),
                                    lambda: ours(torch.tensor([prompt]), logits_to_keep=1)])
        rows.append((f"prefill {len(prompt)} tok/s", len(prompt) / t_off, len(prompt) / t_our))

        _, st_off = official.forward(prompt[:16], None)
        st_our = ours(torch.tensor([prompt[:16]])).state
        toks = prompt[16:16 + args.decode]

        def dec_off():
            s = [x.clone() for x in st_off]
            for t in toks:
                _, s = official.forward([t], s)

        def dec_our():
            s = st_our
            for t in toks:
                s = ours(torch.tensor([[t]]), state=s).state

        st8 = st_our.expand(8)

        def dec_our8():
            s = st8
            for t in toks:
                s = ours(torch.tensor([[t]] * 8), state=s).state

        def dec_our_blocks():  # the same, each block through its own forward (the fused block's twin)
            modeling.FAST_DECODE = False
            try:
                dec_our()
            finally:
                modeling.FAST_DECODE = True

        d_off, d_our, d_our8, d_blocks = interleaved([dec_off, dec_our, dec_our8, dec_our_blocks])
        rows.append(("decode 1 stream tok/s", len(toks) / d_off, len(toks) / d_our))
        rows.append(("decode 8 streams tok/s (aggregate)", float("nan"), 8 * len(toks) / d_our8))
        rows.append(("decode 1 stream tok/s, fused decode block off (`modeling.FAST_DECODE = False`)",
                     len(toks) / d_off, len(toks) / d_blocks))
    return rows


def gemm_bounds(ours, n_prompt):
    """Upper bounds from the dense products alone: the time of only our model's projections (per
    layer r/k/v/gate/output and the channel mix's key/receptance/value, through the same Linear
    modules, plus the head on the rows a step keeps) on random inputs of the right shapes, for a
    prefill of ``n_prompt`` tokens (head on 1 row; the last layer's r/gate/output on 2 rows and its
    channel mix on 1, as the model computes them with ``logits_to_keep=1``) and for one decode step
    of 8 streams. Everything else a model does (WKV, token shift, norms, LoRA) only adds time, so no
    implementation of this model that runs these products through PyTorch goes faster; returns
    tok/s for each."""
    blocks = list(ours.rwkv.blocks)
    dt = ours.head.weight.dtype

    def products(rows, prefill):
        """(module, rows) of one forward over ``rows`` rows: one prompt's tokens (``prefill``, the
        last position's logits kept) or one token of each of ``rows`` streams."""
        out = []
        for i, blk in enumerate(blocks):
            last = prefill and i == len(blocks) - 1
            out += [(blk.att.key, rows), (blk.att.value, rows)]
            out += [(m, 2 if last else rows) for m in (blk.att.receptance, blk.att.gate, blk.att.output)]
            out += [(m, 1 if last else rows) for m in (blk.ffn.key, blk.ffn.receptance, blk.ffn.value)]
        return out

    inputs = {}  # made before timing: drawing random numbers costs as much as a small product

    def run(rows, head_rows):
        if (rows, head_rows) not in inputs:
            prods = products(rows, prefill=head_rows < rows)
            xs = {(m.in_features, r): torch.randn(r, m.in_features, dtype=dt) for m, r in prods}
            inputs[rows, head_rows] = (prods, xs, torch.randn(head_rows, ours.head.in_features, dtype=dt))
        prods, xs, xh = inputs[rows, head_rows]
        for m, r in prods:
            m(xs[m.in_features, r])
        ours.head(xh)

    with torch.no_grad():
        run(8, 8)
        run(n_prompt, 1)
        t_prefill = best(lambda: run(n_prompt, 1), reps=3)
        t_dec8 = best(lambda: [run(8, 8) for _ in range(4)], reps=3) / 4
    return n_prompt / t_prefill, 8 / t_dec8


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=8192, help="context for the memory comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32/bf16 (both packages run each)")
    ap.add_argument("--memory-worker", choices=["rwkv", "llama"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    torch.set_num_threads(args.threads)
    from multimodal_rwkv.model.random_checkpoint import make_blink_checkpoint

    with tempfile.TemporaryDirectory(prefix="mmrwkv-bench-") as tmp:  # the checkpoint is ~0.8 GB: never leave it
        pth = make_blink_checkpoint(Path(tmp) / "bench.pth", n_layer=args.layers, n_embd=args.embd,
                                    vocab_size=args.vocab)
        lines = speed_table(pth, args)
    if not args.skip_memory:
        lines += ["", *memory_table(args)]
    publish("Core model speed and memory (CPU)", lines)


def speed_table(pth, args):
    """The speed rows of the published table: both packages load ``pth`` and take turns."""
    from rwkv.model import RWKV

    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, args.vocab, (args.prefill,), generator=g).tolist()
    lines = [
        f"Random official-layout checkpoint L{args.layers} C{args.embd} V{args.vocab}, {args.threads} threads, "
        f"official package with RWKV_JIT_ON={os.environ['RWKV_JIT_ON']} (its README's setting), "
        f"best of 4 rounds in which the packages take turns (one process). Command: `python bench/model_speed.py`. The \"upper bound\" "
        f"rows time only the model's dense products at the same shapes (nothing else), so a ratio above them "
        f"cannot be reached with fp32 GEMMs on this machine.",
        "",
        "| dtype | measure | official rwkv | multimodal_rwkv | ratio |",
        "|---|---|---|---|---|",
    ]
    for dtype in args.dtypes.split(","):
        official = RWKV(model=str(pth)[:-4], strategy=f"cpu {dtype}", verbose=False)
        ours = RWKVForCausalLM.from_pretrained(pth, dtype=dtype)
        rows = speed_rows(official, ours, prompt, args)
        for name, a, b in rows:
            ratio = "" if a != a else f"{b / a:.2f}x"
            lines.append(f"| {dtype} | {name} | {'-' if a != a else f'{a:.1f}'} | {b:.1f} | {ratio} |")
        lines.append(f"| {dtype} | batched-8 aggregate / single stream (ours) | | | {rows[2][2] / rows[1][2]:.2f}x |")
        pf, d8 = gemm_bounds(ours, len(prompt))
        lines.append(f"| {dtype} | upper bound, GEMMs only: prefill {len(prompt)} tok/s | {rows[0][1]:.1f} | {pf:.1f} | "
                     f"{pf / rows[0][1]:.2f}x |")
        lines.append(f"| {dtype} | upper bound, GEMMs only: decode 8 streams tok/s / our single stream | | "
                     f"{d8:.1f} | {d8 / rows[1][2]:.2f}x |")
        del official, ours
    n_params = RWKVConfig(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd).num_parameters_estimate()
    lines.insert(1, f"({n_params / 1e6:.0f}M parameters.)")
    return lines


def memory_worker(kind, args):
    """Run in a fresh process: build the model, prefill ``ctx`` tokens in chunks of 1024, decode 8
    more, then print the process's peak RSS and the per-stream cache/state bytes."""
    torch.set_num_threads(args.threads)
    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    cfg = RWKVConfig(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.embd)
    ids = torch.randint(1, args.vocab, (1, args.ctx + 8))
    t0 = time.perf_counter()
    with torch.no_grad():
        if kind == "rwkv":
            model = RWKVForCausalLM(cfg).eval()
            st = None
            for i in range(0, args.ctx, 1024):
                st = model(ids[:, i:i + 1024], state=st, logits_to_keep=1).state
            for i in range(args.ctx, args.ctx + 8):
                st = model(ids[:, i:i + 1], state=st).state
            cache = st.nbytes_per_stream()
        else:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(llama_config(cfg, args)).eval()
            out = model(ids[:, :1024], use_cache=True, logits_to_keep=1)
            for i in range(1024, args.ctx, 1024):
                out = model(ids[:, i:i + 1024], cache=out.cache, use_cache=True, logits_to_keep=1)
            for i in range(args.ctx, args.ctx + 8):
                out = model(ids[:, i:i + 1], cache=out.cache, use_cache=True)
            cache = sum(t.numel() * t.element_size() for layer in out.cache.layers
                        for t in (layer.keys, layer.values))
    n = sum(p.numel() for p in model.parameters())
    rss = _peak_rss_bytes()
    print(f"RESULT {n} {cache} {rss} {time.perf_counter() - t0:.2f}")


def _peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss does not (on
    Linux a child inherits its parent's high-water mark), so prefer VmHWM."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_config(cfg, args):
    """A transformers Llama with (about) the RWKV model's parameter count: same width and vocab."""
    from transformers import LlamaConfig

    inter = int(cfg.n_embd * 8 / 3) // 64 * 64
    rwkv_params = cfg.num_parameters_estimate()
    per_layer = 4 * cfg.n_embd * cfg.n_embd + 3 * cfg.n_embd * inter
    n_layers = max(1, round((rwkv_params - 2 * cfg.vocab_size * cfg.n_embd) / per_layer))
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=inter,
                       num_hidden_layers=n_layers, num_attention_heads=cfg.n_embd // 64,
                       num_key_value_heads=cfg.n_embd // 64, max_position_embeddings=args.ctx + 64,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def memory_table(args):
    import subprocess

    res = {}
    for kind in ("rwkv", "llama"):
        cmd = [sys.executable, __file__, "--memory-worker", kind, "--ctx", str(args.ctx), "--layers", str(args.layers),
               "--embd", str(args.embd), "--vocab", str(args.vocab), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT"))
        n, cache, rss, secs = line.split()[1:]
        res[kind] = (int(n), int(cache), int(rss), float(secs))
    r, q = res["rwkv"], res["llama"]
    mib = 2 ** 20
    return [
        f"Memory while generating at {args.ctx} tokens of context (fp32, each model in its own process, peak RSS):",
        "",
        "| model | params | per-stream state / KV cache | grows with context | peak RSS | time |",
        "|---|---|---|---|---|---|",
        f"| RWKV-6 (ours) | {r[0] / 1e6:.0f}M | {r[1] / mib:.2f} MiB (state) | no | {r[2] / mib:.0f} MiB | {r[3]:.0f} s |",
        f"| Llama (transformers, SDPA) | {q[0] / 1e6:.0f}M | {q[1] / mib:.1f} MiB (KV cache) | yes | {q[2] / mib:.0f} MiB | {q[3]:.0f} s |",
        f"| ratio Llama / RWKV | | {q[1] / r[1]:.1f}x | | {q[2] / r[2]:.2f}x | |",
    ]


if __name__ == "__main__":
    main()
