"""Projector from vision features to the language model's embedding width.

- ``linear``: one ``Linear(D_vision -> C, bias=False)``, VisualRWKV v6.0 (the RWKV's ``blocks.0.ln0``
  then normalises the projected features together with the text embeddings).
- ``mlp2x_gelu``: ``Linear(D,C) -> GELU -> Linear(C,C)`` with biases, LLaVA-1.5.

Parameter names (``proj.weight`` for linear; ``proj.0.*``/``proj.2.*`` for the MLP, LLaVA's
``mm_projector`` layout) let released checkpoints load without renaming.
"""
from __future__ import annotations

from torch import nn

from multimodal_rwkv.errors import ConfigError

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Projector module mapping [..., in_dim] -> [..., out_dim]."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ConfigError(f"unknown projector {kind!r} (choose from {PROJECTOR_TYPES})")
