"""The RWKV core: config, model (x060 Finch / x052 Eagle), state, checkpoints, tokenizer, generation."""
from multimodal_rwkv.model.config import RWKVConfig  # noqa: F401
from multimodal_rwkv.model.state import RWKVState  # noqa: F401
