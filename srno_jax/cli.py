"""What the command-line tools share: argument types and how a stop ends them.

Ctrl-C and SIGTERM (a scheduler's or `timeout`'s stop) end a tool the same way: the work
done is kept, the file being written is removed, and the exit status says which it was.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


_stops: list[int] = []  # the signals received within `stops_as_interrupts`


def _as_exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def stops_as_interrupts():
    """Within the block, SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt`.

    Each signal is also recorded, and `raise_if_stopped` raises it again: an exception
    raised while Python runs a garbage-collection callback (JAX has one) is printed as
    "ignored" and dropped, which would let a stopped tool run on to its end.
    """

    def handler(signum, frame):
        _stops.append(signum)
        raise _as_exception(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        _stops.clear()


def raise_if_stopped() -> None:
    """Raises the first stop received in `stops_as_interrupts`, if any: call it between
    units of work (before reading or writing each image)."""
    if _stops:
        raise _as_exception(_stops[0])


class _Warnings(logging.Handler):
    """The package's warnings as the running tool's own lines, on the stderr of the
    moment."""

    prog = "srno-jax"

    def emit(self, record):
        print_safely(f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}", sys.stderr)


_WARNINGS = _Warnings(logging.WARNING)


@contextlib.contextmanager
def logged_as(prog: str):
    """Within the block, what the package and the libraries under it (Orbax) log at
    WARNING and above goes to stderr as the tool's own lines, ``prog: warning: ...``:
    the root logger's one handler, in place of the one Orbax's import sets up (absl's
    ``logging.basicConfig``). The handlers before are put back after it, unclosed (a
    notebook that runs a tool's main() keeps its own)."""
    _WARNINGS.prog = prog
    saved = logging.root.handlers[:]
    logging.root.handlers[:] = [_WARNINGS]
    try:
        yield
    finally:
        logging.root.handlers[:] = saved


def interrupted_status(e: KeyboardInterrupt) -> int:
    """The shell's status for a stop: 128 + the signal's number (SIGTERM 15, SIGINT 2)."""
    return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


def positive_int(text: str) -> int:
    """argparse type of the tools' counts and limits: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def print_safely(text: str, file=None, write=None) -> bool:
    """Prints `text` so that a reader who left cannot fail the work: characters the
    stream cannot encode (a file name that is not UTF-8) are replaced, and a stream whose
    reader is gone (``| head -1``) or that is closed is pointed at devnull, as Python's
    note on SIGPIPE advises, so that the flush at exit does not fail either. Other write
    errors (a full disk behind ``> out.txt``) are raised as `OSError`. `write(text,
    file=...)` prints (tqdm's `bar.write` keeps a progress bar whole). Returns False when
    the stream is gone."""
    file = sys.stdout if file is None else file
    if file is None:
        return False
    encoding = getattr(file, "encoding", None) or "utf-8"
    try:
        text.encode(encoding, getattr(file, "errors", None) or "strict")
    except UnicodeEncodeError:
        text = text.encode(encoding, "replace").decode(encoding)
    try:
        (write or print)(text, file=file)
        file.flush()  # a pipe sees each line when it is done
    except (BrokenPipeError, ValueError):  # the reader is gone, or the stream closed
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), file.fileno())
        return False
    return True
