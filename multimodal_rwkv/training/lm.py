"""The ``lm`` task: an RWKV language model on text (txt/jsonl), binidx or token files.

Loss: mean cross-entropy (nats/token) over target positions; targets are pre-shifted by the data
(``targets[t]`` is the token after ``input_ids[t]`` or -100), so truncated BPTT can cut the
sequence anywhere: with ``train.bptt_chunk = c`` a ``[B, T]`` batch runs as ``ceil(T/c)`` chunks,
each chunk starting from the previous chunk's final state (detached) and backpropagated at once,
so memory is bounded by ``c`` rather than ``T``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from multimodal_rwkv.errors import ConfigError, DataError
from multimodal_rwkv.training.data import (IGNORE_INDEX, PackedDataset, check_id_range, collate_lm, detect_format,
                                           load_stream)
from multimodal_rwkv.training.task import StepContext, Task, rwkv_config_settings, zero_link

logger = logging.getLogger(__name__)

FULL_VOCAB_SCAN = 1 << 27  # tokens checked against vocab_size before training (the rest: per window)


class L2Wrap:
    """RWKV-LM's L2Wrap: the forward returns ``loss`` unchanged; the backward adds a gradient of
    ``c * max_logit`` on each position's largest logit (keeps logits from drifting upwards).

    ``reduction="mean"`` (RWKV-LM): ``loss`` is a mean over the positions of ``logits``
    (``[..., V]``, N = ``logits.numel() / V`` positions) and ``c = factor / N * upstream``, i.e.
    ``1e-4 / (B*T)`` for an upstream gradient of 1. ``reduction="sum"``: ``c = factor * upstream``;
    the LM task passes ``factor = 1e-4 * token_scale / scale`` with its loss sum over targets, so
    that every position gets RWKV-LM's ``1e-4 / (B*T)`` also when chat masking leaves fewer
    targets than positions (RWKV-LM's masked training keeps that factor and pushes every position).
    """

    @staticmethod
    def apply(loss, logits, factor: float = 1e-4, reduction: str = "mean"):
        import torch

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        n = max(logits.numel() // max(logits.shape[-1], 1), 1) if reduction == "mean" else 1
        c = factor / n

        class _F(torch.autograd.Function):
            @staticmethod
            def forward(ctx, loss_, y):
                ctx.save_for_backward(y)
                return loss_

            @staticmethod
            def backward(ctx, grad_output):
                (y,) = ctx.saved_tensors
                maxx, ids = torch.max(y, -1, keepdim=True)
                gy = torch.zeros_like(y)
                gy.scatter_(-1, ids, maxx * (c * grad_output).to(y.dtype))
                return grad_output, gy

        return _F.apply(loss, logits)


class LMTask(Task):
    """Causal LM training of :class:`~multimodal_rwkv.RWKVForCausalLM`."""

    name = "lm"

    @property
    def kept_data_keys(self) -> tuple[str, ...]:
        """The tokenizer, for text: the same ids must keep meaning the same text (token files were
        tokenized elsewhere, and ``data.tokenizer`` means nothing for them)."""
        return () if self._data_format() == "tokens" else ("tokenizer",)

    def _format_of(self, path) -> str:
        """``data.format`` of ``path``: as set, or when ``auto`` as its files say (DataError when they
        cannot say, a folder that cannot be listed among them)."""
        fmt = self.cfg.data.format
        return fmt if fmt != "auto" else detect_format(path, skip=self._run_entries())

    def _data_format(self) -> str:
        """``data.format``, resolved from the train file when it is ``auto`` (as read at the start);
        ``auto`` where the files cannot say (reported where the data is read)."""
        if not self.cfg.data.train_file:
            return self.cfg.data.format
        try:
            return self._format_of(self.cfg.data.train_file)
        except Exception:  # noqa: BLE001 - reported where the data is read
            return self.cfg.data.format

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.model.options:
            raise ConfigError(f"model.options: the lm task takes no options, got {sorted(cfg.model.options)}")
        if cfg.data.options:
            raise ConfigError(f"data.options: the lm task takes no options, got {sorted(cfg.data.options)}")
        if cfg.data.format == "llava":
            raise ConfigError("data.format: 'llava' data needs task: visualrwkv")
        cfg.model.config = rwkv_config_settings(cfg.model.config)  # read as the recipe reads; before data or model
        self._skipped_by_source: dict[Path, int] = {}  # bad records per data source (resolved path)

    # ------------------------------------------------------------------ model
    def build_model(self):
        import torch

        from multimodal_rwkv.model.config import RWKVConfig
        from multimodal_rwkv.model.modeling import RWKVForCausalLM

        m = self.cfg.model
        if m.from_pretrained:
            if m.config:
                raise ConfigError("model.config: give either model.from_pretrained or model.config, not both (to "
                                  "fine-tune a checkpoint with a recipe that sets model.config, add "
                                  "--set model.config=null)")
            return RWKVForCausalLM.from_pretrained(m.from_pretrained, dtype=torch.float32)
        kwargs = dict(m.config)  # (checked and read when the task was made)
        if "vocab_size" not in kwargs and self.cfg.data.tokenizer == "bytes":
            kwargs["vocab_size"] = 257
        return RWKVForCausalLM(RWKVConfig(**kwargs))

    # ------------------------------------------------------------------ data
    def _run_entries(self) -> list[Path]:
        """What a run writes into its output_dir (and the token cache): never training data, also
        when output_dir is (or lies inside) the data folder."""
        out = Path(self.cfg.output_dir)
        hidden = list(out.glob(".*")) if out.is_dir() else []  # the lock, temp folders of checkpoints
        return [out / n for n in ("checkpoints", "final", "logs", "metrics.jsonl", "recipe.yaml", "loss.png")] + [
            self._cache_dir()] + hidden

    def _cache_dir(self) -> Path:
        d = self.cfg.data.cache_dir
        return Path(d) if d else Path(self.cfg.output_dir) / "token_cache"

    def _dataset(self, path, vocab_size: int, key: str) -> PackedDataset:
        d = self.cfg.data
        stream = load_stream(path, d.format, d.tokenizer, self._cache_dir(), d.on_bad_record,
                             skip=self._run_entries(), vocab_size=vocab_size)
        # a full scan up front for all but huge streams; those are checked window by window when read
        n = len(stream)
        scanned_all = n <= FULL_VOCAB_SCAN
        head = stream.ids if scanned_all else stream.ids[: FULL_VOCAB_SCAN]
        try:
            check_id_range(head, vocab_size, stream.source)
        except DataError as e:
            if self._format_of(path) not in ("binidx", "tokens"):  # text: its tokenizer's ids do not fit, no bad data
                raise
            raise DataError(f"{e} (set data.on_bad_record=skip to skip the documents that hold such ids)") from None
        # a valid_file that is the train_file, the same folder or a file inside the train folder holds
        # records the train data holds too: its bad records count once
        self._skipped_by_source[Path(path).resolve()] = stream.skipped
        srcs = self._skipped_by_source
        self.skipped = sum(n for p, n in srcs.items() if not any(q != p and p.is_relative_to(q) for q in srcs))
        L = d.ctx_len
        if 2 <= n <= L:
            # the data fits in one window shorter than ctx_len: a window of ctx_len would be the same
            # tokens and targets followed by padding (masked, so the same loss), at the memory and
            # time of ctx_len positions. The window is cut to the data; a training set that short is
            # most likely a mistake in data.ctx_len or data.train_file, so it is said.
            if key == "data.train_file":
                logger.warning("data.ctx_len=%d is longer than the whole training data (%d tokens in %s): "
                               "training on one window of %d tokens, the whole data (lower data.ctx_len, or "
                               "give more data)", L, n, stream.source, n - 1)
            L = n - 1
        return PackedDataset(stream, L, None if scanned_all else vocab_size)

    def build_datasets(self, model):
        d = self.cfg.data
        if not d.train_file:
            raise ConfigError("data.train_file is not set (e.g. --set data.train_file=corpus.txt)")
        V = int(model.config.vocab_size)
        if self._format_of(d.train_file) not in ("tokens", "binidx"):  # text: a row for every id of its tokenizer
            from multimodal_rwkv.training.data import get_tokenizer

            n = get_tokenizer(d.tokenizer).vocab_size
            if V < n:
                raise ConfigError(f"model vocab_size {V} is smaller than the {d.tokenizer} tokenizer's {n} "
                                  f"(data.tokenizer: {d.tokenizer}): text could hold ids the model has no row "
                                  "for, and mmrwkv generate refuses such a model")
        train = self._dataset(d.train_file, V, "data.train_file")
        valid = self._dataset(d.valid_file, V, "data.valid_file") if d.valid_file else None
        logger.info("train: %d window%s of %d tokens from %s", len(train), "" if len(train) == 1 else "s",
                    train.ctx_len, train.stream.source)
        return train, valid, collate_lm

    # ------------------------------------------------------------------ steps
    def count_targets(self, batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def count_tokens(self, batch) -> int:
        return int(batch["input_ids"].numel())

    def _chunks(self, T: int):
        c = self.cfg.train.bptt_chunk or T
        return [(s, min(s + c, T)) for s in range(0, T, c)]

    def _chunk_loss(self, model, ids, tgt, state):
        from multimodal_rwkv.kernels.cpu import cross_entropy

        out = model(input_ids=ids, state=state, return_dict=True)
        logits = out.logits
        loss = cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, logits, out.state

    def training_step(self, model, batch, ctx: StepContext):
        """Forward + backward over ``ceil(T / bptt_chunk)`` chunks with the state carried
        (detached). Returns ``(loss_sum, n_targets)``."""
        import torch

        ids, tgt = batch["input_ids"], batch["targets"]
        chunks = self._chunks(ids.shape[1])
        state = None
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        for k, (s, e) in enumerate(chunks):
            last = k == len(chunks) - 1
            with (ctx.no_sync() if not last else _null()):
                loss, logits, new_state = self._chunk_loss(model, ids[:, s:e], tgt[:, s:e], state)
                total += loss.detach().double()
                state = new_state.detach() if not last else None  # truncated BPTT
                if self.cfg.train.l2wrap and ctx.scale > 0:
                    # the push per position is 1e-4 / (all positions of the step), as RWKV-LM's
                    loss = L2Wrap.apply(loss, logits, factor=1e-4 * ctx.token_scale / ctx.scale, reduction="sum")
                if not loss.requires_grad and not last:
                    continue  # state tuning alone: past the first chunk nothing trainable feeds the loss
                if last and len(chunks) > 1:
                    # the state carried in is detached, so the initial state (a trainable time_state)
                    # and anything else only the first chunks use are not in this graph: a zero links
                    # every trainable parameter, so that DDP all-reduces what the earlier chunks
                    # accumulated instead of stopping on parameters that took no part
                    loss = loss + zero_link(model)
                ctx.backward(loss * ctx.scale)
        return total, self.count_targets(batch)

    def eval_step(self, model, batch):
        import torch

        ids, tgt = batch["input_ids"], batch["targets"]
        state = None
        total = torch.zeros((), dtype=torch.float64, device=ids.device)
        with torch.no_grad():
            for s, e in self._chunks(ids.shape[1]):
                loss, _, state = self._chunk_loss(model, ids[:, s:e], tgt[:, s:e], state)
                total += loss.double()
        return total, self.count_targets(batch)

    # ------------------------------------------------------------------ export
    def save_pretrained(self, model, out_dir):
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        # token files were tokenized elsewhere (music prepare, ...): their tokenizer is not known here
        tokens = self._data_format() == "tokens"
        info = {"task": "lm", "tokenizer": None if tokens else self.cfg.data.tokenizer,
                "ctx_len": self.cfg.data.ctx_len, "skipped_records": self.skipped}
        (out_dir / "training_info.json").write_text(json.dumps(info, indent=1))


def _null():
    import contextlib

    return contextlib.nullcontext()
