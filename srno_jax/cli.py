"""What the command-line tools share: argument types and how a stop ends them.

Ctrl-C and SIGTERM (a scheduler's or `timeout`'s stop) end a tool the same way: the work
done is kept, the file being written is removed, and the exit status says which it was.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


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
