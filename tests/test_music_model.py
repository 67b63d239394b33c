"""Music on the RWKV core: recipes, a tiny training run (validation loss decreases), generation
(MIDI file mido can read + PNG), sampling filters, evaluation, the shipped demo model."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import mido
import pytest

torch = pytest.importorskip("torch")

from multimodal_rwkv.music import MidiTokenizer, Note  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from multimodal_rwkv.music import BACH_MODEL_DIR as ASSET  # noqa: E402


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name,kind", [("music_bach_midi.yaml", "midi"), ("music_oneill_abc.yaml", "abc")])
def test_recipes_load_and_match_tokenizers(name, kind):
    from multimodal_rwkv.music import AbcTokenizer
    from multimodal_rwkv.training import load_config

    cfg = load_config(ROOT / "recipes" / name).validate()
    assert cfg.task == "lm" and cfg.data.format == "tokens" and cfg.data.valid_file
    vocab = MidiTokenizer().vocab_size if kind == "midi" else AbcTokenizer().vocab_size
    assert cfg.model.config["vocab_size"] == vocab
    assert cfg.model.config.get("version", "x060") == "x060"
    assert any(f.endswith(f"{kind}_tokenizer.json") for f in cfg.export.include_files)


# ----------------------------------------------------------------------------- tiny training + generation
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Prepare 8 chorales, train a 1-layer model for 40 steps; returns (final_dir, data_dir, metrics)."""
    pytest.importorskip("music21")
    from multimodal_rwkv.music.corpora import prepare
    from multimodal_rwkv.training import load_config, train

    tmp = tmp_path_factory.mktemp("music_run")
    data = tmp / "data"
    rep = prepare(data, corpus="bach-chorales", limit=8, valid_permille=400, test_permille=0, workers=1)
    assert rep.counts["valid"]["pieces"] > 0 and rep.counts["train"]["pieces"] > 0
    cfg = load_config(ROOT / "recipes" / "music_bach_midi.yaml", [
        f"output_dir={tmp / 'run'}", f"data.train_file={data / 'train'}", f"data.valid_file={data / 'valid'}",
        "data.ctx_len=64", "train.micro_batch_size=4", "max_steps=24", "eval_every=8", "checkpoint_every=24",
        "model.config.n_layer=1", "model.config.n_embd=64", "model.config.head_size=32", "optim.lr=0.003",
        "optim.warmup_steps=5", "progress_bar=false", f"export.include_files=[{data / 'midi_tokenizer.json'}]",
    ])
    final = train(cfg)
    metrics = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return Path(final), data, metrics


def test_tiny_training_validation_loss_decreases(tiny_run):
    final, _, metrics = tiny_run
    valid = [m["valid_loss"] for m in metrics if "valid_loss" in m]
    assert len(valid) >= 2
    assert valid[-1] < valid[0] - 0.3, valid
    assert valid[-1] < math.log(MidiTokenizer().vocab_size)  # better than uniform
    assert (final / "midi_tokenizer.json").is_file() and (final / "model.safetensors").is_file()
    # token files were tokenized by music prepare: training_info.json does not claim the World tokenizer
    assert json.loads((final / "training_info.json").read_text())["tokenizer"] is None


def test_cli_generate_writes_midi_and_png(tiny_run, tmp_path, capsys):
    from multimodal_rwkv.cli import main

    final, data, _ = tiny_run
    out, png = tmp_path / "song.mid", tmp_path / "pics" / "roll.png"  # pics/ is created
    rc = main(["music", "generate", "--model", str(final), "--out", str(out), "--png", str(png),
               "--seconds", "3", "--max-tokens", "120", "--seed", "3", "--top-k", "20"])
    assert rc == 0
    mid = mido.MidiFile(str(out))
    assert mid.ticks_per_beat > 0 and png.stat().st_size > 100
    assert "wrote" in capsys.readouterr().out
    # continuing a prompt: the prompt's notes come first, unchanged
    prompt = sorted((data / "midi").glob("*.mid"))[0]
    out2 = tmp_path / "cont.mid"
    assert main(["music", "generate", "--model", str(final), "--out", str(out2), "--prompt", str(prompt),
                 "--seconds", "2", "--max-tokens", "60", "--png", str(tmp_path / "c.png")]) == 0
    tok = MidiTokenizer.from_pretrained(final)
    p_notes, _, _, _ = tok.extract_notes(prompt)
    g_notes, _, _, _ = tok.extract_notes(out2)
    assert set(p_notes) <= set(g_notes)
    # bad prompt -> one-line error, exit 2
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"")
    assert main(["music", "generate", "--model", str(final), "--out", str(tmp_path / "x.mid"), "--prompt", str(bad)]) == 2


def test_generate_midi_api_is_seeded(tiny_run, tmp_path):
    from multimodal_rwkv.music import generate_midi

    final, _, _ = tiny_run

    def run(seed):
        buf = io.BytesIO()
        generate_midi(final, seconds=2, seed=seed, max_new_tokens=80).save(file=buf)
        return buf.getvalue()

    a, b = run(5), run(5)
    assert a == b
    assert mido.MidiFile(file=io.BytesIO(a)).tracks


def test_cli_eval_bits_per_note(tiny_run, capsys):
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.music.corpora import load_tokens
    from multimodal_rwkv.music.generate import load_music_model
    from multimodal_rwkv.music.metrics import windowed_nll

    final, data, _ = tiny_run
    assert main(["music", "eval", "--model", str(final), "--data", str(data / "valid"), "--ctx-len", "64"]) == 0
    line = capsys.readouterr().out
    nats = float(line.split(" nats/token")[0].split(", ")[-1])
    bpn = float(line.split(" bits/note")[0].split(", ")[-1])
    ids = load_tokens(data / "valid")
    model, tok = load_music_model(final)
    total, n = windowed_nll(model, ids, 64)
    assert nats == pytest.approx(total / n, abs=1e-4)
    assert bpn == pytest.approx(total / tok.count_notes(ids[1:]) / math.log(2), rel=1e-3)
    # converting the training run's own validation losses
    assert main(["music", "eval", "--metrics", str(final.parent / "metrics.jsonl"), "--data", str(data / "valid")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    valid = [m["valid_loss"] for m in tiny_run[2] if "valid_loss" in m]
    assert len(lines) == len(valid)
    want = valid[-1] * (len(ids) - 1) / tok.count_notes(ids[1:]) / math.log(2)
    assert float(lines[-1].split(", ")[1].split(" ")[0]) == pytest.approx(want, abs=1e-4)


# ----------------------------------------------------------------------------- sampling
def _allowed_reference(logits, temperature, top_k, top_p):
    """Obviously-correct twin of RWKV's filter (rwkv.utils.PIPELINE.sample_logits): the nucleus and
    the top-k from the untempered probabilities (the temperature changes no membership)."""
    x = logits.tolist()
    order = sorted(range(len(x)), key=lambda i: -x[i])
    m = max(x)
    w = [math.exp(x[i] - m) for i in order]
    z = sum(w)
    keep, mass = [], 0.0
    for i, wi in zip(order, w):
        if 0 < top_p < 1 and mass >= top_p and keep:
            break
        keep.append(i)
        mass += wi / z
    return set(keep) & set(order[:top_k] if top_k else order)


@pytest.mark.parametrize("V,temperature,top_k,top_p", [(7, 1.0, 0, 0.5), (13, 0.7, 5, 1.0), (31, 1.3, 9, 0.8), (5, 1.0, 0, 1.0),
                                                     (31, 3.0, 0, 0.5), (31, 0.8, 3, 0.9)])
def test_sample_next_respects_filters(V, temperature, top_k, top_p):
    from multimodal_rwkv.music.generate import sample_next

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g) * 2
    want = _allowed_reference(logits, temperature, top_k, top_p)
    seen = {sample_next(logits, temperature, top_k, top_p, g) for _ in range(400)}
    assert seen <= want and len(seen) >= min(len(want), 2)
    assert sample_next(logits, 0.0) == int(torch.argmax(logits))
    assert sample_next(logits, 1.0, allowed=2, generator=g) in (0, 1)


# ----------------------------------------------------------------------------- shipped demo model
def test_shipped_bach_model():
    if not (ASSET / "model.safetensors").is_file():
        pytest.skip("demo music model not built yet")
    from multimodal_rwkv.music.generate import generate_music, load_music_model

    size = sum(f.stat().st_size for f in ASSET.iterdir())
    assert size < 8.5e6
    model, tok = load_music_model(ASSET)
    assert isinstance(tok, MidiTokenizer) and model.config.vocab_size == tok.vocab_size
    res = generate_music(model, tok, seconds=2, seed=0, max_new_tokens=100)
    assert len(res.notes) > 0
    buf = io.BytesIO()
    res.midi.save(file=buf)
    assert mido.MidiFile(file=io.BytesIO(buf.getvalue())).tracks


def test_cli_eval_and_generate_bad_input_exit_2(tiny_run, tmp_path, capsys):
    import json

    import numpy as np

    from multimodal_rwkv.cli import main

    final, data, _ = tiny_run
    np.save(tmp_path / "big.npy", np.array([0, 1, 5, 60000, 2, 0], np.uint16))
    assert main(["music", "eval", "--model", str(final), "--data", str(tmp_path / "big.npy")]) == 2
    assert "big.npy: token id 60000 is outside the model's vocabulary" in capsys.readouterr().err
    assert main(["music", "eval", "--model", str(final), "--data", str(data)]) == 2
    assert f"{data}: no .npy shards (a prepared dataset: give one split, e.g. {data / 'train'})" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["music", "eval", "--model", str(final), "--data", str(data / "valid"), "--ctx-len", "0"])
    assert e.value.code == 2
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 1, "valid_loss": "x"}) + "\n")
    assert main(["music", "eval", "--metrics", str(tmp_path / "m.jsonl"), "--data", str(data / "valid")]) == 2
    assert "m.jsonl: step 1: valid_loss is not a number" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["music", "generate", "--model", str(final), "--out", str(tmp_path / "g.mid"),
              "--seed", "99999999999999999999999"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_abc_generate_draws_the_piano_roll_for_an_abc_output_too(tmp_path, monkeypatch, capsys):
    """--png with an .abc output: the tune goes through abc_to_midi for the picture only (it used
    to write no picture and still exit 0)."""
    pytest.importorskip("music21")
    from PIL import Image

    import multimodal_rwkv.music.generate as gen
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.music import AbcTokenizer

    tune = "X:1\nT:t\nM:4/4\nL:1/8\nK:D\nDEFG ABcd|d2c2 B2A2|\n"
    monkeypatch.setattr(gen, "load_music_model", lambda path: (None, AbcTokenizer()))
    monkeypatch.setattr(gen, "generate_abc", lambda **kw: tune)
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "t.abc"), "--png",
                 str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.abc").read_text() == tune and not (tmp_path / "t.mid").exists()
    assert Image.open(tmp_path / "t.png").size[0] > 10
    assert main(["music", "generate", "--model", "m", "--out", str(tmp_path / "u.mid")]) == 0
    assert (tmp_path / "u.abc").read_text() == tune and (tmp_path / "u.mid").stat().st_size > 0


def test_generate_midi_api_writes_outputs_safely(tiny_run, tmp_path):
    """``out``/``png`` of the Python API: both written, or refused before generating when one would
    replace an input (the prompt, a file of the model folder)."""
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.music import generate_midi

    final, _, _ = tiny_run
    out, png = tmp_path / "new" / "a.mid", tmp_path / "new" / "a.png"
    midi = generate_midi(final, seconds=1, seed=1, max_new_tokens=40, out=out, png=png)
    assert mido.MidiFile(out).tracks and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(midi.tracks) == len(mido.MidiFile(out).tracks)
    weights = next(p for p in final.iterdir() if p.suffix == ".safetensors")
    before = weights.read_bytes()
    with pytest.raises(DataError, match="is a file of .*the model"):
        generate_midi(final, seconds=1, max_new_tokens=8, out=weights)
    with pytest.raises(DataError, match="is the prompt"):
        generate_midi(final, prompt=out, seconds=1, max_new_tokens=8, out=out)
    assert weights.read_bytes() == before


def test_cli_generate_reports_the_tokens_it_sampled(tmp_path, capsys):
    """A piece cut by --max-tokens is closed with an <eos> the model did not sample: the report
    counted it (6 new tokens for --max-tokens 5)."""
    from pathlib import Path

    import multimodal_rwkv
    from multimodal_rwkv.cli import main

    model = Path(multimodal_rwkv.__file__).parent / "assets" / "music_bach"
    for cap in (1, 5):
        assert main(["music", "generate", "--model", str(model), "--out", str(tmp_path / "m.mid"),
                     "--max-tokens", str(cap), "--seed", "1"]) == 0
        n = int(capsys.readouterr().out.split(" new tokens")[0].split(", ")[-1])
        assert 1 <= n <= cap


def test_generate_midi_api_png_must_be_a_png_name(tiny_run, tmp_path):
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.music import generate_midi

    final, _, _ = tiny_run
    with pytest.raises(DataError, match="roll.jpg: png is written as a PNG picture"):
        generate_midi(final, seconds=1, max_new_tokens=8, png=tmp_path / "roll.jpg")
    assert not (tmp_path / "roll.jpg").exists()


def test_generated_piano_roll_marks_every_prompt_note(tmp_path):
    """The prompt's notes are the first ones of the result and are drawn paler; a prompt that is
    one chord (its time shifts add up to 0) still gets its red line. Its last notes used to be drawn
    as generated, and a one-chord prompt had no line at all."""
    if not (ASSET / "model.safetensors").is_file():
        pytest.skip("demo music model not built yet")
    from multimodal_rwkv.music.generate import generate_music, load_music_model, write_midi_outputs
    from multimodal_rwkv.music.pianoroll import group_colour, render_pianoroll

    model, tok = load_music_model(ASSET)
    for prompt in ([Note(0, 24, 0, 60, 5), Note(0, 24, 0, 64, 5), Note(0, 24, 0, 67, 5)],
                   [Note(0, 12, 0, 60, 5), Note(12, 24, 0, 62, 5)]):
        res = generate_music(model, tok, tok.encode_notes(prompt), seconds=1, seed=0, max_new_tokens=40)
        assert res.prompt_end == max(n.onset for n in prompt) and res.prompt_notes == len(prompt)
        assert [(n.onset, n.duration, n.pitch) for n in res.notes[:len(prompt)]] == \
            [(n.onset, n.duration, n.pitch) for n in prompt]
        write_midi_outputs(res, tok, None, tmp_path / "roll.png")
        from PIL import Image

        img = Image.open(tmp_path / "roll.png").convert("RGB")
        hi = max(n.pitch for n in res.notes) + 2
        pale = tuple((v + 255) // 2 for v in group_colour(0))
        px = min(8.0, (2400 - 40) / max([n.offset for n in res.notes] + [12]))
        last = prompt[-1]
        assert img.getpixel((int(30 + (last.onset + 0.5) * px) + 1, 18 + (hi - last.pitch) * 5 + 1)) == pale
        assert img.getpixel((int(30 + res.prompt_end * px), 30)) == (220, 0, 0)  # the line, at 0 too
    # without a prompt: no line, no pale notes (prompt_end=0, a result's value then, means none)
    with_prompt = render_pianoroll([Note(0, 12, 0, 60, 5)], None, steps_per_beat=12, prompt_notes=1)
    assert (220, 0, 0) in {with_prompt.getpixel((x, 30)) for x in range(with_prompt.size[0])}  # a chord: at 0
    for kw in ({}, {"prompt_end": 0}, {"prompt_end": None}):
        plain = render_pianoroll([Note(0, 12, 0, 60, 5)], None, steps_per_beat=12, **kw)
        assert (220, 0, 0) not in {plain.getpixel((x, 30)) for x in range(plain.size[0])}


class _UniformLM(torch.nn.Module):
    """A stand-in causal LM (the ``transformers`` path of sample_tokens): equal logits for every id."""

    def __init__(self, vocab_size):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=True, past_key_values=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(1, input_ids.shape[1], self.config.vocab_size) + self.w,
                               past_key_values=None)


def test_generation_apis_check_their_arguments():
    """generate_abc(max_bytes=-5) returned the prompt, generate_midi(seconds=inf) was accepted,
    seed=1.5 surfaced as torch's RuntimeError and generate_abc(None) as a bare TypeError."""
    import numpy as np

    from multimodal_rwkv.music import AbcTokenizer, generate_abc, generate_midi
    from multimodal_rwkv.music.generate import generate_music, sample_tokens

    abc, tok = _UniformLM(AbcTokenizer().vocab_size), MidiTokenizer()
    midi = _UniformLM(tok.vocab_size)
    bad = [(lambda: generate_abc(model=abc, max_bytes=-5), ValueError, "max_bytes must be an integer >= 1, got -5"),
           (lambda: generate_abc(model=abc, max_bytes=0), ValueError, "max_bytes must be an integer >= 1"),
           (lambda: generate_abc(model=abc, max_bytes=2.5), ValueError, "max_bytes must be an integer >= 1"),
           (lambda: generate_abc(model=abc, seed=1.5), ValueError, r"seed must be None or an integer in \[0, 2\*\*63"),
           (lambda: generate_abc(model=abc, seed=True), ValueError, "seed must be None or an integer"),
           (lambda: generate_abc(model=abc, seed=-1), ValueError, "seed must be None or an integer"),
           (lambda: generate_abc(None), TypeError, "give model_dir .* or model="),
           (lambda: generate_abc(model=abc, prompt=None), TypeError, "prompt must be ABC text"),
           (lambda: generate_abc(model=abc, temperature=-1), ValueError, "temperature must be"),
           # checked before the model folder is read
           (lambda: generate_midi("/nonexistent", seconds=float("inf")), ValueError, r"seconds must be > 0"),
           (lambda: generate_midi("/nonexistent", seconds=float("nan")), ValueError, r"seconds must be > 0"),
           (lambda: generate_midi("/nonexistent", seconds=-1), ValueError, r"seconds must be > 0"),
           (lambda: generate_midi("/nonexistent", seconds=1, seed=1.5), ValueError, "seed must be None or an integer"),
           (lambda: generate_midi("/nonexistent", seconds=1, max_new_tokens=0), ValueError, "max_new_tokens must be"),
           (lambda: generate_music(midi, tok, seconds=float("inf")), ValueError, r"seconds must be > 0"),
           (lambda: generate_music(midi, tok, seconds=1, max_new_tokens=3.0), ValueError, "max_new_tokens must be"),
           (lambda: generate_music(midi, tok, [1, 5.0], seconds=1), ValueError, "prompt ids must be integers"),
           (lambda: generate_music(midi, tok, [1, tok.vocab_size], seconds=1), ValueError, "prompt ids must be"),
           (lambda: sample_tokens(midi, [0], 0), ValueError, "max_new_tokens must be an integer >= 1"),
           (lambda: sample_tokens(midi, "abc", 3), TypeError, "prompt of token ids"),
           (lambda: sample_tokens(midi, [0], 3, seed=2.0), ValueError, "seed must be None or an integer")]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()
    # numpy integers are integers
    text = generate_abc(model=abc, max_bytes=np.int64(5), seed=np.int64(3))
    assert text == generate_abc(model=abc, max_bytes=5, seed=3)
    res = generate_music(midi, tok, np.array([1, 5]), seconds=np.float32(0.5), max_new_tokens=np.int32(8),
                         seed=np.uint8(1))
    assert res.new_tokens <= 8


def test_sample_next_takes_numpy_settings_and_tiny_temperatures():
    """A temperature of 1e-45 made the music sampler's probabilities NaN (a traceback from the
    CLI); numpy / tensor settings were refused as not numbers."""
    import numpy as np
    import torch

    from multimodal_rwkv.music.generate import sample_next

    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for t in (1e-45, 1e-38, np.float32(1e-40)):
        assert sample_next(logits, temperature=t, generator=torch.Generator().manual_seed(0)) == 1
    got = sample_next(logits, temperature=np.float32(0.8), top_k=np.int64(2), top_p=torch.tensor(0.9),
                      generator=torch.Generator().manual_seed(0))
    assert got in (1, 2)
    for bad in ({"top_k": torch.tensor(2.5)}, {"temperature": np.True_}, {"top_p": torch.tensor(True)}):
        with pytest.raises(ValueError, match="must be"):
            sample_next(logits, **bad)
