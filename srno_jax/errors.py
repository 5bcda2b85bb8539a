"""The errors srno-jax raises for bad input: each names the problem and the fix."""


class SRNOError(Exception):
    """Base class: a problem with the user's input, data, config or checkpoint."""


class CheckpointError(SRNOError, ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model."""


class ConfigError(SRNOError, ValueError):
    """A configuration or command-line argument that cannot work."""


class DataError(SRNOError, ValueError):
    """A data set, folder or image that cannot be used."""
