"""Model configuration shared by RWKV-6 "Finch" (x060) and RWKV-5 "Eagle" (x052)."""
from __future__ import annotations

from transformers import PretrainedConfig

from multimodal_rwkv.errors import ConfigError

VERSIONS = ("x060", "x052")
# other codebases' names for RWKVConfig's sizes (transformers' Rwkv6Config, RWKV-LM's args)
_ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "n_layers": "n_layer",
            "num_layers": "n_layer", "attention_hidden_size": "dim_att", "intermediate_size": "dim_ffn",
            "n_head": "dim_att (n_head = dim_att // head_size)",
            "num_attention_heads": "dim_att (n_head = dim_att // head_size)", "layer_norm_epsilon": "layer_norm_eps"}


def _check_extra_keys(extra: dict) -> None:
    """Keys beyond RWKVConfig's own go to transformers' PretrainedConfig, which keeps any key (its
    generic settings, and other tools' additions in a config.json). A key that is another
    codebase's name for one of ours, or a near-miss of one of ours (a typo), is an error instead
    of a size silently left at its default."""
    import difflib
    import inspect

    own = [p for p in inspect.signature(RWKVConfig.__init__).parameters if p not in ("self", "kwargs")]
    for key in extra:
        if key in _ALIASES:
            raise ConfigError(f"RWKVConfig has no key {key!r}: use {_ALIASES[key]}")
        close = difflib.get_close_matches(key, own, n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"RWKVConfig has no key {key!r} (did you mean {close[0]!r}?)")


def _int(name: str, v) -> int:
    """An integer (an integral float such as 2.0 too); anything else is a ConfigError naming it."""
    if isinstance(v, bool) or not (isinstance(v, int) or isinstance(v, float) and v.is_integer()):
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            return int(v)
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    return int(v)


def _float(name: str, v) -> float:
    try:
        if isinstance(v, bool):
            raise ValueError
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {v!r}") from None


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


class RWKVConfig(PretrainedConfig):
    """Sizes of an RWKV-6/RWKV-5 model.

    Args:
        vocab_size: V (65536 for the World vocabulary).
        n_layer: number of blocks L.
        n_embd: model width C.
        head_size: N, channels per head (64 in every released model).
        dim_att: attention width (None or 0, as in RWKV-LM: n_embd); n_head = dim_att // head_size.
        dim_ffn: channel-mix width (None or 0: int(3.5 * n_embd) // 32 * 32, as RWKV-LM).
        version: "x060" (Finch: data-dependent decay and ddlerp) or "x052" (Eagle: static).
        d_mix_lora / d_decay_lora: x060 LoRA ranks (None or 0: 32/64, 64/128 from C=4096 on);
            checkpoints loaded from disk always take them from the tensor shapes.
        head_size_divisor: 8; sets the GroupNorm eps of x060 (1e-5 * 8**2 = 64e-5) and the
            y/8 scaling of x052.
        has_initial_state: the model carries a trainable initial wkv state per layer
            (state tuning; official key ``blocks.L.att.time_state``).
        tie_word_embeddings: must stay False (RWKV's head is a matrix of its own).

    Other keys are kept as transformers' ``PretrainedConfig`` keeps them, except other codebases'
    names for these sizes (``hidden_size``, ``num_hidden_layers``, ...) and near-misses of these
    names (``n_layers``): a ConfigError, not a size silently left at its default.
    """

    model_type = "mmrwkv"
    keys_to_ignore_at_inference = ["state"]

    def __init__(
        self,
        vocab_size: int = 65536,
        n_layer: int = 12,
        n_embd: int = 768,
        head_size: int = 64,
        dim_att: int | None = None,
        dim_ffn: int | None = None,
        version: str = "x060",
        d_mix_lora: int | None = None,
        d_decay_lora: int | None = None,
        head_size_divisor: int = 8,
        layer_norm_eps: float = 1e-5,
        has_initial_state: bool = False,
        wkv_backend: str = "auto",
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = _int("vocab_size", vocab_size)
        self.n_layer = _int("n_layer", n_layer)
        self.n_embd = _int("n_embd", n_embd)
        self.head_size = _int("head_size", head_size)
        self.dim_att = _int("dim_att", dim_att) if dim_att else self.n_embd
        self.dim_ffn = _int("dim_ffn", dim_ffn) if dim_ffn else int(self.n_embd * 3.5) // 32 * 32
        self.version = version
        big = self.n_embd >= 4096
        self.d_mix_lora = _int("d_mix_lora", d_mix_lora) if d_mix_lora else (64 if big else 32)
        self.d_decay_lora = _int("d_decay_lora", d_decay_lora) if d_decay_lora else (128 if big else 64)
        self.head_size_divisor = _int("head_size_divisor", head_size_divisor)
        self.layer_norm_eps = _float("layer_norm_eps", layer_norm_eps)
        self.has_initial_state = _bool("has_initial_state", has_initial_state)
        self.wkv_backend = wkv_backend
        if _bool("tie_word_embeddings", tie_word_embeddings):
            raise ConfigError("tie_word_embeddings=True is not supported: RWKV's head is untied "
                              "(head.weight is a matrix of its own in every RWKV-5/6 checkpoint)")
        _check_extra_keys(kwargs)
        self.validate_sizes()  # before transformers' own checks, which warn about ids beyond a vocab of 0
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def validate_sizes(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(f"version {self.version!r} is not supported (expected one of {VERSIONS})")
        for name in ("vocab_size", "n_layer", "n_embd", "head_size", "dim_att", "dim_ffn", "head_size_divisor",
                     "d_mix_lora", "d_decay_lora"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.layer_norm_eps < float("inf"):
            raise ConfigError(f"layer_norm_eps must be a positive number, got {self.layer_norm_eps}")
        if self.dim_att % self.head_size:
            raise ConfigError(f"dim_att {self.dim_att} is not a multiple of head_size {self.head_size}")
        if self.wkv_backend not in ("auto", "reference", "torch", "cpu", "triton"):
            raise ConfigError(f"wkv_backend {self.wkv_backend!r} is not one of auto/reference/torch/cpu/triton")

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size

    @property
    def hidden_size(self) -> int:  # transformers' name, used by generic tooling
        return self.n_embd

    @hidden_size.setter
    def hidden_size(self, value) -> None:  # transformers' from_pretrained(..., hidden_size=...) sets it
        raise ConfigError(f"RWKVConfig has no key 'hidden_size': use n_embd (got {value!r})")

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @num_hidden_layers.setter
    def num_hidden_layers(self, value) -> None:
        raise ConfigError(f"RWKVConfig has no key 'num_hidden_layers': use n_layer (got {value!r})")

    def num_parameters_estimate(self) -> int:
        """Parameter count from the sizes alone (paper eq. 27 for x060 with dim_att == n_embd; a
        trained initial state adds its ``H x N x N`` per layer)."""
        C, A, F, L, V = self.n_embd, self.dim_att, self.dim_ffn, self.n_layer, self.vocab_size
        if self.version == "x060":
            att = 4 * C * A + A * C + 6 * C + C * 5 * self.d_mix_lora + 5 * self.d_mix_lora * C
            att += A + C * self.d_decay_lora + self.d_decay_lora * A + A + 2 * A
        else:
            att = 4 * C * A + A * C + 4 * C + 2 * A + 2 * A
        ffn = 2 * C + F * C + C * C + C * F
        if self.has_initial_state:  # time_state [H, N, N] per layer
            att += A * self.head_size
        return L * (att + ffn + 4 * C) + 2 * C + 2 * C + 2 * C * V


def _register_auto_config() -> None:
    """``AutoConfig`` knows model_type "mmrwkv" once RWKVConfig is imported (``AutoModelForCausalLM``
    once ``RWKVForCausalLM`` is: see modeling.py). Not at ``import multimodal_rwkv``, which stays light."""
    from transformers import AutoConfig

    AutoConfig.register(RWKVConfig.model_type, RWKVConfig, exist_ok=True)


_register_auto_config()
