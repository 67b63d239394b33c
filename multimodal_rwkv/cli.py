"""`mmrwkv` command line. The only place that configures logging.

Each domain module contributes its subcommands through a ``register(subparsers)`` function
that adds parsers with ``set_defaults(func=handler)``; handlers take the parsed ``args`` and
return an exit code (or None for 0). Heavy imports happen inside handlers, so ``--help`` is fast.

Exit codes: 0 success, 2 bad input or usage (one line on stderr naming the file/record and
the reason), 1 internal error.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from multimodal_rwkv.errors import MMRWKVError, on_one_line

# Modules that register subcommands, in help order.
_COMMAND_MODULES = (
    "multimodal_rwkv.model.commands",
    "multimodal_rwkv.training.commands",
    "multimodal_rwkv.vision.commands",
    "multimodal_rwkv.music.commands",
    "multimodal_rwkv.demo",
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # a value such as -1e3 or -inf is a negative number, not an option (argparse's own pattern
        # knows only -1 and -1.5, and refused "--presence-penalty -1e3" as a missing argument)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):  # one line, exit 2 (argparse's own convention too)
        self.exit(2, f"{self.prog}: error: {on_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmrwkv",
        description="multimodal_rwkv: RWKV-6/RWKV-5 language models with vision (VisualRWKV) and music (MIDI/ABC).",
        epilog="Example: mmrwkv demo    |    mmrwkv generate --model RWKV-x060-World-1B6.pth --prompt 'Hello'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging of multimodal_rwkv (other libraries stay at INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a part not built yet must not break the others
            if e.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def _one_line(e: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker reaches the main process
    re-wrapped by torch ("Caught DataError in DataLoader worker process 0." + the worker's whole
    traceback): its last line holds the original message."""
    msg = str(e)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = [ln for ln in msg.splitlines() if ln.strip()][-1].strip()
        head, sep, rest = last.partition(": ")
        msg = rest if sep and head.split(".")[-1] == type(e).__name__ else last
    return msg


# commands whose product is what they print: a reader that stops reading ends them (exit 0);
# the others make files, and go on with their output discarded
_PRINTING_COMMANDS = {"generate", "info", "env", "vqa"}


class _Stream:
    """sys.stdout / sys.stderr while a command runs. A reader that went away (``| head``) is not
    an error: later writes go nowhere, so a command that makes files still makes them, while one
    whose product is its printout (``stop_when_gone``) stops there. Any other failure to write (a
    full disk) is an OSError naming the stream. Characters the stream's encoding lacks (a latin-1
    or ASCII terminal) are written as "?" (they ended the command with a UnicodeEncodeError)."""

    def __init__(self, stream, label: str, stop_when_gone: bool):
        self._stream, self._label, self._stop = stream, label, stop_when_gone
        self.gone = False

    def _call(self, method, *a):
        if self.gone:
            return len(a[0]) if a else None
        try:
            return getattr(self._stream, method)(*a)
        except BrokenPipeError:
            self.gone = True
            _silence(self._stream)
            if self._stop:
                raise
            return len(a[0]) if a else None
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), self._label) from None

    def write(self, text):
        try:
            return self._call("write", text)
        except UnicodeEncodeError:  # a stream in an encoding without the text's characters (latin-1, ascii)
            enc = getattr(self._stream, "encoding", None) or "utf-8"
            return self._call("write", text.encode(enc, "replace").decode(enc, "replace"))

    def flush(self):
        return self._call("flush")

    def __getattr__(self, name):  # isatty, fileno, encoding, buffer ...
        return getattr(self._stream, name)


def _silence(stream) -> None:
    """Point ``stream``'s file descriptor at /dev/null, so that the interpreter's final flush of a
    closed pipe does not print a second error at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it cleans up as after Ctrl-C (temporary
    files removed, an earlier output left as it was) and exits 143."""


def _on_sigterm(signum, frame):
    raise _Terminated


def _interrupted(e: KeyboardInterrupt) -> int:
    term = isinstance(e, _Terminated)
    print("terminated" if term else "interrupted", file=sys.stderr)
    return 143 if term else 130


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)  # (training installs its own while it steps)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # (one that came between the handlers below)
        return _interrupted(e)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main(argv) -> int:
    try:  # argparse runs the options' type checks (some import torch): Ctrl-C may come that early
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt as e:
        return _interrupted(e)
    printing = getattr(args, "command", None) in _PRINTING_COMMANDS
    if sys.stdout is None or sys.stderr is None:  # started with >&- or 2>&-
        if sys.stdout is None and printing:
            if sys.stderr is not None:
                print(f"mmrwkv {args.command}: error: standard output is closed (it prints its result there)",
                      file=sys.stderr)
            return 2
        import os

        for name in ("stdout", "stderr"):
            if getattr(sys, name) is None:
                setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - for the whole process
    saved = sys.stdout, sys.stderr
    sys.stdout = _Stream(saved[0], "standard output", stop_when_gone=printing)
    sys.stderr = _Stream(saved[1], "standard error", stop_when_gone=False)
    try:
        return _run(parser, args)
    finally:
        sys.stdout, sys.stderr = saved


def _run(parser, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # -v: debug lines of this package only; third-party libraries (filelock, ...) stay at INFO
    logging.getLogger("multimodal_rwkv").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = " ".join(x for x in (args.command, getattr(args, "music_command", None)) if x)  # e.g. "music roll"
    try:
        rc = args.func(args)
    except MMRWKVError as e:
        print(f"mmrwkv {name}: error: {on_one_line(_one_line(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped reading (mmrwkv info ... | head -1): not an error
        return 0
    except OSError as e:  # a path the command could not read or write (permissions, a full disk, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"mmrwkv {name}: error: {on_one_line(f'{where}{e.strerror or e}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        return _interrupted(e)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as e:
        print(f"mmrwkv {name}: error: {on_one_line(f'{e.filename}: {e.strerror or e}')}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
