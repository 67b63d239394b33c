"""World tokenizer speed: ours vs the official ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, same process.

Builds a few MB of synthetic mixed English/Chinese text (seeded; Zipf-distributed words and
characters, punctuation, numbers, paragraphs), checks both tokenizers give identical ids, and
measures encode and decode MB/s (UTF-8 bytes of the text per second, best of N runs) plus the time
to load the vocabulary. Prints a table and writes it to BENCHMARKS.md under "## World tokenizer".

    python bench/tokenizer_speed.py [--mb 4] [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

EN_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can "
    "who said its into than them about may only time new some could these two over first like other "
    "after years also made many most people such model language network training data learning "
    "recurrent state attention token sequence memory vision music image piano melody performance "
    "however because through between during without within another whether although government "
    "university research development information international experience important available "
    "Wikipedia history century population village river mountain station railway football season"
).split()
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说"
    "产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使"
    "点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明"
    "看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料"
    "象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
    "几九区强放决西被干做必战先回则任取据处府研语言模型神经网络训练数据音乐图像钢琴旋律记忆状态序列"
)
ZH_PUNCT = "，，，。。、；：！？“”（）《》"


def _zipf_choice(rng: random.Random, items, s: float = 1.1):
    weights = [1.0 / (i + 1) ** s for i in range(len(items))]
    return lambda k: rng.choices(items, weights=weights, k=k)


def make_text(n_bytes: int, seed: int = 0, en_share: float = 0.5) -> str:
    """Synthetic text of about ``n_bytes`` UTF-8 bytes; ``en_share`` of the paragraphs English."""
    rng = random.Random(seed)
    en = _zipf_choice(rng, EN_WORDS)
    zh = _zipf_choice(rng, list(ZH_CHARS))
    parts, total = [], 0
    while total < n_bytes:
        if rng.random() < en_share:
            sents = []
            for _ in range(rng.randint(2, 6)):
                words = en(rng.randint(5, 25))
                words[0] = words[0].capitalize()
                if rng.random() < 0.2:
                    words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
                sents.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ","]))
            para = " ".join(sents)
        else:
            chars = []
            for _ in range(rng.randint(2, 6)):
                chars.extend(zh(rng.randint(6, 30)))
                chars.append(rng.choice(ZH_PUNCT))
            para = "".join(chars)
            if rng.random() < 0.3:  # inline English term, as in real Chinese text
                para = para[: len(para) // 2] + " " + " ".join(en(2)) + " " + para[len(para) // 2:]
        parts.append(para)
        total += len(para.encode()) + 2
    return "\n\n".join(parts)


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall-clock seconds, best CPU seconds of this process) over ``repeats`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def update_benchmarks_md(section: str, path: str = "BENCHMARKS.md") -> None:
    """Replace (or append) the '## World tokenizer' section, leaving other sections as they are."""
    header = "## World tokenizer"
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start = old.find(header + "\n")
    if start == -1:
        new = old.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        nxt = old.find("\n## ", start + len(header))
        end = len(old) if nxt == -1 else nxt + 1
        new = old[:start] + section.rstrip("\n") + "\n" + ("\n" + old[end:] if end < len(old) else "")
    tmp = path + ".tmp-tokenizer"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    from multimodal_rwkv.argtypes import float_min, int_min

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float_min(0, strict=True), default=4.0,
                    help="size of the mixed text in MB (default 4)")
    ap.add_argument("--repeats", type=int_min(1), default=3, help="best of N (default 3)")
    ap.add_argument("--no-write", action="store_true", help="print only, do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from multimodal_rwkv.model import tokenizer as tkmod

    vocab_file = tkmod.default_vocab_file()
    tkmod._CACHE.clear()
    w0, c0 = time.perf_counter(), time.process_time()
    ours = tkmod.WorldTokenizer(vocab_file)
    load_ours = (time.perf_counter() - w0, time.process_time() - c0)
    t0 = time.perf_counter()
    ours_again = tkmod.WorldTokenizer(vocab_file)
    load_ours_cached = time.perf_counter() - t0
    assert ours_again._vocab is ours._vocab
    w0, c0 = time.perf_counter(), time.process_time()
    official = TRIE_TOKENIZER(vocab_file)
    load_official = (time.perf_counter() - w0, time.process_time() - c0)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    n = int(args.mb * 1e6)
    corpora = [
        ("mixed EN/ZH", make_text(n, seed=0, en_share=0.5)),
        ("English", make_text(n // 2, seed=1, en_share=1.0)),
        ("Chinese", make_text(n // 2, seed=2, en_share=0.0)),
    ]
    rows = []
    for name, text in corpora:
        nb = len(text.encode("utf-8"))
        ids = ours.encode(text)
        ids_official = official.encode(text)
        if ids != ids_official:
            print(f"MISMATCH on {name}: ours and official ids differ", file=sys.stderr)
            return 1
        assert ours.decode(ids) == text and official.decode(ids) == text
        ours._vocab.piece_cache.clear()  # first pass with empty piece caches
        ours._vocab.chunk_cache.clear()
        enc_cold = best_of(lambda: ours.encode(text), 1)
        enc_o = best_of(lambda: ours.encode(text), args.repeats)
        enc_r = best_of(lambda: official.encode(text), args.repeats)
        dec_o = best_of(lambda: ours.decode(ids), args.repeats)
        dec_r = best_of(lambda: official.decode(ids), args.repeats)
        rows.append((name, nb / 1e6, nb / len(ids), nb / enc_cold[0] / 1e6, nb / enc_o[0] / 1e6,
                     nb / enc_r[0] / 1e6, enc_r[1] / enc_o[1], nb / dec_o[0] / 1e6, nb / dec_r[0] / 1e6,
                     dec_r[1] / dec_o[1]))

    lines = [
        "## World tokenizer",
        "",
        f"`python bench/tokenizer_speed.py --mb {args.mb:g} --repeats {args.repeats}` — "
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs; synthetic seeded text; ids verified identical to the official "
        f"`rwkv.rwkv_tokenizer.TRIE_TOKENIZER` on every corpus; MB = 10^6 UTF-8 bytes of text; best of "
        f"{args.repeats}, same process.",
        "",
        "| text | MB | bytes/token | encode ours, 1st pass MB/s | encode ours MB/s | encode official MB/s "
        "| ratio | ratio (CPU time) | decode ours MB/s | decode official MB/s | ratio | ratio (CPU time) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, mb, bpt, ecold, eo, er, ecpu, do, dr, dcpu in rows:
        lines.append(f"| {name} | {mb:.2f} | {bpt:.2f} | {ecold:.1f} | {eo:.1f} | {er:.1f} | {eo / er:.2f}x | "
                     f"{ecpu:.2f}x | {do:.0f} | {dr:.0f} | {do / dr:.2f}x | {dcpu:.2f}x |")
    lines += [
        "",
        f"Vocabulary load (wall / CPU): ours {load_ours[0]:.2f} s / {load_ours[1]:.2f} s (parse + build the "
        f"matcher; {load_ours_cached * 1e3:.2f} ms when cached in-process), official "
        f"{load_official[0]:.2f} s / {load_official[1]:.2f} s. MB/s columns are wall-clock; the CPU-time "
        f"ratios are less sensitive to other load on the machine (1-min load average at start: "
        f"{load_avg:.1f}). \"1st pass\" starts with empty piece caches (ours caches the ids of short "
        f"pieces between proven token boundaries, e.g. English words); the other encode columns are "
        f"best of {args.repeats}.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        update_benchmarks_md(table + "\n")
        print("\nwrote BENCHMARKS.md (section '## World tokenizer')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
