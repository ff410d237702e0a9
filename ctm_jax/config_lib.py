"""Config checking: the shared helpers (check_number, check_choice, ...) and the fields every
method has (validate_common).  Each method checks its own section (ctm_jax.methods); the
training entry (ctm_jax.train.validate_config) runs both before anything is compiled or
written.  This module imports no method."""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable

from ctm_jax import fileio


class UserError(ValueError):
  """A mistake in what the user asked for (a config value, a path): reported in one line."""


class ConfigError(UserError):
  """A config field has a value outside its accepted range."""


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing")
    node = node[part]
  return node


def check_number(config, path: str, lo=None, hi=None, *, lo_open=False, hi_open=False,
                 integer=False):
  v = _get(config, path)
  ok_type = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
  if isinstance(v, bool) or not ok_type:
    kind = "an integer" if integer else "a number"
    raise ConfigError(f"config.{path} must be {kind}, got {v!r}")
  bad = ((lo is not None and (v <= lo if lo_open else v < lo)) or
         (hi is not None and (v >= hi if hi_open else v > hi)))
  if bad:
    lo_s = "-inf" if lo is None else f"{lo}"
    hi_s = "inf" if hi is None else f"{hi}"
    rng = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{')' if hi_open or hi is None else ']'}"
    raise ConfigError(f"config.{path} must be in {rng}, got {v!r}")
  return v


def check_choice(config, path: str, choices: Iterable[str]):
  v = _get(config, path)
  choices = tuple(choices)
  if v not in choices:
    raise ConfigError(f"config.{path} must be one of {choices}, got {v!r}")
  return v


def _plural(n: int, word: str, plural: str) -> str:
  return f"{n} {word if n == 1 else plural}"


def check_batch_split(batch_size: int, microbatches: int, num_devices: int,
                      process_count: int = 1):
  """The global batch splits into `microbatches` equal parts, each part evenly over the
  devices, and over the processes: batch_size must be a multiple of
  lcm(microbatches * num_devices, process_count).  The error names the nearest such sizes."""
  unit = math.lcm(microbatches * num_devices, process_count)
  if batch_size % unit == 0:
    return
  below = batch_size // unit * unit
  near = (below, below + unit) if below > 0 else (unit, 2 * unit)
  procs = f" on {_plural(process_count, 'process', 'processes')}" if process_count > 1 else ""
  raise ConfigError(
      f"config.training.batch_size = {batch_size} cannot be split over "
      f"{_plural(num_devices, 'device', 'devices')} x "
      f"{_plural(microbatches, 'microbatch', 'microbatches')}{procs}: use a multiple of {unit} "
      f"(e.g. {near[0]} or {near[1]})")


def check_workdir(workdir: str):
  """A workdir must be a directory or not exist yet (it is created)."""
  if not workdir:
    raise UserError("the workdir is empty: name a directory for checkpoints, logs and samples")
  if fileio.exists(workdir) and not fileio.isdir(workdir):
    raise UserError(f"workdir {workdir!r} is an existing file, not a directory: name a new "
                    f"directory or an earlier run's directory (to resume it)")


def load_config_file(spec: str, field: str):
  """The config of `FILE.py` or `FILE.py:arg` (FILE's get_config(arg)), loaded as the launch
  binaries load --config (ml_collections' ConfigFileFlagParser; FILE relative to the working
  directory); a missing FILE is a ConfigError naming `field`."""
  path = str(spec).split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"{field}={spec}: no such config file {path!r}")
  from ml_collections.config_flags import config_flags
  return config_flags.ConfigFileFlagParser("config", lock_config=False).parse(str(spec))


def validate_common(config, *, num_devices: int, process_count: int):
  """Checks of the fields every method has (not config.method itself, which the method
  registry checks). num_devices / process_count: the run's (global) counts."""
  from ctm_jax import data, nets
  from ctm_jax.diffusion import C_NOISE_KINDS

  check_number(config, "seed", 0, integer=True)
  check_number(config, "init_from_step", -1, integer=True)
  if config.get("init_from"):
    if not fileio.exists(fileio.join(config.init_from, "config.json")):
      raise ConfigError(f"config.init_from = {config.init_from!r} is not a ctm-jax run directory "
                        f"(no config.json there)")
  check_choice(config, "data.dataset", tuple(data.DATASETS))
  check_choice(config, "data.sharding", ("global", "split"))
  check_number(config, "data.prefetch", 0, integer=True)
  smin = check_number(config, "diffusion.sigma_min", 0, lo_open=True)
  smax = check_number(config, "diffusion.sigma_max", 0, lo_open=True)
  if smin >= smax:
    raise ConfigError(f"config.diffusion.sigma_min ({smin}) must be < config.diffusion.sigma_max ({smax})")
  check_number(config, "diffusion.sigma_data", 0, lo_open=True)
  check_number(config, "diffusion.rho", 0, lo_open=True)
  check_choice(config, "diffusion.c_noise", C_NOISE_KINDS)
  check_choice(config, "model.arch", nets.ARCHS)
  if "remat" in config.model:     # absent in runs saved before it (= 'none')
    if config.model.arch == "mlp":
      raise ConfigError("config.model.remat applies to the U-Nets (songunet, adm), not to "
                        "arch 'mlp': drop the field")
    check_choice(config, "model.remat", nets.REMAT_MODES)

  bs = check_number(config, "training.batch_size", 1, integer=True)
  mb = check_number(config, "training.microbatches", 1, integer=True)
  check_batch_split(bs, mb, num_devices, process_count)
  check_number(config, "training.num_train_steps", 1, integer=True)
  check_number(config, "training.log_every", 1, integer=True)
  check_number(config, "training.checkpoint_every", 1, integer=True)
  check_number(config, "training.sample_every", 0, integer=True)
  check_number(config, "training.keep_last", 1, integer=True)
  check_number(config, "training.keep_every", 0, integer=True)
  check_choice(config, "training.compute_dtype", tuple(nets.DTYPES))
  cache = config.training.get("compilation_cache_dir", "auto")
  if not isinstance(cache, str):
    raise ConfigError(f"config.training.compilation_cache_dir must be a string ('auto', a "
                      f"directory, or '' for none), got {cache!r}")

  from ctm_jax.train_state import OPTIMIZERS
  check_choice(config, "optim.name", OPTIMIZERS)
  check_number(config, "optim.lr", 0, lo_open=True)
  check_number(config, "optim.b1", 0, 1, hi_open=True)
  check_number(config, "optim.b2", 0, 1, hi_open=True)
  check_number(config, "optim.eps", 0, lo_open=True)
  check_number(config, "optim.weight_decay", 0)
  check_number(config, "optim.warmup_steps", 0, integer=True)
  check_number(config, "optim.grad_clip", 0)

  rates = _get(config, "ema.rates")
  if not isinstance(rates, (tuple, list)) or any(
      isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r < 1 for r in rates):
    raise ConfigError(f"config.ema.rates must be a tuple of numbers in [0, 1), got {rates!r}")
  if len(set(rates)) != len(rates):
    raise ConfigError(f"config.ema.rates has repeated values: {rates!r}")
  check_number(config, "ema.halflife_kimg", 0)
  check_number(config, "ema.rampup_ratio", 0, 1)
  if not rates and config.ema.halflife_kimg <= 0:
    raise ConfigError("config.ema needs at least one EMA: a rate in config.ema.rates or "
                      "config.ema.halflife_kimg > 0")

  check_number(config, "sampling.num_samples", 1, integer=True)
  check_number(config, "sampling.heun_steps", 2, integer=True)
  check_number(config, "sampling.num_eval_samples", 2, integer=True)

  check_number(config, "mesh.fsdp", 1, integer=True)
  data_axis = check_number(config, "mesh.data", -1, integer=True)
  if data_axis == 0:
    raise ConfigError("config.mesh.data must be -1 (all remaining devices) or >= 1, got 0")
  if num_devices % config.mesh.fsdp:
    raise ConfigError(f"config.mesh.fsdp = {config.mesh.fsdp} must divide the device count {num_devices}")
  if data_axis != -1 and data_axis * config.mesh.fsdp != num_devices:
    raise ConfigError(f"config.mesh.data * config.mesh.fsdp must equal the device count "
                      f"{num_devices}, got {data_axis} * {config.mesh.fsdp}")

  info = data.dataset_info(config.data.dataset)
  if config.data.class_conditional and not info.num_classes:
    raise ConfigError(f"config.data.class_conditional is True but config.data.dataset "
                      f"{config.data.dataset!r} has no labels")
  if config.data.random_flip and info.kind != "image":
    raise ConfigError(f"config.data.random_flip only applies to image datasets, not "
                      f"{config.data.dataset!r}")
  if (config.model.arch == "mlp") != (info.kind != "image"):
    raise ConfigError(f"config.model.arch = {config.model.arch!r} does not fit the "
                      f"{info.kind} dataset {config.data.dataset!r} (mlp is for vectors, "
                      f"songunet/adm for images)")

