"""VisualRWKV: vision tower -> projector -> RWKV language model, in one readable file.

Layout follows LLaVA's split (``vision_tower``, ``projector``, ``language_model``). The processor
expands each ``<image>`` into ``num_image_tokens`` placeholder ids (:data:`IMAGE_TOKEN_ID`); here the
projected image features are scattered into those positions of the token embeddings, and the
sequence goes through the RWKV core as ``inputs_embeds`` (``blocks.0.ln0`` normalises text and
image embeddings alike, as in VisualRWKV).

Bidirectional scan (VisualRWKV v6.0): odd-numbered blocks read each image's *patch* tokens in
reverse order (CLS, when kept at the end, stays in place); implemented with the core's
``scan_order`` permutation, so batches may hold images at different positions and several images.
Because the permutation never crosses an image's span, the state after a prompt that contains the
whole image is the state the rest of the sequence sees: prefill in parallel form, then decode in
recurrent form from that state, and the result equals one parallel forward over everything.

Optional vocabulary subset (``vocab_subset``): the model's embedding/head rows cover only the listed
World-tokenizer ids (plus one UNK row for any other id). Text is still tokenised by the World
tokenizer and the model still reads and writes World ids; ids outside the subset are read as UNK
and never produced. Used by the small synthetic model so that it fits in a few MB.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from multimodal_rwkv.errors import CheckpointError, ConfigError, DataError
from multimodal_rwkv.fileio import atomic_write_text, save_folder, save_safetensors
from multimodal_rwkv.vision.encoder import EncoderOptions, VisionEncoder
from multimodal_rwkv.vision.processor import (
    ASPECT_MODES,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    STOP,
    TEMPLATES,
    VisualRWKVProcessor,
    image_processor_for,
    is_blank_question,
    is_unicode,
)
from multimodal_rwkv.vision.projector import PROJECTOR_TYPES, build_projector

logger = logging.getLogger(__name__)

MODEL_TYPE = "visualrwkv"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LOSS_REDUCTIONS = ("token", "sample")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@dataclass
class VisualRWKVConfig:
    """Everything needed to rebuild a VisualRWKV (round-trips through config.json).

    text_config: RWKVConfig keyword arguments (vocab_size, n_layer, n_embd, version, ...).
    vision_config: the tower's `transformers` config as a dict (with ``model_type``).
    vision_tower: hub id or folder the tower comes from; used to load it when ``bundle_encoder``
        is False (the weights are then not stored in model.safetensors).
    feature_layer / cls_token / patch_merge: see :class:`~multimodal_rwkv.vision.encoder.EncoderOptions`
        (``patch_merge`` is its ``merge``: m x m neighbouring patches per image token).
    projector: "linear" (VisualRWKV, no bias) or "mlp2x_gelu" (LLaVA).
    image_aspect_ratio: "crop" (the image processor's resize + centre crop) or "pad" (pad to a
        square with the mean colour first, LLaVA's ``pad``).
    prompt_template: "sandwich" (VisualRWKV), "image_first" or "image_last".
    bidirectional_scan: odd layers read image patches in reverse (VisualRWKV v6.0).
    vocab_subset: World ids the LM's rows cover (see module doc); None = the full vocabulary.
    loss_reduction: "token" (mean over all supervised tokens in the batch) or "sample" (mean per
        sample, then over the batch: VisualRWKV's choice).
    """

    text_config: dict = field(default_factory=dict)
    vision_config: dict | None = None
    vision_tower: str | None = None
    bundle_encoder: bool = True
    feature_layer: int = -1
    cls_token: str = "end"
    patch_merge: int = 1
    projector: str = "linear"
    image_aspect_ratio: str = "crop"
    prompt_template: str = "sandwich"
    bidirectional_scan: bool = True
    vocab_subset: list[int] | None = None
    loss_reduction: str = "token"
    stop: str = STOP

    def __post_init__(self):
        none = type(None)
        for name, types, what in (("text_config", (dict,), "an object of RWKVConfig values"),
                                  ("vision_config", (dict, none), "an object (a transformers vision config)"),
                                  ("vision_tower", (str, none), "a string or null"),
                                  ("bundle_encoder", (bool,), "true or false"),
                                  ("bidirectional_scan", (bool,), "true or false"),
                                  ("stop", (str, none), "a string")):
            if not isinstance(getattr(self, name), types):  # a string "false" would read as true
                raise ConfigError(f"{name} must be {what}, got {getattr(self, name)!r}")
        if self.projector not in PROJECTOR_TYPES:
            raise ConfigError(f"projector must be one of {PROJECTOR_TYPES}, got {self.projector!r}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ConfigError(f"image_aspect_ratio must be one of {ASPECT_MODES}, got {self.image_aspect_ratio!r}")
        if self.prompt_template not in TEMPLATES:
            raise ConfigError(f"prompt_template must be one of {TEMPLATES}, got {self.prompt_template!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ConfigError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        EncoderOptions(self.feature_layer, self.cls_token, merge=self.patch_merge)  # validates
        if self.vision_config is None and not self.vision_tower:
            raise ConfigError("VisualRWKV needs vision_config or vision_tower")
        if not self.bundle_encoder and not self.vision_tower:
            raise ConfigError("bundle_encoder=False needs vision_tower (where to load the encoder from)")
        if self.vocab_subset is not None:
            if not isinstance(self.vocab_subset, (list, tuple)) or not all(
                    hasattr(i, "__index__") and not isinstance(i, bool) for i in self.vocab_subset):
                raise ConfigError(f"vocab_subset must be a list of World ids (integers), got {self.vocab_subset!r}")
            vs = [i.__index__() for i in self.vocab_subset]
            if not vs or vs[0] != 0 or any(b <= a for a, b in zip(vs, vs[1:])) or vs[-1] > 65535 or vs[0] < 0:
                raise ConfigError("vocab_subset must be a strictly increasing list of World ids starting with 0")
            self.vocab_subset = vs
            want = len(vs) + 1
            if self.text_config.get("vocab_size", want) != want:
                raise ConfigError(f"text_config.vocab_size must be len(vocab_subset)+1 = {want}")
            self.text_config = {**self.text_config, "vocab_size": want}

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "VisualRWKVConfig":
        d = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "format_version")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown VisualRWKV config keys {unknown}")
        return cls(**d)

    @property
    def image_size(self) -> int | None:
        """Side in pixels of the tower's input (images are resized/cropped to it)."""
        return (self.vision_config or {}).get("image_size")

    @property
    def encoder_options(self) -> EncoderOptions:
        return EncoderOptions(self.feature_layer, self.cls_token, merge=self.patch_merge)


@dataclass
class VisualRWKVOutput:
    """loss (if labels), logits [B,T',V_local] (None when only the loss was needed), state."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: object = None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def image_spans(input_ids: torch.Tensor, num_image_tokens: int) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) spans of each image's placeholder tokens (runs of IMAGE_TOKEN_ID
    split into ``num_image_tokens``-long images). Raises DataError on a partial image."""
    spans = []
    mask = (input_ids == IMAGE_TOKEN_ID).cpu()
    for b in range(mask.shape[0]):
        row, t, T = [], 0, mask.shape[1]
        m = mask[b].tolist()
        while t < T:
            if not m[t]:
                t += 1
                continue
            s = t
            while t < T and m[t]:
                t += 1
            run = t - s
            if run % num_image_tokens:
                raise DataError(f"row {b}: a run of {run} image placeholders is not a multiple of "
                                f"{num_image_tokens} tokens per image")
            row += [(s + j * num_image_tokens, s + (j + 1) * num_image_tokens) for j in range(run // num_image_tokens)]
        spans.append(row)
    return spans


def build_scan_order(input_ids: torch.Tensor, num_image_tokens: int, cls_position: str | None
                     ) -> torch.Tensor | None:
    """scan_order [B,T] for the bidirectional scan: each image's patch span reversed, identity
    elsewhere (CLS stays where it is). None when the batch holds no image."""
    spans = image_spans(input_ids, num_image_tokens)
    if not any(spans):
        return None
    B, T = input_ids.shape
    order = torch.arange(T).repeat(B, 1)
    for b, row in enumerate(spans):
        for s, e in row:
            if cls_position == "end":
                e -= 1
            elif cls_position == "start":
                s += 1
            order[b, s:e] = torch.arange(e - 1, s - 1, -1)
    return order.to(input_ids.device)


def _world_tokenizer():
    from multimodal_rwkv import WorldTokenizer

    return WorldTokenizer()


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
class VisualRWKV(nn.Module):
    """Vision tower + projector + RWKV LM. See the module doc for the data flow.

    Build with :meth:`from_config`, load with :meth:`from_pretrained` (our folders and released
    VisualRWKV-v060 ``.pth`` files), answer with :meth:`answer` / :meth:`answer_batch`.
    """

    def __init__(self, config: VisualRWKVConfig, language_model: nn.Module, vision_tower: VisionEncoder,
                 projector: nn.Module | None = None, image_processor=None, tokenizer=None):
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.vision_tower = vision_tower
        C = language_model.config.n_embd
        self.projector = projector if projector is not None else build_projector(
            config.projector, vision_tower.out_dim, C)
        if image_processor is None:
            image_processor = image_processor_for(vision_tower.config)
        self.image_processor = image_processor
        side = getattr(vision_tower.config, "image_size", None)
        made = VisualRWKVProcessor(None, image_processor, 1, image_aspect_ratio=config.image_aspect_ratio).fixed_size
        if isinstance(side, int) and made != (side, side):
            got = (f"makes {made[0]}x{made[1]} images" if made is not None else "makes images whose size depends on "
                   "the image (no centre crop after a shortest-edge resize, or no resize)")
            raise ConfigError(f"the image processor {got}, the vision tower takes {side}x{side} (its "
                              f"preprocessor_config.json does not fit the vision config)")
        self._tokenizer = tokenizer
        V = language_model.config.vocab_size
        if config.vocab_subset is not None:
            vs = config.vocab_subset
            if not isinstance(vs, (list, tuple)) or not vs or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 65536 for i in vs):
                raise ConfigError("vocab_subset must be a non-empty list of World token ids in [0, 65536)")
            sub = torch.tensor(vs, dtype=torch.long)
            w2l = torch.full((65536,), len(sub), dtype=torch.long)
            w2l[sub] = torch.arange(len(sub))
            self.register_buffer("world_to_local", w2l, persistent=False)
            self.register_buffer("local_to_world", torch.cat([sub, sub.new_tensor([-1])]), persistent=False)
        else:
            self.world_to_local = None
            self.local_to_world = None
        if config.vocab_subset is not None and V != len(config.vocab_subset) + 1:
            raise ConfigError("language model vocab_size does not match len(vocab_subset) + 1")
        if config.vocab_subset is None and V < 65536:  # prompts are World ids: each needs its row
            raise ConfigError(f"the language model has {V} token rows, fewer than the World vocabulary's 65536 "
                              "(and no vocab_subset maps World ids onto them)")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: VisualRWKVConfig, tokenizer=None, language_model=None) -> "VisualRWKV":
        """A fresh model: RWKV's published init for the LM (or the given ``language_model``); the
        tower random from vision_config, or loaded from ``vision_tower`` when no vision_config is
        given, or whenever ``bundle_encoder`` is False (the tower's weights are then not saved, and
        loading takes them from ``vision_tower`` too); a fresh projector. ``config`` itself is left
        as it was (the model holds a copy)."""
        import copy

        from multimodal_rwkv import RWKVConfig, RWKVForCausalLM

        config = copy.deepcopy(config)
        if language_model is not None:
            config.text_config = _text_config_dict(language_model.config)
            config.__post_init__()
            lm = language_model
        else:
            lm = RWKVForCausalLM(RWKVConfig(**config.text_config))
        image_processor = None
        if config.vision_config is not None and config.bundle_encoder:
            tower = VisionEncoder.from_config(config.vision_config, config.encoder_options)
        else:
            config.vision_tower = _absolute_if_local(config.vision_tower)
            tower = VisionEncoder.from_pretrained(config.vision_tower, config.encoder_options)
            config.vision_config = _vision_config_dict(tower.config)
            image_processor = _load_image_processor(config.vision_tower)
        return cls(config, lm, tower, image_processor=image_processor, tokenizer=tokenizer)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _world_tokenizer()
        return self._tokenizer

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_image_tokens

    @property
    def processor(self) -> VisualRWKVProcessor:
        p = getattr(self, "_processor", None)
        if p is None or p.tokenizer is not self.tokenizer:
            p = VisualRWKVProcessor(self.tokenizer, self.image_processor, self.num_image_tokens,
                                    self.config.prompt_template, self.config.image_aspect_ratio)
            self._processor = p
        return p

    @property
    def device(self) -> torch.device:
        return self.language_model.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.head.weight.dtype

    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Recompute RWKV blocks in the backward pass (the tower is frozen in the paper's recipes)."""
        self.language_model.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self):
        self.language_model.gradient_checkpointing_disable()

    # ---- ids <-> model rows -------------------------------------------------------------------
    def to_local(self, ids: torch.Tensor) -> torch.Tensor:
        """World ids (>= 0) -> rows of the LM's embedding/head (identity without a vocab subset)."""
        if self.world_to_local is None:
            return ids
        return self.world_to_local[ids]

    def to_world(self, ids: torch.Tensor) -> torch.Tensor:
        if self.local_to_world is None:
            return ids
        return self.local_to_world[ids]

    # ---- forward ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N,3,H,W] -> projected image features [N, num_image_tokens, C]."""
        return self.projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """[B,T] World ids with IMAGE_TOKEN_ID placeholders (+ their images in order of appearance,
        row-major) -> input embeddings [B,T,C] (before ln0)."""
        is_img = input_ids == IMAGE_TOKEN_ID
        ids = self.to_local(input_ids.clamp_min(0))
        x = self.language_model.get_input_embeddings()(ids)
        n_slots = int(is_img.sum())
        n_imgs = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_imgs * self.num_image_tokens:
            raise DataError(f"{n_slots} image placeholder tokens but {n_imgs} image(s) x "
                            f"{self.num_image_tokens} tokens per image")
        if n_imgs:
            feats = self.encode_images(pixel_values).to(x.dtype)
            x = x.masked_scatter(is_img.unsqueeze(-1), feats.reshape(-1, x.shape[-1]))
        elif self.training and torch.is_grad_enabled():
            # a batch of text-only records: the projector still joins the graph, with weight 0, so a
            # run that trains it alone (stage 1) has a loss to backpropagate (zero gradients), and DDP
            # sees it used in the forward (a zero added after it was marked unused twice: a crash)
            first = next(m for m in self.projector.modules() if isinstance(m, nn.Linear))
            x = x + 0 * self.projector(first.weight.new_zeros(1, first.in_features)).sum().to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, state=None, logits_to_keep=0,
                return_logits: bool | None = None, attention_mask=None, l2wrap_factor: float | None = None,
                **unused) -> VisualRWKVOutput:
        """input_ids [B,T] World ids with IMAGE_TOKEN_ID placeholders; pixel_values [N,3,H,W];
        labels [B,T] (IGNORE_INDEX = -100 where unsupervised; shifted inside, HF convention).

        With labels, the head runs only on supervised positions (answers are a few tokens of a
        long image+prompt sequence, and the head is the costliest matrix of a small model);
        logits are then None unless ``return_logits``. ``l2wrap_factor`` (training with
        ``l2wrap``): L2Wrap's push per supervised position per unit of the loss's gradient (the
        training engine's, so that the push does not depend on how a batch is split); None: RWKV-LM's
        ``1e-4`` over the supervised positions of this batch.
        """
        x = self.embed(input_ids, pixel_values)
        scan = None
        if self.config.bidirectional_scan:
            scan = build_scan_order(input_ids, self.num_image_tokens, self.vision_tower.cls_position)
        hidden, new_state = self.language_model.rwkv(inputs_embeds=x, state=state, scan_order=scan,
                                                     attention_mask=attention_mask, return_dict=False)
        head = self.language_model.head
        loss = None
        logits = None
        if labels is not None:
            loss = self._loss(hidden, labels.to(hidden.device), l2wrap_factor)
            if return_logits:
                logits = head(hidden)
        else:
            from multimodal_rwkv.model.modeling import keep_logit_positions

            logits = head(keep_logit_positions(hidden, logits_to_keep))
        return VisualRWKVOutput(loss=loss, logits=logits, state=new_state)

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor, l2wrap_factor: float | None = None) -> torch.Tensor:
        tgt = labels[:, 1:]
        sel = tgt != IGNORE_INDEX
        if not bool(sel.any()):
            return hidden.sum() * 0.0
        h = hidden[:, :-1][sel]
        t = self.to_local(tgt[sel])
        logits = self.language_model.head(h).float()
        ce = F.cross_entropy(logits, t, reduction="none")
        if self.config.loss_reduction == "token":
            loss = ce.mean()
        else:
            rows = sel.nonzero()[:, 0]
            per_row = torch.zeros(labels.shape[0], device=ce.device).index_add_(0, rows, ce)
            counts = sel.sum(1)
            keep = counts > 0
            loss = (per_row[keep] / counts[keep]).mean()
        if getattr(self, "l2wrap", False) and self.training:
            from multimodal_rwkv.training.lm import L2Wrap

            loss = (L2Wrap.apply(loss, logits) if l2wrap_factor is None  # on the supervised positions' logits only
                    else L2Wrap.apply(loss, logits, factor=l2wrap_factor, reduction="sum"))
        return loss

    def reference_loss(self, input_ids, pixel_values, labels) -> torch.Tensor:
        """The same loss from full logits (obviously-correct twin of :meth:`_loss`, for tests)."""
        out = self.forward(input_ids, pixel_values)
        logits = out.logits[:, :-1].float()
        tgt = labels[:, 1:]
        sel = tgt != IGNORE_INDEX
        local = torch.where(sel, self.to_local(tgt.clamp_min(0)), torch.full_like(tgt, IGNORE_INDEX))
        ce = F.cross_entropy(logits.transpose(1, 2), local, ignore_index=IGNORE_INDEX, reduction="none")
        if self.config.loss_reduction == "token":
            return ce.sum() / sel.sum()
        per = ce.sum(1) / sel.sum(1).clamp_min(1)
        return per[sel.sum(1) > 0].mean()

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int], pixel_values: torch.Tensor | None = None, state=None):
        """Run one prompt (batch 1, parallel form) -> (last logits [1,V_local], state)."""
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.forward(t, pixel_values, state=state, logits_to_keep=1)
        return out.logits[:, -1].float(), out.state

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, state, max_new_tokens: int = 128, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: str | None = None) -> list[list[int]]:
        """Recurrent decoding from (logits [B,V_local], state) -> generated World ids per row
        (stop token included when produced). ``seed``: an int seeds one generator for the batch; a
        list of B ints seeds one per row, so that a row's samples do not depend on the rows decoded
        with it (eval-vqa: the same answers at any --batch-size)."""
        from multimodal_rwkv.model.generation import check_sampling

        check_sampling(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        per_row = isinstance(seed, (list, tuple))
        for s in (seed if per_row else [seed]):
            if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63):
                raise ValueError(f"seed must be an integer in [0, 2**63) or a list of them, got {seed!r}")
        if per_row and len(seed) != logits.shape[0]:
            raise ValueError(f"seed: a list of {len(seed)} seeds for {logits.shape[0]} rows")
        stop = self.config.stop if stop is None else stop
        if stop is not None and not isinstance(stop, str):
            raise ValueError(f"stop must be a string, got {stop!r}")
        stop_ids = self.tokenizer.encode(stop) if stop else []
        stop_id = stop_ids[0] if len(stop_ids) == 1 else None
        gen = None  # without a seed: torch's global generator (torch.manual_seed makes it reproducible)
        if do_sample and per_row:
            gen = [torch.Generator(device=logits.device).manual_seed(int(s)) for s in seed]
        elif do_sample and seed is not None:
            gen = torch.Generator(device=logits.device).manual_seed(int(seed))
        B = logits.shape[0]
        outs: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new_tokens):
            nxt = self._pick(logits, do_sample, temperature, top_k, top_p, gen)
            world = self.to_world(nxt).tolist()
            for b in range(B):
                if done[b]:
                    continue
                outs[b].append(world[b])
                if world[b] == 0 or world[b] == stop_id or (stop and stop in self.tokenizer.decode(outs[b])):
                    done[b] = True
            if all(done):
                break
            ids = torch.tensor(world, dtype=torch.long, device=self.device).clamp_min(0).unsqueeze(1)
            out = self.forward(ids, state=state, logits_to_keep=1)
            logits, state = out.logits[:, -1].float(), out.state
        return outs

    def _pick(self, logits, do_sample, temperature, top_k, top_p, gen) -> torch.Tensor:
        from multimodal_rwkv.model.generation import check_finite_logits, sample_logits

        check_finite_logits(logits, self.dtype)  # (the argmax of NaN would be id 0: an empty answer)
        logits = logits.clone()
        if self.local_to_world is not None:
            logits[:, -1] = -float("inf")  # never produce the UNK row
        if not do_sample or temperature <= 0:
            return logits.argmax(-1)
        return sample_logits(logits, temperature, top_k, top_p, gen)  # RWKV's sampler, as generate's

    def _text(self, ids: list[int], stop: str | None) -> str:
        stop = self.config.stop if stop is None else stop
        text = self.tokenizer.decode([i for i in ids if i > 0])
        if stop:
            text = text.split(stop)[0]
        return text.strip()

    def _pixels(self, images) -> torch.Tensor:
        pv = self.processor.preprocess_images(images)
        return pv.to(device=self.device, dtype=self.vision_tower.dtype)

    @torch.no_grad()
    def answer(self, image, question: str, max_new_tokens: int = 128, **gen) -> str:
        """Answer one question about one image (path, PIL image or raw tensor [3,H,W]; or a list
        of images for a question with several ``<image>`` placeholders). Greedy by default;
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop`` as in :meth:`decode`."""
        return self.answer_batch([image], [question], max_new_tokens=max_new_tokens, **gen)[0]

    @torch.no_grad()
    def prefill_questions(self, image, questions: list[str]):
        """Image-first prefix reuse: prefill "User: <image>" once, then all questions' remaining
        prompts as one left-padded batch from copies of that state (padded positions leave the
        state unchanged). -> (last logits [N,V_local], state with batch N)."""
        pre, _ = self.processor.image_first_split(questions[0])
        _, st = self.prefill(pre, self._pixels([image]))
        sufs = [self.processor.image_first_split(q)[1] for q in questions]
        n, L = len(sufs), max(len(x) for x in sufs)
        ids = torch.zeros(n, L, dtype=torch.long)
        mask = torch.zeros(n, L, dtype=torch.long)
        for i, x in enumerate(sufs):
            ids[i, L - len(x):] = torch.tensor(x)
            mask[i, L - len(x):] = 1
        out = self.forward(ids.to(self.device), state=st.expand(n), logits_to_keep=1,
                           attention_mask=mask.to(self.device))
        return out.logits[:, -1].float(), out.state

    @torch.no_grad()
    def answer_batch(self, images, questions: list[str], max_new_tokens: int = 128,
                     reuse_image_prefix: bool | None = None, **gen) -> list[str]:
        """Answer many questions. ``images`` is one image for all questions or a list (one entry per
        question; an entry may be a list of images). Each prompt is prefilled on its own (exact, no
        padding), then all are decoded together as a batch.

        In image_first mode, questions about the same image (the same path or object) share one
        prefill of "User: <image>" (:meth:`prefill_questions`; ``reuse_image_prefix``, default on
        for image_first)."""
        from multimodal_rwkv import RWKVState

        if isinstance(questions, str) or not isinstance(questions, (list, tuple)):
            raise DataError(f"questions must be a list of strings (for one question: answer()), got "
                            f"{type(questions).__name__}")
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise DataError(f"question {i}: expected a string, got {type(q).__name__}")
        if not questions:
            return []
        if not isinstance(images, (list, tuple)):
            images = [images] * len(questions)
        if len(images) != len(questions):
            raise DataError(f"{len(images)} images for {len(questions)} questions")
        for i, (img, q) in enumerate(zip(images, questions)):
            n_img = len(img) if isinstance(img, (list, tuple)) else 1
            if q.count(IMAGE_TOKEN) > n_img:  # before "empty": '<image><image>' has places for two images
                raise DataError(f"question {i} has {q.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders for "
                                f"{n_img} image(s)")
            if is_blank_question(q):
                raise DataError(f"question {i} is empty")
            if not is_unicode(q):
                raise DataError(f"question {i}: holds an unpaired surrogate (bytes that were not UTF-8?), not text")
        self.eval()
        template = self.config.prompt_template
        reuse = (template == "image_first") if reuse_image_prefix is None else reuse_image_prefix
        if reuse and template != "image_first":
            raise ConfigError("reuse_image_prefix needs the image_first prompt template")
        rows: list = [None] * len(questions)
        groups: dict = {}
        for i, (img, q) in enumerate(zip(images, questions)):
            imgs = list(img) if isinstance(img, (list, tuple)) else [img]
            if reuse and len(imgs) == 1:
                key = str(imgs[0]) if isinstance(imgs[0], (str, os.PathLike)) else id(imgs[0])
                groups.setdefault(key, (imgs[0], []))[1].append(i)
            else:
                ids = self.processor.build_prompt(q, num_images=len(imgs))
                rows[i] = self.prefill(ids, self._pixels(imgs))
        for img, idx in groups.values():
            lg, st = self.prefill_questions(img, [questions[i] for i in idx])
            for j, i in enumerate(idx):
                rows[i] = (lg[j:j + 1], st[j])
        logits = torch.cat([r[0] for r in rows])
        state = RWKVState.cat([r[1] for r in rows])
        outs = self.decode(logits, state, max_new_tokens=max_new_tokens, **gen)
        return [self._text(o, gen.get("stop")) for o in outs]

    # ---- persistence --------------------------------------------------------------------------
    def save_pretrained(self, out_dir, dtype: torch.dtype | str | None = None) -> None:
        """Write config.json + model.safetensors (+ preprocessor_config.json). The encoder's
        weights are included when ``config.bundle_encoder``; otherwise only ``vision_tower`` (hub id
        or folder) is recorded. ``dtype`` (e.g. torch.bfloat16) casts floating weights on disk."""
        from multimodal_rwkv.model.checkpoint import check_range, resolve_dtype

        dtype = resolve_dtype(dtype)
        if dtype is not None:
            check_range(self.state_dict(), dtype, out_dir)  # fp16: nothing written as inf
        out = save_folder(out_dir)
        sd = {}
        for k, v in self.state_dict().items():
            if not self.config.bundle_encoder and k.startswith("vision_tower."):
                continue
            v = v.detach().cpu()
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            sd[k] = v.contiguous()
        cfg = self.config.to_dict()
        cfg["text_config"] = _text_config_dict(self.language_model.config)
        cfg["vision_config"] = _vision_config_dict(self.vision_tower.config)
        save_safetensors(out / WEIGHTS_NAME, sd, {"format": "pt"})
        atomic_write_text(out / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
        self.image_processor.save_pretrained(str(out))

    @classmethod
    def from_pretrained(cls, src, dtype: torch.dtype | str | None = None, device=None,
                        vision_tower: str | None = None, tokenizer=None) -> "VisualRWKV":
        """Load a folder written by :meth:`save_pretrained`, or a released VisualRWKV-v060
        single-file ``.pth`` (keys ``rwkv.*``, ``vit.*``, ``proj.*``; ``vision_tower`` then optionally
        names the CLIP folder/hub id for its config and image processor). Raises CheckpointError."""
        from multimodal_rwkv.model.checkpoint import check_range, refuse_training_checkpoint, resolve_dtype

        path = Path(src)
        if path.is_file():
            model = load_v060_checkpoint(path, vision_tower=vision_tower, tokenizer=tokenizer)
        elif path.is_dir():
            refuse_training_checkpoint(path)
            if vision_tower is not None:  # a folder holds its own tower: one given too would be ignored
                raise CheckpointError(f"{path}: a model folder brings its own vision tower; vision_tower "
                                      f"({vision_tower}) is for a single-file VisualRWKV-v060 .pth")
            model, saved = _load_folder(path, tokenizer)
            if dtype is None:  # as RWKVForCausalLM: the dtype the folder's weights are stored in
                dtype = saved
        else:
            raise CheckpointError(f"{path}: no such file or folder")
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            check_range(model.state_dict(), dtype, src)
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model.eval()


def _vision_config_dict(vcfg) -> dict:
    d = vcfg.to_dict()
    keep = {"model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
            "projection_dim", "initializer_range", "initializer_factor", "vision_use_head"}
    return {k: v for k, v in d.items() if k in keep}


def _load_image_processor(folder):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder), local_files_only=os.path.isdir(str(folder)))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # a malformed preprocessor_config.json
        raise CheckpointError(f"{folder}: cannot load the image processor ({' '.join(str(e).split())[:200]})") from None


def _load_folder(path: Path, tokenizer=None) -> tuple[VisualRWKV, torch.dtype]:
    """The model (fp32) and the dtype most of the folder's weights are stored in."""
    from safetensors import SafetensorError

    from multimodal_rwkv import RWKVConfig, RWKVForCausalLM
    from multimodal_rwkv.model.checkpoint import load_safetensors, load_state_into, weights_dtype

    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: folder has no {CONFIG_NAME}")
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{cfg_file}: not a JSON object")
    if d.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{cfg_file}: model_type is {d.get('model_type')!r}, not {MODEL_TYPE!r}")
    try:
        config = VisualRWKVConfig.from_dict(d, str(cfg_file))  # types checked there
        text_config = RWKVConfig(**config.text_config)
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: invalid VisualRWKV config ({e})") from None
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    try:
        sd = load_safetensors(wfile)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{wfile}: unreadable safetensors ({e})") from None
    with torch.device("meta"):
        lm = RWKVForCausalLM(text_config)
    lm = lm.to_empty(device="cpu")
    lm_sd = {k[len("language_model."):]: v for k, v in sd.items() if k.startswith("language_model.")}
    load_state_into(lm, {k: v.float() if v.is_floating_point() else v for k, v in lm_sd.items()},
                    f"{wfile} (language_model)")
    if config.bundle_encoder:
        if config.vision_config is None:
            raise CheckpointError(f"{cfg_file}: bundled encoder but no vision_config")
        try:
            tower = VisionEncoder.from_config(config.vision_config, config.encoder_options)
        except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{cfg_file}: cannot build the vision tower it describes "
                                  f"({' '.join(str(e).split())[:200]})") from None
        vt_sd = {k[len("vision_tower."):]: v.float() for k, v in sd.items() if k.startswith("vision_tower.")}
        load_state_into(tower, vt_sd, f"{wfile} (vision_tower)")
    else:
        config.vision_tower = _absolute_if_local(config.vision_tower)  # (saved again, it stays this folder)
        vt = config.vision_tower
        if vt and os.path.isabs(vt) and not os.path.isdir(vt):  # (a hub id is never absolute)
            raise CheckpointError(f"{cfg_file}: its vision tower (not bundled) is the folder {vt}, which no longer "
                                  "exists; set vision_tower there to the tower's new place")
        tower = VisionEncoder.from_pretrained(config.vision_tower, config.encoder_options)
    image_processor = _load_image_processor(path) if (path / "preprocessor_config.json").is_file() else None
    try:
        model = VisualRWKV(config, lm, tower, image_processor=image_processor, tokenizer=tokenizer)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    pj_sd = {k[len("projector."):]: v.float() for k, v in sd.items() if k.startswith("projector.")}
    load_state_into(model.projector, pj_sd, f"{wfile} (projector)")
    extra = [k for k in sd if not k.startswith(("language_model.", "vision_tower.", "projector."))]
    if extra:
        raise CheckpointError(f"{wfile}: unexpected keys {extra[:5]}")
    return model, weights_dtype({k: v for k, v in sd.items() if v.is_floating_point()})


# ------------------------------------------------------------------------------------------------
# released VisualRWKV-v060 checkpoints
# ------------------------------------------------------------------------------------------------
def v060_vit_to_hf(vit_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``vit.*`` keys of a VisualRWKV-v060 file (a ``CLIPVisionModel`` state dict from transformers
    4.x: ``vision_model.embeddings...``) -> this transformers' ``CLIPVisionModel`` keys. Drops the
    old persistent ``position_ids`` buffer."""
    out = {}
    for k, v in vit_sd.items():
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
        if k.endswith("embeddings.position_ids"):
            continue
        out[k] = v
    return out


def infer_clip_vision_config(vit_sd: dict[str, torch.Tensor], src) -> dict:
    """CLIPVisionConfig kwargs from tensor shapes (OpenAI CLIP: 64-dim heads, quick_gelu)."""
    import re

    try:
        hidden = vit_sd["embeddings.class_embedding"].shape[0]
        patch = vit_sd["embeddings.patch_embedding.weight"].shape[-1]
        n_pos = vit_sd["embeddings.position_embedding.weight"].shape[0]
        layers = {int(m.group(1)) for k in vit_sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
        inter = vit_sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{src}: vit.* has no {e.args[0]} (not a CLIP vision tower)") from None
    side = math.isqrt(n_pos - 1)
    if side * side != n_pos - 1:
        raise CheckpointError(f"{src}: {n_pos} position embeddings is not 1 + a square number of patches")
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": max(layers) + 1, "num_attention_heads": max(1, hidden // 64),
            "image_size": side * patch, "patch_size": patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _absolute_if_local(tower: str | None) -> str | None:
    """A ``vision_tower`` that names a local folder relative to the working directory, as an
    absolute path: a model that does not bundle its encoder records where it came from, and a
    relative name would mean another folder (or a hub id) when loaded from elsewhere."""
    if tower and not os.path.isabs(tower) and os.path.isdir(tower):
        return os.path.abspath(tower)
    return tower


def load_v060_checkpoint(path, vision_tower: str | None = None, tokenizer=None) -> VisualRWKV:
    """Released VisualRWKV-v060 single file -> VisualRWKV (paper configuration: last layer, CLS at
    the end, linear projector, sandwich prompt, bidirectional scan, crop)."""
    from multimodal_rwkv import RWKVForCausalLM
    from multimodal_rwkv.model.checkpoint import blink_to_ours, infer_config, load_state_into, read_pth

    path = Path(path)
    sd = read_pth(path)
    groups = {"rwkv.": {}, "vit.": {}, "proj.": {}}
    other = []
    for k, v in sd.items():
        for p, g in groups.items():
            if k.startswith(p):
                g[k[len(p):]] = v
                break
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"{path}: unexpected keys outside rwkv.*/vit.*/proj.*: {other[:5]}")
    if not groups["rwkv."] or not groups["proj."]:
        raise CheckpointError(f"{path}: not a VisualRWKV-v060 checkpoint (needs rwkv.* and proj.* keys)")
    blink = {k: v.float() for k, v in groups["rwkv."].items()}
    rcfg = infer_config(blink, path)
    with torch.device("meta"):
        lm = RWKVForCausalLM(rcfg)
    lm = lm.to_empty(device="cpu")
    load_state_into(lm, blink_to_ours(blink), f"{path} (rwkv.*)")
    image_processor = None
    vit = v060_vit_to_hf({k: v.float() for k, v in groups["vit."].items()})
    if vision_tower:
        tower = VisionEncoder.from_pretrained(vision_tower, EncoderOptions(-1, "end"))
        image_processor = _load_image_processor(vision_tower)
    else:
        if not vit:
            raise CheckpointError(f"{path}: no vit.* weights; pass vision_tower= (e.g. openai/clip-vit-large-patch14-336)")
        tower = VisionEncoder.from_config(infer_clip_vision_config(vit, path), EncoderOptions(-1, "end"))
    if vit:
        load_state_into(tower.model, vit, f"{path} (vit.*)")
    proj = groups["proj."]
    if set(proj) != {"weight"} or proj["weight"].dim() != 2:
        raise CheckpointError(f"{path}: proj.* must be one bias-free linear weight, got {sorted(proj)}")
    if tuple(proj["weight"].shape) != (rcfg.n_embd, tower.hidden_size):
        raise CheckpointError(f"{path}: proj.weight {tuple(proj['weight'].shape)} != "
                              f"(n_embd {rcfg.n_embd}, vision hidden {tower.hidden_size})")
    config = VisualRWKVConfig(text_config=_text_config_dict(rcfg), vision_config=_vision_config_dict(tower.config),
                              vision_tower=vision_tower, bundle_encoder=True, feature_layer=-1, cls_token="end",
                              projector="linear", image_aspect_ratio="crop", prompt_template="sandwich",
                              bidirectional_scan=True)
    model = VisualRWKV(config, lm, tower, image_processor=image_processor, tokenizer=tokenizer)
    with torch.no_grad():
        model.projector.weight.copy_(proj["weight"].float())
    return model


def _text_config_dict(rcfg) -> dict:
    keys = ("vocab_size", "n_layer", "n_embd", "head_size", "dim_att", "dim_ffn", "version", "d_mix_lora",
            "d_decay_lora", "head_size_divisor", "layer_norm_eps", "has_initial_state")
    return {k: getattr(rcfg, k) for k in keys}
