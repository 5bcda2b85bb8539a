"""srno-jax: SRNO, the Super-Resolution Neural Operator (Wei & Zhang, CVPR 2023), in JAX/Flax."""

from srno_jax.checkpoints import load_checkpoint
from srno_jax.coords import make_coord, nearest_index, sample_bilinear
from srno_jax.errors import CheckpointError, ConfigError, DataError, SRNOError
from srno_jax.image_api import upscale
from srno_jax.models import EDSR, RDN, SRNO, GalerkinAttention, Projection, make_model

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
