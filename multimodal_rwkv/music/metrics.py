"""Music metrics: tokenizer-independent losses and statistics of pieces.

- ``bits_per_unit``: convert a loss in nats/token to bits per note (MIDI) or bits per byte (ABC),
  so tokenizers compare: ``nats/token * tokens / units / ln 2``.
- ``pitch_class_entropy`` (bits, 0..log2 12 = 3.585), ``note_density`` (notes per beat),
  ``polyphony`` (mean number of sounding pitches over the grid steps where at least one sounds,
  drums excluded, as in muspy: a pitch held by two voices counts once) of a list of :class:`~multimodal_rwkv.music.midi_tokenizer.Note`.
- ``windowed_nll``: total cross-entropy (nats) of a token stream under a causal LM, evaluated
  in independent windows of ``ctx_len`` (the same for every architecture, like training).
"""
from __future__ import annotations

import math
from typing import Sequence

from multimodal_rwkv.music.midi_tokenizer import Note


def bits_per_unit(nats_per_token: float, n_tokens: int, n_units: int) -> float:
    """Loss in nats/token -> bits per unit (note or byte). ``n_tokens`` predicted tokens,
    ``n_units`` notes/bytes among them."""
    if n_units <= 0:
        return float("nan")
    return nats_per_token * n_tokens / n_units / math.log(2)


def pitch_class_entropy(notes: Sequence[Note], drum_group: int | None = None) -> float:
    """Entropy in bits of the 12-bin pitch-class histogram (drums excluded); nan without notes."""
    hist = [0] * 12
    for n in notes:
        if n.group != drum_group:
            hist[n.pitch % 12] += 1
    tot = sum(hist)
    if tot == 0:
        return float("nan")
    return -sum(c / tot * math.log2(c / tot) for c in hist if c)


def note_density(notes: Sequence[Note], steps_per_beat: int) -> float:
    """Notes per beat over the span from the first onset to the last offset; nan without notes."""
    if not notes:
        return float("nan")
    span = max(n.offset for n in notes) - min(n.onset for n in notes)
    return len(notes) / max(span / steps_per_beat, 1e-9)


def polyphony(notes: Sequence[Note], drum_group: int | None = None) -> float:
    """Mean number of distinct pitches sounding per grid step, over the steps where at least one
    sounds (muspy's ``polyphony``: a binary piano roll, so a unison of two voices counts once);
    notes of ``drum_group`` are left out. nan if no pitched note has a length."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for n in notes:
        if n.group != drum_group and n.offset > n.onset:
            spans.setdefault(n.pitch, []).append((n.onset, n.offset))
    delta: dict[int, int] = {}
    for pitch_spans in spans.values():  # each pitch: the union of its notes' spans
        pitch_spans.sort()
        start, end = pitch_spans[0]
        for a, b in pitch_spans[1:] + [(None, None)]:
            if a is not None and a <= end:
                end = max(end, b)
                continue
            delta[start] = delta.get(start, 0) + 1
            delta[end] = delta.get(end, 0) - 1
            if a is not None:
                start, end = a, b
    active = busy = total = 0
    steps = sorted(delta)
    for a, b in zip(steps, steps[1:]):
        active += delta[a]
        if active > 0:
            busy += b - a
            total += active * (b - a)
    return total / busy if busy else float("nan")


def piece_stats(notes: Sequence[Note], steps_per_beat: int, drum_group: int | None = None) -> dict:
    """``{'notes', 'pitch_class_entropy', 'note_density', 'polyphony'}`` of one piece."""
    return {
        "notes": len(notes),
        "pitch_class_entropy": pitch_class_entropy(notes, drum_group),
        "note_density": note_density(notes, steps_per_beat),
        "polyphony": polyphony(notes, drum_group),
    }


def mean_stats(rows: Sequence[dict]) -> dict:
    """Mean of each key over pieces, ignoring nan."""
    out = {}
    for k in (rows[0].keys() if rows else ()):
        vals = [r[k] for r in rows if not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def windowed_nll(model, ids, ctx_len: int, batch_size: int = 8, device=None) -> tuple[float, int]:
    """Total next-token cross-entropy (nats) of a 1-D id stream and the number of predicted tokens.

    The stream is cut into consecutive windows of ``ctx_len + 1`` ids overlapping by one (each
    window predicts its last ``ctx_len`` ids from the ones before, no state carried between
    windows), so every token after the first is predicted exactly once. ``model(input_ids)``
    must return an object with ``.logits`` ``[B, T, V]``.
    """
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if device is None:
        device = next(model.parameters()).device
    total = 0.0
    count = 0
    starts = list(range(0, max(len(ids) - 1, 0), ctx_len))
    with torch.no_grad():
        for b in range(0, len(starts), batch_size):
            chunk = [ids[s: s + ctx_len + 1] for s in starts[b: b + batch_size]]
            chunk = [c for c in chunk if len(c) > 1]
            if not chunk:
                continue
            L = max(len(c) for c in chunk)
            inp = torch.zeros(len(chunk), L - 1, dtype=torch.long)
            tgt = torch.full((len(chunk), L - 1), -100, dtype=torch.long)
            for j, c in enumerate(chunk):
                inp[j, : len(c) - 1] = c[:-1]
                tgt[j, : len(c) - 1] = c[1:]
            out = model(input_ids=inp.to(device))
            logits = (out.logits if hasattr(out, "logits") else out[0]).float()  # config.return_dict False: a tuple
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((tgt != -100).sum())
    return total, count
