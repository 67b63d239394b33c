"""``mmrwkv music ...`` subcommands: tokenize, prepare, generate, eval, roll, abc2midi."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from multimodal_rwkv.argtypes import add_sampling_args, file_arg, float_min, int_min, int_range, path_arg, seed
from multimodal_rwkv.errors import ConfigError, DataError, MidiError, on_one_line
from multimodal_rwkv.fileio import check_outputs, save_npy, write_outputs
from multimodal_rwkv.music.abc import CONTROL_BYTES
from multimodal_rwkv.music.pianoroll import check_png

log = logging.getLogger(__name__)


def _tokenizer(args):
    from multimodal_rwkv.music.midi_tokenizer import MidiTokenizer, MidiTokenizerConfig

    if getattr(args, "tokenizer_config", None):
        return MidiTokenizer(MidiTokenizerConfig.load(args.tokenizer_config))
    return MidiTokenizer()




def _read_abc(path) -> str:
    """ABC text: UTF-8 (a leading byte-order mark dropped), undecodable bytes replaced (ABC is
    mostly ASCII; titles in other encodings must not stop a conversion). An empty file or one
    holding control bytes (a picture, a MIDI file, ...) is refused: it is not ABC text."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    if not data.strip():
        raise DataError(f"{p}: {'empty file' if not data else 'holds only white space'} (not ABC text)")
    bad = next((k for k, b in enumerate(data) if b in CONTROL_BYTES), None)
    if bad is not None:
        raise DataError(f"{p}: not a text file (control byte 0x{data[bad]:02x} at offset {bad}); ABC is text")
    return data.decode("utf-8-sig", errors="replace")


def cmd_tokenize(args) -> int:
    import numpy as np

    from multimodal_rwkv.music.corpora import midi_files

    out = args.out
    if out and not out.lower().endswith(".npy"):  # (np.save would add .npy: a folder's name, x.mid.npy, -.npy)
        raise DataError(f"{out}: --out is the token stream, a .npy file: give a name ending in .npy")
    tok = _tokenizer(args)
    files: list[Path] = []
    unlistable: list[tuple[str, str]] = []  # folders that cannot be listed: skipped and counted
    for p in map(Path, args.paths):
        if p.is_dir():
            files.extend(midi_files(p, unlistable))
        elif p.is_file() or p.is_symlink():  # a broken link is a file that cannot be read
            files.append(p)
        elif p.exists():  # a FIFO, a device
            raise DataError(f"{p}: not a regular file or a folder")
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError(f"{', '.join(args.paths)}: no .mid/.midi files"
                        + (f" ({unlistable[0][0]}: {unlistable[0][1]})" if unlistable else ""))
    if out:
        check_outputs([("--out", out)], files + ([args.tokenizer_config] if args.tokenizer_config else []))
    ok = bad = tokens = notes = oor = 0
    first_error = None
    for name, reason in unlistable:
        bad += 1
        first_error = first_error or f"{name}: {reason}"
        print(f"skipped: {name}: {reason}", file=sys.stderr)
    stream = [0]
    for f in files:
        try:
            ids = tok.encode(f)
        except MidiError as e:
            bad += 1
            first_error = first_error or str(e)
            if len(files) > 1:  # (one file alone: its error is the command's, said once)
                print(f"skipped: {on_one_line(e)}", file=sys.stderr)
            continue
        ok += 1
        s = tok.last_stats
        tokens += len(ids)
        notes += s.notes_encoded
        oor += s.out_of_range
        if args.text:
            print(f"{f}: {tok.tokens_to_text(ids)}")
        if args.out:
            stream.extend(ids)
            stream.append(0)
    if not ok:  # nothing to write: an error, like prepare's "no usable pieces"
        if len(files) == 1 and not unlistable:
            raise DataError(first_error)  # names the file and the reason
        raise DataError(f"{', '.join(args.paths)}: none of the {len(files)} files could be tokenized "
                        f"(first: {first_error})")
    if out:
        arr = np.asarray(stream, dtype=np.uint16 if tok.vocab_size <= 65535 else np.int32)

        write_outputs([(out, lambda tmp: save_npy(tmp, arr))])
    tpn = f"{tokens / notes:.3f}" if notes else "-"
    print(f"tokenized {ok} files, skipped {bad} unreadable; {notes} notes, {tokens} tokens "
          f"({tpn} tokens/note), {oor} notes out of range; vocab {tok.vocab_size}"
          + (f"; wrote {out}" if out else ""))
    return 0


def cmd_prepare(args) -> int:
    from multimodal_rwkv.music.corpora import ABC_CORPORA, one_line, prepare
    from multimodal_rwkv.music.midi_tokenizer import MidiTokenizerConfig

    if args.corpus in ABC_CORPORA and args.tokenizer_config:
        raise DataError(f"{args.tokenizer_config}: --corpus {args.corpus} is ABC text, tokenized as bytes; "
                        "a MIDI tokenizer config does not apply to it")
    if args.valid_permille + args.test_permille >= 1000:
        raise DataError(f"--valid-permille {args.valid_permille} + --test-permille {args.test_permille} = "
                        f"{args.valid_permille + args.test_permille} leaves no train split "
                        "(their sum must be below 1000)")
    cfg = MidiTokenizerConfig.load(args.tokenizer_config) if args.tokenizer_config else None
    rep = prepare(args.out, corpus=args.corpus, midi_dir=args.midi_dir, limit=args.limit, transpose=args.transpose,
                  valid_permille=args.valid_permille, test_permille=args.test_permille, tokenizer_config=cfg,
                  workers=args.workers,
                  on_failure=lambda name, why: print(f"skipped: {one_line(name)}: {one_line(why)}", file=sys.stderr))
    print(rep.summary())
    return 0


def _save_midi(mid):
    return lambda tmp: mid.save(str(tmp))


def _save_png(img):
    return lambda tmp: img.save(tmp, format="PNG")


def _converted(text: str, what: str):
    """The generated ABC tune as a ``mido.MidiFile``; a tune music21 cannot read is a DataError
    naming ``what`` (the output that needed it)."""
    from multimodal_rwkv.music.abc import abc_to_midi

    name = "<generated tune>"
    try:
        return abc_to_midi(text, None, name=name)
    except MidiError as e:
        why = str(e).removeprefix(f"{name}: ")
        raise DataError(f"{what}: the generated tune does not convert to MIDI ({why}); nothing written "
                        "(try another --seed, or --out NAME.abc for the text alone)") from None


def cmd_generate(args) -> int:
    from multimodal_rwkv.music.abc import AbcTokenizer, with_file_header
    from multimodal_rwkv.music.generate import (check_midi_outputs, generate_abc, generate_music, load_music_model,
                                                 write_midi_outputs)

    model, tok = load_music_model(args.model)
    out = Path(args.out)
    inputs = [("--model", args.model), ("--prompt file", args.prompt)]
    if isinstance(tok, AbcTokenizer) and args.seconds is not None:
        raise ConfigError("--seconds: only with a MIDI model (an ABC model writes one tune; its length is "
                          "--max-tokens bytes at most)")
    if isinstance(tok, AbcTokenizer):
        midi_out = out.suffix.lower() in (".mid", ".midi")
        text_file = out.with_suffix(".abc") if midi_out else out
        # the side output never replaces a NAME.abc: it may be the user's own tune (abc2midi makes
        # NAME.mid from it), whatever else is there
        if midi_out and os.path.lexists(text_file):
            raise DataError(f"{text_file}: exists; --out {out} with an ABC model also writes the tune text to "
                            f"{text_file} and would replace that file (move it away, or give another --out)")
        check_outputs([("--out", out)] + ([("the tune text", text_file)] if midi_out else [])
                      + ([("--png", args.png)] if args.png else []), inputs)
        if args.png:
            check_png("--png", args.png)
        # a file header goes into the tune's header (the form the model trained on; see split_tunes)
        prompt = with_file_header(_read_abc(args.prompt), args.prompt) if args.prompt else "X:1\n"
        text = generate_abc(prompt=prompt, max_bytes=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, model=model)
        writes = [(text_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))]
        mid = _converted(text, args.out if midi_out else args.png) if midi_out or args.png else None
        if midi_out:
            writes.append((out, _save_midi(mid)))
        if args.png:
            from multimodal_rwkv.music.pianoroll import pianoroll_from_midi

            writes.append((args.png, _save_png(pianoroll_from_midi(mid))))
        write_outputs(writes)  # all converted and drawn first: a failure leaves no file
        print(text)
        print(f"wrote {out}" + (f" and {text_file}" if midi_out else "")
              + (f"; piano roll {args.png}" if args.png else ""))
        return 0
    if out.suffix.lower() not in (".mid", ".midi"):
        raise DataError(f"{args.out}: {args.model} is a MIDI model; its output is a MIDI file: give a name ending "
                        "in .mid")
    check_midi_outputs(out, args.png, inputs, names=("--out", "--png"))
    res = generate_music(model, tok, args.prompt, seconds=args.seconds or 30.0, max_new_tokens=args.max_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    write_midi_outputs(res, tok, out, args.png)
    st = res.decode_stats
    print(f"wrote {out}: {len(res.notes)} notes, {res.seconds:.1f} s generated, {res.new_tokens} new tokens"
          + ("" if st.clean else " (decoder repaired the sequence)") + (f"; piano roll {args.png}" if args.png else ""))
    return 0


def cmd_eval(args) -> int:
    from multimodal_rwkv.music.abc import AbcTokenizer
    from multimodal_rwkv.music.corpora import load_tokens
    from multimodal_rwkv.music.generate import load_music_model
    from multimodal_rwkv.music.metrics import bits_per_unit, windowed_nll

    if args.metrics:
        given = [o for o, v in (("--ctx-len", args.ctx_len), ("--max-tokens", args.max_tokens)) if v is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)}: only with --model (--metrics converts the losses the "
                              "training run measured, with its own windows)")
        return _eval_from_metrics(args, load_tokens(args.data))
    ids = load_tokens(args.data)
    model, tok = load_music_model(args.model)
    _check_data_tokenizer(args.data, tok, args.model)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    lo, hi = (int(ids.min()), int(ids.max())) if len(ids) else (0, 0)
    if lo < 0 or hi >= model.config.vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{args.data}: token id {bad} is outside the model's vocabulary [0, {model.config.vocab_size}) "
                        "(data prepared with another tokenizer?)")
    total, n = windowed_nll(model, ids, args.ctx_len or 512)
    if n == 0:
        raise DataError(f"{args.data}: fewer than 2 tokens")
    nats = total / n
    targets = ids[1:]
    if isinstance(tok, AbcTokenizer):
        units, name = tok.count_bytes(targets), "bits/byte"
    else:
        units, name = tok.count_notes(targets), "bits/note"
    _check_units(args.data, units, name)
    print(f"{args.data}: {n} tokens, {nats:.4f} nats/token, {nats / math.log(2):.4f} bits/token, "
          f"{bits_per_unit(nats, n, units):.4f} {name} ({units} {'bytes' if name == 'bits/byte' else 'notes'})")
    return 0


# bad-input limits: they decide which files are refused, not what an id means
_LIMIT_KEYS = ("max_file_bytes", "max_notes", "max_beats", "max_tracks")


def _check_data_tokenizer(data, tok, model_dir) -> None:
    """Refuse data prepared with another tokenizer than the model's: its ids mean other things
    (the scores would be wrong). The data's tokenizer file is found beside its split folder (see
    :func:`~multimodal_rwkv.music.corpora.data_tokenizer_file`); without one, only the id range is
    checked (by the caller)."""
    from multimodal_rwkv.music.abc import AbcTokenizer
    from multimodal_rwkv.music.corpora import data_tokenizer_file
    from multimodal_rwkv.music.generate import load_tokenizer, tokenizer_file

    f = data_tokenizer_file(data)
    if f is None:
        return
    theirs = load_tokenizer(f.parent)
    ours = tokenizer_file(model_dir) or model_dir

    def kind(t):
        return "ABC" if isinstance(t, AbcTokenizer) else "MIDI"

    if kind(theirs) != kind(tok):
        why = f"{kind(theirs)} tokens, the model's tokenizer is {kind(tok)}"
    elif isinstance(tok, AbcTokenizer):
        return
    else:
        a, b = theirs.config.to_dict(), tok.config.to_dict()
        diff = [f"{k} {a[k]} (the model's: {b[k]})" for k in a if k not in _LIMIT_KEYS and a[k] != b[k]]
        if not diff:
            return
        why = ", ".join(diff)
    raise DataError(f"{data}: prepared with another tokenizer ({f}) than the model's ({ours}): {why}; "
                    "evaluate on data prepared with the model's tokenizer")


def _check_units(data, units: int, name: str) -> None:
    if units <= 0:
        raise DataError(f"{data}: no {'bytes' if name == 'bits/byte' else 'notes'} to score ({name} is undefined)")


def _eval_from_metrics(args, ids) -> int:
    """Convert the training engine's ``valid_loss`` (nats/token) into bits per note/byte."""
    import json

    from multimodal_rwkv.music.abc import AbcTokenizer
    from multimodal_rwkv.music.corpora import data_tokenizer_file
    from multimodal_rwkv.music.generate import load_tokenizer
    from multimodal_rwkv.music.metrics import bits_per_unit

    f = data_tokenizer_file(args.data)
    if f is None:
        where = "in or beside its folder" if Path(args.data).is_dir() else "beside it or its folder"
        raise DataError(f"{args.data}: no midi_tokenizer.json or abc_tokenizer.json {where} (--metrics needs the "
                        "tokenizer of the prepared dataset: give its split, e.g. DATASET/valid)")
    tok = load_tokenizer(f.parent)
    p = Path(args.metrics)
    # the run's own tokenizer (its final/ holds it): losses of ABC bytes over a MIDI split's notes,
    # or of another MIDI vocabulary, would convert into a meaningless number
    run_tok = _run_tokenizer_folder(p.parent)
    if run_tok is not None:
        _check_data_tokenizer(args.data, load_tokenizer(run_tok), run_tok)
    # the engine scores the split's first eval_batches x micro_batch_size windows of ctx_len tokens
    # when the run's recipe (beside metrics.jsonl) limits eval_batches: the ratio is theirs
    n_scored = _scored_targets(p.parent / "recipe.yaml", len(ids) - 1)
    targets = ids[1:1 + n_scored]
    is_abc = isinstance(tok, AbcTokenizer)
    units = tok.count_bytes(targets) if is_abc else tok.count_notes(targets)
    name = "bits/byte" if is_abc else "bits/note"
    _check_units(args.data, units, name)
    try:
        lines = [(k, x) for k, x in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if x.strip()]
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read metrics ({e})") from None
    rows = []
    for k, x in lines:
        try:
            rows.append((k, json.loads(x)))
        except ValueError as e:
            if (k, x) == lines[-1]:  # a last line cut off (the run killed mid-write): ignored, as the engine does
                continue
            raise DataError(f"{p}:{k}: invalid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})") \
                from None
    for k, r in rows:
        if not isinstance(r, dict):
            raise DataError(f"{p}:{k}: not a metrics record (a JSON object), got {type(r).__name__}")
    # null: no target token was evaluated, or (named in "nonfinite") the evaluation diverged
    rows = [r for _, r in rows if r.get("valid_loss") is not None or "valid_loss" in (r.get("nonfinite") or [])]
    if not rows:
        raise DataError(f"{p}: no valid_loss entries")
    if n_scored < len(ids) - 1:
        print(f"(valid_loss covers the first {n_scored} of the split's {len(ids) - 1} tokens: eval_batches in "
              f"{p.parent / 'recipe.yaml'}; converted with their {name.split('/')[1]}s)")
    for r in rows:
        v = r["valid_loss"]
        if v is None:  # the engine writes a diverged (NaN/inf) loss as null, named in "nonfinite"
            v = float("nan")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DataError(f"{p}: step {r.get('step')}: valid_loss is not a number ({v!r})")
        if v < 0:
            raise DataError(f"{p}: step {r.get('step')}: valid_loss {v!r} is not a cross-entropy (a number >= 0)")
        if not math.isfinite(v):  # a diverged evaluation: said, and the other steps still converted
            print(f"step {r.get('step')}: valid_loss {v} (not finite: nothing to convert)")
            continue
        print(f"step {r.get('step')}: {v:.4f} nats/token, {bits_per_unit(v, len(targets), units):.4f} {name}")
    if run_tok is None:  # (said after the numbers: an error above stays the one line printed)
        recipe = ("no recipe.yaml" if not (p.parent / "recipe.yaml").is_file()
                  else "its recipe.yaml names no data with a tokenizer file")
        print(f"note: {p.parent} has no final/ model and {recipe}: the split's tokenizer could not be compared "
              "with the run's", file=sys.stderr)
    return 0


def _run_tokenizer_folder(run: Path) -> Path | None:
    """The folder holding a training run's tokenizer: its ``final/`` model, or else the folder of
    the tokenizer beside the data its ``recipe.yaml`` names (a run still training has no final/)."""
    from multimodal_rwkv.music.corpora import data_tokenizer_file
    from multimodal_rwkv.music.generate import tokenizer_file

    if tokenizer_file(run / "final") is not None:
        return run / "final"
    try:
        import yaml

        data = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    for key in ("valid_file", "train_file"):
        if isinstance(data.get(key), str) and os.path.exists(data[key]):
            f = data_tokenizer_file(data[key])
            if f is not None:
                return f.parent
    return None


def _scored_targets(recipe: Path, n_targets: int) -> int:
    """How many of a split's ``n_targets`` the engine scored for valid_loss under ``recipe``: all,
    unless its ``eval_batches`` limits the windows (a missing or unreadable recipe: all)."""
    import yaml

    try:
        cfg = yaml.safe_load(recipe.read_text(encoding="utf-8"))
        batches = int(cfg.get("eval_batches") or 0)
        window = int(cfg["train"]["micro_batch_size"]) * int(cfg["data"]["ctx_len"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
        return n_targets
    return min(n_targets, batches * window) if batches > 0 and window > 0 else n_targets


def cmd_roll(args) -> int:
    from multimodal_rwkv.music.pianoroll import pianoroll_from_midi

    check_outputs([("--out", args.out)], [args.midi] + ([args.tokenizer_config] if args.tokenizer_config else []))
    check_png("--out", args.out)
    img = pianoroll_from_midi(args.midi, None, tokenizer=_tokenizer(args))
    write_outputs([(args.out, _save_png(img))])
    print(f"wrote {args.out}")
    return 0


def cmd_abc2midi(args) -> int:
    from multimodal_rwkv.music.abc import abc_to_midi, split_tunes

    p = Path(args.abc)
    check_outputs([("--out", args.out)], [p])
    if Path(args.out).suffix.lower() not in (".mid", ".midi"):  # after check_outputs: an input is refused as such
        raise DataError(f"{args.out}: abc2midi writes a MIDI file: give a name ending in .mid")
    text = _read_abc(p)
    tunes = split_tunes(text, name=str(p)) or [text]
    if not 0 <= args.index < len(tunes):
        raise DataError(f"{p}: has {len(tunes)} tunes, no index {args.index}")
    write_outputs([(args.out, _save_midi(abc_to_midi(tunes[args.index], None, name=str(p))))])
    print(f"wrote {args.out}")
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    music = subparsers.add_parser(
        "music", help="MIDI/ABC tokenizers, corpora, generation and evaluation",
        description="Music on the RWKV core: tokenize MIDI, prepare corpora, generate MIDI/ABC, evaluate.",
        epilog="Example: mmrwkv music prepare --corpus bach-chorales --out data/music/bach --transpose 3 && "
               "mmrwkv train recipes/music_bach_midi.yaml && "
               "mmrwkv music generate --model runs/music_bach/final --out song.mid --png roll.png",
        formatter_class=fmt)
    sub = music.add_subparsers(dest="music_command", metavar="SUBCOMMAND", parser_class=type(music))

    p = sub.add_parser("tokenize", help="tokenize MIDI files or folders; unreadable files are skipped and counted",
                       description="Tokenize MIDI files (folders are searched recursively for .mid/.midi). Unreadable "
                                   "files (broken links too) are reported on stderr and skipped; prints tokens per "
                                   "note. Exit code 2 when no file could be tokenized (then nothing is written).",
                       epilog="Example: mmrwkv music tokenize my_midis/ --out tokens.npy", formatter_class=fmt)
    p.add_argument("paths", nargs="+", type=path_arg, help="MIDI files or folders")
    p.add_argument("--out", type=file_arg, help="write the 0-separated token stream to this .npy")
    p.add_argument("--text", action="store_true", help="print each file's tokens as text")
    p.add_argument("--tokenizer-config", type=path_arg, help="midi_tokenizer.json (default settings otherwise)")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("prepare", help="build a tokenised dataset (train/valid/test .npy shards)",
                       description="Build a dataset from music21's bundled corpora or your own MIDI folder: "
                                   "deterministic split by content hash, .npy shards in the 'tokens' format. "
                                   "Unreadable files are reported on stderr, skipped and listed in OUT/failed.txt. "
                                   "OUT is a new or empty folder, or one an earlier prepare wrote (its dataset is "
                                   "replaced); a prepare that fails (no usable piece, none for the train split) "
                                   "leaves it as it was.",
                       epilog="Example: mmrwkv music prepare --corpus bach-chorales --out data/music/bach --transpose 3",
                       formatter_class=fmt)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", choices=["bach-chorales", "oneill-abc", "essen-abc"])
    src.add_argument("--midi-dir", type=path_arg, help="a folder of .mid/.midi files")
    p.add_argument("--out", type=path_arg, required=True, help="output folder")
    p.add_argument("--limit", type=int_min(1),
                   help="use only the first N pieces (quick tests); from --midi-dir, the first N files in name "
                        "order that give a piece (unreadable files and duplicates do not count)")
    p.add_argument("--transpose", type=int_range(0, 24), default=0,
                   help="train-split augmentation: add copies at -N..+N semitones (MIDI)")
    p.add_argument("--valid-permille", type=int_range(0, 999), default=100,
                   help="share of pieces in valid, per mille (default 100; valid + test below 1000)")
    p.add_argument("--test-permille", type=int_range(0, 999), default=100,
                   help="share of pieces in test, per mille (default 100; valid + test below 1000)")
    p.add_argument("--tokenizer-config", type=path_arg, help="midi_tokenizer.json to use instead of the defaults (MIDI only)")
    p.add_argument("--workers", type=int_min(1), default=2, help="processes for the chorale conversion (default 2)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate MIDI (or ABC) with a trained music model",
                       description="Generate music with a model folder (config.json, model.safetensors and "
                                   "midi_tokenizer.json or abc_tokenizer.json), from scratch or continuing --prompt. "
                                   "Every output is checked before generating and written only when all of them "
                                   "are ready: a failed command writes nothing.",
                       epilog="Example: mmrwkv music generate --model multimodal_rwkv/assets/music_bach --out song.mid "
                              "--seconds 20 --png roll.png --seed 1", formatter_class=fmt)
    p.add_argument("--model", type=path_arg, required=True, help="model folder")
    p.add_argument("--out", type=file_arg, required=True,
                   help="output .mid (ABC models: .abc, or .mid via music21, the tune text kept beside it as "
                        "NAME.abc, which must not exist yet: it is never replaced)")
    p.add_argument("--prompt", type=path_arg, help="MIDI file to continue (ABC models: a text file with the tune start; its last "
                                    "tune is continued, earlier ones are context); not empty, and never an output")
    p.add_argument("--seconds", type=float_min(0, strict=True),
                   help="seconds of new music (MIDI models only; default 30)")
    p.add_argument("--max-tokens", type=int_min(1), default=4096, help="cap on new tokens (default 4096)")
    add_sampling_args(p, top_p=0.95)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--png", type=file_arg, help="also draw a piano roll here (a .png file)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="held-out loss in nats/token and bits per note (MIDI) or per byte (ABC)",
                       description="Evaluate a music model on a prepared split: nats/token, bits/note or bits/byte; "
                                   "or convert a training run's validation losses (--metrics). The split's tokenizer "
                                   "(midi_tokenizer.json / abc_tokenizer.json beside its folder) must be the model's.",
                       epilog="Example: mmrwkv music eval --model runs/music_bach/final --data data/music/bach/test\n"
                              "         mmrwkv music eval --metrics runs/music_bach/metrics.jsonl --data data/music/bach/valid",
                       formatter_class=fmt)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=path_arg, help="model folder to evaluate")
    which.add_argument("--metrics", type=path_arg, help="instead of --model: convert valid_loss in a training run's metrics.jsonl "
                                         "(data = the valid split it was measured on)")
    p.add_argument("--data", type=path_arg, required=True, help=".npy file or folder of shards")
    p.add_argument("--ctx-len", type=int_min(2), help="with --model: window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int_min(0), help="with --model: evaluate only the first N tokens (0 = all)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("roll", help="draw a piano roll of a MIDI file",
                       description="Draw a MIDI file as a piano roll PNG (time x pitch, a colour per instrument group).",
                       epilog="Example: mmrwkv music roll song.mid --out roll.png", formatter_class=fmt)
    p.add_argument("midi", type=path_arg)
    p.add_argument("--out", type=file_arg, required=True, help="the picture, a .png file (not the MIDI file)")
    p.add_argument("--tokenizer-config", type=path_arg)
    p.set_defaults(func=cmd_roll)

    p = sub.add_parser("abc2midi", help="convert an ABC tune to MIDI (needs music21)",
                       description="Convert one tune of an ABC file to MIDI with music21. A tune without a "
                                   "%abc- version line is read as ABC 2.1 (an accidental carries to the end of "
                                   "its bar, as in abc2midi). Known limits: music21's ABC reader does not apply "
                                   "inline [K:], [L:], [Q:] or [V:] fields, a clef in K: (K:C clef=bass sounds two "
                                   "octaves low), the K: modifiers octave= and transpose=, "
                                   "ties on chords, a tie next to a broken rhythm (c>-d) or Q: lines in the tune "
                                   "body, nor the deprecated ! line breaks (I:linebreak !), and expands a single repeated section "
                                   "only sometimes; grace notes are "
                                   "left out, and so are chord symbols (\"G\").",
                       epilog="Example: mmrwkv music abc2midi tune.abc --out tune.mid", formatter_class=fmt)
    p.add_argument("abc", type=path_arg)
    p.add_argument("--out", type=file_arg, required=True, help="the .mid file to write (not the ABC file)")
    p.add_argument("--index", type=int_min(0), default=0, help="which tune of a multi-tune file (default 0)")
    p.set_defaults(func=cmd_abc2midi)

    music.set_defaults(func=lambda a: (music.print_help(), 2)[1])
