"""Networks: build one from config.model ({'arch': ..., constructor fields ...})."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ctm_jax.nets.layers import REMAT_MODES   # config.model.remat's values (songunet, adm)

ARCHS = ("mlp", "songunet", "adm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def net_class(arch: str):
  if arch == "mlp":
    from ctm_jax.nets.mlp import ToyMLP
    return ToyMLP
  if arch == "songunet":
    from ctm_jax.nets.unet import SongUNet
    return SongUNet
  if arch == "adm":
    from ctm_jax.nets.adm import DhariwalUNet
    return DhariwalUNet
  raise ValueError(f"config.model.arch must be one of {ARCHS}, got {arch!r}")


def build_net(model_cfg, *, use_s: bool, label_dim: int, data_shape, compute_dtype="float32"):
  """The flax module for config.model, with the s input on or off and the label count.

  data_shape is one example's shape: (D,) for vectors (mlp) or (H, W, C) for images.
  Unknown fields fail with their name; the network's channel count follows the data.
  """
  cls = net_class(model_cfg.arch)
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = {k: v for k, v in model_cfg.items() if k != "arch"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that {cls.__name__} does not take; "
                     f"accepted: {sorted(fields)}")
  for k, v in list(kwargs.items()):
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  if compute_dtype not in DTYPES:
    raise ValueError(f"config.training.compute_dtype must be one of {tuple(DTYPES)}, got {compute_dtype!r}")
  kwargs.update(use_s=use_s, label_dim=label_dim, dtype=DTYPES[compute_dtype])
  if model_cfg.arch == "mlp":
    kwargs["out_dim"] = int(data_shape[-1])
  else:
    kwargs["img_resolution"] = int(data_shape[0])
    kwargs["in_channels"] = int(data_shape[-1])
    kwargs["out_channels"] = int(data_shape[-1])
  return cls(**kwargs)
