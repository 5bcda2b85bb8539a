"""Flax modules of SRNO and its encoders, and a factory from the reference's specs."""

from __future__ import annotations

from srno_jax.errors import ConfigError
from srno_jax.models.encoders import EDSR, RDN, RDN_CONFIGS
from srno_jax.models.srno import SRNO, GalerkinAttention, Projection, lifting_inputs

# The reference's constructor defaults; a checkpoint's args list only what differs.
ENCODER_DEFAULTS = {
    "edsr-baseline": dict(n_resblocks=16, n_feats=64, res_scale=1.0),
    "edsr": dict(n_resblocks=32, n_feats=256, res_scale=0.1),
    "rdn": dict(G0=64, RDNkSize=3, RDNconfig="B"),
}


def make_encoder(name: str, args: dict | None = None, dtype="float32"):
    """Builds an encoder from the reference's `encoder_spec` name and args."""
    if name not in ENCODER_DEFAULTS:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(ENCODER_DEFAULTS)}")
    args = {k: v for k, v in (args or {}).items() if k != "no_upsampling"}
    unknown = set(args) - set(ENCODER_DEFAULTS[name])
    if unknown:
        raise ConfigError(
            f"unknown argument(s) {sorted(unknown)} for encoder {name!r}; "
            f"known: {sorted(ENCODER_DEFAULTS[name])}"
        )
    a = {**ENCODER_DEFAULTS[name], **args}
    if name == "rdn":
        if a["RDNconfig"] not in RDN_CONFIGS:
            raise ConfigError(f"RDNconfig {a['RDNconfig']!r} is not one of {sorted(RDN_CONFIGS)}")
        return RDN(g0=a["G0"], config=a["RDNconfig"], kernel_size=a["RDNkSize"], dtype=dtype)
    return EDSR(
        n_resblocks=a["n_resblocks"],
        n_feats=a["n_feats"],
        res_scale=float(a["res_scale"]),
        dtype=dtype,
    )


def init_variables(model: SRNO, seed: int = 0) -> dict:
    """Freshly initialised ``{'params': ...}`` (the shapes do not depend on input sizes)."""
    import jax
    import jax.numpy as jnp

    dummy = (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 2)))
    return model.init(jax.random.key(seed), *dummy)


def make_model(
    encoder: str = "edsr-baseline",
    encoder_args: dict | None = None,
    width: int = 256,
    heads: int = 16,
    dtype="float32",
) -> SRNO:
    """SRNO from the reference's model args (`blocks` there is `heads` here)."""
    if width % heads:
        raise ConfigError(f"width {width} must be divisible by heads {heads}")
    return SRNO(make_encoder(encoder, encoder_args, dtype), width=width, heads=heads, dtype=dtype)


__all__ = [
    "EDSR",
    "RDN",
    "SRNO",
    "GalerkinAttention",
    "Projection",
    "lifting_inputs",
    "make_encoder",
    "make_model",
    "init_variables",
    "ENCODER_DEFAULTS",
]
