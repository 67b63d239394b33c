"""Music quality, side by side: RWKV-6 (x060) vs RWKV-5 (x052) vs a GPT-2-style transformer of
about the same parameter count, trained here with the same data, windows, order and steps, on
Bach chorales (MIDI tokens) and O'Neill tunes (ABC bytes). CPU.

Reports held-out loss (nats/token and bits per note / per byte) and statistics of generated
pieces against held-out ones: pitch-class entropy (bits), note density (notes/beat), polyphony
(mean sounding notes), and the share of generated pieces that decode cleanly (MIDI: a
well-formed token sequence with notes; ABC: music21 parses it into at least one note).

    python bench/music_quality.py                 # default size, about 10 minutes on 2 cores
    python bench/music_quality.py --steps 30 --pieces 2 --no-write   # smoke run

Prints a table and writes it to BENCHMARKS.md under "## Music quality".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(kind: str, vocab: int, n_layer: int, n_embd: int, target_params: int | None = None):
    import torch  # noqa: F401

    if kind in ("x060", "x052"):
        from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

        cfg = RWKVConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=64, version=kind)
        if target_params is not None:  # x052 has no LoRAs: widen its channel mix to the same parameter count
            ffn = min(range(32, 8 * n_embd, 32), key=lambda f: abs(RWKVConfig(
                vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=64, version=kind,
                dim_ffn=f).num_parameters_estimate() - target_params))
            cfg = RWKVConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, head_size=64, version=kind, dim_ffn=ffn)
        return RWKVForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    best = None
    for c in range(64, 512, 8):  # width with the closest parameter count (same depth)
        for h in (2, 4, 8):
            if c % h:
                continue
            cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=c, n_layer=n_layer, n_head=h,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
            n = _gpt_params(cfg)
            if best is None or abs(n - target_params) < abs(best[0] - target_params):
                best = (n, cfg)
            break
    m = GPT2LMHeadModel(best[1])
    m.config.use_cache = True
    return m


def _gpt_params(cfg) -> int:
    C, L, V, P = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_positions
    return L * (12 * C * C + 13 * C) + 2 * C + V * C + P * C + V * C


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def windows(stream, ctx: int, batch: int, steps: int, seed: int):
    """Identical random windows for every model: list of [B, ctx+1] LongTensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(stream, dtype=torch.long)
    hi = len(ids) - ctx - 1
    return [torch.stack([ids[s: s + ctx + 1] for s in torch.randint(0, hi, (batch,), generator=g).tolist()]) for _ in range(steps)]


def train(model, batches, lr: float, warmup: int = 10):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    n = len(batches)
    model.train()
    t0 = time.time()
    for step, b in enumerate(batches):
        f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, n - warmup)))
        for gparam in opt.param_groups:
            gparam["lr"] = lr * max(f, 0.05)
        logits = model(input_ids=b[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return time.time() - t0, float(loss.detach())


def midi_generation_stats(model, tok, pieces: int, seconds: float, max_tokens: int):
    from multimodal_rwkv.music.generate import generate_music
    from multimodal_rwkv.music.metrics import mean_stats, piece_stats

    rows, clean = [], 0
    for k in range(pieces):
        res = generate_music(model, tok, None, seconds=seconds, max_new_tokens=max_tokens, seed=k, top_p=0.95)
        ok = res.decode_stats.clean and len(res.notes) > 0
        clean += ok
        if res.notes:
            rows.append(piece_stats(res.notes, tok.config.steps_per_beat, tok.drum_group))
    return mean_stats(rows) if rows else {}, clean / pieces


def abc_generation_stats(model, pieces: int, max_bytes: int, midi_tok):
    from multimodal_rwkv.music.generate import generate_abc

    texts = [generate_abc(prompt="X:1\n", max_bytes=max_bytes, seed=k, top_p=0.95, model=model) for k in range(pieces)]
    return abc_stats(texts, midi_tok)


def abc_stats(texts, midi_tok):
    from multimodal_rwkv.errors import MMRWKVError
    from multimodal_rwkv.music.abc import abc_to_midi
    from multimodal_rwkv.music.metrics import mean_stats, piece_stats

    rows, clean = [], 0
    for t in texts:
        try:
            notes, _, _, _ = midi_tok.extract_notes(abc_to_midi(t))
        except MMRWKVError:
            continue
        except Exception:  # noqa: BLE001 - music21 can fail in odd ways on generated text
            continue
        if notes:
            clean += 1
            rows.append(piece_stats(notes, midi_tok.config.steps_per_beat))
    return (mean_stats(rows) if rows else {}), clean / max(1, len(texts))


def run(args):
    import torch

    from multimodal_rwkv.music import AbcTokenizer, MidiTokenizer
    from multimodal_rwkv.music.corpora import load_tokens, prepare, split_documents
    from multimodal_rwkv.music.metrics import bits_per_unit, mean_stats, piece_stats, windowed_nll

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    results = []
    for ds in args.datasets:
        d = cache / ds
        if not (d / "meta.json").is_file():
            print(f"preparing {ds} in {d} ...", flush=True)
            prepare(d, corpus=ds, workers=2)
        is_abc = ds.endswith("abc")
        tok = AbcTokenizer() if is_abc else MidiTokenizer.from_pretrained(d)
        midi_tok = MidiTokenizer()
        train_ids = load_tokens(d / "train")
        valid_ids = load_tokens(d / "valid")[: args.valid_tokens]
        test_docs = split_documents(load_tokens(d / "test"))[: args.pieces * 2]
        if is_abc:
            ref, ref_clean = abc_stats([AbcTokenizer().decode(x) for x in test_docs], midi_tok)
            unit = "bits/byte"
            n_units = tok.count_bytes(valid_ids[1:])
        else:
            rows = [piece_stats(tok.decode_notes(x)[0], tok.config.steps_per_beat, tok.drum_group) for x in test_docs]
            ref, ref_clean = mean_stats(rows), 1.0
            unit = "bits/note"
            n_units = tok.count_notes(valid_ids[1:])
        results.append({"dataset": ds, "model": "held-out pieces", "params": 0, "train_s": 0, "nats": float("nan"),
                        "bits": float("nan"), "unit": unit, **ref, "clean": ref_clean})
        batches = windows(train_ids, args.ctx, args.batch, args.steps, seed=args.seed)
        target = None
        for kind in ("x060", "x052", "gpt2"):
            torch.manual_seed(args.seed)
            m = build_model(kind, tok.vocab_size, args.layers, args.embd, target)
            if kind == "x060":
                target = n_params(m)
            secs, last = train(m, batches, args.lr)
            total, n = windowed_nll(m, valid_ids, args.ctx)
            nats = total / n
            if is_abc:
                gen, clean = abc_generation_stats(m, args.pieces, args.abc_bytes, midi_tok)
            else:
                gen, clean = midi_generation_stats(m, tok, args.pieces, args.seconds, args.midi_tokens)
            name = {"x060": "RWKV-6 (x060)", "x052": "RWKV-5 (x052)", "gpt2": "GPT-2 (transformers)"}[kind]
            row = {"dataset": ds, "model": name, "params": n_params(m), "train_s": secs, "nats": nats,
                   "bits": bits_per_unit(nats, n, n_units), "unit": unit, **gen, "clean": clean}
            results.append(row)
            print(f"{ds:14s} {name:22s} params {row['params']:>9,d}  train {secs:6.1f}s  last train loss {last:.3f}  "
                  f"valid {nats:.4f} nats/token {row['bits']:.4f} {unit}  clean {clean:.2f}", flush=True)
    return results


def fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(results, args) -> str:
    lines = ["| data | model | params | train s | valid nats/token | valid bits per unit | vs RWKV-6 | "
             "pitch-class entropy | notes/beat | polyphony | clean decodes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["dataset"]: r["bits"] for r in results if r["model"].startswith("RWKV-6")}
    for r in results:
        ratio = "" if math.isnan(r["bits"]) else f"{r['bits'] / base[r['dataset']]:.3f}x"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['params']:,} | {fmt(float(r['train_s']), 0)} | {fmt(r['nats'])} | "
                     f"{fmt(r['bits'])} {r['unit'] if not math.isnan(r['bits']) else ''} | {ratio} | "
                     f"{fmt(r.get('pitch_class_entropy'), 2)} | {fmt(r.get('note_density'), 2)} | "
                     f"{fmt(r.get('polyphony'), 2)} | {fmt(r.get('clean'), 2)} |")
    cmd = "python bench/music_quality.py" + ("" if args.default else " " + " ".join(sys.argv[1:]))
    head = (f"`{cmd}` — CPU, {args.threads} thread(s); every model trained here for {args.steps} steps on the same "
            f"{args.batch}x{args.ctx}-token windows (same order, seed {args.seed}, AdamW lr {args.lr}, cosine), "
            f"{args.layers} layers; RWKV-6 width {args.embd}; RWKV-5 (no LoRAs) gets a wider channel mix and GPT-2 a width "
            "chosen for the closest parameter count. "
            f"Valid loss over the first {args.valid_tokens} tokens of the valid split in independent {args.ctx}-token windows; "
            f"bits per unit = bits per note (MIDI) or per byte (ABC). Generated: {args.pieces} pieces per model "
            f"(top-p 0.95; MIDI {args.seconds:.0f} s, ABC {args.abc_bytes} bytes), compared with held-out test pieces. "
            "Clean decode: MIDI = well-formed tokens with notes; ABC = music21 parses it into notes. "
            "Small budgets: these numbers rank architectures at toy scale, they are not converged results.")
    return head + "\n\n" + "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["bach-chorales", "oneill-abc"])
    ap.add_argument("--cache", default=str(ROOT / "data" / "bench_music"))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-tokens", type=int, default=16384)
    ap.add_argument("--pieces", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--midi-tokens", type=int, default=400)
    ap.add_argument("--abc-bytes", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = ap.parse_args()
    args.default = len(sys.argv) == 1
    t0 = time.time()
    results = run(args)
    body = table(results, args)
    print()
    print(body)
    print(f"\ntotal {time.time() - t0:.0f} s")
    if not args.no_write:
        sys.path.insert(0, str(ROOT / "bench"))
        from _report import write_section

        write_section("Music quality", body + f"\n\nLoad average at start: {os.getloadavg()[0]:.1f}; total {time.time() - t0:.0f} s.")


if __name__ == "__main__":
    main()
