"""Training methods, each a `Method` built from the config."""
from ctm_jax.methods.base import Method


def method_names():
  return ("edm", "ctm")


def method_class(name: str) -> type:
  """The Method subclass of a config.method name (imported, not built)."""
  if name == "edm":
    from ctm_jax.methods.edm import EDM
    return EDM
  if name == "ctm":
    from ctm_jax.methods.ctm import CTM
    return CTM
  raise ValueError(f"config.method must be one of {method_names()}, got {name!r}")


def build_method(config, model, **kwargs) -> Method:
  return method_class(config.method)(config, model, **kwargs)


def validate_method_config(config):
  """The method's own config checks (raise ctm_jax.config_lib.ConfigError)."""
  from ctm_jax import config_lib
  if config.method == "edm":
    config_lib.check_number(config, "edm.p_std", 0, lo_open=True)
    config_lib.check_number(config, "edm.p_mean", -10, 10)
    validate_augment_config(config)
  elif config.method == "ctm":
    from ctm_jax.methods.ctm import validate_ctm_config
    validate_ctm_config(config)


def validate_augment_config(config):
  """config.edm.augment: ranges, an image data set, and model.augment_dim equal to the
  number of augment labels the enabled transforms make."""
  from ctm_jax import augment, config_lib, data
  if "augment" not in config.edm:       # a run saved before augmentation existed
    return
  a = "edm.augment"
  config_lib.check_number(config, f"{a}.p", 0, 1)
  for name, _ in augment.TRANSFORMS:
    config_lib.check_number(config, f"{a}.{name}", 0)
  for name in ("scale_std", "aniso_std", "translate_frac_std"):
    config_lib.check_number(config, f"{a}.{name}", 0)
  config_lib.check_number(config, f"{a}.rotate_frac_max", 0, 1)
  config_lib.check_number(config, f"{a}.aniso_rotate_prob", 0, 1)
  spec = augment.AugmentSpec.from_config(config.edm.augment)
  if not spec.enabled:
    return
  info = data.dataset_info(config.data.dataset)
  if info.kind != "image":
    raise config_lib.ConfigError(
        f"config.edm.augment.p = {spec.p} needs an image data set; config.data.dataset "
        f"{config.data.dataset!r} holds {info.kind} (set config.edm.augment.p=0)")
  have = config.model.get("augment_dim", 0)
  if have != spec.label_dim:
    raise config_lib.ConfigError(
        f"config.model.augment_dim = {have} must equal the {spec.label_dim} augment labels "
        f"that config.edm.augment makes (1 per flip and scale, 2 per rotation, anisotropy "
        f"and translation)")
