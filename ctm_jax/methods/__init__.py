"""Training methods, each a `Method` built from the config: a registry name -> (class, config
validation), imported lazily (a method's module is loaded only when that method is used)."""
import importlib

from ctm_jax.methods.base import Method

# name -> (module, class name, name of its config-validation function in that module)
_REGISTRY = {
    "edm": ("ctm_jax.methods.edm", "EDM", "validate_edm_config"),
    "ctm": ("ctm_jax.methods.ctm", "CTM", "validate_ctm_config"),
    "cd": ("ctm_jax.methods.cm", "CD", "validate_cd_config"),
    "ct": ("ctm_jax.methods.cm", "CT", "validate_ct_config"),
    "ict": ("ctm_jax.methods.cm", "ICT", "validate_ict_config"),
    "direct_cd": ("ctm_jax.methods.direct_cd", "DirectCD", "validate_direct_cd_config"),
    "tcd": ("ctm_jax.methods.tcd", "TCD", "validate_tcd_config"),
}


def method_names():
  return tuple(_REGISTRY)


def _entry(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"config.method must be one of {method_names()}, got {name!r}")
  module, cls, validate = _REGISTRY[name]
  mod = importlib.import_module(module)
  return getattr(mod, cls), getattr(mod, validate)


def method_class(name: str):
  return _entry(name)[0]


def uses_s(config) -> bool:
  """Whether config.method's network takes the second time input s."""
  return method_class(config.method).uses_s(config)


def build_method(config, model, **kwargs) -> Method:
  return method_class(config.method)(config, model, **kwargs)


def validate_method_config(config):
  """The method's own config checks (raise ctm_jax.config_lib.ConfigError)."""
  _entry(config.method)[1](config)
