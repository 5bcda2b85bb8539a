"""The training config's model fields are checked before any work, like a checkpoint's."""

import pytest

from configs import default
from srno_jax.config_checks import check_config
from srno_jax.errors import ConfigError


@pytest.mark.parametrize(
    "name, value",
    [("n_feats", 0), ("n_resblocks", -1), ("res_scale", float("nan")), ("n_feats", 10**6)],
)
def test_encoder_args_out_of_range(name, value):
    config = default.get_config()
    config.model.encoder_args[name] = value
    with pytest.raises(ConfigError, match=rf"{name} = .* is invalid.*--config.model.encoder_args"):
        check_config(config)


def test_unknown_encoder_arg_and_heads():
    config = default.get_config()
    config.model.encoder_args.n_blocks = 4
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['n_blocks'\]"):
        check_config(config)
    config = default.get_config()
    config.model.heads = 7
    with pytest.raises(ConfigError, match="divisible"):
        check_config(config)


def test_missing_fields_are_named_once_per_section():
    config = default.get_config()
    del config["data"]
    del config.optim["lr"]
    del config.model["encoder_args"]
    with pytest.raises(
        ConfigError, match=r"the config has no field data, optim.lr, model.encoder_args: a config"
    ):
        check_config(config)


def test_a_learning_rate_beyond_float32_is_refused():
    config = default.get_config()
    config.optim.lr = 1e39  # inf in the step's float32: every step would be skipped
    with pytest.raises(ConfigError, match=r"optim.lr = 1e\+39 is invalid: .* <= 3.4"):
        check_config(config)
