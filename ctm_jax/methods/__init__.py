"""Training methods: a registry mapping config.method to the Method class and the function
that checks that method's own config section."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Type

from ctm_jax import config_lib
from ctm_jax.methods import cm, ctm, direct_cd, edm, meanflow, scm, tcd
from ctm_jax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Registered:
  cls: Type[Method]
  validate: Callable[[object], None]     # validate(config): raises config_lib.ConfigError


METHODS: Dict[str, Registered] = {
    "edm": Registered(edm.EDM, edm.validate_edm_config),
    "ctm": Registered(ctm.CTM, ctm.validate_ctm_config),
    "cd": Registered(cm.CD, cm.validate_cd_config),
    "ct": Registered(cm.CT, cm.validate_ct_config),
    "ict": Registered(cm.ICT, cm.validate_ict_config),
    "direct_cd": Registered(direct_cd.DirectCD, direct_cd.validate_direct_cd_config),
    "tcd": Registered(tcd.TCD, tcd.validate_tcd_config),
    "meanflow": Registered(meanflow.MeanFlow, meanflow.validate_meanflow_config),
    "sct": Registered(scm.SCT, scm.validate_sct_config),
    "scd": Registered(scm.SCD, scm.validate_scd_config),
}


def method_names():
  return tuple(METHODS)


def validate_method_config(config):
  """config.method names a registered method, and that method's section is valid."""
  config_lib.check_choice(config, "method", method_names())
  METHODS[config.method].validate(config)


def build_method(config, model, **kwargs) -> Method:
  name = config_lib.check_choice(config, "method", method_names())
  return METHODS[name].cls(config, model, **kwargs)


def method_class(name: str) -> Type[Method]:
  """The Method subclass of a config.method name (not built)."""
  if name not in METHODS:
    raise ValueError(f"config.method must be one of {method_names()}, got {name!r}")
  return METHODS[name].cls
