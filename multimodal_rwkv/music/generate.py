"""Generate music from a trained model folder (MIDI or ABC, found from the tokenizer file in it).

The folder is what the recipes export: ``config.json`` + ``model.safetensors`` + either
``midi_tokenizer.json`` or ``abc_tokenizer.json``. Sampling runs token by token on the RNN state
(RWKV) or the KV cache (any ``transformers`` causal LM, used by the benchmark), so stopping after
``seconds`` of music costs nothing extra.

Python API::

    from multimodal_rwkv.music import generate_midi
    mid = generate_midi("runs/music_bach/final", seconds=20, seed=1)        # -> mido.MidiFile
    mid = generate_midi(model_dir, prompt="start.mid", seconds=10, top_p=0.9)
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from multimodal_rwkv.argtypes import integer_number
from multimodal_rwkv.errors import CheckpointError, MidiError
from multimodal_rwkv.fileio import check_outputs, write_outputs
from multimodal_rwkv.music.abc import TOKENIZER_FILENAME as ABC_FILE
from multimodal_rwkv.music.abc import CONTROL_BYTES, AbcTokenizer, with_file_header
from multimodal_rwkv.music.midi_tokenizer import TOKENIZER_FILENAME as MIDI_FILE
from multimodal_rwkv.music.midi_tokenizer import DecodeStats, MidiTokenizer, Note

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in a model folder: :class:`MidiTokenizer` or :class:`AbcTokenizer`."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: {'not a folder' if d.exists() else 'no such file or folder'} (a music model "
                              "is a folder with config.json, model.safetensors and its tokenizer)")
    f = tokenizer_file(d)
    if f is None:
        raise CheckpointError(f"{d}: no {MIDI_FILE} or {ABC_FILE} (not a music model folder)")
    return MidiTokenizer.from_pretrained(f) if f.name == MIDI_FILE else AbcTokenizer.from_pretrained(f)


def tokenizer_file(folder: str | os.PathLike) -> Path | None:
    """The tokenizer file in ``folder`` (``midi_tokenizer.json`` first, then ``abc_tokenizer.json``), or None."""
    for name in (MIDI_FILE, ABC_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_music_model(model_dir: str | os.PathLike, device: str = "cpu"):
    """``(model, tokenizer)`` from a music model folder; the model in eval mode, fp32."""
    import torch

    from multimodal_rwkv.model.modeling import RWKVForCausalLM

    tok = load_tokenizer(model_dir)
    model = RWKVForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, device=device)
    if model.config.vocab_size < tok.vocab_size:
        raise CheckpointError(f"{model_dir}: model vocab {model.config.vocab_size} < tokenizer vocab {tok.vocab_size}")
    model.eval()
    return model, tok


def _check_count(name: str, v) -> int:
    """``v`` as an int: an integer >= 1, else ValueError (the CLI's --max-tokens rule)."""
    n = integer_number(v)
    if n is None or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return n


def _check_seed(seed) -> int | None:
    """``seed`` as an int or None: an integer in [0, 2**63), the CLI's --seed rule."""
    n = None if seed is None else integer_number(seed)
    if seed is not None and (n is None or not 0 <= n < 2**63):
        raise ValueError(f"seed must be None or an integer in [0, 2**63), got {seed!r}")
    return n


def _prompt_ids(prompt, vocab_size: int | None) -> list[int]:
    """A prompt of token ids (a list, tuple, numpy array, tensor ...) as a list of ints, each an
    integer in [0, vocab_size): TypeError for another kind of prompt, ValueError for a bad id."""
    if isinstance(prompt, (str, bytes, bytearray)) or not hasattr(prompt, "__iter__"):
        raise TypeError(f"a prompt of token ids must be a sequence of integers, got {type(prompt).__name__}")
    out = []
    for i in prompt:
        n = integer_number(i)
        if n is None or n < 0 or (vocab_size is not None and n >= vocab_size):
            raise ValueError(f"prompt ids must be integers in [0, {vocab_size if vocab_size is not None else '...'}), "
                             f"got {i!r}")
        out.append(n)
    return out


def _check_seconds(seconds) -> float:
    """``seconds`` as a float: a finite number > 0 (the CLI's --seconds rule), else ValueError."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not math.isfinite(seconds) \
            or not seconds > 0:
        raise ValueError(f"seconds must be > 0 (a finite number), got {seconds!r}")
    return float(seconds)


def sample_next(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                allowed: int | None = None) -> int:
    """One id from ``logits [V]`` by RWKV's sampler (:func:`~multimodal_rwkv.model.generation.sample_logits`:
    nucleus (top-p) and top-k from the untempered probabilities, then the temperature). ``temperature``
    <= 0 is greedy. Ids >= ``allowed`` (padding beyond the tokenizer's vocabulary) are never drawn."""
    from multimodal_rwkv.model.generation import sample_logits

    x = logits.float().clone()
    if allowed is not None and allowed < x.numel():
        x[allowed:] = float("-inf")
    return int(sample_logits(x[None], temperature, top_k, top_p, generator)[0])


def sample_tokens(model, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int | None = None, stop_ids: Sequence[int] = (0,), vocab_size: int | None = None,
                  on_token=None, banned_ids: Sequence[int] = ()) -> list[int]:
    """Sample up to ``max_new_tokens`` ids after ``prompt`` (non-empty), never one of ``banned_ids``.
    Stops after a token in ``stop_ids`` (kept in the output) or when ``on_token(id)`` returns True.
    Works with RWKV (recurrent state) and with ``transformers`` causal LMs (KV cache). Returns the
    new ids. Logits that are NaN or infinite (a model overflowing fp16) raise
    :class:`~multimodal_rwkv.errors.NumericsError`."""
    import torch

    from multimodal_rwkv.model.generation import check_finite_logits, check_sampling

    max_new_tokens = _check_count("max_new_tokens", max_new_tokens)
    seed = _check_seed(seed)
    check_sampling(temperature, top_k, top_p)
    prompt = _prompt_ids(prompt, getattr(getattr(model, "config", None), "vocab_size", None))
    if not prompt:
        raise ValueError("prompt must hold at least one id (e.g. the separator 0)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    rwkv = hasattr(model, "empty_state")
    new: list[int] = []
    stops = set(int(s) for s in stop_ids)
    banned = torch.tensor(sorted(set(int(b) for b in banned_ids)), dtype=torch.long)
    with torch.no_grad():
        if rwkv:
            out = model(input_ids=x, logits_to_keep=1, return_dict=True)
            cache = out.state
        else:
            out = model(input_ids=x, use_cache=True)
            cache = out.past_key_values
        for step in range(max_new_tokens):
            logits = out.logits[0, -1].cpu()
            check_finite_logits(logits, dtype, f" at new token {step + 1}")
            if len(banned):
                logits = logits.index_fill(0, banned, -float("inf"))
            i = sample_next(logits, temperature, top_k, top_p, gen, vocab_size)
            new.append(i)
            if i in stops or (on_token is not None and on_token(i)):
                break
            x = torch.tensor([[i]], dtype=torch.long, device=device)
            if rwkv:
                out = model(input_ids=x, state=cache, return_dict=True)
                cache = out.state
            else:
                out = model(input_ids=x, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
    return new


@dataclass
class MusicGeneration:
    """Result of :func:`generate_music`: ``ids`` (prompt + new, without the leading separator),
    ``prompt_len`` (ids of those from the prompt), ``midi`` (``mido.MidiFile``), ``notes`` and
    ``prompt_end`` (grid step where the prompt stops: its time shifts added up), ``prompt_notes``
    (how many of ``notes``, the first ones, are the prompt's), ``decode_stats``, ``seconds`` generated,
    ``new_tokens`` (how many the model sampled, at most ``max_new_tokens``; an ``<eos>`` added to
    close a piece cut by the length cap is not one of them)."""

    ids: list[int]
    prompt_len: int
    midi: object
    notes: list[Note] = field(default_factory=list)
    prompt_end: int = 0
    prompt_notes: int = 0
    decode_stats: DecodeStats | None = None
    seconds: float = 0.0
    new_tokens: int = 0
    end_step: int = 0  # grid step where the file ends (its time shifts added up: a closing rest too)


def midi_prompt_ids(tok: MidiTokenizer, prompt) -> list[int]:
    """Prompt ids for a MIDI prompt (path, ``mido.MidiFile``, the file's bytes, a binary file object,
    or ids: a list, tuple, numpy array or tensor of integers in the vocabulary): its tokens without
    ``<eos>``."""
    if prompt is None:
        return [tok.bos_id]
    if isinstance(prompt, (list, tuple)) or hasattr(prompt, "__array__"):  # numpy arrays and tensors too
        ids = _prompt_ids(prompt, tok.vocab_size)
    else:
        ids = tok.encode(prompt)
    while ids and ids[-1] in (tok.eos_id, tok.pad_id):
        ids = ids[:-1]
    while ids and ids[0] == tok.pad_id:
        ids = ids[1:]
    return ids or [tok.bos_id]


def generate_music(model, tok: MidiTokenizer, prompt=None, seconds: float = 30.0, max_new_tokens: int = 8192,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 0.95, seed: int | None = 0,
                   progress: bool = False) -> MusicGeneration:
    """Continue ``prompt`` (None: from scratch) with about ``seconds`` of new music.

    Generation stops at ``<eos>``/separator, after ``seconds`` of new time shifts, or after
    ``max_new_tokens``. The result always decodes into a valid MIDI file.
    """
    seconds = _check_seconds(seconds)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens)
    seed = _check_seed(seed)
    p = midi_prompt_ids(tok, prompt)
    tracker = tok.seconds_tracker()
    for i in p:
        tracker.feed(i)
    start = tracker.seconds

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(seconds, 1), unit="s", desc="music", bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s")

    def stop(i):
        done = tracker.feed(i) - start
        if bar is not None:
            bar.update(round(min(done, seconds) - bar.n, 3))
        return done >= seconds

    new = sample_tokens(model, [tok.pad_id] + p, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_ids=(tok.pad_id, tok.eos_id), vocab_size=tok.vocab_size, on_token=stop)
    if bar is not None:
        bar.close()
    ids = p + new
    if not ids or ids[-1] != tok.eos_id:
        ids = [i for i in ids if i != tok.pad_id] + [tok.eos_id]  # ended by length: close the piece
    notes, tempos, st = tok.decode_notes(ids)
    end = max((n.onset for n in notes), default=0)
    steps = lambda part: sum(i - tok.shift_start + 1 for i in part  # noqa: E731 - the time shifts' grid steps
                             if tok.shift_start <= i < tok.shift_start + tok.config.max_shift)
    # the file lasts as long as the time generated (the seconds reported), a closing rest too
    end_step = steps(ids)
    midi = tok.notes_to_midi(notes, tempos, tok.time_signatures_from_bars(st.bars, end), end_step=end_step)
    prompt_end = steps(p)
    return MusicGeneration(ids=ids, prompt_len=len(p), midi=midi, notes=notes,
                           prompt_end=prompt_end if prompt is not None else 0,
                           prompt_notes=len(tok.decode_notes(p)[0]) if prompt is not None else 0, decode_stats=st,
                           seconds=tracker.seconds - start, new_tokens=len(new), end_step=end_step)


def generate_midi(model_dir: str | os.PathLike, prompt=None, seconds: float = 30.0, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 0.95, seed: int | None = 0, max_new_tokens: int = 8192,
                  out: str | os.PathLike | None = None, png: str | os.PathLike | None = None, device: str = "cpu",
                  progress: bool = False):
    """Generate a MIDI file with the model in ``model_dir``; returns a ``mido.MidiFile``.

    ``prompt``: a MIDI path / ``mido.MidiFile`` to continue, or None. ``seconds``: length of the
    new part. ``out``: also save the ``.mid``; ``png``: also draw a piano roll (prompt shaded).
    """
    from multimodal_rwkv.model.generation import check_sampling

    _check_seconds(seconds)  # before the model is loaded
    _check_count("max_new_tokens", max_new_tokens)
    _check_seed(seed)
    check_sampling(temperature, top_k, top_p)
    check_midi_outputs(out, png, [("model", model_dir)] + ([("prompt", prompt)] if isinstance(prompt, (str, os.PathLike)) else []))
    model, tok = load_music_model(model_dir, device)
    if not isinstance(tok, MidiTokenizer):
        raise MidiError(f"{model_dir}: an ABC model; use generate_abc")
    res = generate_music(model, tok, prompt, seconds, max_new_tokens, temperature, top_k, top_p, seed, progress)
    write_midi_outputs(res, tok, out, png)
    return res.midi


def check_midi_outputs(out, png, inputs, names: tuple[str, str] = ("out", "png")) -> None:
    """Refuse, before generating, a ``.mid`` ``out`` / piano-roll ``png`` (either may be None)
    that would replace one of ``inputs`` or each other, or could not be written; ``png`` must be a
    .png name. ``names``: how the message calls them (the CLI's ``--out`` / ``--png``)."""
    from multimodal_rwkv.music.pianoroll import check_png

    check_outputs([(n, p) for n, p in zip(names, (out, png)) if p is not None], inputs)
    if png is not None:
        check_png(names[1], png)


def write_midi_outputs(res: MusicGeneration, tok: MidiTokenizer, out, png) -> None:
    """Write the generated piece to ``out`` (.mid) and its piano roll (prompt shaded) to ``png``,
    either may be None, all or nothing (a failure leaves no file)."""
    writes = []
    if out is not None:
        writes.append((out, lambda tmp: res.midi.save(str(tmp))))
    if png is not None:
        from multimodal_rwkv.music.pianoroll import render_pianoroll

        img = render_pianoroll(res.notes, None, steps_per_beat=tok.config.steps_per_beat,
                               prompt_end=res.prompt_end if res.prompt_notes else None,
                               prompt_notes=res.prompt_notes, tokenizer=tok, end_step=res.end_step)
        writes.append((png, lambda tmp: img.save(tmp, format="PNG")))
    write_outputs(writes)


def generate_abc(model_dir: str | os.PathLike | None = None, prompt: str = "X:1\n", max_bytes: int = 1024, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 0.95, seed: int | None = 0,
                 model=None, device: str = "cpu") -> str:
    """Generate one ABC tune (text, prompt included) with an ABC model (folder or ``model=``).

    The prompt is normalised to the form the model was trained on: a file header is moved into
    the tunes' headers (:func:`~multimodal_rwkv.music.abc.with_file_header`) and blank lines after
    the last tune are dropped (they would end it). The model continues the prompt's last tune;
    earlier tunes in the prompt are its context (as in training, separated by id 0) and are not
    repeated in the result, which is the last tune and its continuation. Bytes that are not text
    (control bytes other than tab, newlines and form feeds) are never generated."""
    from multimodal_rwkv.model.generation import check_sampling

    tok = AbcTokenizer()
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be ABC text (str), got {type(prompt).__name__}")
    max_bytes = _check_count("max_bytes", max_bytes)
    _check_seed(seed)
    check_sampling(temperature, top_k, top_p)
    if model is None and not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError("generate_abc: give model_dir (an ABC model folder) or model=, got model_dir "
                        f"{type(model_dir).__name__}")
    context, prompt = _last_tune(with_file_header(prompt, "<prompt>"))
    if model is None:
        model, tok2 = load_music_model(model_dir, device)
        if not isinstance(tok2, AbcTokenizer):
            raise MidiError(f"{model_dir}: a MIDI model; use generate_midi")
    ids = [0] + [i for tune in context for i in tok.encode(tune) + [0]] + tok.encode(prompt)
    new = sample_tokens(model, ids, max_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=seed, stop_ids=(0,), vocab_size=tok.vocab_size, banned_ids=[b + 1 for b in CONTROL_BYTES])
    return prompt + tok.decode([i for i in new if i != 0])


def _last_tune(text: str) -> tuple[list[str], str]:
    """``(earlier tunes, the last tune)`` of a prompt, as training has tunes (see
    :func:`~multimodal_rwkv.music.abc.split_tunes`): CRLF line ends as LF; the last tune runs from
    the last ``X:`` line (the ``%abc-`` version line before it included; the whole text when there
    is no ``X:``) to its first empty line, which ends it (ABC 2.1, 2.2: free text may follow);
    without one its last line stays open, to be continued."""
    from multimodal_rwkv.music.abc import split_tunes

    text = text.replace("\r\n", "\n")
    starts = [m.start() for m in re.finditer(r"^X:", text, re.MULTILINE)]
    a = starts[-1] if starts else 0
    version = re.search(r"(?:^|\n)(%abc-[^\n]*\n)\Z", text[:a])
    if version:
        a -= len(version.group(1))
    head, last = text[:a], text[a:]
    lines = last.split("\n")
    first = next((i for i, ln in enumerate(lines) if ln.strip()), 0)  # (a body may start with blank lines)
    ends = [i for i, ln in enumerate(lines[:-1]) if i > first and not ln.strip()]  # (the last item: the open line)
    if ends:
        last = "\n".join(lines[:ends[0]]).rstrip() + "\n"
    return (split_tunes(head, "<prompt>") if head.strip() else []), last
