"""argparse ``type=`` checkers for the CLI's numeric options, and the readers of the API's numeric
arguments (:func:`integer_number`, :func:`real_number`: numpy and tensor scalars count too).

A bad value becomes argparse's one-line usage error and exit code 2, e.g.
``mmrwkv generate: error: argument --top-p: must be in (0, 1], got 2``."""
from __future__ import annotations

import argparse
import math
import operator
import os


def _is_bool(value) -> bool:
    """A bool, numpy bool or bool tensor: a yes/no, never a number here."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def integer_number(value) -> int | None:
    """``value`` as a Python int if it is an integer (int, numpy or one-element integer tensor
    scalar; not a bool, a float or a string), else None."""
    if _is_bool(value):
        return None
    try:
        return operator.index(value)
    except (TypeError, RuntimeError):  # RuntimeError: a tensor of several elements
        return None


def real_number(value) -> float | None:
    """``value`` as a Python float if it is a real number (int, float, numpy or one-element tensor
    scalar; not a bool or a string), else None."""
    if isinstance(value, (str, bytes)) or _is_bool(value):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        return None


def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def int_min(lo: int):
    """An integer >= ``lo``."""
    def check(text: str) -> int:
        v = _number(int, text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text}")
        return v
    check.__name__ = f"integer >= {lo}"
    return check


def float_min(lo: float, strict: bool = False):
    """A finite number >= ``lo`` (> ``lo`` if ``strict``)."""
    def check(text: str) -> float:
        v = _number(float, text)
        if v < lo or (strict and v == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo:g}, got {text}")
        return v
    check.__name__ = f"number {'>' if strict else '>='} {lo:g}"
    return check


def finite(text: str) -> float:
    """Any finite number."""
    return _number(float, text)


def probability(text: str) -> float:
    """A nucleus (top-p) mass in (0, 1]."""
    v = _number(float, text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def add_sampling_args(p, *, top_p: float, temperature_help: str = "0 = greedy", only: str = "") -> None:
    """--temperature (>= 0), --top-k (>= 0, 0 = off), --top-p (in (0, 1]); ``only``: when they
    apply (e.g. "with --do-sample"), said in each one's help."""
    when = f"{only}; " if only else ""
    p.add_argument("--temperature", type=float_min(0), default=1.0, help=f"{only or temperature_help} (default 1)")
    p.add_argument("--top-k", type=int_min(0), default=0, help=f"{when}0 = off")
    p.add_argument("--top-p", type=probability, default=top_p, help=f"{when}nucleus mass in (0, 1] (default {top_p:g})")


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ..."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available on this machine")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA GPU(s)")
    elif d.type != "cpu":
        backend = getattr(torch, d.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise argparse.ArgumentTypeError(f"{text}: no {d.type} device is available on this machine")
    return text


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """The backslash escapes a shell cannot type easily: ``\\n``, ``\\t``, ``\\r`` and ``\\\\``;
    any other backslash stays as it is, and non-ASCII text is untouched."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def path_arg(text: str) -> str:
    """A file or folder path: not empty (an empty one would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def file_arg(text: str) -> str:
    """A path to a file (to write): not empty, and not a folder's name (``sub/``, ``.``, ``sub/..``,
    a blank name: a writer adding its suffix made a hidden ``sub/.npy`` or ``..npy``)."""
    text = path_arg(text)
    name = os.path.basename(text)
    if text.endswith(("/", os.sep)) or name in (".", "..") or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} names a folder; give a file name")
    return text


def seed(text: str) -> int:
    """A random seed torch accepts: an integer in [0, 2**63)."""
    v = _number(int, text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return v


def int_range(lo: int, hi: int):
    """An integer in [lo, hi]."""
    def check(text: str) -> int:
        v = _number(int, text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text}")
        return v
    check.__name__ = f"integer in [{lo}, {hi}]"
    return check
