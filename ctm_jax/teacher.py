"""Teachers for distillation: the exact mixture oracle, a trained checkpoint, or torch weights
(and, for benchmarks and shape tests only, random weights of the teacher's network).

The student's config nests the teacher's (config.teacher.config), so the teacher network is
rebuilt exactly as it was trained.  Teacher parameters are loaded once, on the host, and
passed to the jitted step as arguments (never baked into the compiled program).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
from absl import logging

SOURCES = ("oracle", "checkpoint", "torch_npz", "edm_pkl", "torch_pt", "random")
# 'edm_pkl': an NVlabs/edm network pickle (teacher.path, entry teacher.pickle_key), read torch-free
# without running its code; 'torch_pt': a torch.save state dict (.pt/.pth, e.g. consistency_models'
# edm_imagenet64_ema.pt) at teacher.path, read the same way.
# 'random': N(0, 0.02^2) weights of the teacher network's shapes (seed 0).  Not a teacher: for
# timing and memory measurements (launch.bench) and shape tests, where no weights are at hand.
WEIGHT_SOURCES = ("torch_npz", "edm_pkl", "torch_pt")
LABEL_ORDERS = ("standard",)      # teacher.label_order of a class-conditional WEIGHT_SOURCES teacher


def validate_teacher_config(config):
  """config.teacher: a known source with what it needs, and a teacher of the same data and
  noise range.  A trained teacher must be a denoiser (an `edm` run), so that
  (x - D(x, t)) / t is its probability-flow ODE drift."""
  from ctm_jax import config_lib
  config_lib.check_choice(config, "teacher.source", SOURCES)
  config_lib.check_number(config, "teacher.step", -1, integer=True)
  if config.teacher.source == "oracle" and config.data.dataset != "toy_gmm":
    raise config_lib.ConfigError("config.teacher.source = 'oracle' is the exact denoiser of the "
                                 "toy_gmm mixture; config.data.dataset must be 'toy_gmm'")
  if config.teacher.source == "checkpoint" and not config.teacher.workdir:
    raise config_lib.ConfigError("config.teacher.workdir must name the teacher run's workdir "
                                 "when config.teacher.source = 'checkpoint'")
  if config.teacher.source == "torch_npz" and not config.teacher.npz_path:
    raise config_lib.ConfigError("config.teacher.npz_path must be set when "
                                 "config.teacher.source = 'torch_npz'")
  _validate_file_source(config)
  if (config.teacher.source in WEIGHT_SOURCES and config.teacher.config.data.class_conditional
      and config.teacher.get("label_order", "") not in LABEL_ORDERS):
    raise config_lib.ConfigError(
        f"config.teacher.label_order = {config.teacher.get('label_order', '')!r}: a "
        f"class-conditional teacher from official weights must state the class order it was "
        f"trained on, one of {LABEL_ORDERS} ('standard': the data set's standard order, ImageNet's sorted "
        f"WordNet ids, as openai's and EDM's weights); otherwise every class is conditioned on "
        f"another class's label")
  if config.teacher.source != "oracle":
    tcfg = config.teacher.config
    if tcfg.method != "edm":
      raise config_lib.ConfigError(
          f"config.teacher.config.method = {tcfg.method!r}: the teacher must be a denoiser "
          f"trained by 'edm' (its D(x, t) defines the probability-flow ODE)")
    if tcfg.data.dataset != config.data.dataset:
      raise config_lib.ConfigError(
          f"config.teacher.config.data.dataset ({tcfg.data.dataset!r}) must equal "
          f"config.data.dataset ({config.data.dataset!r})")
    for f in ("sigma_min", "sigma_max"):
      if tcfg.diffusion[f] != config.diffusion[f]:
        raise config_lib.ConfigError(f"config.teacher.config.diffusion.{f} must equal "
                                     f"config.diffusion.{f}")


FILE_SOURCES = ("edm_pkl", "torch_pt")


def _validate_file_source(config):
  """teacher.source edm_pkl / torch_pt: teacher.path is set (the file is read when the teacher's
  parameters are first needed; a finished run stays evaluable without it)."""
  from ctm_jax import config_lib
  tc = config.teacher
  if tc.source not in FILE_SOURCES:
    return
  path = tc.get("path", "")
  if not path:
    raise config_lib.ConfigError(f"config.teacher.path must name the teacher's weight file when "
                                 f"config.teacher.source = {tc.source!r}")


def check_network_matches(module, expected, what: str):
  """Raise naming every constructor field in which the file's network `module` differs from
  the config's network `expected` (dropout, dtype and rematerialisation are the run's choice)."""
  import dataclasses
  from ctm_jax import config_lib
  if type(module) is not type(expected):
    raise config_lib.ConfigError(f"{what} holds a {type(module).__name__}, but "
                                 f"config.teacher.config.model builds a {type(expected).__name__}")
  skip = {"parent", "name", "dropout", "label_dropout", "dtype", "remat"}

  def value(net, field):
    v = getattr(net, field)
    if field == "out_channels" and v is None:     # None: as many as the input
      v = net.in_channels
    return tuple(v) if isinstance(v, (list, tuple)) else v

  diffs = [f"{f.name}: file {value(module, f.name)!r}, config {value(expected, f.name)!r}"
           for f in dataclasses.fields(module)
           if f.name not in skip and value(module, f.name) != value(expected, f.name)]
  if diffs:
    raise config_lib.ConfigError(f"{what} is not the network config.teacher.config describes "
                                 f"(set config.teacher.config.model to match): " + "; ".join(diffs))


def load_edm_pickle_teacher(config, net):
  """Teacher params from an EDM network pickle (config.teacher.path), checked against the
  config: the pickle's class, init_kwargs and sigma_data must describe `net` and the config's
  preconditioning."""
  from ctm_jax import config_lib, official_weights
  from ctm_jax.nets import torch_port
  tc = config.teacher
  key = tc.get("pickle_key", "ema")
  edm = official_weights.read_edm_pickle(tc.path, key)
  module, precond = official_weights.edm_network_module(edm)
  what = f"the EDM pickle {tc.path!r}[{key!r}]"
  check_network_matches(module, net, what)
  sigma_data = float(tc.config.diffusion.sigma_data)
  if abs(precond["sigma_data"] - sigma_data) > 1e-9:
    raise config_lib.ConfigError(f"{what} has sigma_data {precond['sigma_data']}, "
                                 f"config.teacher.config.diffusion.sigma_data is {sigma_data}")
  if tc.config.diffusion.get("c_noise", "log4") != "log4":
    raise config_lib.ConfigError(
        f"{what} is an EDMPrecond (c_noise = ln(sigma)/4), but config.teacher.config."
        f"diffusion.c_noise = {tc.config.diffusion.c_noise!r}")
  logging.info("Teacher: source=edm_pkl path=%s entry=%s (%s/%s)", tc.path, key,
               edm.class_name, edm.inner_class)
  return torch_port.load_torch_state_dict(net, edm.state_dict)


class Teacher:
  """denoise(params, x, t, labels) -> D(x, t), and the params it needs."""

  def __init__(self, config):
    self.config = config
    tc = config.teacher
    self.source = tc.source
    self._params = None
    if self.source == "oracle":
      from ctm_jax.oracle import toy_mixture_2d
      gm = toy_mixture_2d()
      self.model = None
      self._denoise = lambda params, x, t, labels: gm.denoise(x, t).astype(x.dtype)
      return
    from ctm_jax import runs
    tcfg = tc.config
    self.model = runs.build_model(tcfg, use_s=False)
    self.class_conditional = bool(tcfg.data.class_conditional)

    def denoise(params, x, t, labels):
      return self.model.denoiser(params, x, t, None, labels if self.class_conditional else None)
    self._denoise = denoise

  def denoise(self, params, x, t, labels=None):
    return self._denoise(params, x, t, labels)

  def params(self) -> Any:
    """The teacher's parameters (host arrays), loaded on first use."""
    if self._params is None:
      self._params = self._load()
    return self._params

  def param_shapes(self) -> Any:
    """jax.ShapeDtypeStructs of the teacher network's parameters (nothing allocated)."""
    from ctm_jax import runs
    return runs.abstract_params(self.config.teacher.config, self.model)

  def random_params(self, seed: int = 0) -> Any:
    """Host arrays of the teacher network's parameter shapes, each N(0, 0.02^2)."""
    import jax
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype),
        self.param_shapes())

  def _load(self):
    tc = self.config.teacher
    if self.source == "oracle":
      return {}
    if self.source == "random":
      return self.random_params(0)
    if self.source == "checkpoint":
      from ctm_jax import runs
      # The teacher run's evaluation EMA (e.g. EDM's half-life EMA) unless teacher.ema names one.
      field = "config.teacher.ema" if tc.ema else "config.teacher.config.sampling.eval_ema"
      params, step, name = runs.load_params(tc.config, tc.workdir,
                                            None if tc.step < 0 else tc.step, tc.ema or None,
                                            field=field)
      logging.info("Teacher: source=checkpoint workdir=%s step=%d ema=%s", tc.workdir, step, name)
      return params
    if self.source == "edm_pkl":
      return load_edm_pickle_teacher(self.config, self.model.net)
    from ctm_jax import official_weights
    from ctm_jax.nets import torch_port
    sd = official_weights.load_state_dict_file(tc.path if self.source == "torch_pt"
                                               else tc.npz_path)
    return torch_port.load_torch_state_dict(self.model.net, sd)

