"""Task plugins: what a recipe trains (model, data, export). The loop is task-agnostic.

A task subclasses :class:`Task` and is registered in :data:`TASKS` (``name -> "module:Class"``).
The minimum is ``build_model``, ``build_datasets`` and ``save_pretrained``; the default
:meth:`Task.training_step` calls ``model(**batch)`` and uses ``out.loss`` (a mean over the
positions whose ``labels`` are not -100, HF shift convention).

Bad records: ``task.skipped`` counts those skipped while building the datasets. A dataset that drops
a record only when reading it (``__getitem__``: an image turns out truncated) appends one message
naming that record to its ``bad_records`` list and returns another item. The loop collects these
messages, also from DataLoader workers and other processes, counts each record once (by its
message) in metrics.jsonl's ``skipped_records`` and the checkpoints, and sets ``task.skipped`` to
the run's total before :meth:`Task.save_pretrained`.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

from multimodal_rwkv.errors import ConfigError

TASKS: dict[str, str] = {
    "lm": "multimodal_rwkv.training.lm:LMTask",
    "visualrwkv": "multimodal_rwkv.vision.training:VisualRWKVTask",
}


class StepContext:
    """Handed to :meth:`Task.training_step` by the loop.

    ``backward(loss)``: backpropagate (through accelerate: mixed precision, DDP, DeepSpeed).
    ``no_sync()``: a context for extra forward/backward passes that must not all-reduce yet
    (e.g. all but the last truncated-BPTT chunk); harmless on one process.
    ``scale``: multiply a loss *sum* over target positions by this before ``backward`` so that the
    optimiser step sees the mean over all target positions of all micro-batches and processes.
    ``token_scale``: the same for a sum over all positions (masked or not), as RWKV-LM's L2Wrap
    takes its mean over ``B*T``.
    """

    def __init__(self, backward: Callable, no_sync: Callable | None = None, scale: float = 1.0,
                 token_scale: float | None = None):
        self.backward = backward
        self._no_sync = no_sync
        self.scale = scale
        self.token_scale = scale if token_scale is None else token_scale

    def no_sync(self):
        return self._no_sync() if self._no_sync is not None else contextlib.nullcontext()


class Task:
    """Base class. ``cfg`` is the full :class:`~multimodal_rwkv.training.config.TrainConfig`."""

    name = "base"
    # DDP must look for parameters a step did not use (a vision tower's layers above the feature
    # layer, or the whole tower in a text-only batch); costs one graph walk per step, so opt-in.
    find_unused_parameters = False
    # whether export.pth (a BlinkDL-layout model.pth for the official package) fits this task's model
    exports_pth = True
    # keys of ``model.options`` that a resumed run may change: they do not change what the
    # checkpoint's weights mean or which of them train (a prompt template, an export dtype)
    free_options: tuple[str, ...] = ()
    # keys of ``data`` that decide what the weights mean (the tokenizer): a resumed or re-exported
    # run must keep them, as its model settings
    kept_data_keys: tuple[str, ...] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.skipped = 0  # bad records skipped building datasets; at export, the run's total

    # --- required -------------------------------------------------------------------------
    def build_model(self):
        """Return a ``torch.nn.Module``; ``model(**batch)`` -> object with ``.loss``."""
        raise NotImplementedError

    def build_datasets(self, model) -> tuple[Any, Any, Callable]:
        """Return ``(train_dataset, valid_dataset_or_None, collate_fn)`` (map-style datasets)."""
        raise NotImplementedError

    def save_pretrained(self, model, out_dir) -> None:
        """Export the trained model as a folder its ``from_pretrained`` accepts."""
        model.save_pretrained(out_dir)

    # --- optional -------------------------------------------------------------------------
    train_file_example = "corpus.txt"  # for the message when data.train_file is not set

    def check_data_settings(self) -> None:
        """Cheap checks of the data settings, run before any model is built or loaded (a typo in a
        path would cost a whole model load first): ``data.train_file`` is set, and it and
        ``data.valid_file`` exist (a binidx prefix ``X`` of ``X.bin`` + ``X.idx`` counts).
        The datasets' readers check the rest."""
        import os

        from multimodal_rwkv.errors import DataError
        from multimodal_rwkv.training.data import binidx_files

        d = self.cfg.data
        if not d.train_file:
            raise ConfigError(f"data.train_file is not set (e.g. --set data.train_file={self.train_file_example})")
        for key, f in (("data.train_file", d.train_file), ("data.valid_file", d.valid_file)):
            if f and not os.path.lexists(f) and not all(p.is_file() for p in binidx_files(f)[1:]):
                raise DataError(f"{f}: no such file or folder ({key})")

    trainable_options = "the task's settings"  # what decides trainable_filter, for error messages

    def trainable_filter(self, name: str, param) -> bool | None:
        """True/False forces a parameter trainable/frozen; None leaves it to the PEFT settings. A
        PEFT setting that names the parameter (a freeze/trainable pattern, a LoRA adapter) and
        asks otherwise is a ConfigError, not overridden silently."""
        return None

    def count_targets(self, batch: dict) -> int:
        """Number of loss positions in a micro-batch (used to normalise across micro-batches/ranks)."""
        labels = batch.get("labels")
        if labels is None:
            ids = batch.get("input_ids")
            return int(ids.shape[0] * max(ids.shape[1] - 1, 0)) if ids is not None else 1
        return int((labels[..., 1:] != -100).sum())

    def count_tokens(self, batch: dict) -> int:
        """Tokens processed (for tokens/s)."""
        for k in ("input_ids", "inputs_embeds", "labels", "targets"):
            v = batch.get(k)
            if v is not None:
                return int(v.shape[0] * v.shape[1])
        return 0

    def training_step(self, model, batch: dict, ctx: StepContext):
        """Forward + backward one micro-batch. Returns ``(loss_sum, n_targets)``: the summed
        per-position loss (a detached 0-d tensor) and the number of positions."""
        out = model(**batch)
        n = self.count_targets(batch)
        loss_sum = out.loss * n
        loss = loss_sum * ctx.scale
        if not loss.requires_grad:
            # nothing trainable took part: zero gradients instead of a backward without a graph (in one
            # process; under DDP with find_unused_parameters a task must keep its trainable weights in
            # the forward instead, as VisualRWKV keeps its projector for text-only batches)
            loss = loss + zero_link(model)
        ctx.backward(loss)
        return loss_sum.detach(), n

    @staticmethod
    def _no_grad():
        import torch

        return torch.no_grad()

    def eval_step(self, model, batch: dict):
        """Like :meth:`training_step` without backward: ``(loss_sum, n_targets)``."""
        with self._no_grad():
            out = model(**batch)
            n = self.count_targets(batch)
            return (out.loss * n).detach(), n


def zero_link(model):
    """0, as a function of every trainable parameter (a backward through it gives zero gradients):
    added to a loss that does not reach all of them, so that DDP all-reduces every gradient instead
    of stopping on parameters that took no part, and a backward has a graph at all."""
    return sum(p.view(-1)[0] * 0 for p in model.parameters() if p.requires_grad)


def rwkv_config_settings(settings: dict, key: str = "model.config") -> dict:
    """A recipe's language-model sizes (``model.config``), checked and read as strictly as the rest
    of a recipe: known keys only, each of its RWKVConfig type, as the recipe's own settings take
    it (``1e-5`` a number, ``2.0`` the integer 2; a number written as a string such as ``'2'`` is
    refused), and sizes that make a model. A ConfigError names ``key`` and the setting. Returns
    the settings with their values so read (checking builds nothing but a config)."""
    import inspect
    from typing import Optional

    from multimodal_rwkv.model.config import RWKVConfig
    from multimodal_rwkv.training.config import _coerce

    params = {n: p for n, p in inspect.signature(RWKVConfig.__init__).parameters.items()
              if n not in ("self", "kwargs")}
    types = {"int": int, "float": float, "bool": bool, "str": str}
    out = {}
    for k, v in settings.items():
        if k not in params:
            raise ConfigError(f"unknown config key '{key}.{k}'; RWKVConfig takes {sorted(params)}")
        kind = str(params[k].annotation)  # "int", "int | None", "float", "bool", "str"
        tp = types[kind.split(" ")[0]]
        out[k] = _coerce(v, Optional[tp] if "None" in kind else tp, f"{key}.{k}")
    try:
        RWKVConfig(**out)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    return out


def get_task(cfg) -> Task:
    """Instantiate the task named by ``cfg.task`` (ConfigError if unknown or not installed)."""
    spec = TASKS.get(cfg.task)
    if spec is None:
        raise ConfigError(f"task: unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    mod_name, cls_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise ConfigError(f"task: {cfg.task!r} is not available ({mod_name} is not installed)") from None
        raise
    return getattr(mod, cls_name)(cfg)
