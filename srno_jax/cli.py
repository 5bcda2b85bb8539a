"""What the command-line tools share: argument types and how a stop ends them.

Ctrl-C and SIGTERM (a scheduler's or `timeout`'s stop) end a tool the same way: the work
done is kept, the file being written is removed, and the exit status says which it was.
"""

from __future__ import annotations

import argparse
import contextlib
import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `Terminated`."""

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
