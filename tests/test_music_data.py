"""Music data: ABC tokenizer, corpus preparation (split, shards, augmentation), piano roll, metrics."""
from __future__ import annotations

import json
import math
import random
import sys

import mido
import numpy as np
import pytest

from multimodal_rwkv.errors import DataError, MidiError
from multimodal_rwkv.music import AbcTokenizer, MidiTokenizer, Note
from multimodal_rwkv.music.abc import split_tunes
from multimodal_rwkv.music.corpora import load_tokens, prepare, split_documents, split_of
from multimodal_rwkv.music.metrics import bits_per_unit, note_density, pitch_class_entropy, piece_stats, polyphony

TUNE = """X: 7
T: Test reel
M: 4/4
L: 1/8
K:D
|: d2 fd Adfd | e2 ge ceAc :|
"""


# ----------------------------------------------------------------------------- ABC
def test_abc_byte_ids():
    tok = AbcTokenizer()
    text = TUNE + "% café ♪\n"
    ids = tok.encode(text)
    raw = text.encode("utf-8")
    assert ids == [b + 1 for b in raw] and min(ids) >= 1 and max(ids) <= 256 and tok.vocab_size == 257
    assert tok.decode(ids) == text
    assert tok.decode([0] + ids + [0, 5, 6]) == text  # leading separator skipped, stops at the next
    assert tok.decode([999, -3] + ids[:3]) == text[:3]
    assert tok.count_bytes([0] + ids + [0]) == len(raw)


def test_split_tunes_drops_header():
    text = "%abc-2.1\nheader stuff\n\nX: 1\nT: A\nK:G\nGAB|\n\n\nX: 2\nT: B\nK:D\nDEF|\n"
    tunes = split_tunes(text)
    assert tunes == ["%abc-2.1\nX: 1\nT: A\nK:G\nGAB|\n", "%abc-2.1\nX: 2\nT: B\nK:D\nDEF|\n"]  # free text goes


def test_abc_to_midi_with_music21(tmp_path):
    pytest.importorskip("music21")
    from multimodal_rwkv.music.abc import abc_to_midi

    mid = abc_to_midi(TUNE, tmp_path / "t.mid")
    back = mido.MidiFile(str(tmp_path / "t.mid"))
    pitches = [m.note for tr in back.tracks for m in tr if m.type == "note_on" and m.velocity > 0]
    # "d2 fd Adfd" in D major: d=D5(74) f=F#5(78) A=A4(69); 14 notes (28 if the repeat is expanded)
    assert pitches[:4] == [74, 78, 74, 69] and len(pitches) in (14, 28)
    assert len(mid.tracks) == len(back.tracks)


def test_music21_missing_is_a_clear_error(monkeypatch):
    from multimodal_rwkv.music import corpora

    monkeypatch.setitem(sys.modules, "music21", None)
    with pytest.raises(DataError, match="music21 is not installed"):
        corpora.abc_corpus_tunes("oneill-abc", limit=2)
    with pytest.raises(DataError, match="music21 is not installed"):
        prepare("/tmp/never-written", corpus="bach-chorales", limit=1)


# ----------------------------------------------------------------------------- split & shards
def test_split_is_a_function_of_content():
    contents = [f"piece {i}".encode() for i in range(2000)]
    splits = [split_of(c) for c in contents]
    assert splits == [split_of(c) for c in reversed(contents)][::-1]
    share = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert 0.07 < share["valid"] < 0.13 and 0.07 < share["test"] < 0.13
    assert all(split_of(c, 0, 0) == "train" for c in contents[:50])
    assert all(split_of(c, 0, 1000) == "test" for c in contents[:50])


def test_prepare_abc_corpus(tmp_path):
    pytest.importorskip("music21")
    rep = prepare(tmp_path / "o", corpus="oneill-abc", limit=60, valid_permille=200, test_permille=200)
    tok = AbcTokenizer()
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["kind"] == "abc" and (tmp_path / "o" / "abc_tokenizer.json").is_file()
    total = 0
    for s in ("train", "valid", "test"):
        ids = load_tokens(tmp_path / "o" / s)
        assert ids[0] == 0 and ids[-1] == 0 and ids.max() <= 256
        docs = split_documents(ids)
        assert len(docs) == rep.counts[s]["pieces"] == meta["counts"][s]["pieces"]
        assert tok.count_bytes(ids) == rep.counts[s]["bytes"]
        for d in docs:
            assert tok.decode(d).startswith("X:")
        total += len(docs)
    assert total + rep.duplicates == 60 and rep.counts["valid"]["pieces"] > 0


def test_prepare_abc_keeps_a_tune_once_whatever_its_number_or_title(tmp_path, monkeypatch):
    """Essen holds tunes that differ only in X: (and some in T:): each copy was a new piece, so the
    same tune sat in train and in valid/test."""
    from multimodal_rwkv.music import corpora

    body = "M:2/4\nL:1/8\nK:G\nGABc|d2B2|\n"
    tunes = [(f"t#{k}", f"X:{k}\nT:{title}\n{body}") for k, title in enumerate(["Moli hua", "Moli hua", "Jasmine"])]
    tunes.append(("t#9", f"X:9\nT:Moli hua\nN:Z0007\nO:China\nR:song\n% collected 1903\n{body}"))
    tunes.append(("t#3", "X:3\nT:Other\nM:2/4\nL:1/8\nK:G\nGABc|d4|\n"))
    tunes += [(f"f#{k}", f"X:{k}\nT:Filler\nM:2/4\nL:1/8\nK:D\n{'DEFG' * (k + 1)}|\n") for k in range(20)]
    monkeypatch.setattr(corpora, "abc_corpus_tunes", lambda corpus, limit: tunes)
    rep = prepare(tmp_path / "o", corpus="oneill-abc", valid_permille=200, test_permille=200)
    assert rep.duplicates == 3
    assert sum(c["pieces"] for c in rep.counts.values()) == 22


def test_prepare_midi_dir_split_augmentation_and_failures(tmp_path):
    d = tmp_path / "midis"
    d.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        mid = mido.MidiFile(ticks_per_beat=480)
        tr = mido.MidiTrack()
        for j in range(8):
            p = int(rng.integers(40, 80))
            tr.append(mido.Message("note_on", note=p, velocity=90, time=0))
            tr.append(mido.Message("note_off", note=p, velocity=0, time=240))
        tr.append(mido.Message("note_on", note=36, velocity=90, channel=9, time=0))
        tr.append(mido.Message("note_off", note=36, velocity=0, channel=9, time=240))
        mid.tracks.append(tr)
        mid.save(str(d / f"p{k:02d}.mid"))
    (d / "dup.mid").write_bytes((d / "p00.mid").read_bytes())
    (d / "broken.mid").write_bytes(b"MThd\x00\x00")
    (d / "odd\tname\n.mid").write_bytes(b"MThd\x00\x01")  # failed.txt: one line, "name<TAB>reason"
    (d / "readme.txt").write_text("not midi")
    out = tmp_path / "ds"
    rep = prepare(out, midi_dir=d, transpose=2, valid_permille=250, test_permille=250)
    assert rep.duplicates == 1 and len(rep.failed) == 2 and "broken.mid" in rep.failed[0][0]
    lines = (out / "failed.txt").read_text().splitlines()
    assert len(lines) == 2 and all(len(ln.split("\t")) == 2 for ln in lines)
    assert "broken.mid" in lines[0] and lines[1].startswith(str(d / "odd\\tname\\n.mid") + "\t")
    tok = MidiTokenizer.from_pretrained(out)
    n_pieces = {s: rep.counts[s]["pieces"] for s in rep.counts}
    meta = json.loads((out / "meta.json").read_text())
    n_train_files = sum(1 for f in meta["files"] if f["split"] == "train")
    assert n_pieces["train"] == 5 * n_train_files  # -2..+2 all in range (pitches 40..80)
    assert n_pieces["valid"] + n_pieces["test"] == 12 - n_train_files
    train = split_documents(load_tokens(out / "train"))
    # every transposed copy keeps its drum note and shifts its melody
    for doc in train:
        notes, _, st = tok.decode_notes(doc)
        assert st.clean and sum(n.group == tok.drum_group and n.pitch == 36 for n in notes) == 1
    # deterministic: preparing again gives identical shards
    out2 = tmp_path / "ds2"
    prepare(out2, midi_dir=d, transpose=2, valid_permille=250, test_permille=250)
    for s in ("train", "valid", "test"):
        assert np.array_equal(load_tokens(out / s), load_tokens(out2 / s))
    with pytest.raises(DataError, match="not a directory"):
        prepare(tmp_path / "x", midi_dir=tmp_path / "missing")
    with pytest.raises(DataError, match="only implemented for MIDI"):
        prepare(tmp_path / "x", corpus="essen-abc", transpose=1)


def test_prepare_bach_limit(tmp_path):
    pytest.importorskip("music21")
    rep = prepare(tmp_path / "b", corpus="bach-chorales", limit=3, valid_permille=0, test_permille=0, workers=1)
    ids = load_tokens(tmp_path / "b" / "train")
    tok = MidiTokenizer.from_pretrained(tmp_path / "b")
    assert rep.counts["train"]["pieces"] == 3 and tok.count_notes(ids) == rep.counts["train"]["notes"] > 300
    assert len(list((tmp_path / "b" / "midi").glob("*.mid"))) == 3


def test_load_tokens_rejects_bad_shards(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(DataError, match="1-D integer"):
        load_tokens(tmp_path / "f.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npy"):
        load_tokens(tmp_path / "empty")


# ----------------------------------------------------------------------------- piano roll
def test_pianoroll_colours_and_prompt(tmp_path):
    from multimodal_rwkv.music.pianoroll import group_colour, render_pianoroll

    tok = MidiTokenizer()
    notes = [Note(0, 24, 0, 60, 5), Note(48, 24, 5, 72, 5), Note(60, 1, tok.drum_group, 36, 5)]
    img = render_pianoroll(notes, tmp_path / "r.png", steps_per_beat=12, prompt_end=36, tokenizer=tok, px_per_step=4)
    from PIL import Image

    back = Image.open(tmp_path / "r.png")
    assert back.size == img.size and back.format == "PNG"
    legend_h, left, px = 18, 30, 5
    hi = 72 + 2

    def pix(step, pitch):
        return img.getpixel((int(left + step * 4 + 2), legend_h + (hi - pitch) * px + 1))

    assert pix(5, 60) == group_colour(0)
    assert pix(55, 72) == group_colour(5) != group_colour(0)
    assert pix(20, 66) == (236, 236, 236)  # prompt shading
    assert pix(40, 66) == (255, 255, 255)  # generated part, empty
    # a very long piece fits max_width (steps get thinner; the picture does not grow)
    long = render_pianoroll([Note(0, 12 * 50_000, 0, 60, 5), Note(7, 12, 0, 64, 5)], None, steps_per_beat=12)
    assert long.size[0] <= 2400


def test_pianoroll_legend_names_every_group_of_a_short_piece():
    """The legend was one row as wide as the picture, which a short piece's width sets: in a
    one-beat piece of four groups, the last two groups' swatches and names were cut off."""
    from multimodal_rwkv.music.pianoroll import group_colour, render_pianoroll

    tok = MidiTokenizer()
    groups = [0, 5, 7, tok.drum_group]  # piano, strings, brass, drums
    notes = [Note(0, 12, g, 60 + i, 5) for i, g in enumerate(groups)]
    img = render_pianoroll(notes, None, steps_per_beat=12, tokenizer=tok)
    w, h = img.size
    assert w < 200  # a narrow picture: the width follows the piece
    px = img.load()

    def swatch(c):  # an 11 x 11 square of colour c (a note's bar is 4 pixels high)
        return any(all(px[x + i, y + j] == c for i in range(11) for j in range(11))
                   for x in range(w - 10) for y in range(h - 10))

    for g in groups:
        assert swatch(group_colour(g, tok.drum_group)), tok.group_name(g)


def test_pianoroll_is_as_wide_as_its_widest_group_name():
    """A one-beat piece of 16 groups: the picture (136 px) was narrower than the longest names,
    which were cut off at its right edge."""
    from PIL import ImageDraw

    from multimodal_rwkv.music.pianoroll import render_pianoroll

    tok = MidiTokenizer()
    groups = sorted(range(tok.drum_group + 1))
    notes = [Note(0, 12, g, 40 + i, 5) for i, g in enumerate(groups)]
    img = render_pianoroll(notes, None, steps_per_beat=12, tokenizer=tok)
    longest = max(ImageDraw.Draw(img).textlength(tok.group_name(g)) for g in groups)
    assert img.size[0] >= 30 + 14 + longest  # left margin, swatch, the name
    dark = [x for x in range(img.size[0]) for y in range(18 + 14 * (len(groups) - 1))
            if sum(img.getpixel((x, y))) < 300]  # the names' (anti-aliased) black
    assert dark and max(dark) < img.size[0] - 1  # no name runs into the right edge


def test_pianoroll_from_midi_never_draws_over_its_midi_file(tmp_path):
    """The Python API replaced the MIDI file with the PNG (the CLI refused it)."""
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.music.pianoroll import pianoroll_from_midi

    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=80),
                                      mido.Message("note_off", note=60, time=480)]))
    mid.save(tmp_path / "a.mid")
    before = (tmp_path / "a.mid").read_bytes()
    with pytest.raises(DataError, match="a.mid: is the MIDI file the piano roll is drawn from"):
        pianoroll_from_midi(tmp_path / "a.mid", tmp_path / "." / "a.mid")
    assert (tmp_path / "a.mid").read_bytes() == before
    pianoroll_from_midi(tmp_path / "a.mid", tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_roll_and_abc2midi(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    mid = mido.MidiFile()
    tr = mido.MidiTrack([mido.Message("note_on", note=60, velocity=80), mido.Message("note_off", note=60, time=480)])
    mid.tracks.append(tr)
    mid.save(str(tmp_path / "a.mid"))
    assert main(["music", "roll", str(tmp_path / "a.mid"), "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").stat().st_size > 100
    (tmp_path / "bad.mid").write_bytes(b"nope")
    assert main(["music", "roll", str(tmp_path / "bad.mid"), "--out", str(tmp_path / "b.png")]) == 2
    assert "bad.mid: not a MIDI file" in capsys.readouterr().err
    # an output folder that does not exist yet is created; one that cannot be (a file is in the way)
    # is a one-line error naming the path, exit 2
    assert main(["music", "roll", str(tmp_path / "a.mid"), "--out", str(tmp_path / "new" / "dir" / "a.png")]) == 0
    assert (tmp_path / "new" / "dir" / "a.png").is_file()
    assert main(["music", "roll", str(tmp_path / "a.mid"), "--out", str(tmp_path / "a.png" / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmrwkv music roll: error: ") and "a.png" in err[0]
    pytest.importorskip("music21")
    (tmp_path / "t.abc").write_text("header\n\n" + TUNE + "\n" + TUNE.replace("X: 7", "X: 8"))
    assert main(["music", "abc2midi", str(tmp_path / "t.abc"), "--out", str(tmp_path / "t.mid"), "--index", "1"]) == 0
    assert mido.MidiFile(str(tmp_path / "t.mid")).tracks
    assert main(["music", "abc2midi", str(tmp_path / "t.abc"), "--out", str(tmp_path / "t.mid"), "--index", "5"]) == 2
    # a byte-order mark does not hide the first tune; bytes that are not UTF-8 do not stop a conversion
    (tmp_path / "bom.abc").write_bytes(b"\xef\xbb\xbf" + TUNE.encode() + b"\n" + TUNE.replace("X: 7", "X: 8").encode())
    assert len(split_tunes((tmp_path / "bom.abc").read_text(encoding="utf-8"))) == 2
    assert main(["music", "abc2midi", str(tmp_path / "bom.abc"), "--out", str(tmp_path / "b.mid"), "--index", "1"]) == 0
    (tmp_path / "latin.abc").write_bytes(TUNE.replace("X: 7", "X: 7\nT: Caf\xe9").encode("latin-1"))
    assert main(["music", "abc2midi", str(tmp_path / "latin.abc"), "--out", str(tmp_path / "l.mid")]) == 0


# ----------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    assert bits_per_unit(math.log(2), 100, 50) == pytest.approx(2.0)
    same = [Note(i * 12, 12, 0, 60 + 12 * (i % 3), 5) for i in range(6)]  # all C
    assert pitch_class_entropy(same) == 0.0
    chromatic = [Note(i, 1, 0, 60 + i, 5) for i in range(12)]
    assert pitch_class_entropy(chromatic) == pytest.approx(math.log2(12))
    two = [Note(0, 1, 0, 60, 5), Note(1, 1, 0, 62, 5), Note(2, 1, 16, 61, 5)]
    assert pitch_class_entropy(two, drum_group=16) == pytest.approx(1.0)
    # 4 notes over 2 beats
    assert note_density([Note(0, 12, 0, 60, 1), Note(0, 12, 0, 64, 1), Note(12, 12, 0, 62, 1), Note(12, 6, 0, 65, 1)], 12) == pytest.approx(2.0)
    # sounding counts: steps 0-5: 2 notes, 6-9: 1 note, 10-13: silent, 14-15: 3 notes
    notes = [Note(0, 10, 0, 60, 1), Note(0, 6, 0, 64, 1), Note(14, 2, 0, 60, 1), Note(14, 2, 0, 62, 1), Note(14, 2, 0, 67, 1)]
    assert polyphony(notes) == pytest.approx((6 * 2 + 4 * 1 + 2 * 3) / 12)
    assert math.isnan(polyphony([])) and math.isnan(pitch_class_entropy([]))
    assert piece_stats(notes, 12)["notes"] == 5


def _roll_polyphony(notes, drum_group=None):
    """muspy's definition, step by step: distinct pitches per step of a binary roll, drums out."""
    roll = {}
    for n in notes:
        if n.group != drum_group:
            for t in range(n.onset, n.offset):
                roll.setdefault(t, set()).add(n.pitch)
    return sum(map(len, roll.values())) / len(roll) if roll else float("nan")


def test_polyphony_counts_distinct_pitches_without_drums_like_muspy():
    unison = [Note(0, 12, 0, 67, 4), Note(0, 12, 1, 67, 4), Note(0, 12, 0, 48, 4)]  # two voices on one pitch
    assert polyphony(unison) == 2.0
    melody_over_drums = [Note(0, 12, 0, 60, 4)] + [Note(k * 3, 1, 16, 42, 4) for k in range(4)]
    assert piece_stats(melody_over_drums, 12, drum_group=16)["polyphony"] == 1.0
    rng = random.Random(5)
    for _ in range(200):
        notes = [Note(rng.randrange(40), rng.randrange(0, 9), rng.choice((0, 3, 16)), rng.randrange(58, 66), 3)
                 for _ in range(rng.randrange(1, 25))]
        want = _roll_polyphony(notes, 16)
        got = polyphony(notes, drum_group=16)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_windowed_nll_matches_direct_sum():
    torch = pytest.importorskip("torch")
    from multimodal_rwkv.music.metrics import windowed_nll

    class Bigram(torch.nn.Module):  # a model whose per-window loss is easy to compute directly
        def __init__(self, V):
            super().__init__()
            self.t = torch.nn.Parameter(torch.randn(V, V))

        def forward(self, input_ids):
            return type("O", (), {"logits": self.t[input_ids]})()

    torch.manual_seed(0)
    m = Bigram(11)
    ids = torch.randint(0, 11, (53,))
    total, n = windowed_nll(m, ids, ctx_len=8, batch_size=3)
    lp = torch.log_softmax(m.t, -1)
    direct = -sum(float(lp[ids[i], ids[i + 1]].detach()) for i in range(52))
    assert n == 52 and total == pytest.approx(direct, rel=1e-5)


def test_cli_prepare(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    d = tmp_path / "m"
    d.mkdir()
    for k in range(3):
        mid = mido.MidiFile()
        mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60 + k, velocity=80),
                                          mido.Message("note_off", note=60 + k, time=480)]))
        mid.save(str(d / f"{k}.mid"))
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(tmp_path / "o"), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    assert "train: 3 pieces" in capsys.readouterr().out
    assert split_documents(load_tokens(tmp_path / "o" / "train")).__len__() == 3
    with pytest.raises(SystemExit) as e:  # neither --corpus nor --midi-dir: usage error
        main(["music", "prepare", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert main(["music", "prepare", "--midi-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_abc_default_unit_length():
    from multimodal_rwkv.music.abc import with_default_unit_length

    assert with_default_unit_length("X:1\nM:2/4\nK:D\nAB|\n") == "X:1\nM:2/4\nL:1/16\nK:D\nAB|\n"
    assert with_default_unit_length("X:1\nM:6/8\nK:D\nAB|\n") == "X:1\nM:6/8\nL:1/8\nK:D\nAB|\n"
    assert with_default_unit_length("X:1\nK:D\nAB|\n") == "X:1\nL:1/8\nK:D\nAB|\n"
    assert with_default_unit_length("X:1\nL:1/4\nK:D\nAB|\n") == "X:1\nL:1/4\nK:D\nAB|\n"
    assert with_default_unit_length("no header") == "no header"


def test_abc_to_midi_irregular_bars_and_missing_length():
    pytest.importorskip("music21")
    from multimodal_rwkv.music.abc import abc_to_midi

    # bars of the wrong length (as a small model writes them) and no L: field
    text = "X:1\nT:gen\nM:6/8\nK:C\nc d2 c2B A2G|G2 GA AFAG|E>FE G2 B2|\n"
    notes, _, _, _ = MidiTokenizer().extract_notes(abc_to_midi(text))
    pitches = [n.pitch for n in sorted(notes)]
    # c=C5(72) d=D5(74) c B=B4(71) A=A4(69) G=G4(67); 18 notes in all
    assert pitches[:6] == [72, 74, 72, 71, 69, 67] and len(notes) == 18
    # c (1 eighth) then d2 (2 eighths): onsets 0 and 6 steps at 12 steps per quarter
    assert [n.onset for n in sorted(notes)][:3] == [0, 6, 18]
    with pytest.raises(MidiError, match="cannot parse ABC|holds no notes"):
        abc_to_midi("X:1\nK:C\n")


def test_cli_eval_and_generate_refuse_what_cannot_be_answered(tmp_path, capsys):
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.demo import MUSIC_ASSET, asset_dir

    d = tmp_path / "m"
    d.mkdir()
    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=80),
                                      mido.Message("note_off", note=60, time=480)]))
    mid.save(str(d / "a.mid"))
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(tmp_path / "o"), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_loss": 1.0}\n')
    capsys.readouterr()
    # the valid split is empty: bits per note are undefined, not "nan"
    assert main(["music", "eval", "--metrics", str(tmp_path / "metrics.jsonl"), "--data", str(tmp_path / "o" / "valid")]) == 2
    assert "no notes to score" in capsys.readouterr().err
    # a null valid_loss (an evaluation that had no target token) is skipped, not an error
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_loss": null}\n{"step": 2, "valid_loss": 1.0}\n')
    assert main(["music", "eval", "--metrics", str(tmp_path / "metrics.jsonl"), "--data", str(tmp_path / "o" / "train")]) == 0
    printed = capsys.readouterr().out
    assert "step 2: 1.0000 nats/token" in printed and "step 1" not in printed
    # a MIDI model does not write ABC text
    assert main(["music", "generate", "--model", str(asset_dir(MUSIC_ASSET)), "--out", str(tmp_path / "x.abc"),
                 "--seconds", "1"]) == 2
    assert "MIDI model" in capsys.readouterr().err and not (tmp_path / "x.abc").exists()


# ----------------------------------------------------------------------------- failure reasons, broken links
def _midi_bytes(note=60):
    import io

    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=note, velocity=80),
                                      mido.Message("note_off", note=note, time=480)]))
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def test_prepare_with_no_usable_piece_gives_the_reasons(tmp_path, capsys):
    """All files bad: the error used to say only '(2 failed)'. Each reason is reported as it fails
    and the first is quoted; a failed prepare writes nothing (no failed.txt, no folder)."""
    from multimodal_rwkv.cli import main

    d = tmp_path / "allbad"
    d.mkdir()
    (d / "a.mid").write_text("x")
    (d / "b.mid").write_bytes(b"")
    out = tmp_path / "o"
    seen = []
    with pytest.raises(DataError) as e:
        prepare(out, midi_dir=d, on_failure=lambda n, r: seen.append((n, r)))
    assert seen == [(str(d / "a.mid"), "not a MIDI file (no MThd header)"), (str(d / "b.mid"), "empty file")]
    assert str(e.value) == (f"{d}: no usable pieces (2 failed: {d / 'a.mid'}: not a MIDI file (no MThd header); "
                            "1 more, each reported as skipped)")
    assert not out.exists()
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"skipped: {d / 'a.mid'}: not a MIDI file (no MThd header)", f"skipped: {d / 'b.mid'}: empty file"]
    assert err[2].startswith(f"mmrwkv music prepare: error: {d}: no usable pieces (2 failed: ") and len(err) == 3


def test_prepare_reports_failures_and_counts_a_broken_link(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    d = tmp_path / "m"
    d.mkdir()
    (d / "good.mid").write_bytes(_midi_bytes())
    (d / "gone.mid").symlink_to(tmp_path / "missing.mid")
    (d / "bad.mid").write_text("x")
    out = tmp_path / "o"
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(out), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    o = capsys.readouterr()
    assert f"2 failed (reasons in {out / 'failed.txt'})" in o.out
    assert f"skipped: {d / 'gone.mid'}: broken symbolic link (to {tmp_path / 'missing.mid'})" in o.err
    assert f"skipped: {d / 'bad.mid'}: not a MIDI file" in o.err
    assert "gone.mid\tbroken symbolic link" in (out / "failed.txt").read_text()
    assert json.loads((out / "meta.json").read_text())["failed"] == 2
    rep = prepare(tmp_path / "o3", midi_dir=d, valid_permille=0, test_permille=0)  # the API: warnings logged
    assert len(rep.failed) == 2 and "reasons in" in rep.summary()


# ----------------------------------------------------------------------------- ABC file header
HEADER_FILE = "%abc-2.1\nL:1/4\nM:3/4\n% a comment\n%%MIDI program 1\n\nX:1\nT:t\nK:C\nC D E|F G A|\n\nX:2\nT:u\nL:1/8\nK:G\nG A B|\n"


def test_split_tunes_applies_the_file_header_to_every_tune():
    """ABC 2.1, 2.2.2: the file header sets defaults for every tune; programs that extract tunes
    must copy its fields into each (they used to be dropped: L:1/4 lost, notes came out as 1/8)."""
    tunes = split_tunes(HEADER_FILE)
    assert tunes == [  # the version line first, as in the file (it decides how accidentals carry)
        "%abc-2.1\nX:1\nT:t\nL:1/4\nM:3/4\n%%MIDI program 1\nK:C\nC D E|F G A|\n",
        "%abc-2.1\nX:2\nT:u\nL:1/4\nM:3/4\n%%MIDI program 1\nL:1/8\nK:G\nG A B|\n",  # its own L: wins
    ]
    # free text before the first tune is no header; nor is a tune without a blank line before it
    assert split_tunes("some notes\nL:1/4\n\nX:1\nK:C\nC|\n") == ["X:1\nK:C\nC|\n"]
    assert split_tunes("X:1\nL:1/4\nK:C\nC|\n\nX:2\nK:C\nD|\n")[1] == "X:2\nK:C\nD|\n"


def test_file_header_fields_only_a_tune_may_hold_are_not_applied_and_said_so(caplog):
    from multimodal_rwkv.music.abc import file_header

    assert file_header("L:1/4\nQ:1/4=90\nK:D\nC:someone\n+:and another\n\nX:1\nK:C\nC|\n", "f.abc") == [
        "L:1/4", "C:someone", "+:and another"]
    assert "f.abc: the file header holds Q:, K:, which ABC 2.1 allows only in a tune header" in caplog.text


def test_with_file_header_keeps_a_prompt_open():
    from multimodal_rwkv.music.abc import with_file_header

    assert with_file_header("L:1/4\n\nX:1\n") == "X:1\nL:1/4\n"
    assert with_file_header("L:1/4\n\nX:1\nT:a\nK:C\nCD") == "X:1\nT:a\nL:1/4\nK:C\nCD"
    assert with_file_header("X:1\nK:C\nCD") == "X:1\nK:C\nCD"  # no header: unchanged


def test_the_abc_version_line_goes_with_every_tune(tmp_path, capsys):
    """music21 reads ABC without a version line as 1.3, where an accidental does not carry to the
    next notes of the bar: abc2midi (split_tunes) and prompts (with_file_header) dropped the line,
    and ^G G came out as G# G where the file (ABC 2.1, 4.2) means G# G#."""
    pytest.importorskip("music21")
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.music import abc_to_midi
    from multimodal_rwkv.music.abc import file_version, with_file_header

    def pitches(mid):
        return [m.note for m in mid if m.type == "note_on" and m.velocity]

    tune = "X:1\nT:acc\nM:4/4\nL:1/4\nK:C\n^G G =G G |]\n"
    for text in ("%abc-2.1\n" + tune, "\ufeff\n%abc-2.1\nM:4/4\n\n" + tune):  # bare, and with a file header
        assert file_version(text) == "%abc-2.1"
        assert split_tunes(text)[0].startswith("%abc-2.1\nX:1\n")
        assert pitches(abc_to_midi(text)) == pitches(abc_to_midi(split_tunes(text)[0])) == [68, 68, 67, 67]
        assert with_file_header(text).lstrip("\ufeff\n").startswith("%abc-2.1\n")
        (tmp_path / "v.abc").write_text(text)
        assert main(["music", "abc2midi", str(tmp_path / "v.abc"), "--out", str(tmp_path / "v.mid")]) == 0
        assert pitches(mido.MidiFile(tmp_path / "v.mid")) == [68, 68, 67, 67]
    # no version line: the text gains none, but abc_to_midi reads it as ABC 2.1, as abc2midi does
    # (music21's own 1.3 reading did not carry the accidental: G# G)
    assert file_version(tune) is None and split_tunes(tune) == [tune]
    assert pitches(abc_to_midi(tune)) == [68, 68, 67, 67]


def test_abc_default_unit_length_follows_the_last_meter():
    from multimodal_rwkv.music.abc import with_default_unit_length

    # a header 2/4 (default 1/16) overridden by the tune's 3/4 (default 1/8)
    assert with_default_unit_length("X:1\nM:2/4\nM:3/4\nK:D\nAB|\n") == "X:1\nM:2/4\nM:3/4\nL:1/8\nK:D\nAB|\n"
    # a comment after the meter, and a complex meter (5/8 < 3/4): 1/16, as ABC 2.1 section 3.1.7 says
    assert "L:1/16" in with_default_unit_length("X:1\nM:2/4 % two-four\nK:C\nCD|\n")
    assert "L:1/16" in with_default_unit_length("X:1\nM:(2+3)/8\nK:C\nCD|\n")
    assert "L:1/8" in with_default_unit_length("X:1\nM:(3+3+2)/8\nK:C\nCD|\n")


def test_abc_to_midi_fallback_keeps_the_tempo_and_exact_times_and_double_repeats():
    """The direct MIDI writer (music21's rejects bars of the wrong length) wrote 120 BPM whatever Q:
    said, on a 1/12-beat grid (1/32 notes and quintuplets wrong); a note right before :: dropped the
    rest of the tune; plain text without X: was parsed as notes."""
    pytest.importorskip("music21")
    from multimodal_rwkv.errors import MidiError
    from multimodal_rwkv.music import abc_to_midi

    def timed(mid):
        t, on, out = 0, {}, []
        for m in mido.merge_tracks(mid.tracks):
            t += m.time
            if m.type == "note_on" and m.velocity:
                on[m.note] = t
            elif m.type in ("note_off", "note_on"):
                out.append((on.pop(m.note) / mid.ticks_per_beat, (t - on.get(m.note, 0)) / mid.ticks_per_beat, m.note))
        return sorted(out)

    # a short first bar (music21's writer refuses it), 1/32 notes and a quintuplet, at 80 BPM
    mid = abc_to_midi("X:1\nM:4/4\nL:1/8\nQ:1/4=80\nK:C\nA/4B/4c/4d/4|(5CDEFG z2 z4|\n")
    tempos = [m.tempo for m in mido.merge_tracks(mid.tracks) if m.type == "set_tempo"]
    assert [round(mido.tempo2bpm(t)) for t in tempos] == [80]
    onsets = [round(o, 6) for o, _, _ in timed(mid)]
    assert onsets[:4] == [0, 0.125, 0.25, 0.375] and onsets[4:9] == [0.5, 0.7, 0.9, 1.1, 1.3]
    notes = abc_to_midi("X:1\nL:1/4\nK:C\nC D E F|C D E F::G A B c|G A B c|\n")
    assert len([m for m in mido.merge_tracks(notes.tracks) if m.type == "note_on" and m.velocity]) == 16
    twice = abc_to_midi("X:1\nL:1/8\nK:D\n|:ABcd efga|bagf edcB::fgaf gbag|fgaf edcB::ABcd efga|fedc d4:|\n")
    spaced = abc_to_midi("X:1\nL:1/8\nK:D\n|:ABcd efga|bagf edcB ::fgaf gbag|fgaf edcB ::ABcd efga|fedc d4:|\n")
    assert len(timed(twice)) == len(timed(spaced)) > 60  # a second :: in a line cut the tune there
    # a grace note is left out: music21's writer left it sounding to the end (note-on after its note-off)
    graced = MidiTokenizer().extract_notes(abc_to_midi("X:1\nL:1/8\nK:D\nA2 {c}B2 A2 F2|D8|]\n"))
    assert [n.pitch for n in sorted(graced[0])] == [69, 71, 69, 66, 62] and graced[3].unterminated == 0
    # so are chord symbols ("G", and O'Neill's dynamics "f"): they too were left sounding to the end
    chords = MidiTokenizer().extract_notes(abc_to_midi('X:1\nL:1/8\nK:G\n"G"B2 d2 "f"D2 G2|"Am"A8|]\n'))
    assert [n.pitch for n in sorted(chords[0])] == [71, 74, 62, 67, 69] and chords[3].unterminated == 0
    with pytest.raises(MidiError, match="holds no tune"):
        abc_to_midi("This is just some text.\nNo tunes here.\n")
    assert len(timed(abc_to_midi("C D E F|G A B c|\n"))) == 8  # a tune body alone still converts



def test_abc_to_midi_rewrites_what_music21_drops_or_misreads():
    """music21 read K:Bloc as B major, ignored the K: line's extra accidentals (K:G =f, K:D Phr ^f)
    and exp, dropped the invisible rest x with its time, a note under the fermata H, and multi-bar
    rests Z: wrong pitches or every later note early, with exit code 0 (ABC 2.1 sections 4.5, 4.6,
    4.14)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music import abc_to_midi
    from multimodal_rwkv.music.abc import _readable_by_music21

    def notes(text):
        t, on, out = 0, {}, []
        mid = abc_to_midi(text)
        for m in mido.merge_tracks(mid.tracks):
            t += m.time
            if m.type == "note_on" and m.velocity:
                on[m.note] = t
            elif m.type in ("note_off", "note_on") and m.note in on:
                out.append((on.pop(m.note) / mid.ticks_per_beat, m.note))
        return sorted(out)

    def pitches(text):
        return [p for _, p in notes(text)]

    head = "X:1\nM:4/4\nL:1/4\n"
    assert pitches(head + "K:Bloc\nBcde|\n") == pitches(head + "K:B Locrian\nBcde|\n") == [71, 72, 74, 76]
    assert pitches(head + "K:Eloc\nBcde|\n") == [70, 72, 74, 76]  # one flat, as F major
    assert pitches(head + "K:G =f\nGFED|\n") == [67, 65, 64, 62]
    # D Phrygian (two flats) with ^f: every F sharp in every octave, B and E flat
    assert pitches(head + "K:D Phr ^f\nFBef|\n") == [66, 70, 75, 78]
    # an accidental written in the bar carries over the key's modifier, to the bar line only
    assert pitches(head + "K:C ^f\n=F F f F|F4|\n") == [65, 65, 77, 65, 66]
    # exp: only the listed accidentals (not D's sharps); a comment after them stays a comment
    assert pitches(head + "K:D exp _b % explicit\nBcfB|\n") == [70, 72, 77, 70]
    # a K: line in the body changes them from there on
    assert pitches(head + "K:C ^f\nF4|\nK:C\nF4|\n") == [66, 65]
    # x keeps its time; H keeps its note; Z4 is four bars of rest (of the M: in force)
    assert notes("X:1\nM:2/4\nL:1/4\nK:C\nx c|d e|\n") == [(1.0, 72), (2.0, 74), (3.0, 76)]
    assert notes("X:1\nM:2/4\nL:1/4\nK:C\nc Hd|e f|\n") == [(0.0, 72), (1.0, 74), (2.0, 76), (3.0, 77)]
    assert notes("X:1\nM:3/4\nL:1/8\nK:C\nc6|Z2|d6|\n") == [(0.0, 72), (9.0, 74)]
    # what is not music stays as written: fields, strings, decorations, comments
    text = 'X:1\nT:Hex Fx\nM:4/4\nL:1/8\nK:G =f\nw:fix\n"F"!fermata!+trill+F2 [V:1] % xH f\n'
    assert _readable_by_music21(text) == 'X:1\nT:Hex Fx\nM:4/4\nL:1/8\nK:G\nw:fix\n"F"!fermata!+trill+=F2 [V:1] % xH f\n'
    # the old tempo forms count in the tune's own L:, not the file header's before it
    from multimodal_rwkv.music.abc import _unit_tempo

    assert "Q:1/8=120" in _unit_tempo("X:1\nL:1/4\nL:1/8\nQ:C=120\nM:4/4\nK:C\nCDEF|\n")
    tempos = [m.tempo for m in abc_to_midi("L:1/4\n\nX:1\nL:1/8\nQ:C=120\nM:4/4\nK:C\nCDEF GABc|\n")
              if m.type == "set_tempo"]
    assert [round(mido.tempo2bpm(t)) for t in tempos] == [60]
    # an accidental carries into and out of chords (music21 carried it between single notes only)
    assert pitches(head + "K:C\n[^FA] F G A|\n") == [66, 69, 66, 67, 69]
    assert pitches(head + "K:C\n^F [FA] G A|\n") == [66, 66, 69, 67, 69]
    assert pitches(head + "K:G\n[=FA] F G A|\n") == [65, 69, 65, 67, 69]
    # a note continuing a tie keeps the tied note's pitch: the modifier does not break the tie
    assert notes("X:1\nM:4/4\nL:1/4\nK:C exp ^f\n=F2 F2-|F2 F2|\n") == [(0.0, 65), (2.0, 65), (6.0, 66)]
    # ABC 1.x: accidentals do not carry, so the modifier applies to every bare note; octave mode
    assert pitches("%abc-1.6\n" + head + "K:C exp _b\n=B b B2|\n") == [71, 82, 70]
    assert pitches(head + "%%propagate-accidentals octave\nK:C exp _b\n=B b B2|\n") == [71, 82, 71]
    # an inline [M:] sets Z's bar; a tie after a rest is left out (music21 dropped the next note)
    assert notes("X:1\nM:4/4\nL:1/8\nK:C\nC8|[M:3/4]Z|C6|\n") == [(0.0, 60), (7.0, 60)]
    # ... but not an inline [L:] (music21 does not apply it): Z stays one 4/4 bar
    assert notes("X:1\nM:4/4\nL:1/4\nK:C\nC D E F|[L:1/8] Z|G|\n")[-1] == (8.0, 67)
    # octave propagation compares sounding octaves: c, is C
    assert pitches(head + "%%propagate-accidentals octave\nK:C ^C\n=C c, D E|\n") == [60, 60, 62, 64]
    assert pitches(head + "%%propagate-accidentals octave\nK:C\n^C c, z z|\n") == [61, 61]  # between notes too
    assert pitches("X:1\nM:4/4\nL:1/8\nK:C\nC4 z4-|D8|E8|\n") == [60, 62, 64]
    # middle= in K: is display only (music21 read "K:D middle=d" as D minor)
    assert pitches(head + "K:D middle=d\nDFcd|\n") == [62, 66, 73, 74]
    tune = head + "K:D\nD2 FA|d4|\n"  # nothing to rewrite: the text unchanged
    assert _readable_by_music21(tune) == tune


def test_cli_abc2midi_applies_the_file_header(tmp_path, capsys):
    pytest.importorskip("music21")
    from multimodal_rwkv.cli import main

    (tmp_path / "fh.abc").write_text(HEADER_FILE)
    for index, step in ((0, 12), (1, 6)):  # L:1/4 from the header: a quarter (12 steps); tune 2: its own 1/8
        out = tmp_path / f"t{index}.mid"
        assert main(["music", "abc2midi", str(tmp_path / "fh.abc"), "--out", str(out), "--index", str(index)]) == 0
        notes, _, _, _ = MidiTokenizer().extract_notes(out)
        assert [n.onset for n in sorted(notes)][:3] == [0, step, 2 * step]


def test_abc_corpus_tunes_carry_the_file_header(tmp_path, monkeypatch):
    """The ABC corpus path (what the byte-level model trains on): each tune with the header's fields."""
    from types import SimpleNamespace

    from multimodal_rwkv.music import corpora

    root = tmp_path / "m21"
    (root / "corpus" / "oneills1850").mkdir(parents=True)
    (root / "corpus" / "oneills1850" / "a.abc").write_text(HEADER_FILE)
    monkeypatch.setattr(corpora, "_music21", lambda: SimpleNamespace(__file__=str(root / "__init__.py")))
    tunes = [t for _, t in corpora.abc_corpus_tunes("oneill-abc")]
    assert [t.split("\n")[:5] for t in tunes] == [["%abc-2.1", "X:1", "T:t", "L:1/4", "M:3/4"],
                                                  ["%abc-2.1", "X:2", "T:u", "L:1/4", "M:3/4"]]
    rep = prepare(tmp_path / "o", corpus="oneill-abc", valid_permille=0, test_permille=0)
    docs = [AbcTokenizer().decode(d) for d in split_documents(load_tokens(tmp_path / "o" / "train"))]
    assert sorted(docs) == sorted(split_tunes(HEADER_FILE)) and rep.counts["train"]["pieces"] == 2


def test_generate_abc_moves_a_prompt_file_header_into_the_tune(tmp_path, monkeypatch, capsys):
    import multimodal_rwkv.music.generate as gen
    from multimodal_rwkv.cli import main

    real_generate_abc = gen.generate_abc
    prompts = []
    monkeypatch.setattr(gen, "load_music_model", lambda path: (None, AbcTokenizer()))
    monkeypatch.setattr(gen, "generate_abc", lambda **kw: prompts.append(kw["prompt"]) or kw["prompt"] + "C|\n")
    (tmp_path / "p.abc").write_text("L:1/4\n\nX:1\nT:p\n")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t.abc"), "--prompt",
                 str(tmp_path / "p.abc")]) == 0
    assert prompts == ["X:1\nT:p\nL:1/4\n"]
    # the API does the same (the model sees the normalised prompt, which starts the returned text)
    seen = []
    monkeypatch.setattr(gen, "sample_tokens", lambda model, ids, *a, **kw: seen.append(ids) or [0])
    assert real_generate_abc(prompt="L:1/4\n\nX:1\n", model=object()) == "X:1\nL:1/4\n"
    assert AbcTokenizer().decode(seen[0]) == "X:1\nL:1/4\n"


def _song(path, pitches, title=None):
    """A one-track MIDI file of quarter notes (with a track name if ``title``)."""
    mid = mido.MidiFile(ticks_per_beat=480)
    tr = mido.MidiTrack()
    if title is not None:
        tr.append(mido.MetaMessage("track_name", name=title))
    for p in pitches:
        tr += [mido.Message("note_on", note=p, velocity=80, time=0), mido.Message("note_off", note=p, time=480)]
    mid.tracks.append(tr)
    mid.save(path)


def test_prepare_keeps_the_same_music_once_whatever_else_differs(tmp_path):
    """Two files of one piece that differ only in a text event hashed apart: both were kept, and
    could sit in train and in valid/test (a held-out leak)."""
    src = tmp_path / "midi"
    src.mkdir()
    for k in range(12):  # 12 pieces, each saved twice under different titles
        pitches = [60 + (k * 7 + j * 5) % 24 for j in range(8)]
        _song(src / f"a{k:02d}.mid", pitches, f"take one {k}")
        _song(src / f"b{k:02d}.mid", pitches, f"take two {k}")
    rep = prepare(tmp_path / "out", midi_dir=src, valid_permille=300, test_permille=300)
    assert rep.duplicates == 12 and sum(c["pieces"] for c in rep.counts.values()) == 12
    seen = {}
    for split in ("train", "valid", "test"):
        for doc in split_documents(load_tokens(tmp_path / "out" / split)):
            assert tuple(doc) not in seen, (split, seen.get(tuple(doc)))
            seen[tuple(doc)] = split


def test_prepare_meta_names_files_by_their_path_under_the_folder(tmp_path):
    src = tmp_path / "midi"
    for sub, pitches in (("a", [60, 62, 64]), ("b/c", [67, 65, 64])):
        (src / sub).mkdir(parents=True)
        _song(src / sub / "x.mid", pitches)
    prepare(tmp_path / "out", midi_dir=src, valid_permille=0, test_permille=0)
    names = [f["name"] for f in json.loads((tmp_path / "out" / "meta.json").read_text())["files"]]
    assert sorted(names) == ["a/x.mid", "b/c/x.mid"]


def test_prepare_lists_every_unreadable_file_even_when_their_bytes_are_the_same(tmp_path):
    """Five empty .mid files were one failure and four "duplicates": only the first was reported."""
    src = tmp_path / "midi"
    src.mkdir()
    _song(src / "good.mid", [60, 62, 64])
    for k in range(3):
        (src / f"empty_{k}.mid").write_bytes(b"")
    report = prepare(tmp_path / "out", midi_dir=src, valid_permille=0, test_permille=0)
    failed = (tmp_path / "out" / "failed.txt").read_text().splitlines()
    assert report.duplicates == 0 and len(failed) == 3
    assert [ln.split("\t")[0].rsplit("/", 1)[-1] for ln in failed] == ["empty_0.mid", "empty_1.mid", "empty_2.mid"]
    assert failed[1].endswith(f"empty file (the same bytes as {src / 'empty_0.mid'})")


def test_prepare_puts_transpositions_of_a_piece_in_one_split(tmp_path):
    """Train's transposed copies held the exact tokens of a valid/test piece that was a
    transposition of a training piece."""
    src = tmp_path / "midi"
    src.mkdir()
    for k in range(16):
        rng = np.random.default_rng(k)
        pitches = [int(x) for x in rng.integers(55, 70, 10)]
        _song(src / f"a{k:02d}.mid", pitches)
        _song(src / f"b{k:02d}.mid", [p + 2 for p in pitches])  # the same piece two semitones up
    prepare(tmp_path / "out", midi_dir=src, transpose=2, valid_permille=300, test_permille=300)
    split = {f["name"]: f["split"] for f in json.loads((tmp_path / "out" / "meta.json").read_text())["files"]}
    assert all(split[f"a{k:02d}.mid"] == split[f"b{k:02d}.mid"] for k in range(16))
    assert len(set(split.values())) > 1
    train = {tuple(d) for d in split_documents(load_tokens(tmp_path / "out" / "train"))}
    for s in ("valid", "test"):
        assert not [d for d in split_documents(load_tokens(tmp_path / "out" / s)) if tuple(d) in train]


def test_transposed_copies_never_repeat_a_piece(tmp_path):
    """--transpose wrote a drum-only piece 2N+1 times (every shift is the piece itself), and a
    file that is another's transposition appeared twice in train (as itself and as a copy)."""
    def drums(path, k):
        mid = mido.MidiFile(ticks_per_beat=480)
        tr = mido.MidiTrack()
        for j in range(8):
            n = 36 + (k + j) % 10
            tr += [mido.Message("note_on", channel=9, note=n, velocity=90, time=0),
                   mido.Message("note_off", channel=9, note=n, time=240)]
        mid.tracks.append(tr)
        mid.save(path)

    src = tmp_path / "midi"
    src.mkdir()
    for k in range(6):
        drums(src / f"d{k}.mid", k)
        rng = np.random.default_rng(k)
        pitches = [int(x) for x in rng.integers(55, 70, 10)]
        _song(src / f"a{k}.mid", pitches)
        _song(src / f"b{k}.mid", [p + 2 for p in pitches])
    prepare(tmp_path / "out", midi_dir=src, transpose=3, valid_permille=0, test_permille=0)
    docs = [tuple(d) for d in split_documents(load_tokens(tmp_path / "out" / "train"))]
    assert len(docs) == len(set(docs))
    assert len(docs) == 6 + 6 * 9  # each drum piece once; each melody and its +2 file: shifts -3..+5 once


def test_a_tune_ends_at_its_first_empty_line():
    """ABC 2.1 s2.2: text after a tune's empty line is free text. It used to be cut from X: to the
    next X:, so abc2midi played the letters of a sentence between two tunes as notes."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music.abc import abc_to_midi

    text = ("X:1\nT:First\nM:4/4\nL:1/4\nK:C\nCDEF|]\n\nThese are some free text notes about a ballad\n"
            "  \nX:2\nT:Second\nK:G\nGABc|]\n\n:1646\n")
    tunes = split_tunes(text)
    assert tunes == ["X:1\nT:First\nM:4/4\nL:1/4\nK:C\nCDEF|]\n", "X:2\nT:Second\nK:G\nGABc|]\n"]
    body = "\n" + tunes[0].split("\n", 1)[1] + "\nfree text: Abc def|\n"  # a tune without X:, then free text
    for given in (tunes[0], text, body):
        notes = MidiTokenizer().extract_notes(abc_to_midi(given))[0]
        assert [n.pitch for n in notes] == [60, 62, 64, 65]


def test_a_tie_between_different_pitches_keeps_both_notes():
    """'G3-A' (O'Neill's first tune): a tie joins notes of one pitch only (ABC 2.1 s4.11). Merged,
    the A was lost, on music21's writer and on the fallback path (a bar too long)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music.abc import abc_to_midi

    def notes(t):
        return [(n.onset, n.duration, n.pitch) for n in MidiTokenizer().extract_notes(abc_to_midi(t))[0]]

    assert notes("X:1\nM:2/4\nL:1/16\nK:Gm\nG3-A B4 | c8 |]\n") == [(0, 9, 67), (9, 3, 69), (12, 12, 70),
                                                                   (24, 24, 72)]
    assert notes("X:1\nM:2/4\nL:1/16\nK:Gm\nG3-A B4 c2 | c8 |]\n")[:2] == [(0, 9, 67), (9, 3, 69)]
    # ties of one pitch still join, across a bar line and in a chain that ends on another pitch
    assert notes("X:1\nM:4/4\nL:1/8\nK:C\nG4-|G4 c4|]\n") == [(0, 48, 67), (48, 24, 72)]
    assert notes("X:1\nM:4/4\nL:1/8\nK:C\nG2-G2-A2 c2|]\n") == [(0, 24, 67), (24, 12, 69), (36, 12, 72)]
    # the tied note keeps its accidental across the bar (music21 gives it the key's: F# in G), and
    # within the bar; a grace note between the two does not break the tie
    assert notes("X:1\nL:1/4\nM:4/4\nK:G\nD2=F2-|F2D2|\n") == [(0, 24, 62), (24, 48, 65), (72, 24, 62)]
    assert notes("%abc-2.1\nX:1\nL:1/4\nM:4/4\nK:C\nD2_B2-|B2D2|\n")[1] == (24, 48, 70)
    assert notes("X:1\nL:1/4\nM:4/4\nK:C\n^C2-C2|\n") == [(0, 48, 61)]
    assert notes("X:1\nL:1/4\nM:4/4\nK:C\nC2-{D}C2|\n")[0] == (0, 48, 60)
    # an explicit accidental on the second note makes it another pitch: both notes are kept
    assert [n[2] for n in notes("X:1\nL:1/4\nK:C\n^F2-=F2|]\n")] == [66, 65]
    assert [n[2] for n in notes("X:1\nL:1/4\nK:G\nF-|=F A|]\n")] == [66, 65, 69]
    assert notes("X:1\nL:1/4\nK:C\n^E2-F2|]\n") == [(0, 48, 65)]  # enharmonic: one pitch, one note
    # several such ties: a later tie's end of the first note's pitch is not taken for its own (the
    # first B was held over the A, which was lost)
    assert notes("X:1\nM:3/4\nL:1/4\nK:D\nB2-A|c2-B|]\n") == [(0, 24, 71), (24, 12, 69), (36, 24, 73),
                                                               (60, 12, 71)]


def test_abc_corpus_files_are_read_as_utf8(tmp_path, monkeypatch):
    """The Essen files with accents are UTF-8; read as Latin-1 their titles turned into mojibake
    ('Bhéasach' -> 'BhÃ©asach') in the bytes the model trains on. A Latin-1 file still reads."""
    from types import SimpleNamespace

    from multimodal_rwkv.music import corpora

    root = tmp_path / "m21"
    folder = root / "corpus" / "oneills1850"
    folder.mkdir(parents=True)
    (folder / "a.abc").write_bytes("X:1\nT:Bhéasach\nK:C\nC|\n".encode("utf-8"))
    (folder / "b.abc").write_bytes("X:1\nT:Señor\nK:C\nC|\n".encode("latin-1"))
    monkeypatch.setattr(corpora, "_music21", lambda: SimpleNamespace(__file__=str(root / "__init__.py")))
    tunes = [t for _, t in corpora.abc_corpus_tunes("oneill-abc")]
    assert [t.split("\n")[1] for t in tunes] == ["T:Bhéasach", "T:Señor"]


def test_abc_older_tempo_form_counts_in_unit_note_lengths():
    """Q:C=120 / Q:C2=120 (the unit note length L: times a number): music21 read C as a quarter of
    a whole note whatever L: was, a tempo 4-8x too fast (480 BPM for Q:C=120 at L:1/8)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music import abc_to_midi

    def bpm(q, unit):
        mid = abc_to_midi(f"X:1\nL:{unit}\n{q}\nK:C\nCDEF|\n")
        return [round(mido.tempo2bpm(m.tempo), 3) for t in mid.tracks for m in t if m.type == "set_tempo"]

    assert bpm("Q:C=120", "1/8") == [60] and bpm("Q:C2=120", "1/8") == [120]
    assert bpm("Q:C=120", "1/4") == [120] and bpm("Q:C/2=120", "1/4") == [60]
    assert bpm("Q:1/4=100", "1/8") == [100]  # the usual form as before
    assert bpm("Q:120", "1/8") == [60]  # ABC 1.6: a bare number counts unit notes too
    assert bpm("Q:L2=120", "1/8") == [120] and bpm('Q:"Allegro" C=120', "1/8") == [60]
    assert bpm("Q:C3=40 % a comment", "1/8") == [60] and bpm('Q:"Lively" 1/4=90', "1/8") == [90]
    assert bpm("Q:Allegro", "1/8")  # a tempo word without quotes: music21 could not read it at all


def _constant_abc_model(path, byte):
    """A tiny ABC model whose logits favour one byte above all others (by 1.0)."""
    import torch

    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

    m = RWKVForCausalLM(RWKVConfig(vocab_size=257, n_embd=32, n_layer=1, head_size=16))
    with torch.no_grad():
        m.rwkv.ln_out.weight.zero_()
        m.rwkv.ln_out.bias.fill_(1.0)
        m.head.weight.zero_()
        m.head.weight[byte + 1].fill_(1.0 / 32)
    m.save_pretrained(path)
    AbcTokenizer().save_pretrained(path)
    return m


def test_generate_abc_continues_the_prompts_last_tune(tmp_path, monkeypatch):
    """A prompt ending in a blank line (or a finished tune then another) had the continuation
    written after the tune's end: the MIDI held the prompt's notes alone. The last tune is
    continued, earlier ones are context (separated by 0, as in training), and the model never
    writes control bytes (the tool's own readers refuse such a file)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music import abc_to_midi
    from multimodal_rwkv.music import generate as gen

    _constant_abc_model(tmp_path / "c", ord("C"))
    text = gen.generate_abc(tmp_path / "c", "X:1\nL:1/4\nK:C\nD|\n\n", max_bytes=4, temperature=0.01)
    assert text == "X:1\nL:1/4\nK:C\nD|\nCCCC"
    notes = [m.note for t in abc_to_midi(text).tracks for m in t if m.type == "note_on" and m.velocity]
    assert notes == [62, 60, 60, 60, 60]
    seen = []
    real = gen.sample_tokens
    monkeypatch.setattr(gen, "sample_tokens", lambda model, ids, *a, **k: seen.append(ids) or real(model, ids, *a, **k))
    text = gen.generate_abc(tmp_path / "c", "X:1\nL:1/4\nK:C\nD|\n\nX:2\nL:1/4\nK:C\nE|", max_bytes=2,
                            temperature=0.01)
    assert text == "X:2\nL:1/4\nK:C\nE|CC"
    tok = AbcTokenizer()
    assert seen[-1] == [0] + tok.encode("X:1\nL:1/4\nK:C\nD|\n") + [0] + tok.encode("X:2\nL:1/4\nK:C\nE|")
    # free text after the tune's empty line (ABC 2.1, 2.2) is not part of it; CRLF lines as LF
    text = gen.generate_abc(tmp_path / "c", "X:1\r\nL:1/4\r\nK:C\r\nD|\r\n\r\nCollected in 1903.\r\n", max_bytes=2,
                            temperature=0.01)
    assert text == "X:1\nL:1/4\nK:C\nD|\nCC"
    text = gen.generate_abc(tmp_path / "c", "%abc-2.1\nX:1\nL:1/4\nK:C\nD|", max_bytes=2, temperature=0.01)
    assert text == "%abc-2.1\nX:1\nL:1/4\nK:C\nD|CC"  # the version line stays with its tune
    _constant_abc_model(tmp_path / "esc", 0x1B)  # ESC favoured: it must never come out
    text = gen.generate_abc(tmp_path / "esc", "X:1\n", max_bytes=200, temperature=1.0, seed=1)
    from multimodal_rwkv.music.abc import CONTROL_BYTES

    assert len(text) > 50 and not any(b in CONTROL_BYTES for b in text.encode())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_music_generation_refuses_non_finite_logits(tmp_path, sign, capsys):
    """music generate had no check of the logits: an fp16 model that overflowed wrote a piece of
    repaired garbage with exit 0 (greedy picked id 0; sampling was a torch traceback). A row that is
    -inf throughout is no ban either: it is an overflow too."""
    import torch

    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.errors import NumericsError
    from multimodal_rwkv.music import generate as gen

    m = _constant_abc_model(tmp_path / "c", ord("C"))
    with torch.no_grad():  # ln_out gives 1 in each of 32 channels: the logits are +-32 * 1e4, beyond fp16
        m.head.weight.fill_(sign * 1e4)
    m.half().save_pretrained(tmp_path / "c")
    loaded = RWKVForCausalLM.from_pretrained(tmp_path / "c")
    assert loaded.dtype == torch.float16
    for temperature in (0.0, 1.0):
        with pytest.raises(NumericsError, match="logits are NaN or infinite at new token 1 .*load it as bf16"):
            gen.sample_tokens(loaded, [0], 4, temperature=temperature, seed=0)
        with pytest.raises(NumericsError, match="logits are NaN or infinite"):
            loaded.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=temperature > 0)
    with torch.no_grad():  # music generate loads as fp32: logits beyond fp32's range
        m.float().head.weight.fill_(sign * 1e37)
        m.rwkv.ln_out.bias.fill_(100.0)
    m.save_pretrained(tmp_path / "c")
    for temperature in (0.0, 1.0):
        out = tmp_path / "g.abc"
        assert main(["music", "generate", "--model", str(tmp_path / "c"), "--out", str(out), "--max-tokens", "4",
                     "--temperature", str(temperature)]) == 2
        err = capsys.readouterr().err
        assert "logits are NaN or infinite" in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_abc_to_midi_joins_tied_notes_and_chords_split_at_a_bar(monkeypatch):
    """A chord running past the end of an overfull bar was cut at the bar's nominal end and struck
    again where the next bar begins (a gap, and a second note-on of a pitch still sounding); a
    single note there was joined. Ties written in the ABC join notes as before."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music import abc_to_midi

    def timed(text):  # (onset, length, pitch) in quarter notes; a note-on of a sounding pitch fails
        mid, t, on, out = abc_to_midi(text), 0, {}, []
        for m in mido.merge_tracks(mid.tracks):
            t += m.time
            if m.type == "note_on" and m.velocity:
                assert m.note not in on, f"pitch {m.note} struck again at {t} while sounding"
                on[m.note] = t
            elif m.type in ("note_off", "note_on"):
                out.append((on[m.note] / mid.ticks_per_beat, (t - on.pop(m.note)) / mid.ticks_per_beat, m.note))
        return sorted(out)

    for direct in (False, True):  # music21's MIDI writer, and the direct one (used where music21's fails)
        if direct:
            from music21 import stream

            monkeypatch.setattr(stream.Score, "write", lambda *a, **k: 1 / 0)
        _check_ties(timed)


def _check_ties(timed):
    head = "X:1\nT:t\nM:4/4\nL:1/8\nK:A\n"
    chord = timed(head + "c3 e3 a/2 [BF]3 | F4 |\n")  # the first bar holds 9 1/2 eighths
    assert chord == [(0, 1.5, 73), (1.5, 1.5, 76), (3.0, 0.25, 81), (3.25, 1.5, 66), (3.25, 1.5, 71),
                     (4.75, 2.0, 66)]
    single = timed(head + "c3 e3 a/2 B3 | F4 |\n")
    assert single == [(0, 1.5, 73), (1.5, 1.5, 76), (3.0, 0.25, 81), (3.25, 1.5, 71), (4.75, 2.0, 66)]
    tied = timed(head + "A2-A2 B4- | B2 c2 c4 |\n")  # ties written, one across the bar line
    assert tied == [(0, 2.0, 69), (2.0, 3.0, 71), (5.0, 1.0, 73), (6.0, 2.0, 73)]
    # a chord past an overfull bar whose next bar has several notes (music21 lists its second part
    # after them); a natural tied across the bar line stays natural (music21 spells its second part
    # from the key, F sharp)
    assert timed("X:1\nM:4/4\nL:1/4\nK:C\nC D E [CEG]2|c2 d2|\n") == [
        (0, 1.0, 60), (1.0, 1.0, 62), (2.0, 1.0, 64), (3.0, 2.0, 60), (3.0, 2.0, 64), (3.0, 2.0, 67),
        (5.0, 2.0, 72), (7.0, 2.0, 74)]
    assert timed("X:1\nM:3/4\nL:1/8\nK:G\nG6 G2| =F6- | F2z2 |\n") == [(0, 3.0, 67), (3.0, 1.0, 67), (4.0, 4.0, 65)]
    assert timed("X:1\nM:3/4\nL:1/8\nK:G\nG6| =F6- | F2z4 |\n") == [(0, 3.0, 67), (3.0, 4.0, 65)]
