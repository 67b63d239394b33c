"""Music on the RWKV core: MIDI tokenizer (mido), ABC byte tokenizer, corpora, generation, metrics.

Light imports only (no torch): model-dependent functions import torch when called.
``BACH_MODEL_DIR`` is the small RWKV-6 chorale model shipped with the package (the demo's):
``generate_midi(BACH_MODEL_DIR, seconds=20, out="song.mid", png="roll.png")``.
"""
from pathlib import Path as _Path

from multimodal_rwkv.errors import MidiError  # noqa: F401
from multimodal_rwkv.music.abc import AbcTokenizer, abc_to_midi, split_tunes  # noqa: F401
from multimodal_rwkv.music.midi_tokenizer import (  # noqa: F401
    DecodeStats,
    EncodeStats,
    MidiTokenizer,
    MidiTokenizerConfig,
    Note,
)

BACH_MODEL_DIR = _Path(__file__).resolve().parent.parent / "assets" / "music_bach"


def generate_midi(model_dir, prompt=None, seconds: float = 30.0, **kwargs):
    """Generate a ``mido.MidiFile`` with a music model folder (see :mod:`multimodal_rwkv.music.generate`)."""
    from multimodal_rwkv.music.generate import generate_midi as _g

    return _g(model_dir, prompt, seconds, **kwargs)


def generate_abc(model_dir=None, prompt: str = "X:1\n", max_bytes: int = 1024, **kwargs) -> str:
    """Generate ABC text with an ABC model folder (see :mod:`multimodal_rwkv.music.generate`)."""
    from multimodal_rwkv.music.generate import generate_abc as _g

    return _g(model_dir, prompt, max_bytes, **kwargs)


def prepare(out, corpus=None, midi_dir=None, **kwargs):
    """Build a tokenised dataset (see :func:`multimodal_rwkv.music.corpora.prepare`)."""
    from multimodal_rwkv.music.corpora import prepare as _p

    return _p(out, corpus=corpus, midi_dir=midi_dir, **kwargs)


def render_pianoroll(notes, out_path=None, **kwargs):
    """Piano-roll PNG of grid notes (see :mod:`multimodal_rwkv.music.pianoroll`)."""
    from multimodal_rwkv.music.pianoroll import render_pianoroll as _r

    return _r(notes, out_path, **kwargs)


__all__ = [
    "AbcTokenizer", "BACH_MODEL_DIR", "DecodeStats", "EncodeStats", "MidiError", "MidiTokenizer", "MidiTokenizerConfig", "Note",
    "abc_to_midi", "generate_abc", "generate_midi", "prepare", "render_pianoroll", "split_tunes",
]
