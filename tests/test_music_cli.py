"""``mmrwkv music`` outputs and options from a black-box review: a command never replaces its own
input or a file it was not told to write, checks every output before writing any, writes nothing
when it fails, and refuses options that contradict each other. The model is faked (no torch
forward pass): these tests are about files."""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

import mido
import numpy as np
import pytest

from multimodal_rwkv.cli import main
from multimodal_rwkv.errors import DataError
from multimodal_rwkv.music import AbcTokenizer, MidiTokenizer
from multimodal_rwkv.music.corpora import load_tokens, prepare

TUNE = "X:1\nT:t\nM:4/4\nL:1/8\nK:D\nDEFG ABcd|d2c2 B2A2|\n"


def _midi(path, note=60):
    mid = mido.MidiFile()
    mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=note, velocity=80),
                                      mido.Message("note_off", note=note, time=480)]))
    mid.save(str(path))
    return path


def _one_error_line(capsys, command: str) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"mmrwkv music {command}: error: "), err
    return err[0]


def _snapshot(folder):
    """{relative path: bytes} of every file under ``folder`` (folders as None)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


@pytest.fixture
def fake_midi_model(monkeypatch):
    """``load_music_model`` gives a MIDI tokenizer and no model; ``generate_music`` a two-note piece."""
    import multimodal_rwkv.music.generate as gen

    tok = MidiTokenizer()

    def generate_music(model, tok, prompt=None, **kw):
        import io

        buf = io.BytesIO()
        m = mido.MidiFile()
        m.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=80),
                                        mido.Message("note_off", note=60, time=480)]))
        m.save(file=buf)
        ids = tok.encode(buf.getvalue())
        notes, tempos, st = tok.decode_notes(ids)
        return gen.MusicGeneration(ids=ids, prompt_len=0, midi=tok.notes_to_midi(notes, tempos), notes=notes,
                                   decode_stats=st, seconds=1.0)

    monkeypatch.setattr(gen, "load_music_model", lambda path: (None, tok))
    monkeypatch.setattr(gen, "generate_music", generate_music)


@pytest.fixture
def fake_abc_model(monkeypatch):
    """``load_music_model`` gives the ABC tokenizer; ``generate_abc`` returns ``tune[0]`` (settable)."""
    import multimodal_rwkv.music.generate as gen

    tune = [TUNE]
    monkeypatch.setattr(gen, "load_music_model", lambda path: (None, AbcTokenizer()))
    monkeypatch.setattr(gen, "generate_abc", lambda **kw: tune[0])
    return tune


# ----------------------------------------------------------------------------- 1: an empty .npy
def test_eval_of_an_empty_npy_is_a_one_line_error(tmp_path, capsys):
    """An empty .npy raised numpy's EOFError: a traceback and exit 1."""
    from multimodal_rwkv.music import BACH_MODEL_DIR

    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(DataError, match="e.npy: empty file"):
        load_tokens(tmp_path / "e.npy")
    assert main(["music", "eval", "--model", str(BACH_MODEL_DIR), "--data", str(tmp_path / "e.npy")]) == 2
    assert f"{tmp_path / 'e.npy'}: empty file" in _one_error_line(capsys, "eval")
    (tmp_path / "shards").mkdir()  # an empty shard in a folder of shards too
    np.save(tmp_path / "shards" / "a.npy", np.array([0, 5, 0], np.uint16))
    (tmp_path / "shards" / "b.npy").write_bytes(b"")
    with pytest.raises(DataError, match="b.npy: empty file"):
        load_tokens(tmp_path / "shards")


# ----------------------------------------------------------------------------- 2: output = input
def test_roll_and_abc2midi_refuse_to_write_over_their_input(tmp_path, capsys):
    """roll song.mid --out song.mid turned the MIDI file into a PNG; abc2midi t.abc --out t.abc
    replaced the ABC source by MIDI. Same file under another spelling or through a link too."""
    song = _midi(tmp_path / "song.mid")
    before = song.read_bytes()
    (tmp_path / "link.png").symlink_to(song)
    os.link(song, tmp_path / "hard.png")
    for out in (song, tmp_path / "x" / ".." / "song.mid", tmp_path / "link.png", tmp_path / "hard.png"):
        assert main(["music", "roll", str(song), "--out", str(out)]) == 2
        assert "is the command's input" in _one_error_line(capsys, "roll")
    assert song.read_bytes() == before and not (tmp_path / "x").exists()
    song2 = tmp_path / "song2.png"  # a MIDI file named .png: refused as the input, not as a suffix
    song2.write_bytes(before)
    assert main(["music", "roll", str(song2), "--out", str(song2)]) == 2
    assert "is the command's input" in _one_error_line(capsys, "roll") and song2.read_bytes() == before

    (tmp_path / "t.abc").write_text(TUNE)
    for out in ("t.abc", "./t.abc", "sub/../t.abc"):
        assert main(["music", "abc2midi", str(tmp_path / "t.abc"), "--out", str(tmp_path / out)]) == 2
        assert "is the command's input" in _one_error_line(capsys, "abc2midi")
    assert (tmp_path / "t.abc").read_text() == TUNE


def test_tokenize_refuses_to_write_over_its_input(tmp_path, capsys):
    """A file named on the command line is tokenized whatever its name: --out must not be it."""
    src = tmp_path / "piece.npy"  # a MIDI file under a .npy name
    src.write_bytes(_midi(tmp_path / "a.mid").read_bytes())
    before = src.read_bytes()
    assert main(["music", "tokenize", str(src), "--out", str(src)]) == 2
    assert "is the command's input" in _one_error_line(capsys, "tokenize") and src.read_bytes() == before
    assert main(["music", "tokenize", str(tmp_path / "a.mid"), "--out", str(tmp_path / "o" / "t.npy")]) == 0
    assert load_tokens(tmp_path / "o" / "t.npy")[0] == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["t.npy"]  # no temporary file left
    # another name is refused (np.save's rule made a folder's name into NAME.npy beside it, a.mid
    # into a.mid.npy, - into -.npy)
    (tmp_path / "tokdir").mkdir()
    for out in ("tokdir", "a.mid", "-", "o/t"):
        assert main(["music", "tokenize", str(tmp_path / "a.mid"), "--out", str(tmp_path / out)]) == 2
        assert "give a name ending in .npy" in _one_error_line(capsys, "tokenize")
    assert sorted(os.listdir(tmp_path / "o")) == ["t.npy"] and not (tmp_path / "tokdir.npy").exists()


def test_generate_refuses_outputs_that_are_its_inputs(tmp_path, capsys, fake_midi_model):
    prompt = _midi(tmp_path / "p.mid")
    before = prompt.read_bytes()
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "." / "p.mid"), "--prompt",
                 str(prompt)]) == 2
    assert "is the --prompt file" in _one_error_line(capsys, "generate") and prompt.read_bytes() == before
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    import multimodal_rwkv.music.generate as gen

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "load_music_model", lambda path: (None, MidiTokenizer()))
        (model / "notes.mid").write_bytes(b"mine")
        assert main(["music", "generate", "--model", str(model), "--out", str(model / "notes.mid")]) == 2
        assert f"is a file of {model} (the --model)" in _one_error_line(capsys, "generate")
        assert main(["music", "generate", "--model", str(model), "--out", str(tmp_path / "x.txt")]) == 2
        assert "is a MIDI model; its output is a MIDI file" in _one_error_line(capsys, "generate")
    assert (model / "config.json").read_text() == "{}" and (model / "notes.mid").read_bytes() == b"mine"


# ----------------------------------------------------------------------------- 3, 4: outputs checked first
def test_generate_checks_every_output_before_writing_any(tmp_path, capsys, fake_midi_model):
    """--png naming a folder failed after new.mid was written; --out X --png X ended as a PNG."""
    (tmp_path / "d").mkdir()
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "new.mid"), "--png",
                 str(tmp_path / "d")]) == 2
    assert "is a folder" in _one_error_line(capsys, "generate") and not (tmp_path / "new.mid").exists()
    # a --png whose folder cannot be made (a file is in the way)
    (tmp_path / "f").write_text("x")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "new.mid"), "--png",
                 str(tmp_path / "f" / "r.png")]) == 2
    assert "is not a folder" in _one_error_line(capsys, "generate") and not (tmp_path / "new.mid").exists()
    for png in ("same.mid", "./same.mid"):
        assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "same.mid"), "--png",
                     str(tmp_path / png)]) == 2
        assert "name the same file" in _one_error_line(capsys, "generate")
    assert not (tmp_path / "same.mid").exists()
    # all good: both written, nothing else (no temporary files), in a folder made for them
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "g" / "a.mid"), "--png",
                 str(tmp_path / "g" / "a.png")]) == 0
    assert sorted(os.listdir(tmp_path / "g")) == ["a.mid", "a.png"]
    assert mido.MidiFile(str(tmp_path / "g" / "a.mid")).tracks
    assert (tmp_path / "g" / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_leaves_no_output(tmp_path):
    from multimodal_rwkv.fileio import write_outputs

    def boom(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        write_outputs([(tmp_path / "n" / "a.txt", lambda tmp: tmp.write_text("a")), (tmp_path / "n" / "b.txt", boom)])
    assert os.listdir(tmp_path) == []  # no a.txt, no temporary file, not even the folder made for them
    assert e.value.filename == str(tmp_path / "n" / "b.txt")  # the error names the output (it said only why)


def test_temporary_files_of_killed_writers_are_removed_and_half_prepares_not_read(tmp_path):
    """A writer killed with SIGKILL left .tmp-NAME-PID beside its output for good; a prepare killed
    while moving new shards in left .new-shard files that both token readers took as shards (the
    old and the new dataset mixed), and its stage folder stayed."""
    import subprocess
    import sys

    from multimodal_rwkv.fileio import temp_name, write_outputs
    from multimodal_rwkv.training.data import read_tokens

    out = tmp_path / "answers.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = temp_name(out, dead.pid), temp_name(out, os.getppid())
    stale.write_text("half")
    live.write_text("another writer's, still running")
    write_outputs([(out, lambda tmp: tmp.write_text("new"))])
    assert out.read_text() == "new" and not stale.exists() and live.exists()
    # a long name's temp is hashed: found too; a dead pid's temp that a writer holds locked (a writer
    # in another PID namespace, where its pid means nothing here) is kept
    import fcntl

    long_out = tmp_path / ("n" * 240 + ".txt")
    stale = temp_name(long_out, dead.pid)
    stale.write_text("half")
    held = temp_name(out, dead.pid)
    held.write_text("being written")
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        write_outputs([(long_out, lambda tmp: tmp.write_text("new")), (out, lambda tmp: tmp.write_text("again"))])
    finally:
        os.close(fd)
    assert not stale.exists() and held.exists() and out.read_text() == "again"
    # a split folder with a .new- copy beside the shard: the shard alone is read
    split = tmp_path / "ds" / "train"
    split.mkdir(parents=True)
    np.save(split / "shard_00000.npy", np.array([0, 5, 6, 0], dtype=np.uint16))
    np.save(split / ".new-shard_00000.npy", np.array([0, 7, 7, 7, 0], dtype=np.uint16))
    assert load_tokens(split).tolist() == [0, 5, 6, 0]
    assert read_tokens(split, tmp_path / "cache", "fail").ids.tolist() == [0, 5, 6, 0]


# ----------------------------------------------------------------------------- 5: ABC side output
def test_abc_generate_never_replaces_an_abc_file_it_was_not_told_to_write(tmp_path, capsys, fake_abc_model):
    """--out tune.mid with an ABC model wrote the tune text over the user's tune.abc (and failed)."""
    (tmp_path / "tune.abc").write_text("notes\n")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "tune.mid")]) == 2
    line = _one_error_line(capsys, "generate")
    assert f"{tmp_path / 'tune.abc'}: exists" in line
    assert (tmp_path / "tune.abc").read_text() == "notes\n" and not (tmp_path / "tune.mid").exists()
    # a link named like the side output counts as existing too (even a broken one)
    (tmp_path / "l.abc").symlink_to(tmp_path / "gone.abc")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "l.mid")]) == 2
    assert "exists" in _one_error_line(capsys, "generate") and not (tmp_path / "gone.abc").exists()
    # the prompt is never the side output either
    (tmp_path / "p.abc").write_text("X:1\nT:p\n")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "p.mid"), "--prompt",
                 str(tmp_path / "p.abc")]) == 2
    assert (tmp_path / "p.abc").read_text() == "X:1\nT:p\n"
    capsys.readouterr()
    assert "NAME.abc, which must not exist yet" in _help(capsys, ["music", "generate"])
    # not even beside a NAME.mid (abc2midi makes that pair from the user's own tune)
    (tmp_path / "mine.abc").write_text("X:1\nK:C\nC|\n")
    (tmp_path / "mine.mid").write_bytes(b"MThd")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "mine.mid")]) == 2
    assert (tmp_path / "mine.abc").read_text() == "X:1\nK:C\nC|\n"


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_abc_generate_that_fails_leaves_no_output(tmp_path, capsys, fake_abc_model):
    """A tune music21 cannot read: --out t2.abc --png t2.png exited 2 and left t2.abc; --out X.mid
    left X.abc."""
    pytest.importorskip("music21")
    fake_abc_model[0] = "X:1\n9\x00p(?<hKA"
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t2.abc"), "--png",
                 str(tmp_path / "t2.png")]) == 2
    assert "the generated tune does not convert to MIDI" in _one_error_line(capsys, "generate")
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t3.mid")]) == 2
    line = _one_error_line(capsys, "generate")
    assert line.startswith(f"mmrwkv music generate: error: {tmp_path / 't3.mid'}: the generated tune")
    assert os.listdir(tmp_path) == []
    fake_abc_model[0] = TUNE  # a good tune: the text and the MIDI, both
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t3.mid")]) == 0
    assert (tmp_path / "t3.abc").read_text() == TUNE and mido.MidiFile(str(tmp_path / "t3.mid")).tracks



# ----------------------------------------------------------------------------- 6: ABC prompts are text
def test_abc_prompt_must_be_text_and_not_empty(tmp_path, capsys, fake_abc_model):
    """A PNG was used as the tune start (exit 0); an empty prompt was accepted for ABC, refused for MIDI."""
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "pic.png")
    (tmp_path / "empty.abc").write_bytes(b"")
    (tmp_path / "blank.abc").write_text(" \n\n")
    (tmp_path / "song.abc").write_bytes(_midi(tmp_path / "song.mid").read_bytes())
    for name, why in (("pic.png", "not a text file"), ("empty.abc", "empty file"),
                      ("blank.abc", "holds only white space"), ("song.abc", "not a text file")):
        assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t.abc"), "--prompt",
                     str(tmp_path / name)]) == 2
        line = _one_error_line(capsys, "generate")
        assert f"{tmp_path / name}: {why}" in line
        assert not (tmp_path / "t.abc").exists()
    # abc2midi reads ABC the same way
    assert main(["music", "abc2midi", str(tmp_path / "pic.png"), "--out", str(tmp_path / "x.mid")]) == 2
    assert "not a text file" in _one_error_line(capsys, "abc2midi") and not (tmp_path / "x.mid").exists()
    # text in another encoding is still text (latin-1 titles)
    (tmp_path / "latin.abc").write_bytes("X:1\nT:Caf\xe9\n".encode("latin-1"))
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t.abc"), "--prompt",
                 str(tmp_path / "latin.abc")]) == 0


# ----------------------------------------------------------------------------- 7: conflicting options
def test_conflicting_options_are_refused(tmp_path, capsys):
    for argv in (["music", "eval", "--model", "M", "--metrics", "F", "--data", "d"],
                 ["music", "eval", "--data", "d"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "not allowed with argument --model" in capsys.readouterr().err

    d = tmp_path / "m"
    d.mkdir()
    _midi(d / "a.mid")
    out = tmp_path / "o"
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(out), "--valid-permille", "600",
                 "--test-permille", "600"]) == 2
    assert "leaves no train split" in _one_error_line(capsys, "prepare")
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(out), "--valid-permille", "500",
                 "--test-permille", "500"]) == 2
    assert "leaves no train split" in _one_error_line(capsys, "prepare")
    with pytest.raises(DataError, match="leaves no train split"):
        prepare(out, midi_dir=d, valid_permille=0, test_permille=1000)
    MidiTokenizer().save_pretrained(tmp_path)
    assert main(["music", "prepare", "--corpus", "oneill-abc", "--out", str(out), "--tokenizer-config",
                 str(tmp_path / "midi_tokenizer.json")]) == 2
    assert "a MIDI tokenizer config does not apply" in _one_error_line(capsys, "prepare")
    with pytest.raises(DataError, match="a MIDI tokenizer config does not apply"):
        prepare(out, corpus="essen-abc", tokenizer_config=MidiTokenizer().config)
    assert not out.exists()


# ----------------------------------------------------------------------------- 8: prepare in an existing folder
def test_a_failed_prepare_leaves_an_existing_dataset_as_it_was(tmp_path, capsys):
    """A prepare of bad files into an existing dataset folder added midi_tokenizer.json and replaced
    failed.txt."""
    good = tmp_path / "good"
    good.mkdir()
    for k in range(3):
        _midi(good / f"{k}.mid", 60 + k)
    (good / "bad.mid").write_text("x")
    out = tmp_path / "ds"
    assert main(["music", "prepare", "--midi-dir", str(good), "--out", str(out), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    before = _snapshot(out)
    assert "bad.mid" in (out / "failed.txt").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mid").write_text("x")
    capsys.readouterr()
    assert main(["music", "prepare", "--midi-dir", str(bad), "--out", str(out)]) == 2
    assert _snapshot(out) == before
    # a success replaces the dataset (shards, meta.json, failed.txt), leaving other files alone
    (out / "notes.txt").write_text("mine")
    (out / "train" / "mine.txt").write_text("mine")
    (good / "bad.mid").unlink()
    assert main(["music", "prepare", "--midi-dir", str(good), "--out", str(out), "--valid-permille", "0",
                 "--test-permille", "0", "--limit", "2"]) == 0
    assert (out / "failed.txt").read_text() == "" and json.loads((out / "meta.json").read_text())["limit"] == 2
    # --limit counts the pieces kept: files that fail before them do not use it up
    (good / "0bad.mid").write_text("x")
    assert main(["music", "prepare", "--midi-dir", str(good), "--out", str(tmp_path / "lim"), "--valid-permille",
                 "0", "--test-permille", "0", "--limit", "2"]) == 0
    assert json.loads((tmp_path / "lim" / "meta.json").read_text())["counts"]["train"]["pieces"] == 2
    assert "0bad.mid" in (tmp_path / "lim" / "failed.txt").read_text()
    (good / "0bad.mid").unlink()
    assert sorted(os.listdir(out)) == ["failed.txt", "meta.json", "midi_tokenizer.json", "notes.txt", "test",
                                       "train", "valid"]
    assert sorted(os.listdir(out / "train")) == ["mine.txt", "shard_00000.npy"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (load_tokens(out / "train") == 0).sum() == 3  # 2 pieces: 0 a 0 b 0


def test_prepare_refuses_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    _midi(d / "a.mid")
    before = _snapshot(d)
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(d)]) == 2
    assert "the output folder is the MIDI folder read" in _one_error_line(capsys, "prepare")
    other = tmp_path / "docs"
    other.mkdir()
    (other / "train").mkdir()
    (other / "train" / "shard_00000.npy").write_bytes(b"someone else's")
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(other)]) == 2
    assert "not a dataset written by prepare" in _one_error_line(capsys, "prepare")
    assert (other / "train" / "shard_00000.npy").read_bytes() == b"someone else's" and _snapshot(d) == before
    (tmp_path / "file").write_text("x")
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in _one_error_line(capsys, "prepare")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(tmp_path / "empty"), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    assert (tmp_path / "empty" / "meta.json").is_file() and not any(
        n.startswith(".tmp") for n in os.listdir(tmp_path / "empty"))


def test_prepare_switching_kind_removes_the_other_tokenizer(tmp_path, monkeypatch):
    """An ABC dataset prepared again from MIDI: its abc_tokenizer.json must not stay beside the
    new midi_tokenizer.json (and the other way round, where the MIDI one would be found first)."""
    from types import SimpleNamespace

    from multimodal_rwkv.music import corpora
    from multimodal_rwkv.music.generate import load_tokenizer

    root = tmp_path / "m21"
    (root / "corpus" / "oneills1850").mkdir(parents=True)
    (root / "corpus" / "oneills1850" / "a.abc").write_text(TUNE)
    monkeypatch.setattr(corpora, "_music21", lambda: SimpleNamespace(__file__=str(root / "__init__.py")))
    d = tmp_path / "midis"
    d.mkdir()
    _midi(d / "a.mid")
    out = tmp_path / "ds"
    prepare(out, midi_dir=d, valid_permille=0, test_permille=0)
    prepare(out, corpus="oneill-abc", valid_permille=0, test_permille=0)
    assert isinstance(load_tokenizer(out), AbcTokenizer) and not (out / "midi_tokenizer.json").exists()
    prepare(out, midi_dir=d, valid_permille=0, test_permille=0)
    assert isinstance(load_tokenizer(out), MidiTokenizer) and not (out / "abc_tokenizer.json").exists()


def test_prepare_bach_into_an_existing_dataset_reuses_and_extends_the_midi_cache(tmp_path):
    pytest.importorskip("music21")
    out = tmp_path / "b"
    prepare(out, corpus="bach-chorales", limit=1, valid_permille=0, test_permille=0, workers=1)
    first = sorted(os.listdir(out / "midi"))
    stamp = (out / "midi" / first[0]).stat().st_mtime_ns
    rep = prepare(out, corpus="bach-chorales", limit=2, valid_permille=0, test_permille=0, workers=1)
    assert rep.counts["train"]["pieces"] == 2 and len(os.listdir(out / "midi")) == 2
    assert (out / "midi" / first[0]).stat().st_mtime_ns == stamp  # reused, not converted again
    assert not any(n.startswith(".tmp") for n in os.listdir(out))


# ----------------------------------------------------------------------------- 9: PNG only
def test_piano_rolls_are_png_files(tmp_path, capsys, fake_midi_model):
    """roll --out x.jpg wrote PNG bytes into a .jpg."""
    song = _midi(tmp_path / "song.mid")
    for name in ("x.jpg", "x", "x.png.gif"):
        assert main(["music", "roll", str(song), "--out", str(tmp_path / name)]) == 2
        assert "give a file name ending in .png" in _one_error_line(capsys, "roll")
        assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "g.mid"), "--png",
                     str(tmp_path / name)]) == 2
        assert "give a file name ending in .png" in _one_error_line(capsys, "generate")
    assert sorted(os.listdir(tmp_path)) == ["song.mid"]
    assert main(["music", "roll", str(song), "--out", str(tmp_path / "X.PNG")]) == 0
    assert (tmp_path / "X.PNG").read_bytes()[:4] == b"\x89PNG"


def test_prepare_into_a_split_linked_to_another_file_system(tmp_path):
    """A split folder that is a link to another file system: the rename of the new shards failed
    after the old ones were deleted (the dataset lost its training data)."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    d = tmp_path / "m"
    d.mkdir()
    for i in range(3):
        _midi(d / f"{i}.mid", note=60 + i)
    ds = tmp_path / "ds"
    args = ["music", "prepare", "--midi-dir", str(d), "--out", str(ds), "--valid-permille", "0", "--test-permille", "0"]
    assert main(args) == 0
    elsewhere = tempfile.mkdtemp(dir=shm)
    try:
        for f in (ds / "train").iterdir():
            shutil.move(str(f), elsewhere)
        (ds / "train").rmdir()
        (ds / "train").symlink_to(elsewhere)
        assert main(args) == 0
        shards = sorted(p.name for p in (ds / "train").iterdir())
        assert shards and all(n.startswith("shard_") for n in shards)
        assert load_tokens(ds / "train" / shards[0]).size > 0
    finally:
        shutil.rmtree(elsewhere)


def test_prepare_refuses_a_folder_whose_meta_json_is_not_its_own(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    _midi(d / "a.mid")
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "meta.json").write_text('{"my": "settings"}')
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(proj)]) == 2
    assert "not a dataset written by prepare" in _one_error_line(capsys, "prepare")
    assert (proj / "meta.json").read_text() == '{"my": "settings"}'


def test_a_rerun_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    """Outputs are written to a temp file and renamed: a private output (0600) stays private."""
    src = tmp_path / "a.mid"
    _midi(src)
    png = tmp_path / "r.png"
    assert main(["music", "roll", str(src), "--out", str(png)]) == 0
    os.chmod(png, 0o600)
    assert main(["music", "roll", str(src), "--out", str(png)]) == 0
    assert stat.S_IMODE(os.stat(png).st_mode) == 0o600


# ----------------------------------------------------------------------------- 11: eval checks the data's tokenizer
def _dataset(folder, tok):
    """A prepared-dataset layout: ``folder/valid/shard_00000.npy`` (one short piece) and the tokenizer beside it."""
    from multimodal_rwkv.music import Note

    piece = tok.encode("X:1\nK:C\nCDE|\n") if isinstance(tok, AbcTokenizer) else tok.encode_notes(
        [Note(0, 12, 0, 60, 4), Note(12, 12, 0, 62, 4)])
    (folder / "valid").mkdir(parents=True)
    np.save(folder / "valid" / "shard_00000.npy", np.array([0] + piece + [0], np.uint16))
    tok.save_pretrained(folder)
    return folder / "valid"


@pytest.fixture
def fake_eval_model(tmp_path, monkeypatch):
    """A MIDI (default tokenizer) or ABC model folder ``m_midi`` / ``m_abc`` holding its tokenizer
    file; ``load_music_model`` gives a stand-in model and that tokenizer; the loss is faked."""
    from types import SimpleNamespace

    import multimodal_rwkv.music.generate as gen
    import multimodal_rwkv.music.metrics as metrics

    for name, tok in (("m_midi", MidiTokenizer()), ("m_abc", AbcTokenizer())):
        tok.save_pretrained(tmp_path / name)
    monkeypatch.setattr(gen, "load_music_model", lambda path: (
        SimpleNamespace(config=SimpleNamespace(vocab_size=300)), gen.load_tokenizer(path)))
    monkeypatch.setattr(metrics, "windowed_nll", lambda model, ids, ctx: (float(len(ids) - 1), len(ids) - 1))
    return tmp_path / "m_midi", tmp_path / "m_abc"


def test_eval_refuses_data_prepared_with_another_tokenizer(tmp_path, capsys, fake_eval_model):
    """A model evaluated on data prepared with another tokenizer (another max_shift; MIDI tokens for
    an ABC model) printed wrong bits/note or bits/byte without a word."""
    from multimodal_rwkv.music import MidiTokenizerConfig

    m_midi, m_abc = fake_eval_model
    other = _dataset(tmp_path / "d96", MidiTokenizer(MidiTokenizerConfig(max_shift=96, use_bars=True)))
    same = _dataset(tmp_path / "d", MidiTokenizer(MidiTokenizerConfig(max_notes=5000)))  # a limit only: same ids
    abc = _dataset(tmp_path / "dabc", AbcTokenizer())
    for data, model, why in [(other, m_midi, "max_shift 96 (the model's: 48), use_bars True (the model's: False)"),
                             (other / "shard_00000.npy", m_midi, "max_shift 96"),
                             (same, m_abc, "MIDI tokens, the model's tokenizer is ABC"),
                             (abc / "shard_00000.npy", m_midi, "ABC tokens, the model's tokenizer is MIDI")]:
        assert main(["music", "eval", "--model", str(model), "--data", str(data)]) == 2
        err = _one_error_line(capsys, "eval")
        theirs = (data.parent.parent if data.suffix else data.parent) / ("abc_tokenizer.json" if "dabc" in str(data)
                                                                        else "midi_tokenizer.json")
        ours = model / ("midi_tokenizer.json" if model == m_midi else "abc_tokenizer.json")
        assert f"{data}: prepared with another tokenizer ({theirs}) than the model's ({ours}): {why}" in err, err
    for data, model in [(same, m_midi), (same / "shard_00000.npy", m_midi), (abc, m_abc)]:
        assert main(["music", "eval", "--model", str(model), "--data", str(data)]) == 0, capsys.readouterr().err
        assert "bits/" in capsys.readouterr().out
    # no tokenizer file beside the data: only the id range is checked, as before
    (tmp_path / "loose").mkdir()
    np.save(tmp_path / "loose" / "t.npy", np.load(same / "shard_00000.npy"))
    assert main(["music", "eval", "--model", str(m_midi), "--data", str(tmp_path / "loose" / "t.npy")]) == 0
    assert "bits/note" in capsys.readouterr().out
    # relative names from inside the split ("." and a bare shard name) find the dataset's tokenizer too
    import os

    here = os.getcwd()
    try:
        os.chdir(other)
        for data in (".", "shard_00000.npy"):
            assert main(["music", "eval", "--model", str(m_midi), "--data", data]) == 2
            assert "prepared with another tokenizer" in _one_error_line(capsys, "eval")
    finally:
        os.chdir(here)


def test_eval_metrics_finds_the_tokenizer_of_a_shard(tmp_path, capsys):
    """--metrics with a .npy shard looked for the tokenizer in the shard's folder and said
    "not a music model folder"."""
    valid = _dataset(tmp_path / "d", MidiTokenizer())
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 3, "valid_loss": 2.0}) + "\n")
    outs = []
    for data in (valid, valid / "shard_00000.npy"):
        assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(data)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "bits/note" in outs[0]
    (tmp_path / "loose").mkdir()
    np.save(tmp_path / "loose" / "t.npy", np.load(valid / "shard_00000.npy"))
    loose = str(tmp_path / "loose" / "t.npy")
    assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", loose]) == 2
    err = _one_error_line(capsys, "eval")
    assert "no midi_tokenizer.json or abc_tokenizer.json" in err and "model folder" not in err


def test_eval_of_a_file_that_is_not_npy_and_options_metrics_ignores(tmp_path, capsys):
    """A MIDI file as --data got numpy's advice to unpickle it; --metrics with --ctx-len or
    --max-tokens ignored them and printed the same numbers."""
    from multimodal_rwkv.music import BACH_MODEL_DIR

    (tmp_path / "song.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x00\x60" + b"MTrk" + bytes(40))
    assert main(["music", "eval", "--model", str(BACH_MODEL_DIR), "--data", str(tmp_path / "song.mid")]) == 2
    err = _one_error_line(capsys, "eval")
    assert f"{tmp_path / 'song.mid'}: not a .npy file (no NumPy header)" in err and "pickle" not in err
    valid = _dataset(tmp_path / "d", MidiTokenizer())
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 3, "valid_loss": 2.0}) + "\n")
    for extra, name in ((["--ctx-len", "8"], "--ctx-len"), (["--max-tokens", "100"], "--max-tokens")):
        assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(valid), *extra]) == 2
        assert f"{name}: only with --model" in _one_error_line(capsys, "eval")


def test_eval_metrics_refuses_a_split_of_another_tokenizer_than_the_runs(tmp_path, capsys):
    """An ABC run's byte losses over a MIDI split's notes printed a number (exit 0): the run's own
    tokenizer (in its final/) was never compared with the data's, as --model mode does."""
    valid = _dataset(tmp_path / "d", MidiTokenizer())
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    AbcTokenizer().save_pretrained(run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "valid_loss": 2.0}) + "\n")
    assert main(["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(valid)]) == 2
    assert "prepared with another tokenizer" in _one_error_line(capsys, "eval")
    abc_valid = _dataset(tmp_path / "a", AbcTokenizer())
    assert main(["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(abc_valid)]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_eval_metrics_finds_the_runs_tokenizer_without_final_and_says_when_it_cannot(tmp_path, capsys):
    """A run still training (no final/) skipped the tokenizer check silently: a MIDI run's loss
    became bits per ABC byte."""
    midi_valid = _dataset(tmp_path / "m", MidiTokenizer())
    abc_valid = _dataset(tmp_path / "a", AbcTokenizer())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, "valid_loss": 2.0}) + "\n")
    (run / "recipe.yaml").write_text(f"data:\n  valid_file: {midi_valid}\n")
    assert main(["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(abc_valid)]) == 2
    assert "prepared with another tokenizer" in _one_error_line(capsys, "eval")
    (run / "recipe.yaml").unlink()
    assert main(["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(abc_valid)]) == 0
    err = capsys.readouterr().err  # (it spoke of the recipe.yaml the run does not have)
    assert "has no final/ model and no recipe.yaml: the split's tokenizer could not be compared with the run's" in err
    (run / "recipe.yaml").write_text("data: {}\n")
    assert main(["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(abc_valid)]) == 0
    assert "its recipe.yaml names no data with a tokenizer file" in capsys.readouterr().err


def test_piano_rolls_last_as_long_as_the_file_and_skip_reports_stay_on_one_line(tmp_path, capsys):
    """The roll stopped at the last note while the file kept its closing rest; a skipped file whose
    name holds a line break was reported over two lines."""
    import mido

    from multimodal_rwkv.music.pianoroll import pianoroll_from_midi

    mid = mido.MidiFile(ticks_per_beat=96)
    tr = mido.MidiTrack()
    tr += [mido.Message("note_on", note=60, velocity=80, time=0), mido.Message("note_off", note=60, time=96),
           mido.MetaMessage("end_of_track", time=96 * 7)]  # one beat of note, seven of rest
    mid.tracks.append(tr)
    mid.save(tmp_path / "rest.mid")
    short, full = pianoroll_from_midi(tmp_path / "rest.mid", end_step=0), pianoroll_from_midi(tmp_path / "rest.mid")
    assert full.width > 2 * short.width
    d = tmp_path / "md"
    d.mkdir()
    (d / "bad\nname.mid").write_bytes(b"not midi")
    _midi(d / "good.mid")
    assert main(["music", "tokenize", str(d), "--out", str(tmp_path / "t.npy")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert any("bad\\nname.mid" in line for line in err) and not any(line.startswith("name.mid") for line in err)


def test_seconds_with_an_abc_model_is_refused(tmp_path, capsys, fake_abc_model):
    """--seconds with an ABC model was taken and did nothing."""
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t.abc"), "--seconds", "1"]) == 2
    assert "--seconds: only with a MIDI model" in _one_error_line(capsys, "generate")
    assert not (tmp_path / "t.abc").exists()


def test_generated_midi_lasts_at_least_the_seconds_reported():
    """The time shifts after the last note counted towards --seconds and the report, but the file
    ended at the last note: '14.2 s generated' for an 8.9 s file, shorter than asked."""
    import mido

    from multimodal_rwkv.music import BACH_MODEL_DIR
    from multimodal_rwkv.music.generate import generate_music, load_music_model

    model, tok = load_music_model(BACH_MODEL_DIR)
    for seed in range(6):  # (seed 4 ended 5.75 s into the file, 6.25 s into the tokens)
        res = generate_music(model, tok, seconds=6.0, seed=seed, max_new_tokens=400)
        length = mido.MidiFile(file=_as_file(res.midi)).length  # (a last note may ring on past the time)
        assert length >= res.seconds - 1e-3, seed
        assert res.seconds >= 6.0 or res.ids[-1] == tok.eos_id


def _as_file(mid):
    import io

    buf = io.BytesIO()
    mid.save(file=buf)
    buf.seek(0)
    return buf


# ----------------------------------------------------------------------------- 12: abc2midi writes .mid only
def test_abc2midi_refuses_an_output_that_is_not_a_midi_name(tmp_path, capsys):
    """abc2midi --out picture.png wrote a MIDI file under a picture's name."""
    pytest.importorskip("music21")
    (tmp_path / "t.abc").write_text(TUNE)
    for out in ("picture.png", "t.txt", "noext"):
        assert main(["music", "abc2midi", str(tmp_path / "t.abc"), "--out", str(tmp_path / out)]) == 2
        assert "give a name ending in .mid" in _one_error_line(capsys, "abc2midi")
        assert not (tmp_path / out).exists()
    for out in ("T.MID", "t.midi"):
        assert main(["music", "abc2midi", str(tmp_path / "t.abc"), "--out", str(tmp_path / out)]) == 0
        assert mido.MidiFile(str(tmp_path / out)).length > 0


# ----------------------------------------------------------------------------- 13: prepare without a train split
def test_prepare_refuses_a_dataset_without_a_train_piece(tmp_path, capsys):
    """With few pieces and large valid/test shares, every piece could go to valid/test: prepare
    wrote "train: 0 pieces" and exited 0."""
    from multimodal_rwkv.music.corpora import split_of

    src = tmp_path / "m"
    src.mkdir()
    for k in range(3):
        _midi(src / f"{k}.mid", 60 + 5 * k)
    assert all(split_of((src / f"{k}.mid").read_bytes(), 500, 499) != "train" for k in range(3))
    args = ["music", "prepare", "--midi-dir", str(src), "--valid-permille", "500", "--test-permille", "499"]
    assert main(args + ["--out", str(tmp_path / "new")]) == 2
    assert "no piece for the train split" in _one_error_line(capsys, "prepare")
    assert not (tmp_path / "new").exists()
    with pytest.raises(DataError, match="no piece for the train split"):
        prepare(tmp_path / "new", midi_dir=src, valid_permille=500, test_permille=499)
    assert not (tmp_path / "new").exists()
    # an earlier dataset stays as it was
    assert main(["music", "prepare", "--midi-dir", str(src), "--out", str(tmp_path / "ds")]) == 0
    before = _snapshot(tmp_path / "ds")
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "ds")]) == 2
    assert "no piece for the train split" in _one_error_line(capsys, "prepare")
    assert _snapshot(tmp_path / "ds") == before


def test_eval_metrics_converts_with_the_scored_part_and_refuses_bad_lines(tmp_path, capsys):
    """--metrics converted a valid_loss measured on the first eval_batches windows with the whole
    split's bytes per token; a line that is not an object was a traceback, a negative loss passed."""
    from multimodal_rwkv.music.metrics import bits_per_unit

    valid = _dataset(tmp_path / "d", AbcTokenizer())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "valid_loss": 2.0}) + "\n")
    argv = ["music", "eval", "--metrics", str(run / "metrics.jsonl"), "--data", str(valid)]
    assert main(argv) == 0
    n = len("X:1\nK:C\nCDE|\n")  # bytes of the piece; the split's targets are they and the closing 0
    assert f"{bits_per_unit(2.0, n + 1, n):.4f} bits/byte" in capsys.readouterr().out
    (run / "recipe.yaml").write_text("eval_batches: 1\ntrain: {micro_batch_size: 1}\ndata: {ctx_len: 4}\n")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{bits_per_unit(2.0, 4, 4):.4f} bits/byte" in out and "covers the first 4 of the split's" in out
    (tmp_path / "m.jsonl").write_text('{"step": 1, "valid_loss": null, "nonfinite": ["valid_loss"]}\n'
                                      '{"step": 2, "valid_loss": 2.0}\n')  # as the engine writes a NaN
    assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(valid)]) == 0
    out = capsys.readouterr().out  # a diverged evaluation is said, and the other steps converted
    assert "step 1: valid_loss nan (not finite" in out and "step 2: 2.0000 nats/token" in out
    for bad, why in (("[1, 2]", "m.jsonl:2: not a metrics record"), ('{"valid_loss": -1}', "not a cross-entropy")):
        (tmp_path / "m.jsonl").write_text(json.dumps({"step": 1, "valid_loss": 1.0}) + "\n" + bad + "\n")
        assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(valid)]) == 2
        assert why in _one_error_line(capsys, "eval")
    # a bad line names its line (it said 'line 1 column 1' of the line alone); a last line cut off
    # by a killed run is left out, as the engine does
    good = json.dumps({"step": 1, "valid_loss": 1.0})
    (tmp_path / "m.jsonl").write_text(f"{good}\n{good}\nnot json\n{good}\n")
    assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(valid)]) == 2
    assert "m.jsonl:3: invalid JSON (Expecting value at column 1)" in _one_error_line(capsys, "eval")
    (tmp_path / "m.jsonl").write_text(f"{good}\n{good[:12]}")
    assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(valid)]) == 0
    assert "step 1: 1.0000 nats/token" in capsys.readouterr().out


def test_tokenize_says_a_lone_bad_file_once_and_what_a_fifo_is(tmp_path, capsys):
    """One bad file was said twice ("skipped: ..." then the error); a FIFO was "no such file"."""
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"not midi")
    assert main(["music", "tokenize", str(bad)]) == 2
    assert "no MThd header" in _one_error_line(capsys, "tokenize")
    os.mkfifo(tmp_path / "pipe.mid")
    assert main(["music", "tokenize", str(tmp_path / "pipe.mid")]) == 2
    assert _one_error_line(capsys, "tokenize").endswith("pipe.mid: not a regular file or a folder")
    _midi(tmp_path / "good.mid")
    assert main(["music", "tokenize", str(bad), str(tmp_path / "good.mid")]) == 0  # several: bad ones skipped
    assert capsys.readouterr().err.count("no MThd header") == 1


def test_a_folder_that_cannot_be_listed_is_reported_and_counted(tmp_path, capsys, monkeypatch):
    """tokenize and prepare --midi-dir passed over a sub-folder without read permission in
    silence (rglob): its files were neither read nor counted."""
    d = tmp_path / "midis"
    (d / "locked").mkdir(parents=True)
    for k in range(3):
        _midi(d / f"{k}.mid", 60 + k)
    _midi(d / "locked" / "x.mid", 70)
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder of mode 000 gives a user who is not root
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["music", "tokenize", str(d)]) == 0
    cap = capsys.readouterr()
    assert "locked: cannot list folder (Permission denied): its files are not read" in cap.err
    assert "tokenized 3 files, skipped 1 unreadable" in cap.out
    assert main(["music", "tokenize", str(d / "locked")]) == 2  # the folder given: the reason, not 'no files'
    assert "no .mid/.midi files" in (line := _one_error_line(capsys, "tokenize")) and "Permission denied" in line
    out = tmp_path / "ds"
    assert main(["music", "prepare", "--midi-dir", str(d), "--out", str(out), "--valid-permille", "0",
                 "--test-permille", "0"]) == 0
    assert "locked\tcannot list folder (Permission denied)" in (out / "failed.txt").read_text()
    assert json.loads((out / "meta.json").read_text())["counts"]["train"]["pieces"] == 3


def test_a_chorale_that_cannot_be_written_is_an_error_not_a_bad_piece(tmp_path):
    """A full disk while caching a chorale's MIDI counted it as a bad piece: exit 0, a smaller
    dataset and a partial .tmp file."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music.corpora import _convert_chorale

    with pytest.raises(OSError, match="x.mid: cannot write"):
        _convert_chorale(("bach/bwv66.6", str(tmp_path / "missing-folder" / "x.mid")))


def test_a_prepare_killed_halfway_leaves_only_a_stage_the_next_removes(tmp_path):
    """A prepare into a new folder used the folder itself as its stage: killed halfway, it left half
    a dataset there, and the rerun refused the folder as 'not a dataset written by prepare'."""
    d = tmp_path / "mids"
    d.mkdir()
    for i in range(4):
        _midi(d / f"p{i}.mid", note=60 + i)
    out = tmp_path / "ds"
    (out / ".tmp-prepare-99999" / "train").mkdir(parents=True)  # what a kill leaves now: the stage alone
    (out / ".tmp-prepare-99999" / "train" / "shard_00000.npy").write_bytes(b"half")
    prepare(out, midi_dir=d, valid_permille=0, test_permille=0)
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in os.listdir(out) if not n.startswith("."))
    assert load_tokens(out / "train").size > 4
    # interrupted while moving the finished dataset into a new folder: nothing is left (it was half a
    # dataset, which the rerun refused)
    from multimodal_rwkv.music import corpora

    real = corpora._move_dataset

    def interrupted(stage, dst, moved):
        (dst / "other.txt").write_text("another run's file, put here meanwhile")
        moved.append(dst / "train")
        os.replace(stage / "train", dst / "train")
        raise KeyboardInterrupt

    corpora._move_dataset = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "new", midi_dir=d, valid_permille=0, test_permille=0)
    finally:
        corpora._move_dataset = real
    # what it moved in is gone, what others put there stays (a whole folder removal took theirs)
    assert os.listdir(tmp_path / "new") == ["other.txt"]


def test_new_outputs_get_the_umask_mode(tmp_path):
    from multimodal_rwkv.fileio import write_outputs

    old = os.umask(0o002)
    try:
        write_outputs([(tmp_path / "a.txt", lambda tmp: tmp.write_text("a"))])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o664  # (0644 whatever the umask said)


def test_atomic_write_keeps_a_replaced_files_mode(tmp_path):
    """convert made a private earlier conversion world-readable again (0600 -> 0644)."""
    from multimodal_rwkv.fileio import atomic_write_text

    f = tmp_path / "config.json"
    atomic_write_text(f, "a")
    os.chmod(f, 0o600)
    atomic_write_text(f, "b")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600 and f.read_text() == "b"


def test_a_full_disk_during_a_copy_names_the_target(tmp_path):
    """Python's copy reports the (intact) source as the file that failed."""
    from multimodal_rwkv.fileio import naming_target

    with pytest.raises(OSError) as e:
        with naming_target(tmp_path / "final" / "big.bin"):
            raise OSError(27, "File too large", str(tmp_path / "big.bin"))
    assert e.value.filename == str(tmp_path / "final" / "big.bin")
