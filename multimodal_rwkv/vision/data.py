"""LLaVA-format visual instruction data: JSON (a list, or a single record) or JSONL (one record per line).

A record: ``{"id": str, "image": "rel/path.jpg" | [paths] (optional), "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``; images are
resolved against ``image_folder`` (default: the data file's folder).

Bad input is expected input. At construction every record is checked (valid UTF-8 JSON, structure,
speakers, text without unpaired surrogates, ``<image>`` count vs. images, image files present,
non-empty, a recognised image format within the pixel limit); a bad record raises DataError naming
the file, line/index and record id, or with ``on_bad_record="skip"`` it is skipped, counted in
``skipped`` and listed in ``bad_records``.
Tokenisation and full image decoding happen in ``__getitem__``; a record that only then turns out
bad (a truncated image, no answer token within ``ctx_len``) raises, or in skip mode is logged,
counted and replaced by the next good record (``verify_images=True`` decodes every image up front).

``cache_images=True`` keeps each preprocessed image in memory after its first use (for small
datasets read for many epochs).

Items: ``input_ids`` / ``labels`` (LongTensor [T], IMAGE_TOKEN_ID placeholders expanded, labels
IGNORE_INDEX outside the assistant's answers) and ``pixel_values`` [n_images,3,H,W].
:func:`collate` right-pads a batch (ids 0, labels IGNORE_INDEX) and concatenates the images.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.vision.processor import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    VisualRWKVProcessor,
    check_conversations,
    check_image_folder,
    is_unicode,
    load_image,
    missing_image,
    read_text_file,
    utf8_error,
)

logger = logging.getLogger(__name__)

BAD_RECORD_MODES = ("fail", "skip")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, as "surrogateescape" keeps it


@dataclass
class Record:
    rid: str          # record id as written in the file (or file:line when it has none)
    where: str        # "file:line" (JSONL) or "file[index]" (JSON list)
    images: list[str]
    conversations: list

    @property
    def name(self) -> str:
        return f"{self.where} (id {self.rid!r})"


def read_llava_records(path) -> tuple[list[tuple[str, object]], list[str]]:
    """Raw records of a LLaVA .json (list) or .jsonl file -> ([(where, record)], [bad line messages]).

    An unparsable JSONL line, or one that is not valid UTF-8, is a bad line ("file:line: invalid
    JSON", "file:line: not valid UTF-8 (byte 0xe9 ...)"); in a .json list a record holding bytes
    that are not UTF-8 is a bad record ("file[index]: ..."); the rest are kept. A .json file holding
    one record object (pretty-printed or not) is that one record ("file:1"). An unparsable .json
    file, or one holding an object that is not a record, raises DataError."""
    path = Path(path)
    text, clean = read_text_file(path, "data file")  # a leading byte-order mark is not JSON
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # several lines of records (JSONL in a .json file): read below
        if isinstance(whole, dict):
            if "conversations" not in whole:
                raise DataError(f"{path}: a JSON object with keys {sorted(whole)[:5]}; LLaVA data is a JSON list "
                                "of records (or JSONL, one record per line)")
            return _not_utf8_records([(f"{path}:1", whole)], clean)  # a single record, as one JSONL line
    if path.suffix.lower() != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
        return _not_utf8_records([(f"{path}[{i}]", r) for i, r in enumerate(data)], clean)
    out, bad = [], []
    # "\n" only: str.splitlines() would also cut at U+2028, U+0085, ... that JSON strings may hold
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        why = None if clean else utf8_error(line)
        if why:
            bad.append(f"{path}:{n}: {why}")
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{n}: invalid JSON ({e.msg})")
    if not out and not bad:
        raise DataError(f"{path}: no records")
    return out, bad


def _not_utf8_records(records: list[tuple[str, object]], clean: bool) -> tuple[list[tuple[str, object]], list[str]]:
    """Split the records of a JSON file that was not all UTF-8 (see read_text_file) into those that
    are and "where: not valid UTF-8 (byte 0x..)" messages for those holding the bad bytes."""
    if clean:
        return records, []
    out, bad = [], []
    for where, r in records:
        m = _ESCAPED_BYTE.search(json.dumps(r, ensure_ascii=False))
        if m is None:
            out.append((where, r))
        else:
            bad.append(f"{where}: not valid UTF-8 (byte 0x{ord(m.group()) - 0xdc00:02x} in a string of the record)")
    return out, bad


def check_image_header(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Cheap check (no pixel decoding): exists, non-empty, a recognised format, within max_pixels."""
    load_image(path, max_pixels, decode=False)


class LlavaDataset(Dataset):
    """LLaVA JSON/JSONL dataset for VisualRWKV (see the module doc)."""

    def __init__(self, path, processor: VisualRWKVProcessor, image_folder=None, ctx_len: int = 2048,
                 on_bad_record: str = "fail", verify_images: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, cache_images: bool = False,
                 answer_ids=None):
        """``answer_ids``: the World ids the model can produce (a ``vocab_subset`` model's); a record
        whose answer holds another id is a bad record (it would train towards the UNK row)."""
        if on_bad_record not in BAD_RECORD_MODES:
            raise ConfigError(f"on_bad_record must be one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
        self.path = Path(path)
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder else self.path.parent
        if image_folder:  # one error, not every record's missing image
            check_image_folder(self.image_folder)
        from multimodal_rwkv.argtypes import integer_number

        if (integer_number(ctx_len) or 0) < 1:  # a negative one cut the end off every sample
            raise ConfigError(f"ctx_len must be an integer >= 1, got {ctx_len!r}")
        self.ctx_len = int(ctx_len)
        self.on_bad_record = on_bad_record
        self.max_image_pixels = max_image_pixels
        self.answer_ids = frozenset(answer_ids) if answer_ids is not None else None
        self.bad_records: list[str] = []
        self.skipped_at_load = 0
        self._failed: set[int] = set()  # records whose images failed to load in __getitem__
        self._pixel_cache: dict | None = {} if cache_images else None
        raw, bad_lines = read_llava_records(self.path)
        for msg in bad_lines:
            self._bad(msg)
        self.records: list[Record] = []
        for where, r in raw:
            try:
                rec = self._parse(where, r)
            except DataError as e:
                self._bad(f"{where}: {e}")
                continue
            try:
                for p in rec.images:
                    if verify_images:
                        load_image(p, max_image_pixels)
                    else:
                        check_image_header(p, max_image_pixels)
            except DataError as e:
                self._bad(f"{where}: record {rec.rid!r}: {e}")
                continue
            if self.answer_ids is not None:
                try:
                    self._check_answer_ids(rec)
                except DataError as e:
                    self._bad(f"{where}: {e}")
                    continue
            self.records.append(rec)
        if not self.records:
            why = f"; {self.bad_records[0]}" if self.bad_records else ""
            more = f", and {self.skipped - 1} more, each logged" if self.skipped > 1 else ""
            raise DataError(f"{self.path}: no usable records ({self.skipped} skipped{why}{more})")
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s), each logged above", self.path, self.skipped)

    @property
    def skipped(self) -> int:
        """Records skipped so far (at construction and while loading images)."""
        return len(self.bad_records)

    def _bad(self, msg: str) -> None:
        if self.on_bad_record == "fail":
            raise DataError(msg)
        self.bad_records.append(msg)
        logger.warning("skipping bad record: %s", msg)  # each one, as the language-model data does

    def _parse(self, where: str, r) -> Record:
        if not isinstance(r, dict):
            raise DataError("record is not a JSON object")
        rid = str(r.get("id", where))
        name = f"record {rid!r}"
        img = r.get("image")
        if img is None or img == []:
            images = []
        elif isinstance(img, str) and img.strip():
            images = [img]
        elif isinstance(img, list) and all(isinstance(i, str) and i for i in img):
            images = list(img)
        else:
            raise DataError(f"{name}: 'image' must be a file name or a list of file names")
        if not all(is_unicode(i) for i in images):
            raise DataError(f"{name}: 'image' holds an unpaired surrogate (\\ud800-\\udfff), not a file name")
        paths = []
        for i in images:
            p = Path(i)
            p = p if p.is_absolute() else self.image_folder / p
            why = missing_image(p)
            if why:
                raise DataError(f"{name}: {why}: {p}")
            paths.append(str(p))
        check_conversations(r.get("conversations"), len(paths), name)
        return Record(rid, where, paths, r["conversations"])

    def _encode(self, rec: Record) -> tuple[list[int], list[int], int]:
        """(ids, labels, number of images kept) after truncation to ctx_len."""
        ids, labels = self.processor.encode_conversation(rec.conversations, len(rec.images), f"record {rec.rid!r}")
        n_img = len(rec.images)
        if len(ids) > self.ctx_len:
            cut = self.ctx_len
            # never cut through an image: move the cut back to the start of that image
            n_tok = self.processor.num_image_tokens
            img_pos = [i for i, t in enumerate(ids[:cut]) if t == IMAGE_TOKEN_ID]
            n_full = len(img_pos) // n_tok
            if len(img_pos) % n_tok:
                cut = img_pos[n_full * n_tok]
            ids, labels, n_img = ids[:cut], labels[:cut], n_full
            if all(x == IGNORE_INDEX for x in labels[1:]):
                raise DataError(f"record {rec.rid!r}: no answer tokens within ctx_len={self.ctx_len}")
        return ids, labels, n_img

    def _check_answer_ids(self, rec: Record) -> None:
        """DataError if the record's answers hold an id outside ``answer_ids`` (checked at load:
        the text alone decides it)."""
        _, labels = self.processor.encode_conversation(rec.conversations, len(rec.images), f"record {rec.rid!r}")
        out = sorted({t for t in labels if t != IGNORE_INDEX and t not in self.answer_ids})
        if out:
            shown = ", ".join(repr(self.processor.tokenizer.decode([t])) for t in out[:5])
            raise DataError(f"record {rec.rid!r}: its answer holds {len(out)} token(s) outside the model's "
                            f"vocab_subset ({shown}{', ...' if len(out) > 5 else ''}): the model cannot produce them")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        for attempt in range(len(self.records)):
            k = (i + attempt) % len(self.records)
            if k in self._failed:  # known bad (an earlier epoch): the next record stands in, uncounted
                continue
            rec = self.records[k]
            try:
                return self._item(rec)
            except DataError as e:
                if self.on_bad_record == "fail":
                    raise DataError(f"{rec.name}: {e}") from None
                self._failed.add(k)  # counted and logged once, however many epochs meet it
                self.skipped_at_load += 1
                self.bad_records.append(f"{rec.name}: {e}")
                logger.warning("skipping %s: %s", rec.name, e)
        raise DataError(f"{self.path}: every record failed to load")

    def _item(self, rec: Record) -> dict:
        ids, labels, n_img = self._encode(rec)
        if self._pixel_cache is None:
            pv = self.processor.preprocess_images(rec.images[:n_img])
        else:  # small datasets seen many times (the synthetic one): decode each image once
            for p in rec.images[:n_img]:
                if p not in self._pixel_cache:
                    self._pixel_cache[p] = self.processor.preprocess_images([p])
            pv = torch.cat([self._pixel_cache[p] for p in rec.images[:n_img]]) if n_img else \
                self.processor.preprocess_images([])
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": pv}


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ids (``pad_id``) and labels (IGNORE_INDEX) to the longest item; concatenate images
    in order. -> {"input_ids" [B,T], "labels" [B,T], "pixel_values" [N,3,H,W] or None}."""
    T = max(b["input_ids"].numel() for b in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        n = b["input_ids"].numel()
        ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
    pvs = [b["pixel_values"] for b in batch if b["pixel_values"].shape[0]]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.cat(pvs) if pvs else None}
