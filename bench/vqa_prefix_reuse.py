"""Many questions about one image: image-first prefix reuse vs prefilling every prompt from scratch.

In the image-first template the prompt starts "User: <image>", which does not depend on the
question. VisualRWKV.answer_batch prefills that prefix once (vision tower + RWKV over the image
tokens), clones the recurrent state per question and prefills only the question text; the baseline
runs the tower and the whole prompt for every question. Both decode the same way (batched,
greedy), and the bench checks that both give the same answers.

    python bench/vqa_prefix_reuse.py                 # CPU-sized random model, 16 questions
    python bench/vqa_prefix_reuse.py --size paper    # CLIP-L/14-336 tower (577 tokens) + RWKV-6 1B6 sizes
    python bench/vqa_prefix_reuse.py --no-write      # do not touch BENCHMARKS.md

Weights are random (the timing does not depend on them). Prints a table and writes it to
BENCHMARKS.md under "## VisualRWKV" (only that section is replaced).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

SIZES = {
    # tower: CLIP ViT, 224 px / 14 px patches -> 256 patches + CLS; LM: 6 x 512
    "cpu": dict(vision=dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=4, image_size=224, patch_size=14),
                text=dict(n_layer=6, n_embd=512, head_size=64)),
    # CLIP ViT-L/14-336 (577 tokens) and RWKV-6 World 1B6 shapes (24 x 2048)
    "paper": dict(vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                              hidden_act="quick_gelu"),
                  text=dict(n_layer=24, n_embd=2048, head_size=64)),
}

QUESTIONS = [
    "What is in the image?", "How many people are there?", "What colour is the car?", "Is it daytime?",
    "Where was this photo taken?", "What is the man holding?", "Is there a dog?", "What time of year is it?",
    "What is written on the sign?", "How many windows are visible?", "What is on the table?",
    "Is the light on?", "What sport is being played?", "Which animal is on the left?",
    "What is the weather like?", "Are there any trees?", "What is the woman wearing?", "Is the door open?",
]


def build(size: str, device: str, dtype):
    from multimodal_rwkv import WorldTokenizer
    from multimodal_rwkv.vision.modeling import VisualRWKV, VisualRWKVConfig

    s = SIZES[size]
    cfg = VisualRWKVConfig(text_config={"vocab_size": 65536, **s["text"]}, vision_config=s["vision"],
                           prompt_template="image_first", cls_token="end", projector="linear")
    torch.manual_seed(0)
    m = VisualRWKV.from_config(cfg, tokenizer=WorldTokenizer())
    with torch.no_grad():  # RWKV's init zeroes output projections; randomise so the work is real
        for n, p in m.language_model.named_parameters():
            if p.dim() == 2 and ("output" in n or "ffn.value" in n or "ffn.receptance" in n):
                p.normal_(0, p.shape[1] ** -0.5)
    return m.to(device=device, dtype=dtype).eval()


def timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def write_section(path: Path, text: str, title: str = "## VisualRWKV") -> None:
    """Replace (or append) the ``title`` section of BENCHMARKS.md, leaving the others alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == title), None)
    block = title + "\n\n" + text.rstrip() + "\n\n"
    if start is None:
        new = old.rstrip() + "\n\n" + block
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + block + "".join(lines[end:])
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new.rstrip() + "\n")
    tmp.replace(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[4, 8],
                    help="answer lengths to time (VQA short answers are ~2-4 tokens + the stop token)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 | bf16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    from PIL import Image

    m = build(args.size, args.device, dtype)
    g = torch.Generator().manual_seed(1)
    side = m.vision_tower.config.image_size
    img = Image.fromarray((torch.rand(side + 40, side, 3, generator=g) * 255).byte().numpy())
    qs = (QUESTIONS * (args.questions // len(QUESTIONS) + 1))[: args.questions]
    n_img = m.num_image_tokens
    q_tok = sum(len(m.processor.image_first_split(q)[1]) for q in qs) / len(qs)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    table = [f"Prefix reuse, {args.questions} questions about one image (`bench/vqa_prefix_reuse.py --size {args.size}`): "
             f"{dev}, {str(dtype).replace('torch.', '')}; tower {m.vision_tower.config.num_hidden_layers}x"
             f"{m.vision_tower.hidden_size} at {side} px ({n_img} image tokens), RWKV-6 "
             f"{m.language_model.config.n_layer}x{m.language_model.config.n_embd}, V=65536; question suffix "
             f"~{q_tok:.0f} tokens; greedy, N new tokens per question (no stop string; random weights), decoded as one "
             f"batch either way; median of {args.repeats}.",
             "", "| new tokens | method | total s | s / question | speed-up | same answers |",
             "|---:|---|---:|---:|---:|---|"]
    all_same = True
    for n_new in args.new_tokens:
        gen = dict(max_new_tokens=n_new, stop="")

        def scratch():
            return m.answer_batch(img, qs, reuse_image_prefix=False, **gen)

        def reuse():
            return m.answer_batch(img, qs, reuse_image_prefix=True, **gen)

        scratch(), reuse()  # warm-up
        t_scratch, a_scratch = timed(scratch, args.device, args.repeats)
        t_reuse, a_reuse = timed(reuse, args.device, args.repeats)
        same = a_scratch == a_reuse
        all_same &= same
        for name, t, r in (("prefill each prompt from scratch", t_scratch, 1.0),
                           ("prefill image once, clone state", t_reuse, t_scratch / t_reuse)):
            table.append(f"| {n_new} | {name} | {t:.3f} | {t / len(qs):.4f} | {r:.2f}x | {'yes' if same else 'NO'} |")
    text = "\n".join(table)
    print(text)
    if not all_same:
        raise SystemExit("answers differ between the two methods")
    if not args.no_write:
        write_section(Path(args.out), text)
        print(f"wrote the '## VisualRWKV' section of {args.out}")


if __name__ == "__main__":
    main()
