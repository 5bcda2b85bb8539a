"""srno-jax: SRNO, the Super-Resolution Neural Operator (Wei & Zhang, CVPR 2023), in JAX/Flax."""

import logging

_before = list(logging.root.handlers)

from srno_jax.checkpoints import load_checkpoint
from srno_jax.coords import make_coord, nearest_index, sample_bilinear
from srno_jax.errors import CheckpointError, ConfigError, DataError, SRNOError
from srno_jax.image_api import upscale
from srno_jax.models import EDSR, RDN, SRNO, GalerkinAttention, Projection, make_model

# Importing Orbax configures the root logger (absl's logging.basicConfig), after which a
# notebook's own logging.basicConfig would do nothing: that handler is taken off again.
for _added in logging.root.handlers[len(_before) :]:
    logging.root.removeHandler(_added)

__all__ = [
    "load_checkpoint",
    "upscale",
    "make_coord",
    "nearest_index",
    "sample_bilinear",
    "make_model",
    "SRNO",
    "EDSR",
    "RDN",
    "GalerkinAttention",
    "Projection",
    "SRNOError",
    "CheckpointError",
    "ConfigError",
    "DataError",
]
