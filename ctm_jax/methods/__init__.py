"""Training methods, each a `Method` built from the config."""
from ctm_jax.methods.base import Method


def method_names():
  return ("edm", "ctm")


def build_method(config, model, **kwargs) -> Method:
  if config.method == "edm":
    from ctm_jax.methods.edm import EDM
    return EDM(config, model, **kwargs)
  if config.method == "ctm":
    from ctm_jax.methods.ctm import CTM
    return CTM(config, model, **kwargs)
  raise ValueError(f"config.method must be one of {method_names()}, got {config.method!r}")


def validate_method_config(config):
  """The method's own config checks (raise ctm_jax.config_lib.ConfigError)."""
  from ctm_jax import config_lib
  if config.method == "edm":
    config_lib.check_number(config, "edm.p_std", 0, lo_open=True)
    config_lib.check_number(config, "edm.p_mean", -10, 10)
  elif config.method == "ctm":
    from ctm_jax.methods.ctm import validate_ctm_config
    validate_ctm_config(config)
