"""One exception type per domain. Each message names the file or record and what is wrong.

The CLI turns any :class:`MMRWKVError` into one line on stderr and exit code 2.
"""


class MMRWKVError(Exception):
    """Base class for expected, user-facing errors (bad input, bad usage)."""


class CheckpointError(MMRWKVError):
    """A model file or folder cannot be loaded: names the file and the problem."""


class ConfigError(MMRWKVError):
    """A config or recipe is invalid (unknown key, wrong type, bad value)."""


class DataError(MMRWKVError):
    """A data file or record is unreadable or malformed: names the file/record."""


class MidiError(DataError):
    """A MIDI file cannot be tokenized: names the file and the reason."""


class KernelError(MMRWKVError):
    """A kernel backend was asked for explicitly but cannot run on these inputs."""


class NumericsError(MMRWKVError, ValueError):
    """A computation gave non-finite values where it needs finite ones (a model whose activations
    overflow its dtype, e.g. fp16): says where and what to do instead."""


def on_one_line(text: str) -> str:
    """``text`` on one line: a line break (in a path, say) is shown as ``\\n``, as Python writes it
    (errors and skip reports are one line each)."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")
