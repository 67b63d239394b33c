"""MIDI tokenizer: round trips on real chorales and hand-built files, bad input, CLI tokenize.

Expected notes are written by hand from the MIDI events (grid: 12 steps per beat, 480 ticks per
beat -> 40 ticks per step) or read by an independent mido reader in this file; never taken from
the tokenizer under test.
"""
from __future__ import annotations

import io
import random
import struct
from collections import Counter

import mido
import numpy as np
import pytest

from multimodal_rwkv.errors import ConfigError, MidiError
from multimodal_rwkv.music import MidiTokenizer, MidiTokenizerConfig, Note

TPB = 480  # ticks per beat of the hand-built files; 40 ticks per grid step


# ----------------------------------------------------------------------------- helpers
def midi_file(tracks, tpb=TPB, type=1):
    """tracks: list of lists of (abs_tick, mido message) -> MidiFile (delta times computed here)."""
    mid = mido.MidiFile(type=type, ticks_per_beat=tpb)
    for evs in tracks:
        tr = mido.MidiTrack()
        t = 0
        for tick, msg in sorted(evs, key=lambda e: e[0]):
            tr.append(msg.copy(time=tick - t))
            t = tick
        mid.tracks.append(tr)
    return mid


def on(tick, note, vel=100, ch=0):
    return (tick, mido.Message("note_on", note=note, velocity=vel, channel=ch))


def off(tick, note, ch=0, as_note_on=False):
    if as_note_on:
        return (tick, mido.Message("note_on", note=note, velocity=0, channel=ch))
    return (tick, mido.Message("note_off", note=note, velocity=64, channel=ch))


def saved(mid) -> bytes:
    buf = io.BytesIO()
    mid.save(file=buf)
    return buf.getvalue()


def reread(mid) -> mido.MidiFile:
    """Save and parse again (what other MIDI software would see)."""
    return mido.MidiFile(file=io.BytesIO(saved(mid)))


def smf(tracks_bytes, fmt=1, division=TPB, ntracks=None):
    """Raw Standard MIDI File bytes from raw track bodies (no helper from mido)."""
    head = b"MThd" + struct.pack(">IHHh", 6, fmt, ntracks if ntracks is not None else len(tracks_bytes), division)
    return head + b"".join(b"MTrk" + struct.pack(">I", len(t)) + t for t in tracks_bytes)


def independent_notes(mid: mido.MidiFile, spb=12):
    """A second, simple reader: per (channel, pitch) FIFO pairing, no pedal; returns onsets and
    offsets as Counters of (step, group, pitch[, velocity bin]) -- invariant to how same-pitch
    notes are paired."""
    tpb = mid.ticks_per_beat
    evs = []
    for tr in mid.tracks:
        t = 0
        for m in tr:
            t += m.time
            evs.append((t, m))
    evs.sort(key=lambda e: e[0])
    program = [0] * 16
    open_ = {}
    onsets, offsets = Counter(), Counter()
    q = lambda tick: int(tick * spb / tpb + 0.5)  # noqa: E731
    for t, m in evs:
        if m.type == "program_change":
            program[m.channel] = m.program
        elif m.type == "note_on" and m.velocity > 0:
            g = 16 if m.channel == 9 else program[m.channel] // 8
            open_.setdefault((m.channel, m.note), []).append((t, g, m.velocity))
        elif m.type in ("note_on", "note_off") and open_.get((m.channel, m.note)):
            t0, g, v = open_[(m.channel, m.note)].pop(0)
            a, b = q(t0), max(q(t), q(t0) + 1)
            onsets[(a, g, m.note, min(7, (v - 1) * 8 // 127))] += 1
            offsets[(b, g, m.note)] += 1
    return onsets, offsets


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def chorale_dir(tmp_path_factory):
    """A handful of Bach chorales converted from music21's bundled corpus (once per session)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music.corpora import chorale_midis

    d = tmp_path_factory.mktemp("chorales")
    paths, _ = chorale_midis(d, limit=4)
    assert len(paths) >= 3
    return d


@pytest.fixture
def tok():
    return MidiTokenizer()


# ----------------------------------------------------------------------------- round trips
def test_round_trip_real_chorales(chorale_dir, tok):
    files = sorted(chorale_dir.glob("*.mid"))
    total_notes = total_tokens = 0
    for f in files:
        orig = mido.MidiFile(str(f))
        ids = tok.encode(f)
        st = tok.last_stats
        assert st.out_of_range == 0 and st.notes_encoded == st.notes_in > 50
        dec = reread(tok.decode(ids))
        assert tok.last_decode_stats.clean
        # same notes on the grid, by an independent reader
        assert independent_notes(dec) == independent_notes(orig), f.name
        # idempotent
        assert tok.encode(dec) == ids
        # real time: no drift (chorales are written at 120 BPM, a tempo bin centre)
        end_orig = max(t for t, _ in _note_times(orig))
        end_dec = max(t for t, _ in _note_times(dec))
        assert abs(end_orig - end_dec) <= 0.5 / 12 * 0.5 + 1e-6  # half a step at 120 BPM
        total_notes += st.notes_encoded
        total_tokens += len(ids)
    assert total_tokens / total_notes < 2.36  # fewer tokens per note than MIDI-LLM-tokenizer


def _note_times(mid):
    """(seconds, note) of every note-on, via mido's own tempo-aware iteration."""
    t = 0.0
    out = []
    for m in mid:
        t += m.time
        if m.type == "note_on" and m.velocity > 0:
            out.append((t, m.note))
    return out


def test_multitrack_drums_programs_and_tempo_changes(tok):
    meta = [(0, mido.MetaMessage("set_tempo", tempo=500000)), (960, mido.MetaMessage("set_tempo", tempo=250000)),
            (0, mido.MetaMessage("time_signature", numerator=3, denominator=4))]
    piano = [on(0, 60, 100), off(480, 60), on(500, 64, 40), off(1000, 64, as_note_on=True)]
    violin = [(0, mido.Message("program_change", program=41, channel=1)), on(0, 76, 70, ch=1), off(1920, 76, ch=1)]
    drums = [on(0, 36, 127, ch=9), off(10, 36, ch=9), on(960, 38, 90, ch=9), off(970, 38, ch=9)]
    mid = midi_file([meta, piano, violin, drums])
    ids = tok.encode(reread(mid))
    # hand-derived: step = round(tick / 40); vel bin = (v-1)*8//127; violin program 41 -> group 5; drums -> 16
    expected = sorted([
        Note(0, 12, 0, 60, 6), Note(13, 12, 0, 64, 2),      # 500 -> 12.5 -> 13 (half up); 1000 -> 25
        Note(0, 48, 5, 76, 4),
        Note(0, 1, 16, 36, 7), Note(24, 1, 16, 38, 5),      # 10 ticks -> lengthened to one step
    ])
    notes, tempos, st = tok.decode_notes(ids)
    assert sorted(notes) == expected and st.clean
    assert tok.last_stats.lengthened == 2
    assert [round(b) for _, b in tempos] == [120, 240] and [s for s, _ in tempos] == [0, 24]
    dec = reread(tok.decode(ids))
    # drums on channel 10, violin family program, tempo change at beat 2
    chans = {m.channel for tr in dec.tracks for m in tr if m.type == "note_on"}
    assert 9 in chans and len(chans) == 3
    assert any(m.type == "program_change" and m.program == 40 for tr in dec.tracks for m in tr)
    tempos_dec = [(m.tempo) for m in dec.tracks[0] if m.type == "set_tempo"]
    assert tempos_dec == [500000, 250000]
    assert tok.encode(dec) == ids
    # seconds: second beat at 120 BPM then 240 BPM -> violin (0..4 beats) ends at 1.0 + 0.5 = 1.5 s
    assert abs(dec.length - 1.5) < 1e-6


def test_type0_running_status_and_velocity0_note_off(tok):
    # one track, running status: 0x90 once, then (note, vel) pairs; velocity 0 ends notes
    body = bytes([
        0x00, 0x90, 60, 100,      # t=0 note_on 60
        0x00, 64, 100,            # t=0 running status: note_on 64
        0x83, 0x60, 60, 0,        # t=480 running status: note_on 60 vel 0 (= note-off)
        0x00, 64, 0,              # t=480 note_on 64 vel 0
        0x00, 67, 80,             # t=480 note_on 67
        0x83, 0x60, 0x80, 67, 0,  # t=960 real note_off 67
        0x00, 0xFF, 0x2F, 0x00,
    ])
    data = smf([body], fmt=0)
    ids = tok.encode(data)
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == [Note(0, 12, 0, 60, 6), Note(0, 12, 0, 64, 6), Note(12, 12, 0, 67, 4)]


def test_overlapping_same_pitch_notes_fifo(tok):
    # two strikes of 60 overlap; the first note-off ends the first strike (first in, first out)
    mid = midi_file([[on(0, 60, 100), on(480, 60, 50), off(960, 60), off(1440, 60)]])
    ids = tok.encode(reread(mid))
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == [Note(0, 24, 0, 60, 6), Note(12, 24, 0, 60, 3)]
    dec = reread(tok.decode(ids))
    assert tok.encode(dec) == ids
    # same-pitch notes from two channels of one group that cross: onsets and offsets survive
    mid = midi_file([[on(0, 62, 100, ch=0), off(1920, 62, ch=0)], [on(480, 62, 100, ch=1), off(960, 62, ch=1)]])
    ids = tok.encode(reread(mid))
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(n.onset for n in notes) == [0, 12] and sorted(n.offset for n in notes) == [24, 48]
    assert tok.encode(reread(tok.decode(ids))) == ids


def _cc(tick, value, ch=0, control=64):
    return (tick, mido.Message("control_change", control=control, value=value, channel=ch))


def test_sustain_pedal_extends_note_offs(tok):
    evs = [_cc(0, 127), on(0, 60), off(240, 60), on(0, 64), off(240, 64), _cc(960, 0),
           # re-strike under the pedal ends the sustained note at the new strike
           _cc(1920, 127), on(1920, 67), off(2000, 67), on(2400, 67), off(2880, 67), _cc(3840, 0)]
    mid = midi_file([evs])
    ids = tok.encode(reread(mid))
    assert tok.last_stats.sustained == 4
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == sorted([Note(0, 24, 0, 60, 6), Note(0, 24, 0, 64, 6),
                                    Note(48, 12, 0, 67, 6), Note(60, 36, 0, 67, 6)])
    # with sustain handling off, note-offs are taken literally
    tok2 = MidiTokenizer(MidiTokenizerConfig(sustain=False))
    notes2, _, _ = tok2.decode_notes(tok2.encode(reread(mid)))
    assert sorted(n.duration for n in notes2 if n.pitch == 60) == [6]


def test_reset_all_controllers_lifts_the_pedal(tok):
    # pedal down, the note released at beat 0.5, CC121 at beat 1: the held note ends there (GM RP-015)
    mid = midi_file([[_cc(0, 127), on(0, 60), off(240, 60), _cc(480, 0, control=121), on(4320, 72), off(4800, 72),
                      _cc(4800, 0)]])
    notes, _, _ = tok.decode_notes(tok.encode(reread(mid)))
    assert [(n.onset, n.duration) for n in notes if n.pitch == 60] == [(0, 12)]


def test_in_memory_delta_times_must_be_whole_ticks(tok):
    def file_with(delta):
        mid = mido.MidiFile(ticks_per_beat=480)
        mid.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=100, time=0),
                                          mido.Message("note_off", note=60, time=delta)]))
        return mid

    for bad in (240.5, -960, True):
        with pytest.raises(MidiError, match=r"track 0, message 1 \(note_off\) has delta time"):
            tok.encode(file_with(bad))
    want = tok.encode(file_with(480))
    assert tok.encode(file_with(480.0)) == want and tok.encode(file_with(np.int64(480))) == want
    assert all(type(i) is int for i in want)


def test_all_notes_off_and_unterminated(tok):
    mid = midi_file([[on(0, 60), on(0, 62), _cc(480, 0, control=123), on(960, 65), (1440, mido.MetaMessage("marker", text="end"))]])
    ids = tok.encode(reread(mid))
    assert tok.last_stats.unterminated == 1
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == [Note(0, 12, 0, 60, 6), Note(0, 12, 0, 62, 6), Note(24, 12, 0, 65, 6)]


def test_out_of_range_counted_not_silent(tok, caplog):
    caplog.set_level("INFO", logger="multimodal_rwkv.music.midi_tokenizer")
    mid = midi_file([[on(0, 10), off(480, 10), on(0, 60), off(480, 60), on(0, 120), off(480, 120),
                      on(0, 20, ch=9), off(480, 20, ch=9)]])
    ids = tok.encode(reread(mid))
    assert tok.last_stats.out_of_range == 3 and tok.last_stats.notes_in == 4 and tok.last_stats.notes_encoded == 1
    assert tok.count_notes(ids) == 1
    assert "outside the pitch ranges" in caplog.text


def test_long_gaps_and_durations_are_exact(tok):
    # 200-step gap and a 100-step note need several shift/dur tokens (max 48 each)
    mid = midi_file([[on(0, 60), off(40, 60), on(8000, 61), off(12000, 61)]])
    ids = tok.encode(reread(mid))
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == [Note(0, 1, 0, 60, 6), Note(200, 100, 0, 61, 6)]
    text = tok.tokens_to_text(ids)
    assert "dur_48 dur_48 dur_4" in text and "shift_48 shift_48 shift_48 shift_48 shift_8" in text


def test_bar_tokens_follow_time_signature():
    tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True))
    mid = midi_file([[(0, mido.MetaMessage("time_signature", numerator=3, denominator=4)),
                      on(0, 60), off(480, 60), on(2880, 62), off(3360, 62)]])  # second note at beat 6 = bar 3
    ids = tok.encode(reread(mid))
    text = tok.tokens_to_text(ids).split()
    assert text.count("<bar>") == 3  # bars at steps 0, 36, 72
    notes, _, _ = tok.decode_notes(ids)
    assert sorted(notes) == [Note(0, 12, 0, 60, 6), Note(72, 12, 0, 62, 6)]


def test_velocity_bins_consistent():
    for n in (1, 4, 8, 12, 32, 127):
        t = MidiTokenizer(MidiTokenizerConfig(velocity_bins=n))
        bins = [t.velocity_bin(v) for v in range(1, 128)]
        assert bins == sorted(bins) and set(bins) == set(range(n))
        for b in range(n):
            assert t.velocity_bin(t.bin_velocity(b)) == b


def test_random_note_sets_round_trip(tok):
    """Random notes (odd durations, chords, unisons, drums, several groups) -> MIDI -> notes."""
    rng = random.Random(7)
    for trial in range(20):
        notes = []
        for _ in range(rng.randint(1, 60)):
            g = rng.choice([0, 0, 3, 5, 16])
            lo, hi = (27, 87) if g == 16 else (21, 108)
            notes.append(Note(rng.randint(0, 300), rng.randint(1, 130), g, rng.randint(lo, hi), rng.randint(0, 7)))
        mid = reread(tok.notes_to_midi(notes))
        ids = tok.encode(mid)
        on_, off_ = independent_notes(mid)
        want_on = Counter((n.onset, n.group, n.pitch, n.velocity) for n in notes)
        want_off = Counter((n.offset, n.group, n.pitch) for n in notes)
        assert (on_, off_) == (want_on, want_off)
        got, _, st = tok.decode_notes(ids)
        assert Counter((n.onset, n.group, n.pitch, n.velocity) for n in got) == want_on
        assert Counter((n.offset, n.group, n.pitch) for n in got) == want_off
        assert st.clean
        assert tok.encode(reread(tok.decode(ids))) == ids


def test_decode_garbage_always_gives_valid_midi(tok):
    rng = random.Random(0)
    for k in range(30):
        ids = [rng.randint(-5, tok.vocab_size + 5) for _ in range(rng.randint(0, 400))]
        mid = tok.decode(ids)
        back = reread(mid)  # saves and opens in mido
        assert back.ticks_per_beat > 0
        for tr in back.tracks:
            for m in tr:
                if m.type == "note_on" and m.velocity > 0:
                    assert 1 <= m.velocity <= 127
    tok.decode([tok.pitch_start + 39, 999999, -1])
    st = tok.last_decode_stats
    assert not st.clean and st.unknown_ids == 2 and st.defaults_used == 1 and st.missing_eos
    assert reread(tok.decode([])).tracks


def test_text_round_trip_and_unknown_token(tok, chorale_dir):
    ids = tok.encode(sorted(chorale_dir.glob("*.mid"))[0])
    assert tok.text_to_tokens(tok.tokens_to_text(ids)) == ids
    assert tok.tokens_to_text([tok.vocab_size + 3]) == f"<unk:{tok.vocab_size + 3}>"
    with pytest.raises(MidiError, match="unknown token"):
        tok.text_to_tokens("<bos> pitch_60 banana")


def test_config_json_round_trip(tmp_path):
    cfg = MidiTokenizerConfig(steps_per_beat=8, velocity_bins=4, use_bars=True, pitch_range=(30, 90))
    MidiTokenizer(cfg).save_pretrained(tmp_path)
    t2 = MidiTokenizer.from_pretrained(tmp_path)
    assert t2.config == cfg and t2.vocab == MidiTokenizer(cfg).vocab
    (tmp_path / "bad.json").write_text('{"tokenizer": "midi", "steps_per_beat": 12, "colour": 3}')
    with pytest.raises(ConfigError, match="colour"):
        MidiTokenizerConfig.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError):
        MidiTokenizerConfig(pitch_range=(60, 50))
    with pytest.raises(ConfigError):
        MidiTokenizerConfig(group_size=3)


def test_transpose_shifts_melody_not_drums(tok):
    mid = midi_file([[on(0, 60), off(480, 60), on(0, 36, ch=9), off(480, 36, ch=9)]])
    ids = tok.encode(reread(mid))
    up = tok.transpose(ids, 5)
    notes, _, _ = tok.decode_notes(up)
    assert sorted((n.group, n.pitch) for n in notes) == [(0, 65), (16, 36)]
    assert tok.transpose(ids, 60) is None  # 120 is above the pitch range


def test_vocab_layout(tok):
    assert tok.vocab[0] == "<pad>" and tok.pad_id == 0
    assert len(set(tok.vocab)) == tok.vocab_size
    assert tok.vocab[tok.pitch_start] == "pitch_21" and tok.vocab[-1] == "pitch_108"


# ----------------------------------------------------------------------------- bad input
def _valid_bytes():
    return saved(midi_file([[on(0, 60), off(480, 60)]]))


BAD_CASES = {
    "empty": (b"", "empty file"),
    "text": (b"this is not a midi file at all\n", "not a MIDI file"),
    "truncated": (None, "truncated"),
    "smpte": (smf([bytes([0, 0x90, 60, 100, 0x83, 0x60, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])], division=-(25 << 8) + 40), "SMPTE"),
    "type2": (smf([bytes([0, 0x90, 60, 100, 0x83, 0x60, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])], fmt=2), "type 2"),
    "no_notes": (smf([bytes([0, 0xFF, 0x51, 3, 7, 0xA1, 0x20, 0, 0xFF, 0x2F, 0])]), "no notes"),
    "bad_status": (smf([bytes([0, 0xF4, 0, 0xFF, 0x2F, 0])]), "malformed"),
    "running_without_status": (smf([bytes([0, 60, 100, 0, 0xFF, 0x2F, 0])]), "malformed"),
    "wrong_chunk": (b"MThd" + struct.pack(">IHHh", 6, 1, 1, 480) + b"XXXX" + struct.pack(">I", 4) + b"\0\xff\x2f\0", "truncated"),  # the unknown chunk is skipped: no track left
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_raises_midi_error_naming_file(tmp_path, tok, case):
    data, reason = BAD_CASES[case]
    if data is None:
        data = _valid_bytes()[:-7]
    p = tmp_path / f"{case}.mid"
    p.write_bytes(data)
    with pytest.raises(MidiError) as e:
        tok.encode(p)
    msg = str(e.value)
    assert str(p) in msg and reason in msg and "\n" not in msg


def test_absurd_sizes(tmp_path):
    p = tmp_path / "big.mid"
    mid = midi_file([[x for k in range(50) for x in (on(k * 10, 60), off(k * 10 + 5, 60))]])
    p.write_bytes(saved(mid))
    with pytest.raises(MidiError, match="above the limit"):
        MidiTokenizer(MidiTokenizerConfig(max_file_bytes=100)).encode(p)
    with pytest.raises(MidiError, match="more than 10 notes"):
        MidiTokenizer(MidiTokenizerConfig(max_notes=10)).encode(p)
    long = midi_file([[on(0, 60), off(480 * 100_000, 60)]])
    with pytest.raises(MidiError, match="beats long"):
        MidiTokenizer().encode(reread(long))
    with pytest.raises(MidiError, match="cannot read"):
        MidiTokenizer().encode(tmp_path / "missing.mid")


def test_data_bytes_above_127_are_clipped(tmp_path, tok):
    p = tmp_path / "loud.mid"
    p.write_bytes(smf([bytes([0, 0x90, 60, 200, 0x83, 0x60, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])]))
    notes, _, _ = tok.decode_notes(tok.encode(p))
    assert tok.last_stats.clipped and notes == [Note(0, 12, 0, 60, 7)]


# ----------------------------------------------------------------------------- CLI
def test_cli_tokenize_skips_bad_files(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    d = tmp_path / "midis"
    (d / "sub").mkdir(parents=True)
    (d / "good.mid").write_bytes(_valid_bytes())
    (d / "sub" / "good2.MID").write_bytes(_valid_bytes())
    (d / "empty.mid").write_bytes(b"")
    (d / "text.mid").write_bytes(b"hello")
    (d / "notes.txt").write_text("ignored")
    out = tmp_path / "t.npy"
    assert main(["music", "tokenize", str(d), "--out", str(out)]) == 0
    o = capsys.readouterr()
    assert "tokenized 2 files, skipped 2 unreadable" in o.out
    assert "empty.mid: empty file" in o.err
    import numpy as np

    arr = np.load(out)
    assert arr[0] == 0 and arr[-1] == 0 and (arr == 0).sum() == 3
    assert main(["music", "tokenize", str(tmp_path / "nope")]) == 2
    assert "nope: no such file" in capsys.readouterr().err


def test_bars_round_trip_through_decoded_time_signatures():
    """With use_bars the decoder writes time signatures where the bar length changes, so the
    bars of a re-encoded file are where the <bar> tokens were (3/4, then 6/8, then 4/4)."""
    tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True))
    ts = lambda tick, n, d: (tick, mido.MetaMessage("time_signature", numerator=n, denominator=d))  # noqa: E731
    evs = [ts(0, 3, 4), ts(1440 * 2, 6, 8), ts(1440 * 2 + 1440 * 3, 4, 4)]
    evs += [x for b in range(12) for x in (on(b * 720, 60 + b % 5), off(b * 720 + 400, 60 + b % 5))]
    ids = tok.encode(reread(midi_file([evs])))
    assert tok.tokens_to_text(ids).count("<bar>") >= 5
    assert tok.encode(reread(tok.decode(ids))) == ids


def test_a_zero_tempo_is_a_bad_file_that_batch_jobs_skip(tmp_path, tok, capsys):
    from multimodal_rwkv.cli import main

    d = tmp_path / "m"
    d.mkdir()
    (d / "good.mid").write_bytes(_valid_bytes())
    mid = midi_file([[(0, mido.MetaMessage("set_tempo", tempo=0)), on(0, 60), off(480, 60)]])
    (d / "tempo0.mid").write_bytes(saved(mid))
    with pytest.raises(MidiError, match="tempo0.mid: set_tempo of 0"):
        tok.encode(d / "tempo0.mid")
    assert main(["music", "tokenize", str(d)]) == 0
    o = capsys.readouterr()
    assert "tokenized 1 files, skipped 1 unreadable" in o.out and "set_tempo of 0" in o.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["music", "tokenize", str(empty)]) == 2
    assert "no .mid/.midi files" in capsys.readouterr().err
    assert main(["music", "tokenize", str(d), "--out", str(tmp_path / "tok.npy")]) == 0
    assert (tmp_path / "tok.npy").is_file() and f"wrote {tmp_path / 'tok.npy'}" in capsys.readouterr().out


def test_tokenizer_config_values_are_checked_and_the_file_named(tmp_path):
    for bad in ({"pitch_range": [1]}, {"pitch_range": ["a", "b"]}, {"max_file_bytes": "x"}, {"max_notes": -1},
                {"steps_per_beat": 40000}, {"use_bars": "yes"}):
        (tmp_path / "midi_tokenizer.json").write_text(__import__("json").dumps(bad))
        with pytest.raises(ConfigError, match=r"midi_tokenizer.json: MidiTokenizerConfig\." + next(iter(bad))):
            MidiTokenizerConfig.load(tmp_path / "midi_tokenizer.json")


def test_no_note_within_range_is_an_error_not_an_empty_piece(tok):
    mid = midi_file([[on(0, 10), off(480, 10), on(0, 120), off(480, 120)]])
    with pytest.raises(MidiError, match="no notes within the pitch ranges"):
        tok.encode(reread(mid))


def test_unknown_chunks_are_skipped_as_the_smf_spec_says(tok):
    track = bytes([0, 0x90, 60, 100, 0x83, 0x60, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
    plain = smf([track])
    alien = (plain[:14] + b"XFIH" + struct.pack(">I", 3) + b"abc" + plain[14:]
             + b"XFKM" + struct.pack(">I", 0))
    assert tok.encode(alien) == tok.encode(plain)
    assert tok.count_notes(tok.encode(alien)) == 1
    with pytest.raises(MidiError, match="truncated|malformed"):  # a chunk running past the end is no skip
        tok.encode(plain[:14] + b"XFIH" + struct.pack(">I", 99) + b"abc")


def test_tempo_outside_range_is_counted(tok):
    mid = midi_file([[(0, mido.MetaMessage("set_tempo", tempo=200_000)), on(0, 60), off(480, 60),
                      (960, mido.MetaMessage("set_tempo", tempo=500_000)), on(960, 62), off(1440, 62)]])
    tok.encode(reread(mid))  # 300 BPM, then 120 BPM
    assert tok.last_stats.tempos_clamped == 1 and "1 tempos clamped" in tok.last_stats.summary()


# ----------------------------------------------------------------------------- bars that are not whole steps
def _bar_steps(tok, ids):
    """Grid steps of the <bar> tokens of ``ids`` (read here, not by the tokenizer under test)."""
    now, out = 0, []
    for i in ids:
        if tok.shift_start <= i < tok.shift_start + tok.config.max_shift:
            now += i - tok.shift_start + 1
        elif i == tok.bar_id:
            out.append(now)
    return out


@pytest.mark.parametrize("num,den", [(3, 32), (1, 64), (3, 64), (5, 64), (7, 8)])
def test_bars_that_are_not_whole_steps_keep_their_place_and_round_trip(num, den):
    """3/32 at 12 steps per beat is a bar of 4.5 steps: its lines are rounded one by one from the
    exact positions (0, 5, 9, 14, 18, ...: half up), never by adding a rounded bar length (which
    drifted, and came back as 4/4 bars after decoding)."""
    tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True))
    ts = (0, mido.MetaMessage("time_signature", numerator=num, denominator=den))
    evs = [ts] + [x for b in range(16) for x in (on(b * 480, 60), off(b * 480 + 480, 60))]
    ids = tok.encode(reread(midi_file([evs])))
    exact = [j * num * 48 / den for j in range(2000)]  # bar j in steps (12 per beat), last onset at step 180
    expected = sorted({int(x + 0.5) for x in exact if int(x + 0.5) <= 180})
    assert _bar_steps(tok, ids) == expected
    assert tok.encode(reread(tok.decode(ids))) == ids


def test_bars_round_trip_for_random_time_signature_changes():
    """Time signatures of every kind (sub-step bars, bars of 255 beats, changes in mid-bar) at
    several grid resolutions: the decoded file's time signatures give back the same <bar> tokens."""
    rng = random.Random(3)
    for spb in (12, 7, 24):
        tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True, steps_per_beat=spb))
        for _ in range(40):
            tpb = rng.choice([480, 96, 100])
            evs = [(rng.randint(0, 20 * tpb), mido.MetaMessage(
                "time_signature", numerator=rng.choice([1, 2, 3, 5, 7, 12, 13, 255]),
                denominator=rng.choice([1, 2, 4, 8, 16, 32, 64, 128]))) for _ in range(rng.randint(0, 4))]
            for _ in range(rng.randint(1, 12)):
                t, p = rng.randint(0, 30 * tpb), rng.randint(40, 90)
                evs += [on(t, p), off(t + rng.randint(1, 2 * tpb), p)]
            ids = tok.encode(reread(midi_file([evs], tpb=tpb)))
            assert tok.encode(reread(tok.decode(ids))) == ids


# ----------------------------------------------------------------------------- malformed headers and meta events
TRACK_60 = bytes([0, 0x90, 60, 100, 0x83, 0x60, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
TRACK_64 = bytes([0, 0x90, 64, 100, 0x83, 0x60, 0x80, 64, 0, 0, 0xFF, 0x2F, 0])


def test_tracks_beyond_the_header_count_are_read_and_counted(tmp_path, tok, caplog):
    """mido reads only as many tracks as the header declares: the notes of the others were lost
    without a word."""
    p = tmp_path / "count.mid"
    p.write_bytes(smf([TRACK_60, TRACK_64], ntracks=1))
    notes, _, _, st = tok.extract_notes(p)
    assert sorted(n.pitch for n in notes) == [60, 64] and st.extra_tracks == 1
    assert "declares 1 tracks but the file holds 2" in caplog.text and "1 tracks beyond" in st.summary()
    assert tok.encode(p) == tok.encode(smf([TRACK_60, TRACK_64]))
    assert tok.last_stats.extra_tracks == 0


@pytest.mark.parametrize("fmt", [3, 7, 0x7FFF])
def test_a_format_that_does_not_exist_is_an_error(tmp_path, tok, fmt):
    p = tmp_path / "f.mid"
    p.write_bytes(smf([TRACK_60], fmt=fmt))
    with pytest.raises(MidiError, match=rf"f.mid: the header says MIDI format {fmt}, which does not exist"):
        tok.encode(p)


def _meta(meta_type, data, delta=0):
    return bytes([delta, 0xFF, meta_type, len(data)]) + bytes(data)


@pytest.mark.parametrize("event", [
    _meta(0x59, [20, 0]),        # key signature with 20 sharps
    _meta(0x59, [0, 5]),         # key signature of mode 5
    _meta(0x59, [0]),            # key signature without its mode
    _meta(0x20, []),             # channel prefix without data
    _meta(0x00, [1]),            # sequence number of one byte
    _meta(0x54, [0xE0, 0, 0, 0, 0]),  # SMPTE offset with an unknown frame rate
    _meta(0x58, [3, 2]),         # time signature without clocks (not needed without use_bars)
], ids=["key20", "mode5", "key_short", "channel_prefix", "seqnum", "smpte", "timesig_short"])
def test_a_broken_meta_event_the_tokenizer_does_not_need_is_skipped_and_counted(tmp_path, tok, caplog, event):
    p = tmp_path / "meta.mid"
    p.write_bytes(smf([event + TRACK_60]))
    ids = tok.encode(p)
    assert tok.last_stats.broken_meta == 1 and "1 broken meta events skipped" in tok.last_stats.summary()
    assert ids == tok.encode(smf([TRACK_60]))
    assert "meta.mid: skipped 1 broken meta event" in caplog.text and "tick 0 of track 0" in caplog.text


def test_a_skipped_meta_event_moves_no_other_event():
    """The time of a dropped event goes to the next one; a dropped last event keeps the end of the
    track (where an unterminated note ends)."""
    tok = MidiTokenizer()
    # note on at 0; broken key signature at 480; note off 0 ticks later -> one beat
    mid = bytes([0, 0x90, 60, 100]) + _meta(0x59, [20, 0], delta=0x40) + bytes([0x83, 0x20, 0x80, 60, 0, 0, 0xFF, 0x2F, 0])
    # (delta 0x40 + 0x1A0 = 64 + 416 = 480)
    notes, _, _ = tok.decode_notes(tok.encode(smf([mid])))
    assert notes == [Note(0, 12, 0, 60, 6)]
    # a note never released and a broken key signature as the track's last event at tick 960
    tail = bytes([0, 0x90, 62, 100]) + bytes([0x87, 0x40, 0xFF, 0x59, 2, 20, 0])
    notes, _, _ = tok.decode_notes(tok.encode(smf([tail])))
    assert notes == [Note(0, 24, 0, 62, 6)] and tok.last_stats.unterminated == 1


def test_a_broken_meta_event_the_tokenizer_needs_is_an_error_naming_it(tmp_path):
    p = tmp_path / "tempo.mid"
    p.write_bytes(smf([TRACK_64, _meta(0x51, [7, 0xA1]) + TRACK_60]))
    with pytest.raises(MidiError) as e:
        MidiTokenizer().encode(p)
    assert str(e.value) == f"{p}: broken set_tempo meta event at tick 0 of track 1 (2 data bytes, expected 3)"
    p.write_bytes(smf([_meta(0x58, [3, 2]) + TRACK_60]))
    with pytest.raises(MidiError, match=r"tempo.mid: broken time_signature meta event at tick 0 of track 0 \(2 data bytes, expected 4\)"):
        MidiTokenizer(MidiTokenizerConfig(use_bars=True)).encode(p)
    p.write_bytes(smf([_meta(0x58, [0, 2, 24, 8]) + TRACK_60]))  # numerator 0: no bar length
    with pytest.raises(MidiError, match="time signature 0/4 at tick 0"):
        MidiTokenizer(MidiTokenizerConfig(use_bars=True)).encode(p)
    tok = MidiTokenizer()
    tok.encode(p)
    assert tok.last_stats.broken_meta == 1


# ----------------------------------------------------------------------------- what encode accepts
def test_encode_refuses_ints_and_reads_binary_file_objects(tmp_path, tok):
    """An int used to be taken for a file descriptor: encode(0) read stdin, encode(fd) closed fd."""
    import os

    p = tmp_path / "a.mid"
    p.write_bytes(_valid_bytes())
    fd = os.open(p, os.O_RDONLY)
    try:
        for bad in (fd, 0, None, True, 1.5, ["a.mid"]):  # the fd first: the old code read it (and closed it)
            with pytest.raises(TypeError, match="give a path .str or os.PathLike., the file's bytes, a binary file object"):
                tok.encode(bad)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)
    want = tok.encode(_valid_bytes())
    assert tok.encode(io.BytesIO(_valid_bytes())) == want
    assert tok.encode(memoryview(_valid_bytes())) == want
    with open(p, "rb") as f:
        assert tok.encode(f) == want and not f.closed
    assert tok.last_stats.source == str(p)
    with pytest.raises(MidiError, match="<file object>: not a MIDI file"):
        tok.encode(io.BytesIO(b"text"))
    with pytest.raises(TypeError, match="text-mode file object"):
        tok.encode(io.StringIO("MThd"))
    with open(p) as f:  # a MIDI file opened in text mode: its read() failed decoding the bytes as text
        with pytest.raises(TypeError, match=f"{p}: a text-mode file object"):
            tok.encode(f)


# ----------------------------------------------------------------------------- CLI: nothing tokenized, broken links
def test_cli_tokenize_with_nothing_tokenized_is_an_error_and_writes_nothing(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    (tmp_path / "notmidi.mid").write_text("hello\n")
    out = tmp_path / "t.npy"
    assert main(["music", "tokenize", str(tmp_path / "notmidi.mid"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mmrwkv music tokenize: error: {tmp_path / 'notmidi.mid'}: not a MIDI file (no MThd header)"
    assert not out.exists()
    (tmp_path / "empty.mid").write_bytes(b"")
    assert main(["music", "tokenize", str(tmp_path), "--out", str(out)]) == 2
    assert "none of the 2 files could be tokenized (first: " in capsys.readouterr().err and not out.exists()


def test_cli_tokenize_counts_a_broken_link(tmp_path, capsys):
    from multimodal_rwkv.cli import main

    d = tmp_path / "m"
    d.mkdir()
    (d / "good.mid").write_bytes(_valid_bytes())
    (d / "gone.mid").symlink_to(tmp_path / "missing.mid")
    assert main(["music", "tokenize", str(d)]) == 0
    o = capsys.readouterr()
    assert "tokenized 1 files, skipped 1 unreadable" in o.out
    assert f"skipped: {d / 'gone.mid'}: broken symbolic link (to {tmp_path / 'missing.mid'})" in o.err
    assert main(["music", "tokenize", str(d / "good.mid"), str(d / "gone.mid")]) == 0  # named on the command line
    assert "tokenized 1 files, skipped 1 unreadable" in capsys.readouterr().out


def test_meter_changes_are_decoded_at_the_bar_where_they_happen():
    """A change to a shorter bar came back one bar late, and a new meter on the last bar as 3/256."""
    tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True))
    assert tok.time_signatures_from_bars([0, 48, 96, 132, 168]) == [(0, 4, 4), (96, 3, 4)]
    assert tok.time_signatures_from_bars([0, 48, 96, 120], 120) == [(0, 4, 4), (96, 2, 4)]
    assert tok.time_signatures_from_bars([0, 48, 96, 120], 130) == [(0, 4, 4), (96, 2, 4)]
    assert tok.time_signatures_from_bars([0, 36, 72, 120, 168]) == [(0, 3, 4), (72, 4, 4)]


def test_time_signatures_of_numpy_integers_are_taken():
    import numpy as np

    tok = MidiTokenizer(MidiTokenizerConfig(use_bars=True))
    notes = [Note(onset=s, duration=6, group=0, pitch=60, velocity=4) for s in range(0, 200, 12)]
    plain = tok.encode_notes(notes, time_signatures=[(0, 3, 4)])
    assert tok.encode_notes(notes, time_signatures=[(np.int64(0), np.int64(3), np.int32(4))]) == plain
    with pytest.raises(ValueError, match="need positive ints"):
        tok.encode_notes(notes, time_signatures=[(0, 3.0, 4)])


def test_with_file_header_keeps_an_open_title_line_open():
    from multimodal_rwkv.music.abc import with_file_header

    assert with_file_header("M:6/8\n\nX:1\nT:Fo") == "X:1\nM:6/8\nT:Fo"
    assert with_file_header("M:6/8\n\nX:1\nT:Fo\n") == "X:1\nT:Fo\nM:6/8\n"


def test_config_numbers_must_be_finite(tmp_path, capsys):
    """{"tempo_range": [30, Infinity]} (Python's json reads Infinity) crashed with OverflowError."""
    from multimodal_rwkv.cli import main

    for text, match in [('{"tempo_range": [30, Infinity]}', "tempo_range: must be two finite numbers"),
                        ('{"tempo_range": [NaN, 240]}', "tempo_range: must be two finite numbers"),
                        ('{"tempo_range": [-Infinity, 240]}', "tempo_range: must be two finite numbers"),
                        ('{"pitch_range": [21, Infinity]}', "pitch_range: must be two integers"),
                        ('{"tempo_range": [1e-320, 240]}', "tempo_range: too wide"),
                        ('{"tempo_range": [1e200, 1e300], "tempo_bins": 1}', "tempo_range: too wide"),
                        ('{"max_shift": Infinity}', "max_shift: must be a positive int")]:
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(ConfigError, match=match):
            MidiTokenizerConfig.load(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"tempo_range": [30, Infinity]}')
    (tmp_path / "a.mid").write_bytes(_valid_bytes())
    assert main(["music", "tokenize", str(tmp_path / "a.mid"), "--tokenizer-config", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be two finite numbers" in err[0]


def test_vocabulary_sizes_are_bounded_by_what_a_shard_holds():
    """{"max_shift": 100000000} was accepted, then ran out of memory building the vocabulary."""
    for key, limit in (("max_shift", 30000), ("max_duration", 30000), ("tempo_bins", 1000)):
        with pytest.raises(ConfigError, match=f"MidiTokenizerConfig.{key}: at most {limit}, got 100000000 "):
            MidiTokenizerConfig(**{key: 100_000_000})
    with pytest.raises(ConfigError, match="velocity_bins: at most 127"):
        MidiTokenizerConfig(velocity_bins=128)
    # every size at its limit: the vocabulary still fits a uint16 shard (prepare's rule: <= 65535 ids)
    from multimodal_rwkv.music.midi_tokenizer import MAX_VOCAB

    big = MidiTokenizer(MidiTokenizerConfig(max_shift=30000, max_duration=30000, tempo_bins=1000,
                                            tempo_range=(1000, 1_000_000), velocity_bins=127, group_size=1,
                                            pitch_range=(0, 127), drum_pitch_range=(0, 127)))
    assert big.vocab_size <= MAX_VOCAB <= 65535


@pytest.mark.parametrize("spb", [1, 2, 3, 5, 7, 12, 24, 480])
def test_time_signatures_from_bars_give_the_bars_back(spb):
    """Property: encoding with the time signatures made from a bar list puts the bar lines exactly
    there (plus the encoder's line at step 0) wherever successive lines are at most 255 whole
    notes apart; a longer stretch gets only lines of the longest bar (255/1). A first bar after
    step 0 used to bring the encoder's 4/4 lines from step 0 up to it."""
    tok = MidiTokenizer(MidiTokenizerConfig(steps_per_beat=spb, use_bars=True))
    longest = 255 * 4 * spb
    rng = random.Random(spb)
    for _ in range(60):
        span = rng.choice([10, 50, 400, 2000, 5000])
        bars = sorted({rng.randrange(0, span) for _ in range(rng.randint(1, 12))})
        end = bars[-1] + rng.choice([0, rng.randrange(0, 60), rng.randrange(0, 3000)])
        ts = tok.time_signatures_from_bars(bars, end)
        got = tok.decode_notes(tok.encode_notes([Note(end, 1, 0, 60, 3)], [(0, 120.0)], ts))[2].bars
        want = sorted({0} | set(bars))
        if all(b - a <= longest for a, b in zip(want, want[1:])) and end - want[-1] < longest:
            assert got == want, (bars, end, ts)
        else:
            assert set(want) <= set(got), (bars, end, ts)
            stops = want + [end + 1]
            for x in set(got) - set(want):  # only the longest bar's lines, inside a long stretch
                k = max(k for k, b in enumerate(want) if b < x)
                assert stops[k + 1] - want[k] > longest and (x - want[k]) % longest == 0, (bars, end, ts, x)
    # a decoded piece whose first <bar> is after its start comes back with that bar, not 4/4 lines before it
    ids = tok.encode_notes([Note(0, 1, 0, 60, 3), Note(7 * spb, 1, 0, 62, 3)], [(0, 120.0)], [])
    shifted = [ids[0]] + [i for i in ids[1:] if i != tok.bar_id]
    k = shifted.index(tok.pitch_start + 62 - tok.pitch_lo)
    shifted.insert(k, tok.bar_id)  # a bar line at the second note only
    assert tok.decode_notes(shifted)[2].bars == [7 * spb]
    buf = io.BytesIO()
    tok.decode(shifted).save(file=buf)
    assert tok.decode_notes(tok.encode(buf.getvalue()))[2].bars == [0, 7 * spb]
