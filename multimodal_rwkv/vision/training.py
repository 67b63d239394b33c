"""The ``visualrwkv`` task for the shared training engine (``mmrwkv train RECIPE.yaml``).

Recipe keys this task reads (everything else is the engine's):

``model.from_pretrained``
    a VisualRWKV folder (ours) or a released VisualRWKV-v060 ``.pth``: the whole model is loaded
    (stage 2 starts from the stage-1 output); any other source (a BlinkDL RWKV ``.pth``, an HF RWKV
    folder, an LM saved by this package) is the *language model*, and the tower and projector are
    built from ``model.options`` (stage 1).
``model.config``
    RWKVConfig kwargs for a fresh language model (instead of from_pretrained).
``model.options`` (validated here; unknown keys are errors)
    vision_tower (hub id or folder) or vision_config (a transformers CLIP/SigLIP vision config dict,
    random init); bundle_encoder, feature_layer, cls_token, patch_merge, projector,
    image_aspect_ratio, prompt_template, bidirectional_scan, loss_reduction (see VisualRWKVConfig);
    vocab_subset: null | "auto" | [ids] ("auto": the World ids used by the training data);
    stage: 1 (projector only) | 2 (LM + projector; default); train_encoder (stage 2, default false);
    freeze_embeddings (default true in stage 2, as VisualRWKV); train_projector (default true);
    export_dtype: null | bf16 | fp16 (weights on disk in final/).
``data``: train_file / valid_file (LLaVA .json/.jsonl), image_folder, ctx_len, on_bad_record;
    ``data.options``: verify_images (decode every image up front), cache_images (keep preprocessed
    images in memory: small datasets read for many epochs).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from multimodal_rwkv.errors import CheckpointError, ConfigError
from multimodal_rwkv.model.checkpoint import refuse_training_checkpoint
from multimodal_rwkv.training.task import Task, rwkv_config_settings

VOCAB_SUBSET_FILE = "vocab_subset.json"  # in output_dir: the ids 'auto' chose for the run

logger = logging.getLogger(__name__)

_ARCH_KEYS = ("vision_tower", "vision_config", "bundle_encoder", "feature_layer", "cls_token", "patch_merge",
              "projector", "vocab_subset")
_RUNTIME_KEYS = ("image_aspect_ratio", "prompt_template", "bidirectional_scan", "loss_reduction")
_TASK_KEYS = ("stage", "train_encoder", "freeze_embeddings", "train_projector", "export_dtype")
_DATA_KEYS = ("verify_images", "cache_images")


class VisualRWKVTask(Task):
    """VisualRWKV stage 1 / stage 2 training on LLaVA-format data."""

    find_unused_parameters = True  # tower layers above feature_layer; text-only batches skip the tower

    name = "visualrwkv"
    train_file_example = "train.json"
    exports_pth = False  # a BlinkDL .pth holds a language model alone; final/ is the VisualRWKV folder
    free_options = _RUNTIME_KEYS + ("export_dtype",)

    def check_data_settings(self) -> None:
        """The base checks, and ``data.image_folder`` a folder (found after the model was built)."""
        super().check_data_settings()
        if self.cfg.data.image_folder:
            from multimodal_rwkv.vision.processor import check_image_folder

            check_image_folder(self.cfg.data.image_folder, "data.image_folder")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.loss_reduction = cfg.model.options.get("loss_reduction", "token")  # set from the model it builds
        o = dict(cfg.model.options)
        unknown = sorted(set(o) - set(_ARCH_KEYS + _RUNTIME_KEYS + _TASK_KEYS))
        if unknown:
            raise ConfigError(f"model.options: unknown keys {unknown} for task visualrwkv; "
                              f"known: {sorted(_ARCH_KEYS + _RUNTIME_KEYS + _TASK_KEYS)}")
        unknown = sorted(set(cfg.data.options) - set(_DATA_KEYS))
        if unknown:
            raise ConfigError(f"data.options: unknown keys {unknown} for task visualrwkv; known: {list(_DATA_KEYS)}")
        if cfg.peft.train_state:
            raise ConfigError("peft.train_state: state tuning is for the lm task (it exports a language model's "
                              "time_state); for task visualrwkv use full or LoRA fine-tuning")
        if cfg.data.format not in ("auto", "llava"):
            raise ConfigError(f"data.format: task visualrwkv reads LLaVA json/jsonl (format auto or llava), "
                              f"got {cfg.data.format!r}")
        if cfg.data.tokenizer != "world":
            raise ConfigError("data.tokenizer: VisualRWKV uses the World tokenizer")
        cfg.model.config = rwkv_config_settings(cfg.model.config)  # the language model's sizes, before anything
        if o.get("export_dtype") is not None:  # checked now: it was refused by the export, after training
            from multimodal_rwkv.model.checkpoint import resolve_dtype

            try:
                resolve_dtype(o["export_dtype"])
            except CheckpointError as e:
                raise ConfigError(f"model.options.export_dtype: {e}") from None
        self._check_model_options(o)
        self.opts = o
        self.stage = int(o.get("stage", 2))
        if self.stage not in (1, 2):
            raise ConfigError(f"model.options.stage must be 1 or 2, got {self.stage}")
        self.train_encoder = bool(o.get("train_encoder", False))
        self.freeze_embeddings = bool(o.get("freeze_embeddings", True))
        self.train_projector = bool(o.get("train_projector", True))
        if self.stage == 1 and not self.train_projector:
            raise ConfigError("model.options: stage 1 trains only the projector; train_projector cannot be false")
        if self.stage == 1:  # the stage decides what trains: PEFT settings would be silently overridden
            asked = [k for k, on in (("peft.lora_r", cfg.peft.lora_r), ("peft.trainable", cfg.peft.trainable),
                                     ("peft.freeze", cfg.peft.freeze)) if on]
            if asked:
                raise ConfigError(f"{', '.join(asked)}: stage 1 trains the projector alone (model.options.stage: 1); "
                                  "LoRA and freeze/trainable patterns are for stage 2")

    @staticmethod
    def _check_model_options(o: dict) -> None:
        """The values of the model's options, checked as its config checks them, when the task is
        made (``--print-config`` too): a bad projector or template was found only when the model
        was built, and said without ``model.options``. Settings that depend on each other (a
        vision tower or config at all) are left to :meth:`build_model`."""
        from multimodal_rwkv.vision.modeling import VisualRWKVConfig

        kw = {k: o[k] for k in _ARCH_KEYS + _RUNTIME_KEYS if k in o and k != "vocab_subset"}
        if not kw.get("vision_config") and not kw.get("vision_tower"):
            kw["vision_tower"] = "(checked when the model is built)"
        subset = o.get("vocab_subset")
        try:
            VisualRWKVConfig(text_config={}, vocab_subset=None if subset == "auto" else subset, **kw)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"model.options: {e}") from None

    # ------------------------------------------------------------------ model
    def build_model(self):
        from multimodal_rwkv.vision.modeling import VisualRWKV, VisualRWKVConfig

        m, o = self.cfg.model, self.opts
        src = m.from_pretrained
        if src and Path(src).is_dir():
            refuse_training_checkpoint(Path(src))
        if src and _is_visualrwkv_source(src):
            if m.config:
                raise ConfigError("model.config: a VisualRWKV checkpoint fixes the LM size; remove model.config")
            given = [k for k in _ARCH_KEYS if k in o]
            if given:
                raise ConfigError(f"model.options {given}: fixed by the checkpoint {src}; only "
                                  f"{list(_RUNTIME_KEYS)} can change")
            model = VisualRWKV.from_pretrained(src, dtype="fp32")  # trained in fp32 whatever it was saved in
            for k in _RUNTIME_KEYS:
                if k in o:
                    setattr(model.config, k, o[k])
            model.config.__post_init__()
            model._processor = None
        else:
            if not (o.get("vision_tower") or o.get("vision_config")):
                raise ConfigError("model.options: set vision_tower (hub id or folder) or vision_config")
            kw = {k: o[k] for k in _ARCH_KEYS + _RUNTIME_KEYS if k in o and k != "vocab_subset"}
            subset = o.get("vocab_subset")
            if subset == "auto":
                subset = self._run_vocab_subset()
            elif subset is not None and not isinstance(subset, list):
                raise ConfigError("model.options.vocab_subset must be null, 'auto' or a list of World ids")
            if src:
                if m.config:
                    raise ConfigError("model: give either model.from_pretrained or model.config, not both "
                                      "(to start from the checkpoint, add --set model.config=null)")
                if subset is not None:
                    raise ConfigError("model.options.vocab_subset needs a fresh language model (model.config)")
                from multimodal_rwkv import RWKVForCausalLM

                from multimodal_rwkv.vision.modeling import _text_config_dict

                lm = RWKVForCausalLM.from_pretrained(src, dtype="fp32")
                cfg = VisualRWKVConfig(text_config=_text_config_dict(lm.config), **kw)
                model = VisualRWKV.from_config(cfg, language_model=lm)
            else:
                text = dict(m.config)
                if subset is not None:
                    text["vocab_size"] = len(subset) + 1
                try:
                    cfg = VisualRWKVConfig(text_config=text, vocab_subset=subset, **kw)
                except TypeError as e:
                    raise ConfigError(f"model.options: {e}") from None
                try:
                    model = VisualRWKV.from_config(cfg)
                except TypeError as e:
                    raise ConfigError(f"model.config: {e}") from None
        if self.stage == 2 and self.train_encoder and not model.config.bundle_encoder:
            # final/ would name the tower's source and reload the untrained one: the training lost
            if "bundle_encoder" in o:
                raise ConfigError("model.options: train_encoder true with bundle_encoder false would lose the "
                                  "trained encoder (final/ names only its source, which holds the untrained "
                                  "one); set bundle_encoder true, or train_encoder false")
            logger.warning("%s has bundle_encoder false; the encoder is trained (train_encoder), so final/ holds "
                           "it (bundle_encoder set to true)", src)
            model.config.bundle_encoder = True
        model.l2wrap = bool(self.cfg.train.l2wrap)
        self.loss_reduction = model.config.loss_reduction  # the recipe's, or the checkpoint's
        return model

    def _run_vocab_subset(self) -> list[int]:
        """``vocab_subset: auto`` is resolved once per run and kept in ``output_dir/vocab_subset.json``:
        a resume or a re-export reads it back, since the checkpoint's embedding and head rows are
        those ids (the data or the prompt template may have changed since; new words read as UNK)."""
        from multimodal_rwkv.fileio import atomic_write_text
        from multimodal_rwkv.training.loop import list_checkpoints

        out = Path(self.cfg.output_dir)
        saved = out / VOCAB_SUBSET_FILE
        if list_checkpoints(out / "checkpoints"):
            # the file, or else the run's exported config (the same ids: a run never changes them)
            for f, key in ((saved, None), (out / "final" / "config.json", "vocab_subset")):
                if not f.is_file():
                    continue
                try:
                    subset = json.loads(f.read_text(encoding="utf-8"))
                    subset = subset.get(key) if key else subset
                except (OSError, ValueError, AttributeError) as e:
                    raise ConfigError(f"{f}: cannot read the run's vocab_subset ({e})") from None
                if not (isinstance(subset, list) and subset and all(type(i) is int for i in subset)
                        and all(a < b for a, b in zip(subset, subset[1:]))):
                    raise ConfigError(f"{f}: the run's vocab_subset is not an increasing list of World ids")
                logger.info("vocab_subset auto: the run's %d World ids (%s)", len(subset), f)
                return subset
            logger.warning("%s is missing: vocab_subset auto is computed again from the data; the checkpoint's "
                           "rows match it only if the data and the prompt template are those of the run", saved)
        subset = self._auto_vocab_subset()
        atomic_write_text(saved, json.dumps(subset))
        return subset

    def _auto_vocab_subset(self) -> list[int]:
        """World ids used by the train/valid conversations (as templated) plus the template's own."""
        from multimodal_rwkv import WorldTokenizer
        from multimodal_rwkv.vision.data import read_llava_records
        from multimodal_rwkv.vision.processor import (
            STOP,
            VisualRWKVProcessor,
            _ROLES,
            apply_template,
        )

        d = self.cfg.data
        if not d.train_file:
            raise ConfigError("data.train_file is not set (needed for model.options.vocab_subset: auto)")
        tok = WorldTokenizer()
        proc = VisualRWKVProcessor(tok, None, 1, self.opts.get("prompt_template", "sandwich"))
        ids = {0}
        for s in ("User: ", "Assistant:", STOP, " ", "\n"):
            ids.update(tok.encode(s))
        for f in [d.train_file] + ([d.valid_file] if d.valid_file else []):
            recs, _ = read_llava_records(f)
            for _, r in recs:
                conv = r.get("conversations") if isinstance(r, dict) else None
                if not isinstance(conv, list):
                    continue
                turns = [(_ROLES.get(str(t.get("from", "")).lower(), "human"), str(t.get("value", "")))
                         for t in conv if isinstance(t, dict)]
                try:
                    t_ids, _ = proc.encode_turns(apply_template(turns, proc.template))
                except Exception:  # noqa: BLE001 - malformed records are reported by the dataset
                    continue
                ids.update(i for i in t_ids if i >= 0)
        subset = sorted(ids)
        logger.info("vocab_subset auto: %d World ids from %s", len(subset), d.train_file)
        return subset

    trainable_options = "model.options stage, train_encoder, train_projector and freeze_embeddings"

    def trainable_filter(self, name: str, param):
        if self.stage == 1:
            return name.startswith("projector.")
        if name.startswith("vision_tower."):
            return self.train_encoder
        if name.startswith("projector."):
            return self.train_projector
        if name == "language_model.rwkv.emb.weight" and self.freeze_embeddings:
            return False
        return None

    # ------------------------------------------------------------------ data
    def build_datasets(self, model):
        from multimodal_rwkv.vision.data import LlavaDataset, collate

        d = self.cfg.data
        if not d.train_file:
            raise ConfigError("data.train_file is not set (e.g. --set data.train_file=train.json)")
        verify = bool(d.options.get("verify_images", False))
        cache = bool(d.options.get("cache_images", False))

        subset = model.config.vocab_subset
        if subset is not None:  # answers end in the stop text: the model must be able to write it
            stop = model.tokenizer.encode(model.config.stop or "")
            missing = [t for t in stop if t not in set(subset)]
            if missing:
                raise ConfigError(f"model vocab_subset lacks the stop text's id(s) {missing} "
                                  f"({model.config.stop!r}): a model trained on it could never stop")

        def make(path):
            return LlavaDataset(path, model.processor, image_folder=d.image_folder, ctx_len=d.ctx_len,
                                on_bad_record=d.on_bad_record, verify_images=verify, cache_images=cache,
                                answer_ids=subset)

        train = make(d.train_file)
        valid = make(d.valid_file) if d.valid_file else None
        self._datasets = [x for x in (train, valid) if x is not None]
        self.skipped = sum(x.skipped for x in self._datasets)
        logger.info("train: %d records from %s (%d skipped)", len(train), d.train_file, train.skipped)
        return train, valid, collate

    # ------------------------------------------------------------------ steps
    def count_targets(self, batch) -> int:
        sel = batch["labels"][:, 1:] != -100
        if self.loss_reduction == "sample":  # micro-batches weighted by samples, not answer tokens
            return int(sel.any(1).sum())
        return int(sel.sum())

    def count_tokens(self, batch) -> int:
        """The positions of the micro-batch's samples, without the right padding :func:`collate`
        adds (pad id 0 beyond a sample's end, label -100): what the step's tokens/s and L2Wrap's
        per-position push count. The padded width depends on how the samples are split into
        micro-batches and processes, so counting it made the metrics' ``tokens`` (and L2Wrap's
        scale) differ between one process and two with the same global batch."""
        import torch

        ids, labels = batch["input_ids"], batch["labels"]
        real = (ids != 0) | (labels != -100)  # a sample's own positions (its last one always is one)
        pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
        return int((real * pos).amax(dim=1).sum())  # each row up to its last own position

    def training_step(self, model, batch, ctx):
        """The base step; with ``train.l2wrap``, L2Wrap's push is RWKV-LM's ``1e-4`` over all
        positions of the optimiser step (as the LM task's), whatever the split into micro-batches
        and processes: the model's own (``1e-4`` over one micro-batch's supervised positions) made
        two processes differ from one with the doubled batch under ``loss_reduction: sample``."""
        n = self.count_targets(batch)
        if self.cfg.train.l2wrap and n and ctx.scale > 0:
            # the loss's gradient is n * scale (the base step's loss_sum * scale): per position
            # the push is then factor * n * scale = 1e-4 * token_scale
            batch = {**batch, "l2wrap_factor": 1e-4 * ctx.token_scale / (n * ctx.scale)}
        return super().training_step(model, batch, ctx)

    # ------------------------------------------------------------------ export
    def save_pretrained(self, model, out_dir):
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir, dtype=self.opts.get("export_dtype"))
        skipped = self.skipped  # the run's total, set by the loop (worker drops, drops before a resume)
        info = {"task": "visualrwkv", "stage": self.stage, "ctx_len": self.cfg.data.ctx_len,
                "train_file": self.cfg.data.train_file, "skipped_records": skipped}
        (out_dir / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")


def _is_visualrwkv_source(src) -> bool:
    p = Path(src)
    if p.is_dir():
        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # (the model loader names what is wrong with it)
            return False
        return isinstance(cfg, dict) and cfg.get("model_type") == "visualrwkv"
    if p.is_file():
        from multimodal_rwkv.model.checkpoint import read_pth

        sd = read_pth(p)
        return any(k.startswith("proj.") for k in sd) and any(k.startswith("rwkv.") for k in sd)
    return False
