"""The recurrent state of an RWKV model: what a transformer's KV cache is, but of fixed size."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from multimodal_rwkv.errors import CheckpointError


@dataclass
class RWKVState:
    """Recurrent state after the last token seen, per layer ``l``:

    - ``att_shift[l]``: ``[B, C]``, the previous token's ln1 output (time-mix token shift);
    - ``wkv[l]``: ``[B, H, K, V]`` float32, key-major (``S[key j, value i]``), the WKV matrix state;
    - ``ffn_shift[l]``: ``[B, C]``, the previous token's ln2 output (channel-mix token shift).

    Its size does not depend on the context length: ``L * (2*C + H*K*V)`` numbers per stream.
    Methods return new state objects; a forward pass never modifies the state it is given. As
    with torch tensors, ``state[i]`` and ``state[a:b]`` share memory with ``state`` (views) while
    an index list, tensor or mask copies: ``.clone()`` before editing tensors in place.
    """

    att_shift: list[torch.Tensor]
    wkv: list[torch.Tensor]
    ffn_shift: list[torch.Tensor]

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def zeros(cls, config, batch_size: int, device=None, dtype=torch.float32) -> "RWKVState":
        """All-zero state for ``batch_size`` streams; shift states in ``dtype``, wkv in fp32."""
        batch_size = _count("batch_size", batch_size)
        C, H, N = config.n_embd, config.n_head, config.head_size
        L = config.n_layer
        return cls(
            att_shift=[torch.zeros(batch_size, C, device=device, dtype=dtype) for _ in range(L)],
            wkv=[torch.zeros(batch_size, H, N, N, device=device, dtype=torch.float32) for _ in range(L)],
            ffn_shift=[torch.zeros(batch_size, C, device=device, dtype=dtype) for _ in range(L)],
        )

    # ---- shape --------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return len(self.wkv)

    @property
    def batch_size(self) -> int:
        return self.wkv[0].shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def nbytes_per_stream(self) -> int:
        """Bytes of state one stream carries (independent of context length)."""
        total = sum(t[0].numel() * t.element_size() for t in self._tensors())
        return total

    def _tensors(self):
        return [*self.att_shift, *self.wkv, *self.ffn_shift]

    def _map(self, fn) -> "RWKVState":
        return RWKVState([fn(t) for t in self.att_shift], [fn(t) for t in self.wkv], [fn(t) for t in self.ffn_shift])

    # ---- operations ---------------------------------------------------------------------
    def clone(self) -> "RWKVState":
        return self._map(lambda t: t.clone())

    def detach(self) -> "RWKVState":
        """Cut the autograd graph (truncated BPTT)."""
        return self._map(lambda t: t.detach())

    def to(self, device=None, dtype=None) -> "RWKVState":
        """Move to ``device``; ``dtype`` applies to the shift states only (wkv stays fp32). As for
        tensors, a dtype alone may come first: ``state.to(torch.bfloat16)``."""
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError("to(): a dtype given twice")
            device, dtype = None, device
        return RWKVState(
            [t.to(device=device, dtype=dtype) for t in self.att_shift],
            [t.to(device=device) for t in self.wkv],
            [t.to(device=device, dtype=dtype) for t in self.ffn_shift],
        )

    def __getitem__(self, idx) -> "RWKVState":
        """Rows of the batch: ``state[i]`` keeps a batch dimension of 1 (``i`` an int, a numpy integer
        or a 0-d integer tensor, e.g. ``scores.argmax()``); a slice, a list or 1-D array/tensor of
        integers (of any integer dtype, uint8 included) or of bools (a mask) selects several rows."""
        return self._map(lambda t: t[_batch_index(idx, self.batch_size)])

    def expand(self, n: int) -> "RWKVState":
        """Repeat a batch-1 state ``n`` times (prefix reuse: one prefill, many continuations)."""
        if self.batch_size != 1:
            raise ValueError(f"expand needs a batch-1 state, got batch {self.batch_size}")
        n = _count("n", n)
        return self._map(lambda t: t.expand(n, *t.shape[1:]).clone())

    @staticmethod
    def cat(states: list["RWKVState"]) -> "RWKVState":
        """Concatenate states along the batch dimension."""
        if not states:
            raise ValueError("cat needs at least one state")
        L = states[0].n_layer
        for i, st in enumerate(states):
            if st.n_layer != L:
                raise ValueError(f"cat: state {i} has {st.n_layer} layers, state 0 has {L}")
            for name in ("att_shift", "wkv", "ffn_shift"):
                a, b = getattr(states[0], name)[0], getattr(st, name)[0]
                if a.shape[1:] != b.shape[1:]:
                    raise ValueError(f"cat: state {i}'s {name} rows are {tuple(b.shape[1:])}, state 0's "
                                     f"{tuple(a.shape[1:])} (states of different models?)")
        return RWKVState(
            [torch.cat([s.att_shift[i] for s in states]) for i in range(L)],
            [torch.cat([s.wkv[i] for s in states]) for i in range(L)],
            [torch.cat([s.ffn_shift[i] for s in states]) for i in range(L)],
        )

    def equal(self, other: "RWKVState") -> bool:
        """The same layers, shapes and values (dtypes may differ, as ``torch.equal``)."""
        a, b = self._tensors(), other._tensors()
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    def __eq__(self, other) -> bool:  # (the dataclass's would compare lists of tensors: an error)
        return self.equal(other) if isinstance(other, RWKVState) else NotImplemented

    __hash__ = None  # mutable, like a list

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(self.n_layer):
            out[f"{i}.att_shift"] = self.att_shift[i]
            out[f"{i}.wkv"] = self.wkv[i]
            out[f"{i}.ffn_shift"] = self.ffn_shift[i]
        return out

    def save(self, path: str | Path) -> None:
        """Write the state as safetensors (``{l}.att_shift``, ``{l}.wkv``, ``{l}.ffn_shift``), atomically
        and with the usual mode of a new file (safetensors alone makes it 0600)."""
        from multimodal_rwkv.fileio import save_safetensors

        save_safetensors(path, {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()})

    @classmethod
    def load(cls, path: str | Path, device=None) -> "RWKVState":
        from multimodal_rwkv.model.checkpoint import load_safetensors

        try:
            d = load_safetensors(path, device=str(device or "cpu"))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{path}: not a saved RWKV state ({e})") from None
        if not d or not all(re.fullmatch(r"\d+\.(att_shift|wkv|ffn_shift)", k) for k in d):
            raise CheckpointError(f"{path}: not a saved RWKV state (keys must be <layer>.att_shift/.wkv/.ffn_shift)")
        n = 1 + max(int(k.split(".")[0]) for k in d)
        try:
            st = cls(
                [d[f"{i}.att_shift"] for i in range(n)],
                [d[f"{i}.wkv"] for i in range(n)],
                [d[f"{i}.ffn_shift"] for i in range(n)],
            )
        except KeyError as e:
            raise CheckpointError(f"{path}: state file is missing {e.args[0]}") from None
        for k, v in d.items():  # what a forward would only trip over later, without naming the file
            if not v.is_floating_point():
                raise CheckpointError(f"{path}: {k} holds {str(v.dtype).replace('torch.', '')} values; a state is "
                                      "floating point")
            want = 4 if k.endswith(".wkv") else 2
            if v.dim() != want or v.shape[0] != st.batch_size:
                raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}; every tensor of a state is "
                                      f"[B, ...] with one batch size (0.wkv: {st.batch_size}), wkv 4-D, shifts 2-D")
            if not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{path}: {k} holds NaN or infinite values")
        return st


def _batch_index(idx, batch_size: int):
    """``idx`` as an index of the batch dimension alone: a slice, or a 1-D int64/bool tensor."""
    if isinstance(idx, slice):
        return idx
    bad = TypeError(f"a state is indexed by batch rows only (an integer, a slice, or a 1-D list/array of "
                    f"integers or bools), got {idx!r}")
    if isinstance(idx, (list, range)):
        items = list(idx)
        if items and all(_is_bool(x) for x in items):
            return torch.tensor([bool(x) for x in items])
        try:
            idx = torch.tensor([_as_int(x) for x in items], dtype=torch.long)
        except TypeError:
            raise bad from None
    elif getattr(idx, "ndim", None) is not None and not isinstance(idx, torch.Tensor):  # numpy
        if idx.ndim == 0:  # a numpy scalar (np.uint64 included) or 0-d array: an integer, or refused
            if idx.dtype.kind not in "iu":  # bool, float, ...
                raise bad
            idx = idx.item()
        else:
            import numpy as np

            idx = torch.as_tensor(np.ascontiguousarray(idx))  # a reversed view has negative strides
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 0:
            if idx.dtype == torch.bool or idx.dtype.is_floating_point or idx.dtype.is_complex:
                raise bad
            idx = int(idx)
        elif idx.dim() > 1:
            raise bad
        elif idx.dtype == torch.bool:
            return idx
        elif idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise bad
        else:
            return idx.long()  # uint8 included: integers, not torch's old byte mask
    if _is_bool(idx):
        raise bad
    try:
        i = operator.index(idx)
    except TypeError:
        raise bad from None
    if not -batch_size <= i < batch_size:
        raise IndexError(f"state row {i} out of range for batch {batch_size}")
    return slice(i, i + 1) if i != -1 else slice(-1, None)


def _is_bool(x) -> bool:
    """A Python, numpy (``bool_``, named ``bool`` in numpy 2) or 0-d tensor boolean."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool_", "bool")) or (
        isinstance(x, torch.Tensor) and x.dim() == 0 and x.dtype == torch.bool)


def _count(name: str, n) -> int:
    """``n`` as an int >= 0 (a bool, a float or a negative number is a ValueError naming ``name``)."""
    from multimodal_rwkv.argtypes import integer_number

    k = integer_number(n)
    if k is None or k < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n!r}")
    return k


def _as_int(x) -> int:
    if _is_bool(x):
        raise TypeError(x)
    return operator.index(x)
