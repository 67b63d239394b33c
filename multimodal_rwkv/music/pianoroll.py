"""Piano-roll pictures with Pillow: time (x) x pitch (y), one colour per instrument group,
the prompt part shaded and separated by a red line."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from multimodal_rwkv.errors import DataError
from multimodal_rwkv.music.midi_tokenizer import MidiTokenizer, Note

# distinct, print-safe colours (tab20-like); drums get black
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148),
]


def group_colour(group: int, drum_group: int | None = None) -> tuple[int, int, int]:
    if drum_group is not None and group == drum_group:
        return (30, 30, 30)
    return _PALETTE[group % len(_PALETTE)]


def check_png(what: str, path) -> None:
    """A piano roll is a PNG: refuse another suffix (the file would hold PNG bytes under a name
    that says otherwise)."""
    if Path(path).suffix.lower() != ".png":
        raise DataError(f"{path}: {what} is written as a PNG picture; give a file name ending in .png")


def render_pianoroll(notes: Sequence[Note], out_path: str | os.PathLike | None = None, *,
                     steps_per_beat: int = 12, prompt_end: int | None = None, prompt_notes: int = 0,
                     tokenizer: MidiTokenizer | None = None, px_per_step: float | None = None,
                     px_per_pitch: int = 5, max_width: int = 2400, beats_per_bar: int = 4, end_step: int = 0):
    """Draw ``notes`` (grid steps) and return the ``PIL.Image``; saved as PNG when ``out_path``.

    ``prompt_end``: step where the prompt ends and generation starts, the time its shifts add up to
    (the region before it is shaded and a red line marks the boundary; 0 or None: no prompt, unless
    ``prompt_notes`` says there is one, a single chord). ``prompt_notes``: how many of ``notes``
    (the first ones) are the prompt's: drawn paler, so a prompt note that starts at ``prompt_end``
    or lasts past it still reads as the prompt's. ``tokenizer`` gives group names for the legend. Width is
    ``total_steps * px_per_step`` pixels (auto so it fits ``max_width``), height
    ``pitch_span * px_per_pitch`` plus a legend strip (in more rows where one is too narrow for every
    group's name). ``end_step``: where the music ends when that
    is after the last note (a closing rest): the picture lasts as long as the file.
    """
    from PIL import Image, ImageDraw

    drum_group = tokenizer.drum_group if tokenizer is not None else None
    end = max([n.offset for n in notes] + [prompt_end or 0, end_step, steps_per_beat])
    lo = min((n.pitch for n in notes), default=60) - 2
    hi = max((n.pitch for n in notes), default=72) + 2
    if px_per_step is None:
        px_per_step = min(8.0, (max_width - 40) / end)  # a long piece gets thinner steps, never a wider picture
    left = 30
    # the legend: a swatch and a name per group, in as many rows as a narrow picture needs; the
    # picture is at least as wide as the widest name (a short piece with long group names)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    groups = sorted({n.group for n in notes})
    names = [tokenizer.group_name(g) if tokenizer is not None else f"group {g}" for g in groups]
    widths = [20 + int(measure.textlength(name)) + 6 for name in names]
    w = int(max([left + end * px_per_step + 10] + [left + wd for wd in widths]))
    legend, x, row = [], left, 0
    for g, name, width in zip(groups, names, widths):
        if x > left and x + width > w:
            x, row = left, row + 1
        legend.append((g, name, x, 4 + 14 * row))
        x += width
    legend_h = 18 + 14 * row
    h = int((hi - lo + 1) * px_per_pitch + legend_h + 4)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)

    def y_of(p):  # top edge of pitch p's row (high pitches at the top)
        return legend_h + (hi - p) * px_per_pitch

    def x_of(step):
        return left + step * px_per_step

    if prompt_end:  # (None or 0: no prompt, or one that is a single chord)
        d.rectangle([x_of(0), legend_h, x_of(prompt_end), h - 1], fill=(236, 236, 236))
    for p in range(lo, hi + 1):  # C rows a little darker, label every C
        if p % 12 == 0:
            d.line([left, y_of(p) + px_per_pitch - 1, w, y_of(p) + px_per_pitch - 1], fill=(215, 215, 215))
            d.text((2, y_of(p) - 4), f"C{p // 12 - 1}", fill=(90, 90, 90))
    beat = steps_per_beat
    every = 1 if beat * px_per_step >= 3 else beats_per_bar if beat * beats_per_bar * px_per_step >= 3 else 0
    for b in range(0, end + 1, beat * every) if every else ():  # grid lines only where they stay apart
        col = (200, 200, 200) if (b // beat) % beats_per_bar == 0 else (238, 238, 238)
        d.line([x_of(b), legend_h, x_of(b), h - 1], fill=col)
    for k, n in enumerate(notes):
        c = group_colour(n.group, drum_group)
        if k < prompt_notes:  # halfway to white
            c = tuple((v + 255) // 2 for v in c)
        x0, x1 = x_of(n.onset), max(x_of(n.onset) + 1, x_of(n.offset) - 1)
        y0 = y_of(n.pitch)
        d.rectangle([x0, y0, x1, y0 + px_per_pitch - 2], fill=c)
    if prompt_end or prompt_notes:  # a prompt (one chord: its line at 0)
        prompt_end = prompt_end or 0
        d.line([x_of(prompt_end), legend_h, x_of(prompt_end), h - 1], fill=(220, 0, 0), width=2)
        d.text((x_of(prompt_end) + 3, legend_h + 1), "generated", fill=(220, 0, 0))
        if prompt_end:
            d.text((left + 2, legend_h + 1), "prompt", fill=(120, 120, 120))
    for g, name, x, y in legend:
        d.rectangle([x, y, x + 10, y + 10], fill=group_colour(g, drum_group))
        d.text((x + 14, y - 1), name, fill=(0, 0, 0))
    if out_path is not None:
        img.save(Path(out_path), format="PNG")
    return img


def pianoroll_from_midi(src, out_path: str | os.PathLike | None = None, tokenizer: MidiTokenizer | None = None, **kw):
    """Piano roll of a MIDI file (path or ``mido.MidiFile``), via the tokenizer's note reader. An
    ``out_path`` that is the MIDI file itself is refused (the picture would replace the music)."""
    import mido

    from multimodal_rwkv.fileio import same_file

    if out_path is not None and isinstance(src, (str, os.PathLike)) and same_file(src, out_path):
        raise DataError(f"{out_path}: is the MIDI file the piano roll is drawn from; give another output")
    tok = tokenizer or MidiTokenizer()
    notes, _, _, _ = tok.extract_notes(src)
    if "end_step" not in kw:  # the file's own end (its longest track), a closing rest too
        try:
            mid = src if isinstance(src, mido.MidiFile) else mido.MidiFile(src)
            ticks = max((sum(m.time for m in tr) for tr in mid.tracks), default=0)
            kw["end_step"] = round(ticks / mid.ticks_per_beat * tok.config.steps_per_beat)
        except Exception:  # noqa: BLE001 - extract_notes read it; a file mido cannot reopen keeps the notes' end
            pass
    return render_pianoroll(notes, out_path, steps_per_beat=tok.config.steps_per_beat, tokenizer=tok, **kw)
