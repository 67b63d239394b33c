"""The RWKV core: config, model (x060 Finch / x052 Eagle), state, checkpoints, tokenizer, generation.

Import from the submodules (``multimodal_rwkv.model.modeling`` ...) or from ``multimodal_rwkv``;
this file imports nothing so the tokenizer can be used without loading torch/transformers.
"""
