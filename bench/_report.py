"""Shared by the benchmarks: interleaved timing, and printing a table and writing it into
BENCHMARKS.md under its own ``## title`` section."""
from __future__ import annotations

import re
import time
from pathlib import Path

BENCH_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(title: str, body: str) -> None:
    text = BENCH_FILE.read_text() if BENCH_FILE.exists() else "# Benchmarks\n\nMeasured tables; each section says its command.\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pat = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda m: section + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + section
    BENCH_FILE.write_text(text)


def publish(title: str, lines: list[str], write: bool = True) -> str:
    """Print a benchmark's table (its ``lines`` joined) and, if ``write``, put it into BENCHMARKS.md
    under ``## title`` (:func:`write_section`). Returns the text."""
    text = "\n".join(lines)
    print(text)
    if write:
        write_section(title, text)
    return text


def interleaved(fns, reps=4):
    """Best time in seconds of each of ``fns`` over ``reps`` rounds, the functions taking turns in
    every round, so that a burst of load on the shared machine hits them alike rather than one."""
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    return [min(t) for t in ts]
