"""The errors srno-jax raises for bad input: each names the problem and the fix."""

import re


class SRNOError(Exception):
    """Base class: a problem with the user's input, data, config or checkpoint."""


class CheckpointError(SRNOError, ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model."""


class ConfigError(SRNOError, ValueError):
    """A configuration or command-line argument that cannot work."""


class DataError(SRNOError, ValueError):
    """A data set, folder or image that cannot be used."""


class HostError(SRNOError):
    """A part of the run that one host does alone failed (its data loader, its logging,
    its validation), or another host did: every host stops at the same point."""


# TensorStore (under Orbax) appends its whole spec, kilobytes of JSON, to its messages;
# the cause ("File too large") comes before it.
_TENSORSTORE_DETAIL = re.compile(r"\s*(\[tensorstore_spec=|See full TensorStore details).*")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none),
    without TensorStore's spec."""
    text = str(e).strip()
    return _TENSORSTORE_DETAIL.sub("", text.splitlines()[0]) if text else type(e).__name__


def summary(e: BaseException) -> str:
    """'Type: first line of the message', for an error reported in one line."""
    return f"{type(e).__name__}: {first_line(e)}"
