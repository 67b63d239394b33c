"""VisualRWKV on the shared training engine: stage 1 freezes all but the projector, a short
synthetic run lowers the loss, and the CLI answers questions with the trained model."""
import json
import subprocess
import sys

import pytest
import torch

from multimodal_rwkv.errors import ConfigError

TINY_TOWER = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16}


def recipe(tmp, data, out, **over):
    from multimodal_rwkv.training.config import config_from_dict

    d = {
        "task": "visualrwkv", "output_dir": str(out), "seed": 0, "max_steps": 20, "checkpoint_every": 0,
        "progress_bar": False,
        "model": {"config": {"n_layer": 2, "n_embd": 32, "head_size": 32, "d_mix_lora": 8, "d_decay_lora": 16},
                  "options": {"vision_config": TINY_TOWER, "vocab_subset": "auto", "loss_reduction": "sample",
                              "train_encoder": True, "freeze_embeddings": False}},
        "data": {"train_file": str(data / "train.json"), "image_folder": str(data / "images"), "ctx_len": 128},
        "optim": {"lr": 3e-3, "lr_final": 1e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "train": {"micro_batch_size": 6},
    }
    for k, v in over.items():
        sec, key = k.split("__") if "__" in k else (None, k)
        (d[sec] if sec else d)[key] = v
    return config_from_dict(d)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic run (20 steps): returns (data folder, run folder, exported model)."""
    from multimodal_rwkv.training import train
    from multimodal_rwkv.vision.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("vrwkv")
    generate_dataset(root / "data", n_train=40, n_test=4, questions_per_image=2, size=32, seed=1)
    final = train(recipe(root, root / "data", root / "run"))
    return root / "data", root / "run", final


def test_synthetic_run_lowers_the_loss(trained):
    _, run, final = trained
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    info = json.loads((final / "training_info.json").read_text())
    assert info["task"] == "visualrwkv" and info["skipped_records"] == 0
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["model_type"] == "visualrwkv" and len(cfg["vocab_subset"]) + 1 == cfg["text_config"]["vocab_size"]


def test_stage1_changes_only_the_projector(trained, tmp_path):
    from safetensors.torch import load_file

    from multimodal_rwkv.training import train

    data, _, final = trained
    cfg = recipe(tmp_path, data, tmp_path / "s1", max_steps=3)
    cfg.model.config = {}
    cfg.model.from_pretrained = str(final)
    cfg.model.options = {"stage": 1, "prompt_template": "image_first"}
    out = train(cfg)
    before, after = load_file(str(final / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("projector.") for k in changed), changed
    assert json.loads((out / "config.json").read_text())["prompt_template"] == "image_first"
    # architecture options cannot be changed when starting from a VisualRWKV checkpoint
    cfg.model.options = {"stage": 1, "projector": "mlp2x_gelu"}
    cfg.output_dir = str(tmp_path / "s1b")
    with pytest.raises(ConfigError, match="projector"):
        train(cfg)


@pytest.mark.parametrize("peft", [{"lora_r": 4}, {"trainable": ["*.ln_out.*"]}, {"freeze": ["projector.*"]}])
def test_stage1_refuses_peft_settings_it_would_override(tmp_path, peft):
    """Stage 1 trains the projector alone: LoRA (logged as applied, exported as zeros) and
    trainable/freeze patterns were silently overridden."""
    from multimodal_rwkv.vision.training import VisualRWKVTask

    cfg = recipe(tmp_path, tmp_path / "none.json", tmp_path / "run")
    cfg.model.options = {"stage": 1}
    for k, v in peft.items():
        setattr(cfg.peft, k, v)
    with pytest.raises(ConfigError, match=f"peft.{next(iter(peft))}: stage 1 trains the projector alone"):
        VisualRWKVTask(cfg)


def test_a_resume_may_change_runtime_options_but_not_what_trains(trained, tmp_path):
    """model.options that leave the weights' meaning alone (prompt_template, export_dtype) may change
    on resume; those that change what trains (stage, train_encoder) are still refused."""
    from multimodal_rwkv.training import train

    data, _, final = trained
    run = tmp_path / "s1"

    def cfg(steps, **options):
        c = recipe(tmp_path, data, run, max_steps=steps, checkpoint_every=1)
        c.model.config = {}
        c.model.from_pretrained = str(final)
        c.model.options = {"stage": 1, **options}
        return c

    train(cfg(1))
    out = train(cfg(2, prompt_template="image_first", export_dtype="bf16"))
    assert json.loads((out / "config.json").read_text())["prompt_template"] == "image_first"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match=r"model\.options\.stage: 1 -> 2"):
        train(cfg(3, stage=2))


def test_a_resume_of_a_vocab_subset_auto_run_keeps_the_runs_ids(trained, tmp_path):
    """vocab_subset: auto was computed again on a resume: another prompt_template (allowed) or data
    with a new word gave other ids, so the checkpoint did not load ('Error(s) in loading state_dict
    for VisualRWKV:', the reason cut off)."""
    from multimodal_rwkv.training import train

    data, _, _ = trained
    run = tmp_path / "auto"
    train(recipe(tmp_path, data, run, max_steps=2, checkpoint_every=1))
    ids = json.loads((run / "vocab_subset.json").read_text())
    rows = json.loads((data / "train.json").read_text())
    rows[0]["conversations"][0]["value"] += " elephant"  # a word the first run's data did not hold (read as UNK)
    (tmp_path / "more.json").write_text(json.dumps(rows))
    c = recipe(tmp_path, data, run, max_steps=3, checkpoint_every=1)
    c.model.options = {**c.model.options, "prompt_template": "image_first"}
    c.data.train_file = str(tmp_path / "more.json")
    out = train(c)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_subset"] == ids and cfg["prompt_template"] == "image_first"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    (run / "vocab_subset.json").unlink()  # lost: the run's final/ config holds the same ids
    c.max_steps = 4
    out = train(c)
    assert json.loads((out / "config.json").read_text())["vocab_subset"] == ids


def test_micro_batches_are_weighted_by_the_models_loss_reduction(trained, tmp_path):
    """loss_reduction 'sample' taken from the checkpoint (not repeated in the recipe): the loop
    weighted micro-batches by answer tokens (the recipe's default), so an accumulated step was
    neither a per-sample nor a per-token mean."""
    from multimodal_rwkv.vision.training import VisualRWKVTask

    data, _, final = trained
    assert json.loads((final / "config.json").read_text())["loss_reduction"] == "sample"
    cfg = recipe(tmp_path, data, tmp_path / "ft")
    cfg.model.config = {}
    cfg.model.from_pretrained = str(final)
    cfg.model.options = {"stage": 2}
    task = VisualRWKVTask(cfg)
    task.build_model()
    labels = torch.full((2, 6), -100)
    labels[0, 2:5] = 1  # 3 answer tokens and 1
    labels[1, 4] = 1
    assert task.count_targets({"labels": labels}) == 2
    cfg.model.options = {"stage": 2, "loss_reduction": "token"}
    task = VisualRWKVTask(cfg)
    task.build_model()
    assert task.count_targets({"labels": labels}) == 4


@pytest.mark.parametrize("reduction", ["sample", "token"])
def test_l2wrap_does_not_depend_on_how_the_batch_is_split(trained, tmp_path, reduction):
    """L2Wrap pushed each supervised position by 1e-4 over its micro-batch's supervised positions:
    under loss_reduction 'sample', one batch of 4 and two micro-batches of 2 (or two processes)
    trained differently (losses 2e-5 apart after 20 steps)."""
    from multimodal_rwkv.training import train

    data, _, _ = trained

    def losses(out, **over):
        cfg = recipe(tmp_path, data, tmp_path / out, max_steps=6, **over)
        cfg.model.options["loss_reduction"] = reduction
        cfg.train.l2wrap = True
        train(cfg)
        rows = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows], [r["tokens"] for r in rows]

    whole, whole_tokens = losses("whole", train__micro_batch_size=4)
    split, split_tokens = losses("split", train__micro_batch_size=2, train__grad_accum=2)
    assert max(abs(a - b) for a, b in zip(whole, split)) < 5e-6, (whole, split)  # (the split: 2.5e-5)
    # the samples' tokens, not their padding to each micro-batch's longest (which the split changes)
    assert whole_tokens == split_tokens


def test_config_values_of_the_wrong_type_are_refused():
    """bidirectional_scan: "false" (a hand-edited config.json) read as true and scanned the image
    backwards; a vocab_subset id 11.5 was cut to 11."""
    from multimodal_rwkv.vision.modeling import VisualRWKVConfig

    ok = {"text_config": {"n_layer": 1, "n_embd": 32}, "vision_config": TINY_TOWER}
    VisualRWKVConfig(**ok, bidirectional_scan=False)
    for bad, match in (({"bidirectional_scan": "false"}, "bidirectional_scan must be true or false"),
                       ({"bundle_encoder": "no"}, "bundle_encoder must be true or false"),
                       ({"stop": 5}, "stop must be a string"), ({"text_config": [1]}, "text_config must be an object"),
                       ({"vocab_subset": [0, 5, 11.5]}, "vocab_subset must be a list of World ids"),
                       ({"vocab_subset": [0, True]}, "vocab_subset must be a list of World ids")):
        with pytest.raises(ConfigError, match=match):
            VisualRWKVConfig(**{**ok, **bad})


def test_unknown_option_is_a_config_error(trained, tmp_path):
    from multimodal_rwkv.training import train

    data, _, _ = trained
    cfg = recipe(tmp_path, data, tmp_path / "x")
    cfg.model.options = {**cfg.model.options, "bogus": 1}
    with pytest.raises(ConfigError, match="bogus"):
        train(cfg)
    # a vocab_subset without the stop text's id: a model that could never end an answer
    cfg = recipe(tmp_path, data, tmp_path / "nostop")
    cfg.model.options = {**cfg.model.options, "vocab_subset": [0, 5, 6]}
    with pytest.raises(ConfigError, match=r"vocab_subset lacks the stop text's id\(s\) \[261\]"):
        train(cfg)
    # state tuning exports a language model's time_state: refused for a VisualRWKV, with the reason
    cfg = recipe(tmp_path, data, tmp_path / "st")
    cfg.peft.train_state = True
    with pytest.raises(ConfigError, match="peft.train_state: state tuning is for the lm task"):
        train(cfg)
    # a BlinkDL model.pth holds a language model alone: refused up front, not written unloadable
    cfg = recipe(tmp_path, data, tmp_path / "y")
    cfg.export.pth = True
    with pytest.raises(ConfigError, match="export.pth"):
        train(cfg)
    assert not (tmp_path / "y" / "checkpoints").exists()
    # an export dtype that cannot be: refused before training, naming the setting (it failed at the
    # export, after training, without the setting's name); --print-config checks it too
    cfg = recipe(tmp_path, data, tmp_path / "z")
    cfg.model.options = {**cfg.model.options, "export_dtype": "fp64"}
    with pytest.raises(ConfigError, match="model.options.export_dtype: unknown dtype 'fp64'"):
        train(cfg)
    assert not (tmp_path / "z").exists()
    from multimodal_rwkv.cli import main
    from multimodal_rwkv.training.config import save_config

    save_config(cfg, tmp_path / "z.yaml")
    assert main(["train", str(tmp_path / "z.yaml"), "--print-config"]) == 2
    # the model's options as its config checks them, when the task is made (they were found only
    # when the model was built, without model.options in the message)
    cfg = recipe(tmp_path, data, tmp_path / "p")
    cfg.model.options = {**cfg.model.options, "projector": "bogus"}
    with pytest.raises(ConfigError, match=r"model.options: projector must be one of \('linear'"):
        train(cfg)
    save_config(cfg, tmp_path / "p.yaml")
    assert main(["train", str(tmp_path / "p.yaml"), "--print-config"]) == 2


def test_a_missing_image_folder_is_refused_before_the_model_is_built(trained, tmp_path, monkeypatch):
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.training import train
    from multimodal_rwkv.vision.training import VisualRWKVTask

    def no_model(self):
        raise AssertionError("the model was built")

    monkeypatch.setattr(VisualRWKVTask, "build_model", no_model)
    data, _, _ = trained
    cfg = recipe(tmp_path, data, tmp_path / "o")
    cfg.data.image_folder = str(tmp_path / "nodir")
    with pytest.raises(DataError, match=r"nodir: image folder not found \(data.image_folder\)"):
        train(cfg)
    assert not (tmp_path / "o").exists()


def _cli(capsys, *args):
    from multimodal_rwkv.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_vqa_and_eval_vqa(trained, tmp_path, capsys):
    data, _, final = trained
    img = sorted((data / "images").glob("test_*.png"))[0]
    rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(img), "--question",
                         "How many shapes are there?", "--max-new-tokens", "4")
    assert rc == 0, err
    assert len(out_.strip().splitlines()) == 1
    qfile = tmp_path / "q.jsonl"
    lines = (data / "test_questions.jsonl").read_text().splitlines()
    qfile.write_text("\n".join(lines[:3] + ["{oops", json.dumps({"question_id": "m", "image": "nope.png",
                                                                  "question": "Q?"})]) + "\n")
    out = tmp_path / "a.jsonl"
    rc, out_, err = _cli(capsys, "eval-vqa", "--model", str(final), "--questions", str(qfile), "--image-folder",
                         str(data / "images"), "--output", str(out), "--max-new-tokens", "4")
    assert rc == 0, err
    assert f"{qfile}:4: invalid JSON" in err and f"{qfile}:5: image file not found" in err
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [json.loads(x)["question_id"] for x in lines[:3]]
    assert "accuracy:" in out_ and "over 3 questions" in out_
    # the score printed is the mean of the per-question scores of the answers written
    from multimodal_rwkv.vision.evaluate import vqa_soft_accuracy

    want = [vqa_soft_accuracy(a["answer"], json.loads(x)["answers"]) for a, x in zip(answers, lines[:3])]
    assert f"accuracy: {100 * sum(want) / 3:.2f}%" in out_
    # sampling with --seed: the same answers at any --batch-size (the seed restarted every batch, so
    # at --batch-size 1 every question got the same draw)
    qfile8 = tmp_path / "q8.jsonl"
    q0 = json.loads(lines[0])
    qfile8.write_text("".join(json.dumps({**q0, "question_id": i}) + "\n" for i in range(8)))
    got = []
    for bs in ("1", "3", "8"):
        o = tmp_path / f"s{bs}.jsonl"
        rc, out_, err = _cli(capsys, "eval-vqa", "--model", str(final), "--questions", str(qfile8), "--image-folder",
                             str(data / "images"), "--output", str(o), "--max-new-tokens", "6", "--do-sample",
                             "--temperature", "5", "--seed", "5", "--batch-size", bs)
        assert rc == 0, err
        got.append(o.read_text())
    assert got[0] == got[1] == got[2]
    assert len({json.loads(x)["answer"] for x in got[0].splitlines()}) > 1  # one stream per question
    rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(tmp_path / "missing.png"),
                         "--question", "Q?")
    assert rc == 2 and "missing.png" in err and "Traceback" not in err
    (tmp_path / "dir.png").mkdir()
    rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(tmp_path / "dir.png"), "--question", "Q?")
    assert rc == 2 and "dir.png: a directory, not an image file" in err
    for blank in ("  ", "<image>\n"):
        rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(img), "--question", blank)
        assert rc == 2 and "--question is empty" in err
    rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(img), "--question", "<image><image>")
    assert rc == 2 and "--question has 2 <image> placeholders for its one image" in err
    rc, out_, err = _cli(capsys, "vqa", "--model", str(final), "--image", str(img), "--question", "Q?",
                         "--vision-tower", "openai/clip-vit-large-patch14")  # a folder has its own tower
    assert rc == 2 and "brings its own vision tower" in err
    (tmp_path / "outdir").mkdir()
    rc, out_, err = _cli(capsys, "eval-vqa", "--model", str(final), "--questions", str(qfile), "--image-folder",
                         str(img.parent), "--output", str(tmp_path / "outdir"))
    assert rc == 2 and "outdir: --output is a folder" in err and "skipped" not in err


def test_cli_vision_synth_subprocess(tmp_path):
    """The console entry point end to end (one subprocess; the rest of the CLI is tested in-process)."""
    r = subprocess.run([sys.executable, "-m", "multimodal_rwkv", "vision-synth", "--out", str(tmp_path / "s"),
                        "--n-train", "2", "--n-test", "1", "--size", "32"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["train_records"] == len(json.loads((tmp_path / "s" / "train.json").read_text()))


@pytest.mark.slow
def test_stage2_lora_trains_lm_adapters_and_projector_only(trained, tmp_path):
    from safetensors.torch import load_file

    from multimodal_rwkv.training import train
    from multimodal_rwkv.vision.modeling import VisualRWKV

    data, _, final = trained
    cfg = recipe(tmp_path, data, tmp_path / "lora", max_steps=2)
    cfg.model.config = {}
    cfg.model.from_pretrained = str(final)
    cfg.model.options = {"stage": 2}  # encoder and token embedding frozen (VisualRWKV's defaults)
    cfg.peft.lora_r = 4
    cfg.optim.lr = 1e-2
    out = train(cfg)
    before, after = load_file(str(final / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # LoRA merged back into plain weights on export
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("projector.") for k in changed)
    assert any(k.startswith("language_model.rwkv.blocks.") and k.endswith("att.key.weight") for k in changed)
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert "language_model.rwkv.emb.weight" not in changed
    assert not any(k.endswith("time_decay") or k.endswith("ln1.weight") for k in changed)  # only LoRA targets
    VisualRWKV.from_pretrained(out)


def test_two_processes_with_unused_tower_layers(trained, tmp_path):
    """DDP (2 gloo ranks) with parameters a step does not use -- the tower's layer above
    feature_layer 0 -- trains, and gives one process's losses with the doubled batch. A validation
    set of one batch (fewer than the ranks) hung the final evaluation: the rank with no batch
    skipped the forward whose buffer broadcast the other waited in."""
    import os

    from multimodal_rwkv.training import train
    from multimodal_rwkv.training.config import save_config

    data, _, _ = trained
    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps(json.loads((data / "train.json").read_text())[:1]))
    over = {"max_steps": 3, "train__micro_batch_size": 4, "data__valid_file": str(valid)}
    one = recipe(tmp_path, data, tmp_path / "one", **over)
    one.model.options["feature_layer"] = 0
    one.model.options["loss_reduction"] = "token"
    rows = [json.loads(x) for x in (train(one).parent / "metrics.jsonl").read_text().splitlines()]
    ref = [r["loss"] for r in rows]
    two = recipe(tmp_path, data, tmp_path / "two", max_steps=3, train__micro_batch_size=2,
                 data__valid_file=str(valid))
    two.model.options["feature_layer"] = 0
    two.model.options["loss_reduction"] = "token"
    save_config(two, tmp_path / "r.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), "-m", "multimodal_rwkv", "train", str(tmp_path / "r.yaml")]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows2]
    assert len(got) == 3
    assert got == pytest.approx(ref, abs=1e-5)
    assert rows2[-1]["valid_loss"] == pytest.approx(rows[-1]["valid_loss"], abs=1e-5)
    assert (tmp_path / "two" / "final" / "config.json").is_file()


def test_stage1_on_a_fresh_language_model_warns_that_nothing_learns(trained, tmp_path, caplog):
    """RWKV's initialisation zeroes the output projections: with the LM frozen (stage 1), no answer
    depends on the image and the projector's gradient is exactly 0. Said, not silently trained."""
    from multimodal_rwkv.training import train

    data, _, _ = trained
    cfg = recipe(tmp_path, data, tmp_path / "fresh", max_steps=1)
    cfg.model.options = {**cfg.model.options, "stage": 1, "train_encoder": False}
    caplog.set_level("WARNING", logger="multimodal_rwkv.training.loop")
    train(cfg)
    assert "gradient norm 0 at step 1" in caplog.text


def test_bad_text_records_are_skipped_and_counted_not_a_crash(tmp_path):
    """A conversation value with an unpaired surrogate (a JSON "\\ud800" escape) and a line that is not
    UTF-8 are bad records under data.on_bad_record: skip, not a UnicodeEncodeError or a rejected file."""
    from multimodal_rwkv.errors import DataError
    from multimodal_rwkv.training import train
    from multimodal_rwkv.vision.synthetic import generate_dataset

    generate_dataset(tmp_path / "data", n_train=6, n_test=0, questions_per_image=1, size=32, seed=2)
    lines = [json.dumps(r).encode() for r in json.loads((tmp_path / "data" / "train.json").read_text())]
    lines[1] = lines[1].replace(b'"value": "', b'"value": "bad \\ud800 ', 1)
    lines[3] = lines[3].replace(b'"value": "', b'"value": "caf\xe9 ', 1)
    data = tmp_path / "data" / "train.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    cfg = recipe(tmp_path, tmp_path / "data", tmp_path / "run", max_steps=2,
                 data__train_file=str(data), data__on_bad_record="skip")
    final = train(cfg)
    assert json.loads((final / "training_info.json").read_text())["skipped_records"] == 2
    cfg = recipe(tmp_path, tmp_path / "data", tmp_path / "run2", max_steps=2, data__train_file=str(data))
    with pytest.raises(DataError, match=f"{data}:4: not valid UTF-8 \\(byte 0xe9"):
        train(cfg)
    data.write_bytes(b"\n".join(lines[:3]) + b"\n")
    with pytest.raises(DataError, match=f"{data}:2: record .*turn 0 value holds an unpaired surrogate"):
        train(cfg)


def test_a_trained_encoder_is_never_left_out_of_final(trained, tmp_path):
    """train_encoder with bundle_encoder false: final/ named the tower's source and reloaded the
    untrained tower (the trained one silently lost)."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from multimodal_rwkv.training import train
    from multimodal_rwkv.vision.modeling import VisualRWKV

    data, _, _ = trained
    tower = tmp_path / "tower"
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_TOWER.items() if k != "model_type"})).save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tower)
    opts = {"vision_tower": str(tower), "bundle_encoder": False, "train_encoder": True, "freeze_embeddings": False}
    cfg = recipe(tmp_path, data, tmp_path / "a", max_steps=2)
    cfg.model.options = dict(opts)
    with pytest.raises(ConfigError, match="would lose the trained encoder"):
        train(cfg)
    # a checkpoint without its tower, trained further with the encoder: final/ bundles it
    cfg.model.options = {**opts, "train_encoder": False}
    cfg.output_dir = str(tmp_path / "b")
    first = train(cfg)
    assert not any(k.startswith("vision_tower.") for k in load_file(str(first / "model.safetensors")))
    cfg = recipe(tmp_path, data, tmp_path / "c", max_steps=2)
    cfg.model.config, cfg.model.from_pretrained = {}, str(first)
    cfg.model.options = {"train_encoder": True}
    final = train(cfg)
    saved = load_file(str(final / "model.safetensors"))
    tuned = {k: v for k, v in saved.items() if k.startswith("vision_tower.")}
    untrained = VisualRWKV.from_pretrained(first).state_dict()
    assert tuned and any(not torch.equal(v, untrained[k]) for k, v in tuned.items())
    again = VisualRWKV.from_pretrained(final).state_dict()
    assert all(torch.equal(again[k], v) for k, v in tuned.items())


def test_stage1_with_a_batch_of_text_only_records(trained, tmp_path):
    """LLaVA data may hold text-only records (no "image"); in stage 1 (the projector alone trains) a
    micro-batch of only those gave a loss with no graph: a backward traceback, exit 1, no step."""
    from multimodal_rwkv.training import train

    data, _, final = trained
    rows = json.loads((data / "train.json").read_text())[:2]
    answer = rows[0]["conversations"][1]["value"]  # (the model answers from its vocab_subset)
    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Hello {i}"},
                                                   {"from": "gpt", "value": answer}]} for i in range(2)]
    (tmp_path / "mixed.json").write_text(json.dumps(text_only + rows))
    cfg = recipe(tmp_path, data, tmp_path / "s1t", max_steps=4, train={"micro_batch_size": 1})
    cfg.data.train_file = str(tmp_path / "mixed.json")
    cfg.model.config = {}
    cfg.model.from_pretrained = str(final)
    cfg.model.options = {"stage": 1}
    train(cfg)
    got = [json.loads(x) for x in (tmp_path / "s1t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in got)
    # two DDP ranks, one record each: a text-only micro-batch crashed the backward there too
    # ("Expected to mark a variable ready only once"), and the losses equal one process's
    import os

    from multimodal_rwkv.training.config import save_config

    cfg.train.micro_batch_size, cfg.max_steps, cfg.output_dir = 2, 2, str(tmp_path / "one")
    ref = [json.loads(x)["loss"] for x in (train(cfg).parent / "metrics.jsonl").read_text().splitlines()]
    cfg.train.micro_batch_size, cfg.output_dir = 1, str(tmp_path / "two")
    save_config(cfg, tmp_path / "r.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(28600 + os.getpid() % 1000), "-m", "multimodal_rwkv", "train", str(tmp_path / "r.yaml")]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(ref, abs=1e-5)
