"""Byte-level tokenizer for ABC notation (the Eagle paper's music setup), and ABC -> MIDI.

Ids: ``0`` is the document separator (as in every tokenizer of this project: the training
engine packs tunes as ``0 tune 0 tune 0 ...``); byte ``b`` (0..255) is id ``b + 1``. So the
vocabulary has 257 ids and ``bits per byte`` is simply the loss in bits per non-separator token.
Text is encoded as UTF-8; decoding replaces invalid UTF-8 (never raises).
"""
from __future__ import annotations

import copy
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


# control bytes that do not occur in text (tab, newlines, form feeds do): a file holding one is not ABC
CONTROL_BYTES = frozenset(range(0, 9)) | frozenset(range(14, 32)) | {127}


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
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: cannot read ABC tokenizer config: {e}") from None
        if not isinstance(d, dict) or d.get("tokenizer") != "abc":
            raise ConfigError(f"{p}: not an ABC tokenizer config")
        return cls()


_TUNE_START = re.compile(r"^X:", re.MULTILINE)
_FIELD = re.compile(r"^([A-Za-z+]):")
_VERSION = re.compile(r"^%abc-(\d+(?:\.\d+)*)")
# fields the ABC 2.1 standard allows in a file header (its field table): K:, P:, Q:, T:, V:, W:,
# w:, s: and X: belong to a tune only
_FILE_HEADER_FIELDS = frozenset("ABCDFGHILMmNORrSUZ")


def file_header(text: str, name: str = "<abc>") -> list[str]:
    """The lines of an ABC file's header to copy into each of its tunes (ABC 2.1, 2.2.2: "the file
    header is used to set default values for the tunes in the file ... applications which extract
    separate tunes from a file must insert the fields of the original file header into the header
    of the extracted tune").

    The file header is the first block of lines (ended by an empty line or the first ``X:``),
    after the ``%abc-2.1`` version line, when it holds only fields, ``%%`` directives and comments
    (otherwise it is free text, which applies to nothing). Returned: its fields and directives
    (``+:`` continuations with their field); comments and the version line are left out (the
    version line goes before each tune instead, see :func:`file_version`). Fields the standard allows only in a tune (``K:``,
    ``Q:``, ``T:``, ...) are not carried; that is logged as a warning naming ``name``.
    """
    lines = [ln.rstrip() for ln in text.lstrip("\ufeff").split("\n")]
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i < len(lines) and _VERSION.match(lines[i]):
        i += 1
        while i < len(lines) and not lines[i].strip():  # a header may follow after an empty line
            i += 1
    out: list[str] = []
    not_applied: list[str] = []
    carry = False
    for ln in lines[i:]:
        if not ln.strip() or ln.startswith("X:"):
            break
        if ln.startswith("%%"):
            out.append(ln)
            carry = False
            continue
        if ln.lstrip().startswith("%"):
            continue
        m = _FIELD.match(ln)
        if not m:
            return []  # music or text: free text, not a file header
        letter = m.group(1)
        if letter == "+":
            if carry:
                out.append(ln)
        elif letter in _FILE_HEADER_FIELDS:
            out.append(ln)
            carry = True
        else:
            not_applied.append(f"{letter}:")
            carry = False
    if not_applied:
        log.warning("%s: the file header holds %s, which ABC 2.1 allows only in a tune header; not applied to the tunes",
                    name, ", ".join(dict.fromkeys(not_applied)))
    return out


def file_version(text: str) -> str | None:
    """The ``%abc-2.1`` version line an ABC file starts with, or None. Tunes taken out of the file
    keep it as their first line. (music21 reads a file without one as ABC 1.3, where an accidental
    does not carry on to the next notes of the bar; :func:`abc_to_midi` reads such a tune as ABC 2.1,
    as abc2midi does.)"""
    for ln in text.lstrip("\ufeff").split("\n"):
        if ln.strip():
            return ln.rstrip() if _VERSION.match(ln) else None
    return None


def _insert_header(tune: str, header: Sequence[str]) -> str:
    """``tune`` (from its ``X:`` line) with ``header`` lines inserted after ``X:`` and the ``T:``
    lines right after it (ABC 2.1: ``T:`` follows ``X:``), so the tune's own fields, later in its
    header, override them; nothing else changes."""
    if not header:
        return tune
    lines = tune.split("\n")
    j = 1
    while j < len(lines) and lines[j].startswith(("T:", "+:")):
        j += 1
    if j == len(lines):  # the tune ends right there, without a newline (a prompt)
        if j > 1:  # in a T: line: the header goes before it, the prompt's last line stays open
            return "\n".join(lines[:-1] + list(header) + lines[-1:])
        return tune + "\n" + "\n".join(header) + "\n"
    return "\n".join(lines[:j] + list(header) + lines[j:])


def split_tunes(text: str, name: str = "<abc>") -> list[str]:
    """Split a multi-tune ABC file into tunes (each from its ``X:`` line), trailing blank lines
    removed (a byte-order mark too). The fields of the file header (see :func:`file_header`) are
    inserted into each tune's header, after its ``X:``/``T:`` lines, as the ABC standard asks of
    programs that extract tunes, so a tune means on its own what it meant in the file (its own
    fields still override them); the file's ``%abc-`` version line, if any, goes before each
    tune's ``X:`` (see :func:`file_version`). A tune ends at its first empty line (ABC 2.1 section
    2.2); text between tunes and before the first ``X:`` is free text and is dropped.

    The ABC corpora of :mod:`multimodal_rwkv.music.corpora` are made of these tunes, so a
    byte-level model trains on self-contained tunes, file header fields included (and generation
    prompts are normalised the same way, see :func:`with_file_header`)."""
    text = text.lstrip("\ufeff")
    header = file_header(text, name)
    version = file_version(text)
    first = version + "\n" if version else ""
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    tunes = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        lines = [ln.rstrip() for ln in text[a:b].split("\n")]
        if "" in lines:  # the empty line that ends the tune; what follows it is free text
            free = [ln for ln in lines[lines.index(""):] if ln]
            lines = lines[:lines.index("")]
            if any("|" in ln and not ln.startswith("%") for ln in free):
                log.info("%s: tune %s ends at its empty line (ABC 2.1); %d line(s) of free text after it that "
                         "look like music are not part of it", name, lines[0], len(free))
        t = "\n".join(lines)
        if t:
            tunes.append(first + _insert_header(t + "\n", header))
    return tunes


def with_file_header(text: str, name: str = "<abc>") -> str:
    """``text`` with its file header (see :func:`file_header`) moved into the header of each tune,
    everything from the first ``X:`` otherwise unchanged (a tune start used as a prompt keeps its
    last line open); the file's ``%abc-`` version line stays first, before each tune (see
    :func:`file_version`). Text without an ``X:`` line, or without a file header, is returned as is."""
    text = text.lstrip("\ufeff")
    starts = [m.start() for m in _TUNE_START.finditer(text)]
    header = file_header(text, name) if starts else []
    if not header:
        return text
    version = file_version(text)
    first = version + "\n" if version else ""
    return "".join(first + _insert_header(text[a:b], header) for a, b in zip(starts, starts[1:] + [len(text)]))


def with_default_unit_length(tune: str) -> str:
    """Insert the ABC standard's default ``L:`` before ``K:`` when the header has none (music21
    refuses notes without it): 1/16 if the meter ``M:`` is below 3/4, else 1/8 (also for no
    meter or ``M:none``); the last ``M:`` of the header counts (a tune's own overrides one
    copied from the file header). A comment after the meter (``M:2/4 % two-four``) is ignored and
    a complex meter adds up its numerator (``M:(2+3)/8`` is 5/8)."""
    lines = tune.split("\n")
    k_line = next((i for i, ln in enumerate(lines) if ln.startswith("K:")), None)
    if k_line is None or any(ln.startswith("L:") for ln in lines[:k_line]):
        return tune
    unit = "1/8"
    meters = [ln for ln in lines[:k_line] if ln.startswith("M:")]
    if meters:
        m = meters[-1][2:].split("%", 1)[0].strip()
        m = {"C": "4/4", "C|": "2/2"}.get(m, m)
        frac = re.fullmatch(r"\(?\s*(\d+(?:\s*\+\s*\d+)*)\s*\)?\s*/\s*(\d+)", m)
        if frac and int(frac[2]) and sum(map(int, frac[1].split("+"))) / int(frac[2]) < 0.75:
            unit = "1/16"
    return "\n".join(lines[:k_line] + [f"L:{unit}"] + lines[k_line:])


_HEADER_LINE = re.compile(r"[A-Za-z+]:|%")  # a field line (X:, T:, M:, ...) or a comment or directive


def _require_music21():
    try:
        import music21  # noqa: F401
    except ImportError:
        raise DataError("music21 is not installed: pip install 'multimodal-rwkv[music]'") from None
    return music21


def abc_to_midi(abc_text: str, out_path: str | os.PathLike | None = None, name: str = "<abc>"):
    """Convert one ABC tune to MIDI with music21. Returns a ``mido.MidiFile`` (and writes it to
    ``out_path`` if given). A file header before the tune is applied to it; the tune ends at its
    first empty line, and only the first tune of the text is converted (see :func:`split_tunes`).
    A tune without a ``%abc-`` version line is read as ABC 2.1 (an accidental carries to the end
    of its bar, as abc2midi reads any tune); text without an ``X:`` line is taken as a tune body
    when it holds a ``K:`` field or a bar line. Unparsable ABC raises :class:`MidiError` naming
    ``name``. Known limits: music21's ABC reader does not apply inline ``[K:]``, ``[L:]``, ``[Q:]``
    or ``[V:]`` fields, a clef in ``K:`` (``K:C clef=bass`` sounds two octaves low), the ``K:``
    modifiers ``octave=`` and ``transpose=``, ties on chords, a tie next to a broken rhythm
    (``c>-d``), or ``Q:`` lines in the tune body (the header's tempo holds throughout), and expands
    a single repeated section only sometimes, or the deprecated ``!`` line breaks (``I:linebreak !``).
    Grace notes and chord symbols (``"G"``) are left out.
    What music21 would drop or misread otherwise is rewritten first (see :func:`_readable_by_music21`):
    ``K:`` modifiers (``K:D Phr ^f``, ``exp``), accidentals carried into chords, the Locrian mode,
    ``middle=``, ``x`` and ``Z`` rests, a tie after a rest, ``H``."""
    import tempfile

    import mido

    _require_music21()
    from music21 import converter

    text = abc_text.lstrip("\ufeff")
    if not _TUNE_START.search(text):  # a tune body alone, if it looks like music (a K: field or a bar line)
        lines = re.sub(r"\A(?:[ \t\r]*\n)+", "", text).split("\n")  # from its first line that is not blank
        if not any(ln.startswith("K:") or ("|" in ln and not _HEADER_LINE.match(ln)) for ln in lines):
            raise MidiError(f"{name}: the ABC holds no tune (no X: line, and no K: field or bar line of music)")
        if not any(ln.startswith("K:") for ln in lines):  # K:C ends the header, before the first music line
            first = next(i for i, ln in enumerate(lines) if not _HEADER_LINE.match(ln))
            lines.insert(first, "K:C")
        text = "X:1\n" + "\n".join(lines)
    tunes = split_tunes(text, name)  # the first tune (to its empty line), the file header applied
    if not tunes:
        raise MidiError(f"{name}: the ABC holds no tune")
    text = _readable_by_music21(_unit_tempo(with_default_unit_length(tunes[0])))
    if not _VERSION.match(text):  # ABC 2.1, as abc2midi reads any tune: an accidental carries to the bar's end
        text = "%abc-2.1\n" + text
    text = "\n".join(ln if _HEADER_LINE.match(ln) else _DOUBLE_REPEAT.sub(r"\1 ::", ln)
                     for ln in text.split("\n"))  # music21 reads a note letter before :: as a field (F: ...)
    try:
        score = converter.parse(text, format="abc")
    except Exception as e:  # noqa: BLE001 - music21 raises many types on bad ABC
        raise MidiError(f"{name}: cannot parse ABC ({type(e).__name__}: {str(e)[:200]})") from None
    if not score.flatten().notes:
        raise MidiError(f"{name}: the ABC holds no notes")
    _untie_other_pitches(score, name)
    _drop_grace_notes(score)
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


_DOUBLE_REPEAT = re.compile(r"([A-Ga-gz,'0-9/>])::")  # in a line of music
_UNIT_TEMPO = re.compile(
    r'^Q:(?P<pre>[ \t]*(?:"[^"\n]*"[ \t]*)?)'
    r"(?:(?P<c>[CL])(?P<n>\d*)(?:/(?P<d>\d+))?[ \t]*=[ \t]*(?P<bpm>\d+(?:\.\d+)?)|(?P<bare>\d+(?:\.\d+)?))"
    r'(?P<post>[ \t]*(?:"[^"\n]*")?[ \t]*(?:%.*)?)$', re.MULTILINE)
_WORD_TEMPO = re.compile(r'^Q:[ \t]*([A-Za-z][^"%=\n]*?)[ \t]*(%.*)?$', re.MULTILINE)  # Q:Allegro (quotes lost)
_UNIT_LENGTH = re.compile(r"^L:[ \t]*(\d+)[ \t]*/[ \t]*(\d+)", re.MULTILINE)


def _unit_tempo(tune: str) -> str:
    """The older tempo forms, in beats of the unit note length ``L:`` (ABC 1.6: "if the default
    note length is an eighth note then Q:120 or Q:C=120 is 120 eighth notes per minute", and
    ``Q:C3=40`` 40 dotted quarters; ``L`` for ``C`` in ABC 1.7.6), written as ``Q:1/8=120``:
    music21 reads ``C`` as a quarter of a whole note and a bare number as quarters, whatever
    ``L:`` is (``Q:C=120`` at L:1/8 was 480 BPM). Text in quotes and a comment stay; a tempo word
    without quotes (``Q:Allegro``, which music21 cannot read) gets them."""
    k_line = re.search(r"^K:", tune, re.MULTILINE)
    units = list(_UNIT_LENGTH.finditer(tune, 0, k_line.start() if k_line else len(tune)))
    unit = units[-1] if units else None  # the header's last L: (a tune's own overrides the file header's)
    if unit is None or int(unit.group(2)) == 0:
        return tune
    from fractions import Fraction

    length = Fraction(int(unit.group(1)), int(unit.group(2)))

    def beat(m):
        bpm = m.group("bpm") or m.group("bare")
        f = length * int(m.group("n") or 1) / int(m.group("d") or 1)
        if f <= 0:
            return m.group(0)
        return f"Q:{m.group('pre')}{f.numerator}/{f.denominator}={bpm}{m.group('post')}"

    return _WORD_TEMPO.sub(r'Q:"\1"\2', _UNIT_TEMPO.sub(beat, tune))


# ---- what music21's ABC reader would drop or misread, written in forms it reads ---------------
_KEY_MODIFIER = re.compile(r"(\^\^|\^|__|_|=)([A-Ga-g])")
_KEY_TONIC = re.compile(r"(?P<tonic>[A-Ga-g][#b]?)[ \t]*(?P<mode>[A-Za-z]*)")
_MAJOR_KEYS = ["Cb", "Gb", "Db", "Ab", "Eb", "Bb", "F", "C", "G", "D", "A", "E", "B", "F#", "C#"]  # -7..7 sharps
_MUSIC_TOKEN = re.compile(
    r'(?P<keep>"[^"\n]*"?|![^!\n]*!|\+(?:[A-Za-z]{4,}[()]?|[0-5]|[<>][()]?|[pmfrsz]{1,4}|D\.[SC]\.)\+|%.*)'
    r"|(?P<field>\[(?P<fkey>[A-Za-z]):(?P<fval>[^\]\n]*)\])"
    r"|(?P<note>(?P<acc>\^\^|\^|__|_|=)?(?P<letter>[A-Ga-g])(?P<octave>[,']*))"
    r"|(?P<chord>\[(?![|\d]))|(?P<chord_end>\])"
    r"|(?P<tie>-)"
    r"|(?P<bar>\||::)"
    r"|(?P<multirest>Z(?P<bars>\d*))"
    r"|(?P<rest>[zx])(?P<rest_length>[\d/]*)(?P<rest_tie>-?)"
    r"|(?P<fermata>H)")
_PROPAGATION = re.compile(r"^%%propagate-accidentals[ \t]+(not|octave|pitch)\b", re.MULTILINE)


def _rewrite_key_line(line: str) -> tuple[str, dict[str, str]]:
    """A ``K:`` line as music21 reads it, and the accidentals its modifiers add (``K:D Phr ^f`` ->
    ``K:D Phr`` and ``{"F": "^"}``): Locrian as the major key of the same signature (music21 took
    ``K:Bloc`` as B major), ``exp`` as C plus the listed accidentals, and the display-only
    ``middle=`` left out (music21 read ``K:D middle=d`` as D minor: "m..." is its minor)."""
    body, _, comment = line[2:].partition("%")
    words = body.split()
    mods = {m[2].upper(): m[1] for w in words if (m := _KEY_MODIFIER.fullmatch(w))}
    words = [w for w in words if not _KEY_MODIFIER.fullmatch(w) and not re.match(r"(?i)(middle|m)=", w)]
    explicit = any(w.lower() == "exp" for w in words)
    words = [w for w in words if w.lower() != "exp"]
    rest = " ".join(words)
    m = _KEY_TONIC.match(rest)
    if explicit:  # only the listed accidentals: C's signature (a tonic or mode given stays unused)
        n = m.end() if m and not re.match(r"(?i)clef|octave|transpose|stafflines", m["mode"]) else 0
        rest = "C " + rest[n:].strip() if n else "C " + rest
    elif m and m["mode"][:3].lower() == "loc":
        from music21 import key

        tonic = m["tonic"][0].upper() + m["tonic"][1:].replace("b", "-")
        sharps = key.pitchToSharps(tonic, "major") - 5
        if -7 <= sharps <= 7:
            rest = _MAJOR_KEYS[sharps + 7] + rest[m.end():]
    if not mods and not explicit and rest == " ".join(body.split()):
        return line, {}
    return "K:" + rest.strip() + (" %" + comment if comment else ""), mods


def _bar_units(meter: str, unit: str):
    """Units of length ``L:`` in one bar of meter ``M:`` (``None`` for ``M:none`` or one unread)."""
    from fractions import Fraction

    meter = {"C": "4/4", "C|": "2/2"}.get(meter.split("%", 1)[0].strip(), meter.split("%", 1)[0].strip())
    fm = re.fullmatch(r"\(?\s*(\d+(?:\s*\+\s*\d+)*)\s*\)?\s*/\s*(\d+)", meter)
    fu = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*(?:%.*)?", unit)
    if not fm or not fu or not int(fm[2]) or not int(fu[1]) or not int(fu[2]):
        return None
    units = Fraction(sum(map(int, fm[1].split("+"))), int(fm[2])) / Fraction(int(fu[1]), int(fu[2]))
    return f"{units.numerator}/{units.denominator}" if units.denominator > 1 else str(units.numerator)


def _accidental_propagation(tune: str) -> str:
    """How far an accidental carries in ``tune``, as music21 reads it: ``"pitch"`` (ABC 2.x: to the
    end of the bar, in every octave), ``"octave"`` (that octave only) or ``"not"`` (ABC 1.x: the
    note alone); a ``%%propagate-accidentals`` directive decides over the version line."""
    directive = _PROPAGATION.search(tune)
    if directive:
        return directive[1]
    v = _VERSION.match(tune)
    return "not" if v and int(v[1].split(".")[0]) < 2 else "pitch"


def _readable_by_music21(tune: str) -> str:
    """Rewrite what music21's ABC reader drops or misreads into forms it reads, the music unchanged:

    - the ``K:`` modifiers (``K:D Phr ^f``, ``K:D exp _b``) as the notes' own accidentals, where no
      accidental written earlier carries over them (bar by bar in ABC 2.x, per octave with
      ``%%propagate-accidentals octave``, never in ABC 1.x); a note continuing a tie is left as
      it is (it sounds as the note tied to it);
    - an accidental that carries into or out of a chord (``[^FA] F``, ``^F [FA]``), written out:
      music21 carries accidentals between single notes only;
    - ``K:`` in the Locrian mode, and ``middle=`` in ``K:`` (see :func:`_rewrite_key_line`);
    - the invisible rest ``x`` as ``z`` (music21 dropped it and its time), and a tie after a rest
      left out (music21 then dropped the next note; abc2midi ignores such a tie);
    - the fermata ``H`` as ``!fermata!`` (music21 dropped the note);
    - a multi-bar rest ``Z``/``Z4`` as that many bars of ``z`` (of the ``M:`` in force, inline
      ``[M:]`` too, in the unit length music21 applies: ``L:`` lines, not inline ``[L:]``; left as
      is for ``M:none``)."""
    mode = _accidental_propagation(tune)
    in_body, mods = False, {}
    carried: dict = {}  # the bar's accidentals: key -> (accidental, written in a chord)
    meter, unit = "none", "1/8"
    st = {"chord": False, "tied": False}
    out = []

    def carry_key(m):  # the letter (pitch mode), or the letter and its sounding octave (c, is C)
        if mode == "pitch":
            return m["letter"].upper()
        return m["letter"].upper(), m["letter"].islower() + m["octave"].count("'") - m["octave"].count(",")

    def sub(m):
        if m["note"]:
            tied, st["tied"] = st["tied"], False
            k = carry_key(m)
            if m["acc"]:
                if mode != "not":
                    carried[k] = (m["acc"], st["chord"])
                return m[0]
            if tied:  # a tie's second note: as written (it sounds as the note tied to it)
                return m[0]
            if k in carried and mode != "not":
                acc, in_chord = carried[k]
                # music21 carries the rest itself (octave mode: by spelling, so c, after ^C is written out)
                return acc + m[0] if in_chord or st["chord"] or mode == "octave" else m[0]
            if m["letter"].upper() in mods:
                return mods[m["letter"].upper()] + m[0]
        elif m["chord"]:
            st["chord"] = True
        elif m["chord_end"]:
            st["chord"] = False
        elif m["tie"]:
            st["tied"] = True
        elif m["bar"]:
            carried.clear()
        elif m["field"] and m["fkey"] == "M":  # (music21 applies an inline [M:], not an inline [L:])
            nonlocal meter
            meter = m["fval"]
        elif m["multirest"]:
            bar = _bar_units(meter, unit)
            if bar is not None:
                return " | ".join([f"z{bar}"] * max(1, int(m["bars"] or 1)))
        elif m["rest"]:
            return "z" + m["rest_length"]
        elif m["fermata"]:
            return "!fermata!"
        return m[0]

    for ln in tune.split("\n"):
        if ln.startswith("K:"):
            ln, mods = _rewrite_key_line(ln)
            in_body = True
        elif ln.startswith("M:"):
            meter = ln[2:]
        elif ln.startswith("L:"):
            unit = ln[2:]
        if not in_body or _HEADER_LINE.match(ln):
            out.append(ln)
            continue
        out.append(_MUSIC_TOKEN.sub(sub, ln))
    return "\n".join(out)

def _drop_grace_notes(score) -> None:
    """Leave grace notes (``{g}``) and chord symbols (``"G"``, ``"Am"``; O'Neill's ``"f"``) out:
    music21 gives them no length, so its MIDI writer's note-on comes after the note-off and never
    ends, and the direct writer would sound a grace note with its main note."""
    from music21 import harmony

    for n in list(score.recurse().notes):
        if (n.duration.isGrace or isinstance(n, harmony.ChordSymbol)) and n.activeSite is not None:
            n.activeSite.remove(n)


def _untie_other_pitches(score, name: str) -> None:
    """Drop the ties music21 keeps between notes of different pitches (``G3-A``): a tie joins two
    notes of the same pitch (ABC 2.1 section 4.11), so abc2midi ignores such a tie; merged, the second
    note would be lost. A second note without an accidental of its own is compared by letter and
    octave: it keeps the tied note's accidental across a bar line (``=F2-|F2``), where music21 gives
    it the key's. One with an explicit accidental (``^F2-=F2``) is compared by pitch. Grace notes
    between the two are skipped."""
    from music21 import tie

    def explicit(p) -> bool:
        return p.accidental is not None and bool(p.accidental.displayStatus)

    def same(a, b) -> bool:
        midi = sorted(p.midi for p in a.pitches) == sorted(p.midi for p in b.pitches)
        if midi or any(explicit(p) for p in b.pitches):  # one pitch (E#-F too), or the second's own
            return midi
        return sorted((p.step, p.octave) for p in a.pitches) == sorted((p.step, p.octave) for p in b.pitches)

    parts = list(getattr(score, "parts", None) or [score])
    dropped = 0
    for part in parts:
        notes = [n for n in part.recurse().notes if not n.duration.isGrace]
        for i, a in enumerate(notes[:-1]):
            if a.tie is None or a.tie.type not in ("start", "continue"):
                continue
            # the tie's other end: the next note when a tie ends there (of another pitch too: B2-A),
            # else the continuation of a note or chord music21 split past the end of an overfull
            # bar, which it lists after the next bar's own notes (a later tie's end of the same pitch
            # taken for it held B2-A|c2-B's first B over the A, which was lost)
            nxt = notes[i + 1]
            b = nxt if nxt.tie is not None and nxt.tie.type in ("stop", "continue") else next(
                (c for c in notes[i + 2:i + 65] if c.tie is not None and c.tie.type in ("stop", "continue")
                 and same(a, c)), nxt)
            if same(a, b):
                for p in b.pitches:  # the tied note's own pitch (=F2-|F2 stays F natural), as abc2midi
                    q = next((q for q in a.pitches if (q.step, q.octave) == (p.step, p.octave)), None)
                    if q is not None and q.midi != p.midi and not explicit(p):
                        p.accidental = copy.deepcopy(q.accidental)
                continue
            a.tie = None if a.tie.type == "start" else tie.Tie("stop")
            if b.tie is not None:
                b.tie = None if b.tie.type == "stop" else tie.Tie("start")
            dropped += 1
    if dropped:
        log.info("%s: %d tie(s) between notes of different pitches ignored", name, dropped)


_TICKS_PER_BEAT = 960  # divisible by 2, 3, 4, 5, 6, 7, 8, 16, 32: tuplets and short notes exact


def _tied_notes(flat) -> list[tuple[int, float, float]]:
    """``(midi pitch, start, length)`` in quarter notes of every note of ``flat``, chords' notes
    each on its own, a note tied to the next of its pitch counted once, its length the sum of the
    tied parts. music21 splits a note or chord that runs past a bar line into tied parts; in a bar
    longer than its metre the second part starts later than the first ends, so the parts are
    joined by their ties, not by where they lie (the sum is the length written in the ABC)."""
    parts = []  # (start, 0 for a tie's continuation else 1, pitch, length, tie kind)
    for n in flat.notes:
        start, length = float(n.offset), float(n.duration.quarterLength)
        members = list(getattr(n, "notes", ())) or [n]  # a chord's notes carry its ties
        for k, p in enumerate(getattr(n, "pitches", ())):
            if 0 <= p.midi <= 127:
                tie = getattr(members[k] if k < len(members) else n, "tie", None) or n.tie
                kind = tie.type if tie is not None else None
                parts.append((start, 0 if kind in ("stop", "continue") else 1, int(p.midi), length, kind))
    # at one time, continuations first: a note struck where its tied predecessor ends is a new one
    parts.sort(key=lambda e: (e[0], e[1]))
    done, open_ = [], {}  # open_: pitch -> [start, length] of a note whose tie goes on
    for start, _, pitch, length, kind in parts:
        held = open_.pop(pitch, None)
        if held is not None and kind in ("stop", "continue"):
            held[1] += length
        else:
            if held is not None:  # a tie that led nowhere: the note as it was
                done.append((pitch, *held))
            held = [start, length]
        if kind in ("start", "continue"):
            open_[pitch] = held
        else:
            done.append((pitch, *held))
    done.extend((pitch, *held) for pitch, held in open_.items())
    return done


def _notes_to_midi(score, name: str):
    """The notes music21 parsed (offsets/durations in quarter notes) -> a MIDI file written here,
    without music21's measure machinery (which refuses bars of the wrong length): repeats
    expanded where music21 can, the tempo of each ``Q:`` (120 BPM without one), times exact to
    1/960 of a beat."""
    import mido

    try:
        score = score.expandRepeats()
    except Exception:  # noqa: BLE001 - unmatched repeat signs: the notes as written
        pass
    flat = score.flatten()
    tpb = _TICKS_PER_BEAT
    events = []  # (tick, order, message): at one tick, tempo first, then note-offs, then note-ons
    for mm in flat.getElementsByClass("MetronomeMark"):
        bpm = mm.getQuarterBPM()
        if bpm and bpm > 0:
            events.append((round(float(mm.offset) * tpb), 0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm))))
    notes = _tied_notes(flat)
    for pitch, start, length in notes:
        on = round(start * tpb)
        off = on + max(1, round(length * tpb))
        events.append((on, 2, mido.Message("note_on", note=pitch, velocity=90)))
        events.append((off, 1, mido.Message("note_off", note=pitch, velocity=0)))
    n_notes = len(notes)
    if not n_notes:
        raise MidiError(f"{name}: the ABC holds no notes")
    mid = mido.MidiFile(ticks_per_beat=tpb)
    track = mido.MidiTrack()
    mid.tracks.append(track)
    now = 0
    for tick, _, msg in sorted(events, key=lambda e: (e[0], e[1])):
        track.append(msg.copy(time=tick - now))
        now = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return mid
