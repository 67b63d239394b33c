"""LLaVA JSON/JSONL dataset: labels, collate, truncation, every bad-record path, skip counting."""
import json
import re

import pytest
import torch
from PIL import Image

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.vision.data import LlavaDataset, collate
from multimodal_rwkv.vision.processor import IGNORE_INDEX, IMAGE_TOKEN_ID, VisualRWKVProcessor, image_processor_for

N_IMG = 4


@pytest.fixture(scope="module")
def proc():
    from transformers import CLIPVisionConfig

    from multimodal_rwkv import WorldTokenizer

    ip = image_processor_for(CLIPVisionConfig(image_size=16, patch_size=8))
    return VisualRWKVProcessor(WorldTokenizer(), ip, N_IMG, template="sandwich")


def rec(rid, image="a.png", q="<image>\nWhat colour?", a="red", **kw):
    r = {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **kw}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(tmp_path / "b.png")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    noise = (torch.rand(256, 256, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) * 6 // 10])  # header intact, pixels cut
    return tmp_path


def write(path, records, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_items_labels_and_collate(folder, proc):
    recs = [rec("r1"), rec("r2", image=["a.png", "b.png"], q="<image> or <image>?", a="the second one"),
            rec("text-only", image=None, q="Hello?", a="hi")]
    for jsonl in (False, True):
        ds = LlavaDataset(write(folder / ("d.jsonl" if jsonl else "d.json"), recs, jsonl), proc)
        assert len(ds) == 3 and ds.skipped == 0
        items = [ds[i] for i in range(3)]
        assert [it["pixel_values"].shape[0] for it in items] == [1, 2, 0]
        for it, answer in zip(items, ("red", "the second one", "hi")):
            ids, lab = it["input_ids"], it["labels"]
            sup = ids[lab != IGNORE_INDEX].tolist()
            assert proc.tokenizer.decode(sup) == f" {answer}\n\n"
            assert (lab[ids == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
        b = collate(items)
        T = max(it["input_ids"].numel() for it in items)
        assert b["input_ids"].shape == b["labels"].shape == (3, T)
        assert b["pixel_values"].shape == (3, 3, 16, 16)
        n2 = items[2]["input_ids"].numel()
        assert (b["input_ids"][2, n2:] == 0).all() and (b["labels"][2, n2:] == IGNORE_INDEX).all()
        assert int((b["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * N_IMG
        cached = LlavaDataset(folder / ("d.jsonl" if jsonl else "d.json"), proc, cache_images=True)
        for _ in range(2):  # first read fills the cache, second reads it
            for i, it in enumerate(items):
                c = cached[i]
                assert all(torch.equal(c[k], it[k]) for k in ("input_ids", "labels", "pixel_values"))


BAD = [
    (rec("no-image-file", image="missing.png"), "image file not found"),
    (rec("image-is-a-folder", image="folder.png"), "a directory, not an image file"),
    (rec("no-placeholder", q="What colour?"), "no <image>"),
    (rec("too-many", q="<image><image> colour?"), "only 1 image"),
    (rec("empty-conv", conversations=[]), "empty"),
    (rec("zero-byte", image="zero.png"), "empty image file"),
    (rec("bad-speaker", conversations=[{"from": "bot", "value": "<image>"}, {"from": "gpt", "value": "x"}]),
     "unknown speaker"),
    ({"id": "not-a-list", "image": 5, "conversations": []}, "'image' must be"),
    ({"id": "empty-name", "image": "", "conversations": []}, "'image' must be"),  # was the folder itself
]


@pytest.mark.parametrize("bad,why", BAD, ids=[b[0]["id"] for b in BAD])
def test_bad_records_fail_naming_the_record(folder, proc, bad, why):
    path = write(folder / "d.json", [rec("good"), bad])
    with pytest.raises(DataError) as e:
        LlavaDataset(path, proc)
    assert bad["id"] in str(e.value) and why in str(e.value) and str(path) in str(e.value), str(e.value)


def test_skip_mode_counts_every_bad_record(folder, proc, caplog):
    lines = [json.dumps(rec("good1")), "{not json", json.dumps(rec("good2"))] + [json.dumps(b) for b, _ in BAD]
    path = folder / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        ds = LlavaDataset(path, proc, on_bad_record="skip")
    assert len(ds) == 2
    assert ds.skipped == len(BAD) + 1
    assert any(f"{path}:2: invalid JSON" in m for m in ds.bad_records)
    # each skipped record is logged with its reason (only the first one was, in a summary line)
    logged = caplog.text
    assert all(m in logged for m in ds.bad_records) and all(why in logged for _, why in BAD)
    with pytest.raises(DataError, match=f"{path}:2"):
        LlavaDataset(path, proc)
    # a missing image folder is one error (every record was skipped as a missing image)
    with pytest.raises(DataError, match="nowhere: image folder not found"):
        LlavaDataset(path, proc, image_folder=folder / "nowhere", on_bad_record="skip")
    # none usable: the error says why, naming a record and its reason (it gave only the count)
    path.write_text("\n".join(lines[3:]) + "\n")
    with pytest.raises(DataError, match=rf"no usable records \({len(BAD)} skipped; {re.escape(str(path))}:1: .*"
                                        rf"and {len(BAD) - 1} more, each logged\)"):
        LlavaDataset(path, proc, on_bad_record="skip")


def test_a_json_object_and_a_byte_order_mark(folder, proc):
    (folder / "obj.json").write_text(json.dumps({"data": [rec("a")]}))
    with pytest.raises(DataError, match="obj.json: a JSON object with keys \\['data'\\]; LLaVA data is a JSON list"):
        LlavaDataset(folder / "obj.json", proc)
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([rec("a"), rec("b")]).encode())
    assert len(LlavaDataset(folder / "bom.json", proc)) == 2


def test_truncated_image_found_at_load_time(folder, proc):
    path = write(folder / "d.json", [rec("t", image="trunc.jpg"), rec("ok")])
    ds = LlavaDataset(path, proc)  # the header is fine; the pixels are not
    with pytest.raises(DataError, match="trunc.jpg"):
        ds[0]
    ds = LlavaDataset(path, proc, on_bad_record="skip")
    item = ds[0]  # replaced by the next good record, and counted
    assert item["pixel_values"].shape[0] == 1 and ds.skipped == 1 and "trunc.jpg" in ds.bad_records[0]
    for _ in range(3):  # later epochs meet it again: still one bad record, counted once
        assert ds[0]["pixel_values"].shape[0] == 1
    assert ds.skipped == 1
    with pytest.raises(DataError, match="trunc.jpg"):
        LlavaDataset(path, proc, verify_images=True)
    ds = LlavaDataset(path, proc, verify_images=True, on_bad_record="skip")
    assert len(ds) == 1 and ds.skipped == 1


def test_decompression_bomb_record(folder, proc):
    Image.new("L", (200, 200)).save(folder / "big.png")
    path = write(folder / "d.json", [rec("bomb", image="big.png"), rec("ok")])
    with pytest.raises(DataError, match="big.png.*bomb"):
        LlavaDataset(path, proc, max_image_pixels=10_000)


def test_ctx_len_truncation_never_cuts_an_image(folder, proc):
    long_q = "<image>\n" + "word " * 40 + "?"
    path = write(folder / "d.json", [rec("long", q=long_q, a="yes " * 30)])
    full = LlavaDataset(path, proc, ctx_len=4096)[0]
    n = full["input_ids"].numel()
    ds = LlavaDataset(path, proc, ctx_len=n - 5)
    it = ds[0]
    assert it["input_ids"].numel() == n - 5 and torch.equal(it["input_ids"], full["input_ids"][: n - 5])
    # a cut inside the image span drops the whole image, and without answer tokens the record is bad
    first_img = int((full["input_ids"] == IMAGE_TOKEN_ID).nonzero()[0])
    ds = LlavaDataset(path, proc, ctx_len=first_img + 2)
    with pytest.raises(DataError, match="no answer tokens"):
        ds[0]
    for bad in (-3, 0, "100", 2.5):  # -3 cut the end off every sample (its answer and stop label)
        with pytest.raises(ConfigError, match="ctx_len must be an integer >= 1"):
            LlavaDataset(path, proc, ctx_len=bad)


SURROGATE = '"bad \\ud800 x"'  # the 6-character JSON escape of an unpaired surrogate: valid JSON, not text


def test_unpaired_surrogate_is_a_bad_record_not_a_crash(folder, proc):
    good = json.dumps(rec("good"))
    bad = json.dumps(rec("sur", a="PLACEHOLDER")).replace('"PLACEHOLDER"', SURROGATE)
    path = folder / "d.jsonl"
    path.write_text("\n".join([good, bad, good.replace('"good"', '"good2"')]) + "\n")
    with pytest.raises(DataError, match=f"{path}:2: record 'sur': turn 1 value holds an unpaired surrogate"):
        LlavaDataset(path, proc)
    ds = LlavaDataset(path, proc, on_bad_record="skip")
    assert len(ds) == 2 and ds.skipped == 1 and "unpaired surrogate" in ds.bad_records[0]
    assert [ds[i]["pixel_values"].shape[0] for i in range(len(ds))] == [1, 1]  # no UnicodeEncodeError
    # the same in a JSON list, and in an image file name
    (folder / "d.json").write_text("[" + ", ".join([good, bad, json.dumps(rec("img", image="PH")).replace(
        '"PH"', SURROGATE)]) + "]")
    ds = LlavaDataset(folder / "d.json", proc, on_bad_record="skip")
    assert len(ds) == 1 and ds.skipped == 2
    assert ds.bad_records[0].startswith(f"{folder / 'd.json'}[1]: record 'sur'")
    assert ds.bad_records[1].startswith(f"{folder / 'd.json'}[2]: record 'img': 'image' holds an unpaired")
    # tokenising such a conversation (what __getitem__ does) is a DataError too, not a UnicodeEncodeError
    conv = json.loads(bad)["conversations"]
    with pytest.raises(DataError, match="rec: turn 1 value holds an unpaired surrogate"):
        proc.encode_conversation(conv, 1, "rec")


def test_a_line_that_is_not_utf8_is_one_bad_record(folder, proc):
    lines = [json.dumps(rec(f"r{i}"), ensure_ascii=False).encode() for i in range(3)]
    lines[1] = lines[1].replace(b"red", b"r\xe9d")  # latin-1, not UTF-8
    # a U+2028 (line separator) inside a string is one line of JSONL, not two
    lines.append(json.dumps(rec("sep", a="red\u2028blue"), ensure_ascii=False).encode())
    path = folder / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    ds = LlavaDataset(path, proc, on_bad_record="skip")
    assert [r.rid for r in ds.records] == ["r0", "r2", "sep"] and ds.skipped == 1
    assert ds.bad_records[0].startswith(f"{path}:2: not valid UTF-8 (byte 0xe9 at column "), ds.bad_records
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        LlavaDataset(path, proc)
    # in a JSON list the record that holds the byte is the bad one
    jpath = folder / "d.json"
    jpath.write_bytes(b"[" + b",\n".join(lines) + b"]")
    ds = LlavaDataset(jpath, proc, on_bad_record="skip")
    assert [r.rid for r in ds.records] == ["r0", "r2", "sep"] and ds.skipped == 1
    assert ds.bad_records == [f"{jpath}[1]: not valid UTF-8 (byte 0xe9 in a string of the record)"]
    with pytest.raises(DataError, match=r"d\.json\[1\]: not valid UTF-8"):
        LlavaDataset(jpath, proc)


def test_a_json_file_holding_one_record(folder, proc):
    path = folder / "single.json"
    path.write_text(json.dumps(rec("only"), indent=2))  # pretty-printed: many lines, one record
    ds = LlavaDataset(path, proc)
    assert len(ds) == 1 and ds.records[0].rid == "only" and ds.records[0].where == f"{path}:1"
    assert ds[0]["pixel_values"].shape[0] == 1
    path.write_text(json.dumps(rec("bad", image="missing.png"), indent=2))
    with pytest.raises(DataError, match=f"{path}:1: record 'bad': image file not found"):
        LlavaDataset(path, proc)


def test_an_answer_outside_the_models_vocab_subset_is_a_bad_record(folder, proc):
    """A vocab_subset model reads other ids as UNK: an answer word outside the subset was trained
    silently towards the UNK row, which generation never produces."""
    tok = proc.tokenizer
    known = {0, *tok.encode(" red"), *tok.encode("\n\n")}
    path = write(folder / "s.json", [rec("ok", a="red"), rec("unk", a="red hi there")])
    with pytest.raises(DataError, match=r"record 'unk': its answer holds 2 token\(s\) outside the model's "
                                        r"vocab_subset \(' hi', ' there'\)"):
        LlavaDataset(path, proc, answer_ids=known)  # found at load, not hours into training
    ds = LlavaDataset(path, proc, answer_ids=known, on_bad_record="skip")
    items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 1 and ds.skipped == 1 and all(set(it["labels"].tolist()) <= known | {IGNORE_INDEX} for it in items)
    assert len(LlavaDataset(path, proc)) == 2  # without a subset every World id is an answer id
