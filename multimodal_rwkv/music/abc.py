"""Byte-level tokenizer for ABC notation (the Eagle paper's music setup), and ABC -> MIDI.

Ids: ``0`` is the document separator (as in every tokenizer of this project: the training
engine packs tunes as ``0 tune 0 tune 0 ...``); byte ``b`` (0..255) is id ``b + 1``. So the
vocabulary has 257 ids and ``bits per byte`` is simply the loss in bits per non-separator token.
Text is encoded as UTF-8; decoding replaces invalid UTF-8 (never raises).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from multimodal_rwkv.errors import ConfigError, DataError, MidiError

TOKENIZER_FILENAME = "abc_tokenizer.json"


@dataclass
class AbcTokenizer:
    """ABC text <-> ids (``id = byte + 1``, ``0`` = separator). ``vocab_size`` = 257."""

    pad_id: int = 0
    vocab_size: int = 257

    def encode(self, text: str) -> list[int]:
        """ABC text -> ids (one id per UTF-8 byte, no separator)."""
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; stops at the first separator after content; out-of-range ids are skipped."""
        out = bytearray()
        for i in map(int, ids):
            if i == 0:
                if out:
                    break
                continue
            if 1 <= i <= 256:
                out.append(i - 1)
        return out.decode("utf-8", errors="replace")

    def count_bytes(self, ids: Sequence[int]) -> int:
        """Number of byte tokens (the denominator of bits per byte)."""
        return sum(1 for i in ids if 1 <= int(i) <= 256)

    tokens_to_text = decode

    def text_to_tokens(self, text: str) -> list[int]:
        return self.encode(text)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``abc_tokenizer.json`` into ``directory``."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        p = Path(directory) / TOKENIZER_FILENAME
        p.write_text(json.dumps({"tokenizer": "abc", "vocab_size": self.vocab_size, "pad_id": self.pad_id}, indent=2) + "\n")
        return p

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "AbcTokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILENAME
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: cannot read ABC tokenizer config: {e}") from None
        if not isinstance(d, dict) or d.get("tokenizer") != "abc":
            raise ConfigError(f"{p}: not an ABC tokenizer config")
        return cls()


_TUNE_START = re.compile(r"^X:", re.MULTILINE)


def split_tunes(text: str) -> list[str]:
    """Split a multi-tune ABC file into tunes (each from its ``X:`` line); the file header
    before the first ``X:`` is dropped; trailing blank lines are removed."""
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    tunes = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        t = text[a:b].strip("\n").rstrip()
        lines = [ln.rstrip() for ln in t.split("\n")]
        t = "\n".join(lines)
        if t:
            tunes.append(t + "\n")
    return tunes


def _require_music21():
    try:
        import music21  # noqa: F401
    except ImportError:
        raise DataError("music21 is not installed: pip install 'multimodal-rwkv[music]'") from None
    return music21


def abc_to_midi(abc_text: str, out_path: str | os.PathLike | None = None, name: str = "<abc>"):
    """Convert one ABC tune to MIDI with music21. Returns a ``mido.MidiFile`` (and writes it to
    ``out_path`` if given). Unparsable ABC raises :class:`MidiError` naming ``name``."""
    import tempfile

    import mido

    _require_music21()
    from music21 import converter

    text = abc_text if _TUNE_START.search(abc_text) else "X:1\n" + abc_text
    try:
        score = converter.parse(text, format="abc")
        with tempfile.TemporaryDirectory() as d:
            fp = Path(d) / "tune.mid"
            score.write("midi", fp=str(fp))
            mid = mido.MidiFile(str(fp))
    except Exception as e:  # noqa: BLE001 - music21 raises many types on bad ABC
        raise MidiError(f"{name}: cannot convert ABC to MIDI ({type(e).__name__}: {e})") from None
    if out_path is not None:
        mid.save(str(out_path))
    return mid
