"""Offline music corpora -> tokenised ``.npy`` shards in the training engine's "tokens" format.

Sources: music21's bundled corpus (``bach-chorales`` converted to MIDI, ``oneill-abc`` and
``essen-abc`` tunes as ABC text; music21 is the optional extra ``music``) or the user's own
MIDI folder (``midi_dir``).

Output layout (``out``)::

    train/shard_00000.npy ...   1-D uint16 (int32 for vocabularies >= 65536) token ids:
    valid/shard_00000.npy       0 doc 0 doc 0 ... (0 = document separator)
    test/shard_00000.npy
    midi_tokenizer.json | abc_tokenizer.json
    meta.json                   counts per split (pieces, tokens, notes or bytes), settings, and each
                                kept file (its path under midi_dir, its split, a content hash)
    failed.txt                  files that could not be read: one line each, "name<TAB>reason"
                                (a backslash, tab, newline or other control character in either
                                written as a Python escape: \\, \t, \n, \x1b)
    midi/                       (bach-chorales only) the converted MIDI files, reused on reruns

``out`` is a new or empty folder or an earlier dataset (replaced); the dataset is built in a
temporary folder and moved in when complete, so a prepare that fails writes nothing.

The split is a pure function of the piece's content: ``sha256(content) mod 1000`` below
``test_permille`` goes to test, the next ``valid_permille`` to valid, the rest to train, so it
does not depend on file order, ``limit`` or the machine. Identical contents are kept once, and
so are MIDI files whose tokens are identical (the same music, files differing in a title or
another event the tokenizer drops): the first in path order, in its split. MIDI pieces that are
transpositions of one another go to one split, the first one's (train's transposed copies would
otherwise hold a held-out piece's exact tokens); a transposed copy equal to a piece already kept
(drum-only pieces, another file's transposition) is not added again.
Transposition augmentation (MIDI only, train split only) adds copies shifted by
``-transpose..+transpose`` semitones (drums untouched; copies that leave the pitch range skipped).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from multimodal_rwkv.errors import DataError, MidiError
from multimodal_rwkv.fileio import (listed_files, load_token_npy, naming_target, naming_write_errors, remove_tree,
                                    same_file, save_npy)

log = logging.getLogger(__name__)

CORPORA = ("bach-chorales", "oneill-abc", "essen-abc")
FAILED_FILE = "failed.txt"
_ABC_DIRS = {"oneill-abc": "oneills1850", "essen-abc": "essenFolksong"}
ABC_CORPORA = tuple(_ABC_DIRS)
SPLITS = ("train", "valid", "test")
# what prepare writes into OUT: a folder holding one of these files is a dataset it may replace
_TOKENIZER_FILES = ("midi_tokenizer.json", "abc_tokenizer.json")
_DATASET_FILES = ("meta.json", FAILED_FILE) + _TOKENIZER_FILES


def _music21():
    try:
        import music21
    except ImportError:
        raise DataError("music21 is not installed (needed for the bundled corpora): pip install 'multimodal-rwkv[music]'") from None
    return music21


def split_of(content: bytes, valid_permille: int = 100, test_permille: int = 100) -> str:
    """Deterministic split of one piece from its content hash: 'train' | 'valid' | 'test'."""
    h = int.from_bytes(hashlib.sha256(content).digest()[:8], "big") % 1000
    if h < test_permille:
        return "test"
    if h < test_permille + valid_permille:
        return "valid"
    return "train"


def _convert_chorale(args) -> tuple[str, str | None, str | None]:
    """Worker: music21 chorale -> MIDI file. Returns (name, midi_path | None, error | None)."""
    name, out_path = args
    try:
        from music21 import corpus

        if not os.path.exists(out_path):
            tmp = out_path + ".tmp"
            corpus.parse(name).write("midi", fp=tmp)
            os.replace(tmp, out_path)
        return name, out_path, None
    except OSError as e:  # writing the MIDI file failed (a full disk, a quota): no bad piece, an error
        if os.path.exists(out_path + ".tmp"):
            os.remove(out_path + ".tmp")
        raise OSError(e.errno, f"{out_path}: cannot write ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - music21 raises many types (e.g. badly formed repeats)
        return name, None, f"{type(e).__name__}: {e}"


def chorale_midis(out_dir: str | os.PathLike, limit: int | None = None, workers: int = 1,
                  cache_dir: str | os.PathLike | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Convert music21's Bach chorales to MIDI in ``out_dir`` (cached: existing files are reused,
    from ``cache_dir`` too, where given: nothing is written there).

    Returns ``(midi_paths, failures)``; order is music21's chorale order, duplicates removed.
    About 0.2 s per chorale on one core.
    """
    _music21()
    from music21 import corpus

    names = []
    seen = set()
    for fn in corpus.chorales.Iterator(returnType="filename"):
        if fn not in seen:
            seen.add(fn)
            names.append(fn)
    if limit is not None:
        names = names[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for n in names:
        fname = n.replace("/", "_") + ".mid"
        cached = Path(cache_dir) / fname if cache_dir is not None else None
        jobs.append((n, str(cached if cached is not None and cached.is_file() else out / fname)))
    if workers > 1 and len(jobs) > 4:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_convert_chorale, jobs, chunksize=4))
    else:
        results = [_convert_chorale(j) for j in jobs]
    paths, failed = [], []
    for name, p, err in results:
        if p is None:
            log.debug("chorale %s: %s", name, err)  # returned to the caller, who reports it
            failed.append((name, err))
        else:
            paths.append(Path(p))
    return paths, failed


def abc_corpus_tunes(corpus_name: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(name, abc_text)`` for every tune of a bundled ABC collection ('oneill-abc' | 'essen-abc'),
    split by :func:`~multimodal_rwkv.music.abc.split_tunes` (a file header's fields copied into
    each tune: the text a byte-level model trains on is the self-contained tune)."""
    from multimodal_rwkv.music.abc import split_tunes

    if corpus_name not in _ABC_DIRS:
        raise DataError(f"{corpus_name}: not an ABC corpus (choose from {sorted(_ABC_DIRS)})")
    m21 = _music21()
    root = Path(m21.__file__).parent / "corpus" / _ABC_DIRS[corpus_name]
    files = sorted(root.glob("*.abc"))
    if not files:
        raise DataError(f"{root}: no .abc files (music21 installed without its corpus?)")
    tunes = []
    for f in files:
        raw = f.read_bytes()
        try:  # the files with accents in their titles are UTF-8; an older one may be Latin-1
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for k, t in enumerate(split_tunes(text, name=str(f))):
            tunes.append((f"{f.stem}#{k}", t))
            if limit is not None and len(tunes) >= limit:
                return tunes
    return tunes


_NOT_MUSIC = re.compile(r"^(?:[XTCOABDFGHNRSZW]:|%(?!abc-))")  # information fields (ABC 2.1, 3.1), comments


def _tune_key(tune: str) -> str:
    """An ABC tune without the lines that do not change its music: the reference number, title,
    composer, origin, notes, rhythm, source, history and the other information fields (``X:``,
    ``T:``, ``C:``, ``O:``, ``N:``, ``R:``, ...) and comments; what makes it the same piece as another."""
    return "\n".join(ln.rstrip() for ln in tune.split("\n") if not _NOT_MUSIC.match(ln))


@dataclass
class PrepareReport:
    """What :func:`prepare` wrote."""

    out: Path
    kind: str                                  # 'midi' | 'abc'
    counts: dict = field(default_factory=dict)  # split -> {pieces, tokens, notes|bytes}
    failed: list = field(default_factory=list)  # (name, reason)
    duplicates: int = 0

    def summary(self) -> str:
        parts = [f"{s}: {c['pieces']} pieces, {c['tokens']} tokens" for s, c in self.counts.items()]
        failed = f"{len(self.failed)} failed" + (f" (reasons in {self.out / FAILED_FILE})" if self.failed else "")
        return f"{self.out}: " + "; ".join(parts) + f"; {failed}, {self.duplicates} duplicates"


def one_line(text: str) -> str:
    """``text`` with backslashes and control characters as Python escapes (``\\``, ``\t``, ``\n``,
    ``\x1b``): a file name on one line of a list, and unambiguous there."""
    return "".join(c if c != "\\" and (" " <= c != "\x7f") else
                   {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}")
                   for c in text)


def _ids_hash(ids: Sequence[int]) -> str:
    """A piece's identity as the model sees it: the hash of its token ids."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _transposition_key(tok, ids) -> str:
    """One hash for every transposition of a piece: its tokens with the melodic pitches moved
    down so that the lowest sits at the bottom of the tokenizer's range."""
    low = tok.lowest_pitch(ids)
    return _ids_hash(ids if low is None else tok.transpose(ids, tok.config.pitch_range[0] - low))


def midi_files(folder: str | os.PathLike, unlistable: list | None = None) -> list[Path]:
    """The .mid/.midi files under ``folder`` (recursive, sorted; see
    :func:`~multimodal_rwkv.fileio.listed_files`), broken links included: they are unreadable
    files, reported and counted, not nothing. A folder that cannot be listed (no permission) is
    appended to ``unlistable`` as ``(path, reason)``, for the caller to report and count."""
    def cannot_list(e: OSError) -> None:
        if unlistable is not None:
            unlistable.append((e.filename, f"cannot list folder ({e.strerror or e}): its files are not read"))

    return listed_files(folder, (".mid", ".midi"), on_unlistable=cannot_list)


def _write_split(out: Path, split: str, docs: Sequence[Sequence[int]], vocab_size: int, shard_tokens: int) -> int:
    import numpy as np

    d = out / split
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("shard_*.npy"):
        old.unlink()
    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    buf: list[int] = [0]
    k = 0
    total = 0

    def flush():
        nonlocal buf, k, total
        arr = np.asarray(buf, dtype=dtype)
        with naming_write_errors(d / f"shard_{k:05d}.npy"):
            save_npy(d / f"shard_{k:05d}.npy", arr)
        total += len(arr)
        k += 1
        buf = [0]

    for doc in docs:
        buf.extend(doc)
        buf.append(0)
        if len(buf) >= shard_tokens:
            flush()
    if len(buf) > 1 or k == 0:
        flush()
    return total


def prepare(out: str | os.PathLike, corpus: str | None = None, midi_dir: str | os.PathLike | None = None,
            limit: int | None = None, transpose: int = 0, valid_permille: int = 100, test_permille: int = 100,
            tokenizer_config=None, shard_tokens: int = 50_000_000, workers: int = 1, seed: int = 0,
            on_failure=None) -> PrepareReport:
    """Build a tokenised dataset (see the module docstring). Exactly one of ``corpus`` /
    ``midi_dir``. ``limit`` caps the number of source pieces (for tests): with ``midi_dir``, the first
    ``limit`` files (in path order) that give a piece, unreadable files and duplicates not counted;
    with a corpus, its first ``limit`` pieces. Returns a report.

    A piece that cannot be read is skipped, counted and reported: ``on_failure(name, reason)`` is
    called for it (default: a logged warning) and it is listed in ``OUT/failed.txt``. When no
    piece is usable, the DataError quotes the first reason; when none is left for the train split
    (a few pieces, large valid/test shares), that is a DataError too.

    ``out`` is a new or empty folder, or one an earlier prepare wrote: its dataset (splits,
    tokenizer, meta.json, failed.txt) is replaced, other files in it are left alone. Everything is
    written into a temporary folder first and moved in only when the dataset is complete, so a
    prepare that fails leaves ``out`` as it was (and creates nothing)."""
    if on_failure is None:
        def on_failure(name, reason):
            log.warning("skipped %s: %s", name, reason)

    if (corpus is None) == (midi_dir is None):
        raise DataError("prepare: give exactly one of corpus or midi_dir")
    if corpus is not None and corpus not in CORPORA:
        raise DataError(f"{corpus}: unknown corpus (choose from {', '.join(CORPORA)})")
    kind = "abc" if corpus in _ABC_DIRS else "midi"
    if kind == "abc" and transpose:
        raise DataError(f"{corpus}: transposition augmentation is only implemented for MIDI corpora")
    if kind == "abc" and tokenizer_config is not None:
        raise DataError(f"{corpus}: an ABC corpus is tokenized as bytes; a MIDI tokenizer config does not apply to it")
    if not (0 <= valid_permille and 0 <= test_permille and valid_permille + test_permille < 1000):
        raise DataError(f"prepare: valid_permille {valid_permille} + test_permille {test_permille} leaves no "
                        "train split (each >= 0, their sum below 1000)")
    if midi_dir is not None and not Path(midi_dir).is_dir():
        raise DataError(f"{midi_dir}: not a directory")
    out = Path(out)
    _check_out_folder(out, midi_dir)
    from multimodal_rwkv.fileio import make_dirs, remove_dirs

    existed = out.is_dir()
    if existed:  # what an interrupted prepare left here: its stage, copies of shards not yet renamed
        for left in out.glob(".tmp-prepare-*"):
            shutil.rmtree(left, ignore_errors=True)
        for left in out.glob("*/.new-shard_*.npy"):
            left.unlink()
    made = [] if existed else make_dirs(out)
    # staged in a hidden folder, a new output folder too: a prepare killed halfway leaves only that,
    # which the next prepare removes (a new folder holding half a dataset was refused as not its own)
    stage = out / f".tmp-prepare-{os.getpid()}"
    stage.mkdir()
    moved: list[Path] = []  # what _move_dataset put into out
    try:
        report = _prepare_into(stage, out, kind, corpus, midi_dir, limit, transpose, valid_permille, test_permille,
                               tokenizer_config, shard_tokens, workers, seed, on_failure)
        _move_dataset(stage, out, moved)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not existed:  # what it had moved in before it failed (only that: another run may share the folder)
            for p in reversed(moved):
                remove_tree(p)
            if (out / "midi").is_dir() and not any((out / "midi").iterdir()):
                (out / "midi").rmdir()
        remove_dirs(made)
        raise
    log.debug("%s", report.summary())  # (the CLI prints it; callers have the report)
    return report


def _check_out_folder(out: Path, midi_dir) -> None:
    """Refuse an ``out`` prepare would damage: a file, the MIDI folder it reads, a folder holding
    other things than an earlier prepare's dataset (whose files it would replace)."""
    if midi_dir is not None and same_file(out, midi_dir):
        raise DataError(f"{out}: the output folder is the MIDI folder read (give the dataset its own folder)")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise DataError(f"{out}: not a folder (the output of prepare is a folder)")
    entries = {e.name for e in out.iterdir() if not e.name.startswith(".tmp-prepare-")}  # (a killed prepare's)
    if entries and not _is_prepared(out):
        raise DataError(f"{out}: a folder that holds other files, not a dataset written by prepare "
                        "(give a new or empty folder)")
    for name in SPLITS + ("midi",):
        if os.path.lexists(out / name) and not (out / name).is_dir():
            raise DataError(f"{out / name}: not a folder (prepare writes its {name} files there)")
    for name in _DATASET_FILES:
        if (out / name).is_dir():
            raise DataError(f"{out / name}: a folder (prepare writes this file)")


def _is_prepared(out: Path) -> bool:
    """Whether ``out`` holds a dataset :func:`prepare` wrote: its meta.json, as prepare writes it."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") in ("midi", "abc") and isinstance(meta.get("counts"), dict)


def _move_dataset(stage: Path, out: Path, moved: list) -> None:
    """Move a complete dataset from ``stage`` into ``out``: its old shards and files replaced, new
    chorale MIDI files added to the cache; then ``stage`` removed. ``moved`` gets each path it puts
    where nothing was (what a failed prepare into a new folder takes out again). The new files are
    first copied in beside the old ones (``.new-`` names; a split folder may be a link to another
    file system, where a rename fails), and the old ones go only once all are in place: a failure
    leaves the old dataset whole."""
    if (stage / "midi").is_dir():  # the cache only grows: files added first do no harm
        (out / "midi").mkdir(exist_ok=True)
        for f in sorted((stage / "midi").iterdir()):
            if not (out / "midi" / f.name).exists():
                moved.append(out / "midi" / f.name)
            shutil.move(str(f), str(out / "midi" / f.name))
        (stage / "midi").rmdir()
    placed: list[Path] = []
    try:
        for name in SPLITS:
            if (out / name).is_dir():
                for f in sorted((stage / name).iterdir()):
                    placed.append(out / name / f".new-{f.name}")
                    with naming_target(out / name / f.name):  # (not the staged source)
                        shutil.move(str(f), str(placed[-1]))
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        raise
    for name in SPLITS:
        dst = out / name
        if dst.is_dir():
            for old in dst.glob("shard_*.npy"):
                old.unlink()
            for f in sorted(dst.glob(".new-*")):
                os.replace(f, dst / f.name[len(".new-"):])
            (stage / name).rmdir()
        else:
            moved.append(dst)
            os.replace(stage / name, dst)
    for name in _TOKENIZER_FILES:  # the other kind's tokenizer would be found first or confuse
        if (out / name).is_file() and not (stage / name).exists():
            (out / name).unlink()
    for name in _DATASET_FILES:
        if (stage / name).exists():
            if not (out / name).exists():
                moved.append(out / name)
            os.replace(stage / name, out / name)
    stage.rmdir()


def _prepare_into(out: Path, final: Path, kind, corpus, midi_dir, limit, transpose, valid_permille, test_permille,
                  tokenizer_config, shard_tokens, workers, seed, on_failure) -> PrepareReport:
    """The body of :func:`prepare`: writes the dataset into ``out`` (a fresh folder); the report
    names ``final``, where it is moved."""
    from multimodal_rwkv.music.abc import AbcTokenizer
    from multimodal_rwkv.music.midi_tokenizer import MidiTokenizer

    def fail(name, reason):
        reason = reason[len(f"{name}: "):] if reason.startswith(f"{name}: ") else reason  # MidiError names it
        report.failed.append((name, reason))
        on_failure(name, reason)

    report = PrepareReport(out=final, kind=kind)
    docs: dict[str, list[list[int]]] = {"train": [], "valid": [], "test": []}
    units: dict[str, int] = {"train": 0, "valid": 0, "test": 0}
    files = []
    seen: set[str] = set()
    split_by_key: dict[str, str] = {}
    kept: list[tuple[str, list[int]]] = []  # (split, ids) of each MIDI piece kept, in path order

    if kind == "abc":
        tok = AbcTokenizer()
        for name, text in abc_corpus_tunes(corpus, limit):
            content = text.encode("utf-8")
            h = hashlib.sha256(content).hexdigest()
            # the same tune under another reference number, title, origin, notes... is one piece:
            # kept once, so it cannot sit in train and in a held-out split (as for MIDI files)
            key = hashlib.sha256(_tune_key(text).encode("utf-8")).hexdigest()
            if key in seen:
                report.duplicates += 1
                continue
            seen.add(key)
            s = split_of(content, valid_permille, test_permille)
            ids = tok.encode(text)
            docs[s].append(ids)
            units[s] += len(ids)
            files.append({"name": name, "split": s, "sha256": h[:16]})
    else:
        tok = MidiTokenizer(tokenizer_config)
        if corpus == "bach-chorales":
            paths, failed = chorale_midis(out / "midi", limit=limit, workers=workers, cache_dir=final / "midi")
            for name, reason in failed:
                fail(name, reason)
        else:
            root = Path(midi_dir)
            unlistable: list[tuple[str, str]] = []
            paths = midi_files(root, unlistable)  # all of them: ``limit`` counts the pieces kept, not the files tried
            for name, reason in unlistable:
                fail(str(name), reason)
            if not paths:
                raise DataError(f"{root}: no .mid/.midi files" + (f" ({unlistable[0][0]}: {unlistable[0][1]})"
                                                                   if unlistable else ""))
        bad_content: dict[str, tuple[str, str]] = {}  # content hash -> (file, reason) of files that failed
        for p in paths:
            if limit is not None and len(kept) >= limit:
                break
            try:
                content = p.read_bytes()
            except OSError as e:
                broken = p.is_symlink() and not p.exists()
                fail(str(p), f"broken symbolic link (to {os.readlink(p)})" if broken
                     else f"cannot read file ({e.strerror or e})")
                continue
            h = hashlib.sha256(content).hexdigest()
            if h in bad_content:  # the same bytes as a file that failed: failed too, each one listed
                fail(str(p), f"{bad_content[h][1]} (the same bytes as {bad_content[h][0]})")
                continue
            if h in seen:
                report.duplicates += 1
                continue
            seen.add(h)
            try:
                ids = tok.encode(p)
            except MidiError as e:
                fail(str(p), str(e))
                bad_content[h] = (str(p), str(e).split(": ", 1)[-1])
                continue
            # the same music in files that differ elsewhere (a title, a text event) is one piece:
            # kept once, so it cannot sit in train and in a held-out split
            th = _ids_hash(ids)
            if th in seen:
                report.duplicates += 1
                continue
            seen.add(th)
            # transpositions of one piece share a split (the first one's): train's transposed
            # copies would otherwise hold a valid/test piece's exact tokens
            s = split_by_key.setdefault(_transposition_key(tok, ids), split_of(content, valid_permille, test_permille))
            kept.append((s, ids))
            name = p.relative_to(root).as_posix() if midi_dir is not None else p.name  # a/x.mid and b/x.mid differ
            files.append({"name": name, "split": s, "sha256": h[:16], "out_of_range": tok.last_stats.out_of_range})
        # each piece, then (train only) its transposed copies, once every file is read: a copy
        # equal to a piece or to an earlier copy (drums only: every shift is the piece itself;
        # another file's transposition) is not added again
        emitted = set(seen)
        for s, ids in kept:
            docs[s].append(ids)
            units[s] += tok.count_notes(ids)
            for k in range(-transpose, transpose + 1) if s == "train" and transpose else ():
                t = tok.transpose(ids, k) if k else None
                if t is not None and (key := _ids_hash(t)) not in emitted:
                    emitted.add(key)
                    docs[s].append(t)
                    units[s] += tok.count_notes(t)
    with naming_write_errors(out / ("abc_tokenizer.json" if kind == "abc" else "midi_tokenizer.json")):
        tok.save_pretrained(out)
    vocab_size = tok.vocab_size

    if not any(docs.values()):
        why = ""
        if report.failed:
            n, r = report.failed[0]
            more = len(report.failed) - 1
            why = f": {n}: {r}" + (f"; {more} more, each reported as skipped" if more else "")
        raise DataError(f"{corpus or midi_dir}: no usable pieces ({len(report.failed)} failed{why})")
    if not docs["train"]:  # the split is by content hash: a few pieces may all be held out
        held = ", ".join(f"{s} {len(docs[s])}" for s in ("valid", "test"))
        raise DataError(f"{corpus or midi_dir}: no piece for the train split (pieces: {held}; "
                        "lower the valid and test permille, or add pieces); nothing written")
    with naming_write_errors(out / FAILED_FILE):
        (out / FAILED_FILE).write_text("".join(f"{one_line(n)}\t{one_line(r)}\n" for n, r in report.failed))
    random.Random(seed).shuffle(docs["train"])  # transposed copies of one piece apart
    unit_name = "bytes" if kind == "abc" else "notes"
    for s in ("train", "valid", "test"):
        n_tok = _write_split(out, s, docs[s], vocab_size, shard_tokens)
        report.counts[s] = {"pieces": len(docs[s]), "tokens": n_tok, unit_name: units[s]}
    meta = {
        "kind": kind, "corpus": corpus, "midi_dir": str(midi_dir) if midi_dir else None, "limit": limit,
        "transpose": transpose, "valid_permille": valid_permille, "test_permille": test_permille,
        "vocab_size": vocab_size, "counts": report.counts, "failed": len(report.failed),
        "duplicates": report.duplicates, "files": files,
    }
    with naming_write_errors(out / "meta.json"):
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return report


def load_tokens(path: str | os.PathLike):
    """Concatenated ids of a ``.npy`` file or a folder of shards (sorted; hidden files, such as an
    interrupted prepare's ``.new-`` copies, are not shards), as an int64 numpy array."""
    import numpy as np

    p = Path(path)
    # (hidden files are no shards: ".new-" copies of an interrupted prepare, temporary files)
    files = sorted(f for f in p.glob("*.npy") if not f.name.startswith(".")) if p.is_dir() else [p]
    if not files:
        splits = [s for s in ("train", "valid", "test") if (p / s).is_dir()]
        hint = f" (a prepared dataset: give one split, e.g. {p / splits[0]})" if splits else ""
        raise DataError(f"{p}: no .npy shards{hint}")
    return np.concatenate([load_token_npy(f, mmap=False, allow_empty=True).astype(np.int64) for f in files])


def data_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The tokenizer file the token data at ``path`` was prepared with, or None when there is none:
    the ``midi_tokenizer.json`` / ``abc_tokenizer.json`` in a folder of shards or beside it (a
    split of a prepared dataset), or, for a ``.npy`` shard, in its folder or beside that."""
    p = Path(os.path.abspath(path))  # "." and a bare shard name have parents too
    for folder in (p, p.parent) if p.is_dir() else (p.parent, p.parent.parent):
        for name in _TOKENIZER_FILES:  # MIDI first, as a model folder is read
            if (folder / name).is_file():
                return folder / name
    return None


def split_documents(ids: Iterable[int]) -> list[list[int]]:
    """Cut a 0-separated id stream into documents (empty ones dropped)."""
    docs, cur = [], []
    for i in map(int, ids):
        if i == 0:
            if cur:
                docs.append(cur)
            cur = []
        else:
            cur.append(i)
    if cur:
        docs.append(cur)
    return docs
