"""Write a benchmark's table into BENCHMARKS.md under its own ``## title`` section."""
from __future__ import annotations

import re
from pathlib import Path

BENCH_FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(title: str, body: str) -> None:
    text = BENCH_FILE.read_text() if BENCH_FILE.exists() else "# Benchmarks\n\nMeasured tables; each section says its command.\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pat = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda m: section + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + section
    BENCH_FILE.write_text(text)
