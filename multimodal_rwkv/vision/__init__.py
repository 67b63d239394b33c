"""VisualRWKV: CLIP/SigLIP vision tower + projector + RWKV core (LLaVA-style), trained on LLaVA data.

Public names (imported lazily so ``import multimodal_rwkv.vision`` stays light):

- :class:`VisualRWKV`, :class:`VisualRWKVConfig` (``modeling``)
- :class:`VisualRWKVProcessor`, :func:`load_image` (``processor``)
- :class:`LlavaDataset` (``data``), :func:`draw_scene` / :func:`generate_dataset` (``synthetic``)
- :func:`vqa_soft_accuracy`, :func:`normalize_answer` (``evaluate``)
- ``SYNTHETIC_MODEL_DIR``: the small VisualRWKV shipped with the package (the demo's), e.g.
  ``VisualRWKV.from_pretrained(SYNTHETIC_MODEL_DIR)``
"""
from pathlib import Path as _Path

SYNTHETIC_MODEL_DIR = _Path(__file__).resolve().parent.parent / "assets" / "visualrwkv_synthetic"

_LAZY = {
    "VisualRWKV": "multimodal_rwkv.vision.modeling",
    "VisualRWKVConfig": "multimodal_rwkv.vision.modeling",
    "VisionEncoder": "multimodal_rwkv.vision.encoder",
    "VisualRWKVProcessor": "multimodal_rwkv.vision.processor",
    "load_image": "multimodal_rwkv.vision.processor",
    "LlavaDataset": "multimodal_rwkv.vision.data",
    "draw_scene": "multimodal_rwkv.vision.synthetic",
    "generate_dataset": "multimodal_rwkv.vision.synthetic",
    "vqa_soft_accuracy": "multimodal_rwkv.vision.evaluate",
    "normalize_answer": "multimodal_rwkv.vision.evaluate",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multimodal_rwkv.vision' has no attribute {name!r}")


__all__ = sorted([*_LAZY, "SYNTHETIC_MODEL_DIR"])
