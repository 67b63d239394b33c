"""Vision tower: a `transformers` CLIP or SigLIP vision model plus the feature-selection options.

VisualRWKV v6.0 takes CLIP's ``last_hidden_state`` (the last encoder layer, before
``post_layernorm``) and keeps the CLS token, moved to the *end* of the sequence (577 tokens for
CLIP-L/14-336). LLaVA-1.5 takes the penultimate layer (``feature_layer=-2``) and drops CLS (576).
SigLIP has no CLS token; its ``last_hidden_state`` is post-LayerNorm'd (that is what VisualRWKV
v6.10 uses), any other layer is the raw encoder output.

The wrapper keeps the `transformers` model as ``self.model`` so that the encoder can be saved as a
normal `transformers` folder (``save_pretrained``) and referenced by hub id or path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from multimodal_rwkv.errors import CheckpointError, ConfigError
from multimodal_rwkv.fileio import is_utf8_path

logger = logging.getLogger(__name__)

CLS_POSITIONS = ("end", "drop", "start")
_CLIP_TYPES = ("clip", "clip_vision_model")
_SIGLIP_TYPES = ("siglip", "siglip_vision_model")


@dataclass
class EncoderOptions:
    """How features are read off the tower.

    feature_layer: -1 = ``last_hidden_state`` (VisualRWKV); any other int indexes
        ``hidden_states`` (embeddings output is index 0; LLaVA uses -2).
    cls: "end" (VisualRWKV v6.0: CLS moved after the patches), "drop" (LLaVA), "start"
        (the tower's own order). Ignored for towers without a CLS token (SigLIP).
    merge: 1 = one token per patch. m > 1: each m x m window of neighbouring patches becomes one
        token whose feature is the m*m patch features concatenated (row by row), so an image gives
        m*m times fewer, m*m times wider tokens (the spatial merge of InternVL's pixel shuffle and
        Qwen2-VL's patch merger; the projector maps the wide features). Needs the CLS dropped
        (or a tower without one) and a patch grid divisible by m.
    """

    feature_layer: int = -1
    cls: str = "end"
    merge: int = 1

    def __post_init__(self):
        if not isinstance(self.feature_layer, int) or isinstance(self.feature_layer, bool):
            raise ConfigError(f"vision feature_layer must be an int, got {self.feature_layer!r}")
        if self.cls not in CLS_POSITIONS:
            raise ConfigError(f"vision cls must be one of {CLS_POSITIONS}, got {self.cls!r}")
        if not isinstance(self.merge, int) or isinstance(self.merge, bool) or self.merge < 1:
            raise ConfigError(f"vision patch merge must be an int >= 1, got {self.merge!r}")


def vision_model_class(model_type: str):
    """The `transformers` vision-tower class for a config ``model_type`` (CLIP or SigLIP)."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    if model_type in _CLIP_TYPES:
        return CLIPVisionModel
    if model_type in _SIGLIP_TYPES:
        return SiglipVisionModel
    raise ConfigError(f"unsupported vision encoder type {model_type!r} (supported: CLIP, SigLIP)")


def vision_config_from_dict(d: dict):
    """Build a CLIPVisionConfig / SiglipVisionConfig from a dict with a ``model_type`` key."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    d = dict(d)
    mt = d.pop("model_type", None)
    klass = CLIPVisionConfig if mt in _CLIP_TYPES else SiglipVisionConfig if mt in _SIGLIP_TYPES else None
    if klass is not None:
        try:
            return klass(**d)
        except Exception as e:  # noqa: BLE001 - transformers' config validation raises its own types
            raise ConfigError(f"{mt} config: {' '.join(str(e).split())[:200]}") from None
    raise ConfigError(f"vision config needs model_type clip_vision_model or siglip_vision_model, got {mt!r}")


def _vision_sub_config(cfg):
    """A full CLIPConfig/SiglipConfig (hub checkpoints) -> its vision part; vision configs pass through."""
    if getattr(cfg, "model_type", None) in ("clip", "siglip"):
        return cfg.vision_config
    return cfg


class VisionEncoder(nn.Module):
    """A frozen-by-default CLIP/SigLIP tower that returns selected patch (and CLS) features.

    forward(pixel_values [N,3,H,W] float) -> features [N, num_image_tokens, out_dim].
    """

    def __init__(self, model: nn.Module, options: EncoderOptions | None = None):
        super().__init__()
        self.model = model
        self.options = options or EncoderOptions()
        mt = model.config.model_type
        if mt not in _CLIP_TYPES + _SIGLIP_TYPES:
            raise ConfigError(f"unsupported vision encoder type {mt!r} (supported: CLIP, SigLIP)")
        self.has_cls = mt in _CLIP_TYPES
        n_layers = model.config.num_hidden_layers
        fl = self.options.feature_layer
        if not (-(n_layers + 1) <= fl <= n_layers):
            raise ConfigError(f"vision feature_layer {fl} out of range for a {n_layers}-layer encoder")
        m = self.options.merge
        if m > 1 and self.cls_position is not None:
            raise ConfigError(f"patch_merge {m} needs cls_token 'drop' (a CLS token has no neighbours to merge with)")
        if self.num_patches_per_side % m:
            raise ConfigError(f"patch_merge {m} does not divide the {self.num_patches_per_side}x"
                              f"{self.num_patches_per_side} patch grid")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, options: EncoderOptions | None = None) -> "VisionEncoder":
        """A randomly initialised tower from a transformers vision config (or a dict with model_type)."""
        if isinstance(config, dict):
            config = vision_config_from_dict(config)
        config = _vision_sub_config(config)
        model = vision_model_class(config.model_type)(config)
        return cls(model, options)

    @classmethod
    def from_pretrained(cls, name_or_path: str, options: EncoderOptions | None = None,
                        dtype: torch.dtype | None = None, local_files_only: bool | None = None) -> "VisionEncoder":
        """Load a CLIP/SigLIP tower by hub id or local folder (a full CLIP/SigLIP checkpoint is fine:
        only its vision part is loaded)."""
        from transformers import AutoConfig

        if local_files_only is None:
            local_files_only = os.path.isdir(str(name_or_path))
        if not is_utf8_path(name_or_path):  # transformers reads the weights with safetensors, by a UTF-8 name
            raise CheckpointError(f"{name_or_path}: the vision tower's path is not valid UTF-8, which transformers "
                                  "cannot read its weights from; rename the folder")
        try:
            cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{name_or_path}: cannot load a vision encoder config ({_one_line(e)})") from e
        vcfg = _vision_sub_config(cfg)
        klass = vision_model_class(vcfg.model_type)
        kw = {"dtype": dtype} if dtype is not None else {}
        from safetensors import SafetensorError

        try:
            model = klass.from_pretrained(name_or_path, local_files_only=local_files_only, **kw)
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{name_or_path}: cannot load vision encoder weights ({_one_line(e)})") from e
        return cls(model, options)

    # ---- properties -----------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def out_dim(self) -> int:
        """Width of the features :meth:`forward` returns (hidden_size x merge^2)."""
        return self.hidden_size * self.options.merge ** 2

    @property
    def num_patches(self) -> int:
        """Patch tokens per image after the optional merge."""
        return (self.num_patches_per_side // self.options.merge) ** 2

    @property
    def num_patches_per_side(self) -> int:
        c = self.model.config
        return c.image_size // c.patch_size

    @property
    def cls_position(self) -> str | None:
        """Where CLS sits in the output: "end", "start", or None (dropped / no CLS)."""
        if not self.has_cls or self.options.cls == "drop":
            return None
        return self.options.cls

    @property
    def num_image_tokens(self) -> int:
        """Tokens per image fed to the language model (patches + CLS if kept)."""
        return self.num_patches + (1 if self.cls_position is not None else 0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N,3,H,W] (normalised by the tower's image processor) -> [N, num_image_tokens, out_dim]."""
        fl = self.options.feature_layer
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self.model(pixel_values=pixel_values, output_hidden_states=(fl != -1))
        feats = out.last_hidden_state if fl == -1 else out.hidden_states[fl]
        cls_tok = None
        if self.has_cls:
            cls_tok, feats = feats[:, :1], feats[:, 1:]
        m = self.options.merge
        if m > 1:  # raster [N, g*g, D] -> [N, (g/m)^2, m*m*D]: each m x m window, row by row, as one token
            N, _, D = feats.shape
            g = self.num_patches_per_side
            feats = (feats.reshape(N, g // m, m, g // m, m, D).permute(0, 1, 3, 2, 4, 5)
                     .reshape(N, (g // m) ** 2, m * m * D))
        pos = self.cls_position
        if pos == "end":
            feats = torch.cat([feats, cls_tok], dim=1)
        elif pos == "start":
            feats = torch.cat([cls_tok, feats], dim=1)
        return feats


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]
