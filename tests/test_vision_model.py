"""VisualRWKV model: image scatter, bidirectional scan, prefill + recurrent decode, loss, I/O."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from multimodal_rwkv.errors import CheckpointError, ConfigError, DataError
from multimodal_rwkv.vision.modeling import VisualRWKV, VisualRWKVConfig, build_scan_order
from multimodal_rwkv.vision.processor import IGNORE_INDEX, IMAGE_TOKEN_ID
from multimodal_rwkv.vision.testing import (
    make_v060_checkpoint,
    random_lm,
    save_tiny_tower,
    tiny_vision_config,
    v060_state_dict,
)


@pytest.fixture(scope="module")
def tok():
    from multimodal_rwkv import WorldTokenizer

    return WorldTokenizer()


def make_model(tok, cls_token="end", template="sandwich", bidir=True, n_layer=3, vocab_size=65536,
               subset=None, kind="clip", seed=0):
    text = {"n_layer": n_layer, "n_embd": 64, "head_size": 32}
    if subset is None:
        text["vocab_size"] = vocab_size
    cfg = VisualRWKVConfig(
        text_config=text,
        vision_config=tiny_vision_config(kind, image_size=24, patch_size=8), cls_token=cls_token,
        prompt_template=template, bidirectional_scan=bidir, vocab_subset=subset)
    torch.manual_seed(seed)
    lm = random_lm(n_layer=n_layer, n_embd=64, vocab_size=cfg.text_config["vocab_size"], seed=seed)
    m = VisualRWKV.from_config(cfg, tokenizer=tok, language_model=lm)
    with torch.no_grad():
        m.projector.weight.normal_(0, 1.0)
    return m.eval()


@pytest.fixture(scope="module")
def base(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def subset_model(tok):
    sub = sorted(set([0] + list(range(200, 400)) + tok.encode("User: Assistant: yes no red blue\n\n What?")))
    return make_model(tok, subset=sub)


def variant(m, **kw):
    """A copy of ``m`` with config fields changed (weights shared by value, tokenizer by reference)."""
    import copy

    m2 = copy.deepcopy(m, {id(m._tokenizer): m._tokenizer})
    for k, v in kw.items():
        setattr(m2.config, k, v)
    m2.vision_tower.options = m2.config.encoder_options
    m2._processor = None
    return m2


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(20 + i, 30, 3, generator=g) * 255).byte().numpy()) for i in range(n)]


def manual_flip_forward(m, ids, pv):
    """VisualRWKV v6.0's bidirectional_forward, written out: odd blocks flip each image's patch span."""
    x = m.embed(ids, pv)
    n = m.num_image_tokens
    lm = m.language_model.rwkv
    B, T, C = x.shape
    spans = []
    for b in range(B):
        pos = (ids[b] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
        for j in range(0, len(pos), n):
            s, e = pos[j], pos[j] + n
            if m.vision_tower.cls_position == "end":
                e -= 1
            elif m.vision_tower.cls_position == "start":
                s += 1
            spans.append((b, s, e))
    zero = x.new_zeros(B, C)
    for i, block in enumerate(lm.blocks):  # (block 0 applies ln0 itself)
        if i % 2 == 1:
            x = x.clone()
            for b, s, e in spans:
                x[b, s:e] = x[b, s:e].flip(0)
        x = block(x, zero, None, zero)[0]
        if i % 2 == 1:
            x = x.clone()
            for b, s, e in spans:
                x[b, s:e] = x[b, s:e].flip(0)
    return m.language_model.head(lm.ln_out(x))


@pytest.mark.parametrize("cls_token", ["end", "drop", "start"])
def test_scan_order_equals_manual_flip(tok, base, cls_token):
    m = variant(base, cls_token=cls_token)
    p = m.processor
    # two rows, images at different positions; row 0 has two images
    r0 = p.build_prompt("<image> vs <image>: which is brighter?", num_images=2)
    r1 = p.build_prompt("Colour?", num_images=1) + tok.encode(" red")
    T = max(len(r0), len(r1))
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[0, :len(r0)] = torch.tensor(r0)
    ids[1, :len(r1)] = torch.tensor(r1)
    pv = p.preprocess_images(images(3))
    with torch.no_grad():
        got = m(ids, pv).logits
        want = manual_flip_forward(m, ids, pv)
        m.config.bidirectional_scan = False
        uni = m(ids, pv).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert (got - uni).abs().max() > 1e-3  # the scan changes the result, so the check above can fail


def test_build_scan_order_layout():
    I = IMAGE_TOKEN_ID
    ids = torch.tensor([[5, I, I, I, I, 6, I, I, I, I], [I, I, I, I, 7, 8, 9, 1, 2, 3]])
    order = build_scan_order(ids, 4, "end")
    assert order[0].tolist() == [0, 3, 2, 1, 4, 5, 8, 7, 6, 9]
    assert order[1].tolist() == [2, 1, 0, 3, 4, 5, 6, 7, 8, 9]
    assert build_scan_order(ids, 4, None)[1].tolist() == [3, 2, 1, 0, 4, 5, 6, 7, 8, 9]
    assert build_scan_order(torch.tensor([[1, 2]]), 4, None) is None
    with pytest.raises(DataError):
        build_scan_order(torch.tensor([[I, I, I, 1]]), 4, None)


@pytest.mark.parametrize("template", ["sandwich", "image_first"])
def test_prefill_then_recurrent_decode_equals_parallel(tok, base, template):
    m = variant(base, prompt_template=template, cls_token="drop")  # image span ends the prefix in image_first
    p = m.processor
    prompt = p.build_prompt("What is in the top left?")
    cont = tok.encode(" red circle\n\nUser: sure?")
    pv = p.preprocess_images(images(1))
    full_ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        full = m(full_ids, pv).logits[0].float()
        lg, st = m.prefill(prompt, pv)
        steps = [lg[0]]
        for t in cont:
            out = m(torch.tensor([[t]]), state=st)
            st = out.state
            steps.append(out.logits[0, -1].float())
        # image-first prefix reuse: prefill "User: <image>", then the question from a cloned state
        if template == "image_first":
            pre, suf = p.image_first_split("What is in the top left?")
            _, st_pre = m.prefill(pre, pv)
            lg2, _ = m.prefill(suf, None, state=st_pre.clone())
            assert torch.allclose(lg2[0], full[len(prompt) - 1], atol=1e-4, rtol=1e-4)
    rec = torch.stack(steps)
    par = full[len(prompt) - 1:]
    assert torch.allclose(rec, par, atol=1e-4, rtol=1e-4), (rec - par).abs().max()


def test_answer_batch_matches_single_answers_and_prefix_reuse(tok, base):
    m = variant(base, prompt_template="image_first")
    imgs = images(2)
    qs = ["What colour?", "How many shapes are there?", "Where?"]
    single = [m.answer(imgs[i % 2], q, max_new_tokens=4) for i, q in enumerate(qs)]
    batch = m.answer_batch([imgs[i % 2] for i in range(3)], qs, max_new_tokens=4)
    noreuse = m.answer_batch([imgs[i % 2] for i in range(3)], qs, max_new_tokens=4, reuse_image_prefix=False)
    assert m.answer_batch([], []) == []
    assert batch == single == noreuse
    # the left-padded batch of question suffixes starts from exact copies of the image state
    lg, st = m.prefill_questions(imgs[0], qs)
    for j, q in enumerate(qs):
        want, want_st = m.prefill(m.processor.build_prompt(q), m.processor.preprocess_images([imgs[0]]))
        assert torch.allclose(lg[j], want[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(st[j].wkv[-1], want_st.wkv[-1], atol=1e-4, rtol=1e-4)
    assert any(a for a in single)  # random weights still produce some text
    s1 = m.answer(imgs[0], "Q?", max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    s2 = m.answer(imgs[0], "Q?", max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    assert s1 == s2
    # without a seed: torch's global generator, as transformers' generate (it was re-seeded at random)
    draws = []
    for _ in range(2):
        torch.manual_seed(5)
        draws.append((m.answer(imgs[0], "Q?", max_new_tokens=8, do_sample=True, temperature=1.5), torch.rand(2)))
    assert draws[0][0] == draws[1][0] and torch.equal(draws[0][1], draws[1][1])
    # a temperature whose logits / temperature overflow (NaN probabilities before): the top token
    tiny = m.answer(imgs[0], "Q?", max_new_tokens=8, do_sample=True, temperature=1e-45, seed=3)
    assert tiny == m.answer(imgs[0], "Q?", max_new_tokens=8)


def test_image_count_mismatch_raises(base):
    m = base
    ids = torch.tensor([m.processor.build_prompt("Q?")])
    with pytest.raises(DataError, match="image"):
        m(ids, None)
    with pytest.raises(DataError, match="image"):
        m(ids, m.processor.preprocess_images(images(2)))


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_loss_fast_path_equals_full_logits(tok, subset_model, reduction):
    m = variant(subset_model, loss_reduction=reduction)
    p = m.processor
    a, la = p.encode_conversation([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "yes"}], 1)
    b, lb = p.encode_conversation([{"from": "human", "value": "<image>\nLonger question here?"},
                                   {"from": "gpt", "value": "no, a long answer with odd words zebra"}], 1)
    T = max(len(a), len(b))
    ids = torch.zeros(2, T, dtype=torch.long)
    labels = torch.full((2, T), IGNORE_INDEX)
    for i, (x, l) in enumerate(((a, la), (b, lb))):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(l)] = torch.tensor(l)
    pv = p.preprocess_images(images(2))
    with torch.no_grad():
        fast = m(ids, pv, labels=labels).loss
        ref = m.reference_loss(ids, pv, labels)
    assert torch.allclose(fast, ref, atol=1e-5), (fast, ref)
    # sample vs token reduction differ when the rows have different numbers of targets
    m.config.loss_reduction = "token" if reduction == "sample" else "sample"
    with torch.no_grad():
        other = m(ids, pv, labels=labels).loss
    assert abs(float(other) - float(fast)) > 1e-4


def test_vocab_subset_maps_ids(tok, subset_model):
    m = subset_model
    sub = m.config.vocab_subset
    assert m.language_model.config.vocab_size == len(sub) + 1
    w = torch.tensor([0, sub[3], 12345])
    loc = m.to_local(w)
    assert loc.tolist() == [0, 3, len(sub)]  # unknown World id -> UNK row
    assert m.to_world(loc[:2]).tolist() == [0, sub[3]]
    out = m.answer(images(1)[0], "What?", max_new_tokens=5)
    assert isinstance(out, str)
    ids = m.decode(torch.randn(1, len(sub) + 1), m.prefill(m.processor.build_prompt("What?"),
                                                          m.processor.preprocess_images(images(1)))[1], 4)[0]
    assert all(i in set(sub) for i in ids)


def test_save_load_round_trip(tok, base, tmp_path):
    m = variant(base, prompt_template="image_first")
    m.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "config.json" in files and "model.safetensors" in files and "preprocessor_config.json" in files
    m2 = VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    assert m2.config == m.config or m2.config.to_dict()["text_config"] == m.config.to_dict()["text_config"]
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    img = images(1)[0]
    assert m.answer(img, "Q?", max_new_tokens=5) == m2.answer(img, "Q?", max_new_tokens=5)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not a folder"):  # (it said only 'File exists')
        m.save_pretrained(tmp_path / "afile")
    # bf16 on disk: about half the bytes, loads back close
    m.save_pretrained(tmp_path / "b", dtype="bf16")
    size32 = (tmp_path / "m" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "b" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    m3 = VisualRWKV.from_pretrained(tmp_path / "b", tokenizer=tok)
    assert m3.dtype == torch.bfloat16  # as stored, as RWKVForCausalLM loads (it came back fp32)
    k = "language_model.head.weight"
    assert torch.allclose(m3.state_dict()[k].float(), sd1[k], rtol=1e-2, atol=1e-2)
    assert VisualRWKV.from_pretrained(tmp_path / "b", dtype="fp32", tokenizer=tok).dtype == torch.float32
    # a corrupt folder is a CheckpointError naming the file
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["bogus"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus"):
        VisualRWKV.from_pretrained(tmp_path / "m")


def test_bad_folders_and_api_inputs_are_clear_errors(tok, base, tmp_path):
    base.save_pretrained(tmp_path / "m")
    good = json.loads((tmp_path / "m" / "config.json").read_text())

    def with_config(**change):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**good, **change}))
        return tmp_path / "m"

    for change, why in (({"text_config": None}, "invalid VisualRWKV config"),
                        ({"vision_config": "clip"}, "vision_config must be an object"),
                        ({"stop": 5}, "stop must be a string"),
                        ({"vision_config": {**good["vision_config"], "hidden_size": 63}}, "cannot build the vision tower"),
                        ({"feature_layer": 7}, "cannot build the vision tower it describes .*feature_layer 7")):
        with pytest.raises(CheckpointError, match=why):
            VisualRWKV.from_pretrained(with_config(**change), tokenizer=tok)
    with_config()
    pre = tmp_path / "m" / "preprocessor_config.json"
    pcfg = json.loads(pre.read_text())
    pre.write_text(json.dumps({**pcfg, "crop_size": {"height": 16, "width": 16}, "size": {"shortest_edge": 16}}))
    with pytest.raises(CheckpointError, match="makes 16x16 images, the vision tower takes 24x24"):
        VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    # no centre crop after a shortest-edge resize, or no resize: the size follows the image
    for change in ({"do_center_crop": False}, {"do_resize": False, "do_center_crop": False}):
        pre.write_text(json.dumps({**pcfg, **change}))
        with pytest.raises(CheckpointError, match="makes images whose size depends on the image"):
            VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    pre.write_text(json.dumps({**pcfg, "do_center_crop": False}))  # padded to a square first: fixed size
    with_config(image_aspect_ratio="pad")
    VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    pre.write_text(json.dumps(pcfg))
    (tmp_path / "m" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        VisualRWKV.from_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="fewer than the World vocabulary"):
        make_model(tok, vocab_size=1000)
    img = images(1)[0]
    with pytest.raises(DataError, match="questions must be a list"):
        base.answer_batch(img, "How many?")
    with pytest.raises(DataError, match="question 0: expected a string"):
        base.answer(img, None)
    with pytest.raises(DataError, match="unpaired surrogate"):
        base.answer(img, "bad \udcff")
    for blank in ("  ", "<image>", " <image>\n"):  # a placeholder alone is no question either
        with pytest.raises(DataError, match="question 0 is empty"):
            base.answer(img, blank)
    # two places for the one image say so, with or without text (it was 'empty' without)
    for two in (" <image>\n<image> ", "<image><image> hi"):
        with pytest.raises(DataError, match=r"question 0 has 2 <image> placeholders for 1 image\(s\)"):
            base.answer(img, two)
    with pytest.raises(ValueError, match="max_new_tokens"):
        base.answer(img, "Q?", max_new_tokens=-1)
    with pytest.raises(ValueError, match="seed"):
        base.answer(img, "Q?", do_sample=True, seed="a")
    with pytest.raises(DataError, match="empty"):
        base.answer(torch.zeros(3, 0, 5), "Q?")
    for kw in ({"top_p": -1}, {"temperature": float("inf")}, {"temperature": float("nan")}, {"top_k": -2}):
        with pytest.raises(ValueError):
            base.answer(img, "Q?", do_sample=True, **kw)
    from PIL import Image

    Image.new("RGB", (1_000_000, 1)).save(tmp_path / "strip.png")  # a small file, a huge resize
    with pytest.raises(DataError, match="strip.png: image is 1000000x1; preprocessing"):
        base.answer(str(tmp_path / "strip.png"), "Q?")


def test_referenced_encoder_round_trip(tok, tmp_path):
    folder = save_tiny_tower(tmp_path / "siglip", "siglip", image_size=24, patch_size=8)
    cfg = VisualRWKVConfig(text_config={"vocab_size": 65536, "n_layer": 2, "n_embd": 64, "head_size": 32},
                           vision_tower=folder, bundle_encoder=False, projector="mlp2x_gelu")
    m = VisualRWKV.from_config(cfg, tokenizer=tok, language_model=random_lm(n_layer=2))
    assert m.num_image_tokens == 9
    m.save_pretrained(tmp_path / "m")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert not any(k.startswith("vision_tower.") for k in keys)  # referenced, not bundled
    assert any(k.startswith("projector.0.") for k in keys)
    m2 = VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    img = images(1)[0]
    with torch.no_grad():
        pv = m.processor.preprocess_images([img])
        assert torch.equal(m.encode_images(pv), m2.encode_images(pv))


def test_a_referenced_encoder_given_as_a_relative_folder_is_recorded_absolute(tok, tmp_path, monkeypatch):
    """vision_tower='tower' (relative) was saved as typed: loaded from another directory the model
    went to the hub for it, or silently took another folder of that name."""
    import json

    save_tiny_tower(tmp_path / "train" / "tower", "siglip", image_size=24, patch_size=8)
    save_tiny_tower(tmp_path / "elsewhere" / "tower", "siglip", image_size=24, patch_size=8, seed=7)
    monkeypatch.chdir(tmp_path / "train")
    cfg = VisualRWKVConfig(text_config={"vocab_size": 65536, "n_layer": 2, "n_embd": 64, "head_size": 32},
                           vision_tower="tower", bundle_encoder=False)
    m = VisualRWKV.from_config(cfg, tokenizer=tok, language_model=random_lm(n_layer=2))
    m.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["vision_tower"]
    assert saved == str(tmp_path / "train" / "tower")
    monkeypatch.chdir(tmp_path / "elsewhere")
    m2 = VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    with torch.no_grad():
        pv = m.processor.preprocess_images(images(1))
        assert torch.equal(m.encode_images(pv), m2.encode_images(pv))


def test_fp16_refuses_a_weight_beyond_its_range(tok, tmp_path):
    """A VisualRWKV loaded (or saved) as fp16 turned a finite 1e5 into inf: vqa answered nothing."""
    m = make_model(tok, n_layer=2)
    with torch.no_grad():
        m.language_model.rwkv.blocks[1].ffn.value.weight[0, 0] = 1e5
    m.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.value\.weight holds 1e\+05, beyond fp16's range"):
        VisualRWKV.from_pretrained(tmp_path / "m", dtype="fp16", tokenizer=tok)
    with pytest.raises(CheckpointError, match="beyond fp16's range"):
        m.save_pretrained(tmp_path / "m16", dtype="fp16")
    assert not (tmp_path / "m16").exists()
    VisualRWKV.from_pretrained(tmp_path / "m", dtype="bf16", tokenizer=tok)  # bf16 has the range


def test_nan_logits_are_an_error_not_an_empty_answer(tok):
    """NaN logits (fp16 overflow) picked id 0 by argmax: vqa answered nothing, with exit 0."""
    from multimodal_rwkv.errors import NumericsError

    m = make_model(tok, n_layer=2)
    logits = torch.zeros(2, 50)
    logits[1, 3] = float("nan")
    for sample in (False, True):
        with pytest.raises(NumericsError, match="logits are NaN or infinite"):
            m._pick(logits, sample, 1.0, 0, 1.0, None)
    logits[1, 3] = -float("inf")  # a ban is fine
    assert m._pick(logits, False, 1.0, 0, 1.0, None).shape == (2,)


def test_load_released_v060_layout(tok, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.model.checkpoint import blink_to_ours, infer_config, load_state_into

    path = make_v060_checkpoint(tmp_path / "VisualRWKV-v060-tiny.pth")
    m = VisualRWKV.from_pretrained(path, tokenizer=tok)
    assert m.config.prompt_template == "sandwich" and m.config.cls_token == "end" and m.config.projector == "linear"
    raw = torch.load(path, weights_only=True)
    # independent twin: a CLIPVisionModel from the vit.* weights and an LM from the rwkv.* weights
    vit = {k[len("vit.vision_model."):]: v.float() for k, v in raw.items()
           if k.startswith("vit.") and not k.endswith("position_ids")}
    vcfg = CLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
                            image_size=32, patch_size=8, hidden_act="quick_gelu")
    ref_vit = CLIPVisionModel(vcfg)
    ref_vit.load_state_dict(vit)
    pv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        h = ref_vit(pixel_values=pv).last_hidden_state
        want = torch.cat([h[:, 1:], h[:, :1]], 1) @ raw["proj.weight"].float().T
        got = m.encode_images(pv)
    assert torch.allclose(got, want, atol=1e-4)
    blink = {k[len("rwkv."):]: v.float() for k, v in raw.items() if k.startswith("rwkv.")}
    with torch.device("meta"):
        lm = RWKVForCausalLM(infer_config(blink, "x"))
    lm = lm.to_empty(device="cpu")
    load_state_into(lm, blink_to_ours(blink), "x")
    ids = torch.tensor([[1, 2, 3, 300]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, lm(input_ids=ids).logits)
    # broken files
    sd = v060_state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="extra.weight"):
        VisualRWKV.from_pretrained(tmp_path / "bad.pth")
    sd = v060_state_dict()
    sd["proj.weight"] = torch.zeros(5, 5)
    torch.save(sd, tmp_path / "bad2.pth")
    with pytest.raises(CheckpointError, match="proj.weight"):
        VisualRWKV.from_pretrained(tmp_path / "bad2.pth")
    # the language-model loaders (info, generate, convert) name it a VisualRWKV model: they said its
    # int64 position_ids are no RWKV weights, or listed vit.* as unexpected keys
    from multimodal_rwkv.cli import main

    sd = v060_state_dict()
    sd.pop("vit.vision_model.embeddings.position_ids", None)
    torch.save(sd, tmp_path / "no_ids.pth")
    for f in (Path(path), tmp_path / "no_ids.pth"):
        with pytest.raises(CheckpointError, match=f"{f.name}: a VisualRWKV model .*use it with mmrwkv vqa"):
            RWKVForCausalLM.from_pretrained(f)
        assert main(["info", str(f)]) == 2


def test_patch_merge_model_tokens_decode_and_round_trip(tok, tmp_path):
    cfg = VisualRWKVConfig(text_config={"n_layer": 2, "n_embd": 64, "head_size": 32, "vocab_size": 65536},
                           vision_config=tiny_vision_config("clip", image_size=32, patch_size=8),  # 4x4 patches
                           cls_token="drop", patch_merge=2, projector="mlp2x_gelu", prompt_template="image_first")
    m = VisualRWKV.from_config(cfg, tokenizer=tok, language_model=random_lm(n_layer=2, n_embd=64)).eval()
    assert m.num_image_tokens == 4 and m.projector[0].in_features == 32 * 4
    p = m.processor
    prompt = p.build_prompt("What is in the top left?")
    assert prompt.count(IMAGE_TOKEN_ID) == 4
    cont = tok.encode(" red circle\n\n")
    pv = p.preprocess_images(images(1))
    with torch.no_grad():
        full = m(torch.tensor([prompt + cont]), pv).logits[0]
        lg, st = m.prefill(prompt, pv)
        steps = [lg[0]]
        for t in cont:
            out = m(torch.tensor([[t]]), state=st)
            st = out.state
            steps.append(out.logits[0, -1])
    assert torch.allclose(torch.stack(steps), full[len(prompt) - 1:], atol=1e-4, rtol=1e-4)
    m.save_pretrained(tmp_path / "m")
    m2 = VisualRWKV.from_pretrained(tmp_path / "m", tokenizer=tok)
    assert m2.config.patch_merge == 2 and m2.num_image_tokens == 4
    img = images(1)[0]
    assert m.answer(img, "Q?", max_new_tokens=4) == m2.answer(img, "Q?", max_new_tokens=4)


def test_from_config_leaves_the_config_alone_and_an_unbundled_tower_comes_from_its_folder(tmp_path):
    """from_config wrote the tower folder's config into the caller's config, so a second model from it
    got a random tower and the default image processor; with bundle_encoder false and a
    vision_config it built a random tower, saved without its weights, that came back as vision_tower's."""
    from multimodal_rwkv.vision.modeling import VisualRWKVConfig
    from multimodal_rwkv.vision.testing import random_lm, save_tiny_tower, tiny_vision_config

    tower = save_tiny_tower(tmp_path / "clip", seed=3)
    lm = random_lm(n_layer=1)
    cfg = VisualRWKVConfig(vision_tower=tower)
    a = VisualRWKV.from_config(cfg, language_model=lm)
    assert cfg.vision_config is None  # untouched
    b = VisualRWKV.from_config(cfg, language_model=lm)
    for pa, pb in zip(a.vision_tower.parameters(), b.vision_tower.parameters()):
        assert torch.equal(pa, pb)  # both from the folder
    unbundled = VisualRWKVConfig(vision_tower=tower, vision_config=tiny_vision_config(), bundle_encoder=False)
    c = VisualRWKV.from_config(unbundled, language_model=lm)  # the tower from its folder, as loading does
    for pa, pc in zip(a.vision_tower.parameters(), c.vision_tower.parameters()):
        assert torch.equal(pa, pc)
    again = VisualRWKV.from_config(c.config, language_model=lm)  # its own config builds it again
    c.save_pretrained(tmp_path / "m")
    back = VisualRWKV.from_pretrained(tmp_path / "m")
    for pa, pb, pc in zip(again.vision_tower.parameters(), back.vision_tower.parameters(), c.vision_tower.parameters()):
        assert torch.equal(pa, pc) and torch.equal(pb, pc)
    os.rename(tower, tmp_path / "moved")  # the folder it records is gone: said so (it was a hub-id error)
    with pytest.raises(CheckpointError, match=f"config.json: its vision tower .*{re.escape(str(tower))}, which no longer"):
        VisualRWKV.from_pretrained(tmp_path / "m")
