"""multimodal_rwkv: vision and music on one RWKV-6 (Finch) / RWKV-5 (Eagle) language-model core.

Public API (imported lazily so ``import multimodal_rwkv`` stays fast):

- :class:`RWKVConfig`, :class:`RWKVForCausalLM`, :class:`RWKVState`
- :class:`WorldTokenizer`
- errors: :class:`CheckpointError`, :class:`ConfigError`, :class:`DataError`, :class:`MidiError`
- subpackages: ``multimodal_rwkv.kernels``, ``.vision``, ``.music``, ``.training``
"""
from multimodal_rwkv.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    DataError,
    KernelError,
    MidiError,
    MMRWKVError,
    NumericsError,
)

__version__ = "0.1.0"

_LAZY = {
    "RWKVConfig": "multimodal_rwkv.model.config",
    "RWKVForCausalLM": "multimodal_rwkv.model.modeling",
    "RWKVModel": "multimodal_rwkv.model.modeling",
    "RWKVState": "multimodal_rwkv.model.state",
    "WorldTokenizer": "multimodal_rwkv.model.tokenizer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'multimodal_rwkv' has no attribute {name!r}")


__all__ = sorted(_LAZY) + [
    "CheckpointError", "ConfigError", "DataError", "KernelError", "MidiError", "MMRWKVError", "NumericsError",
]
