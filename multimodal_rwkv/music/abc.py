"""Byte-level tokenizer for ABC notation (the Eagle paper's music setup), and ABC -> MIDI.

Ids: ``0`` is the document separator (as in every tokenizer of this project: the training
engine packs tunes as ``0 tune 0 tune 0 ...``); byte ``b`` (0..255) is id ``b + 1``. So the
vocabulary has 257 ids and ``bits per byte`` is simply the loss in bits per non-separator token.
Text is encoded as UTF-8; decoding replaces invalid UTF-8 (never raises).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from multimodal_rwkv.errors import ConfigError, DataError, MidiError

TOKENIZER_FILENAME = "abc_tokenizer.json"
log = logging.getLogger(__name__)


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
    before the first ``X:`` is dropped; trailing blank lines are removed (a byte-order mark too)."""
    text = text.lstrip("\ufeff")
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    tunes = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        t = text[a:b].strip("\n").rstrip()
        lines = [ln.rstrip() for ln in t.split("\n")]
        t = "\n".join(lines)
        if t:
            tunes.append(t + "\n")
    return tunes


def with_default_unit_length(tune: str) -> str:
    """Insert the ABC standard's default ``L:`` before ``K:`` when the header has none (music21
    refuses notes without it): 1/16 if the meter ``M:`` is below 3/4, else 1/8 (also for no
    meter or ``M:none``)."""
    lines = tune.split("\n")
    k_line = next((i for i, ln in enumerate(lines) if ln.startswith("K:")), None)
    if k_line is None or any(ln.startswith("L:") for ln in lines[:k_line]):
        return tune
    unit = "1/8"
    for ln in lines[:k_line]:
        if ln.startswith("M:"):
            m = ln[2:].strip()
            m = {"C": "4/4", "C|": "2/2"}.get(m, m)
            try:
                a, b = m.split("/")
                if int(a) / int(b) < 0.75:
                    unit = "1/16"
            except (ValueError, ZeroDivisionError):
                pass
    return "\n".join(lines[:k_line] + [f"L:{unit}"] + lines[k_line:])


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
    text = with_default_unit_length(text)
    try:
        score = converter.parse(text, format="abc")
    except Exception as e:  # noqa: BLE001 - music21 raises many types on bad ABC
        raise MidiError(f"{name}: cannot parse ABC ({type(e).__name__}: {str(e)[:200]})") from None
    if not score.flatten().notes:
        raise MidiError(f"{name}: the ABC holds no notes")
    try:
        with tempfile.TemporaryDirectory() as d:
            fp = Path(d) / "tune.mid"
            score.write("midi", fp=str(fp))
            mid = mido.MidiFile(str(fp))
    except Exception as e:  # noqa: BLE001 - e.g. bars of the wrong length trip music21's MIDI writer
        log.info("%s: music21's MIDI writer failed (%s); writing the parsed notes directly", name, type(e).__name__)
        mid = _notes_to_midi(score, name)
    mid.filename = name
    if out_path is not None:
        mid.save(str(out_path))
    return mid


def _notes_to_midi(score, name: str):
    """The notes music21 parsed (offsets/durations in quarter notes) -> MIDI at 120 BPM on a
    12-steps-per-beat grid, without music21's measure machinery."""
    from multimodal_rwkv.music.midi_tokenizer import MidiTokenizer, Note

    tok = MidiTokenizer()
    spb = tok.config.steps_per_beat
    notes = []
    flat = score.flatten()
    try:
        flat = flat.stripTies()  # a note music21 split at a bar line is one note again
    except Exception:  # noqa: BLE001 - keep the split notes rather than fail
        pass
    for n in flat.notes:
        on = int(round(float(n.offset) * spb))
        dur = max(1, int(round(float(n.duration.quarterLength) * spb)))
        for p in getattr(n, "pitches", ()):
            if 0 <= p.midi <= 127:
                notes.append(Note(on, dur, 0, int(p.midi), tok.velocity_bin(90)))
    if not notes:
        raise MidiError(f"{name}: the ABC holds no notes")
    return tok.notes_to_midi(notes)
