"""Loading a trained run: its config, its model and the parameters of one EMA.

This module sits below the training loop (it imports no method and not ctm_jax.train), so
the teacher, the evaluation jobs and the launch scripts can load runs without the loop that
drives the methods.  `load_params` restores only the parameters it is asked for with an
Orbax partial restore of the saved TrainState: no optimizer, method, teacher or
discriminator is built and their arrays are never read.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ctm_jax import checkpointing, config_lib, fileio, data, diffusion, flow_map, nets, parallel, train_state

RAW_PARAMS = "params"     # load_params(ema=RAW_PARAMS): the trained (non-averaged) parameters


class NotARunError(config_lib.UserError, FileNotFoundError):
  """A directory that holds no ctm-jax run (no config.json) or no checkpoint."""


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  path = fileio.join(workdir, "config.json")
  if not fileio.isfile(path):
    raise NotARunError(f"{path} not found: {workdir!r} is not a ctm-jax run directory "
                       f"(launch.train writes config.json there)")
  return ml_collections.ConfigDict(fileio.read_json(path))


def schedule_from_config(config) -> diffusion.Schedule:
  d = config.diffusion
  return diffusion.Schedule(d.sigma_min, d.sigma_max, d.sigma_data, d.rho)


def uses_s(config) -> bool:
  """Whether the run's network takes the second time input s: CTM's, and TCD's unless
  config.tcd.s_input is False (the TCD paper's network, where s enters only by DDIM)."""
  return (config.method in ("ctm", "meanflow")
          or (config.method == "tcd" and bool(config.tcd.s_input)))


def precond_of(config) -> str:
  """The network's preconditioning (flow_map.PRECONDS) for config.method: MeanFlow's rectified
  flow 'rf'; sCT / sCD's TrigFlow 'trig', or 'trig_edm' when config.<method>.time_input keeps
  EDM's c_noise (a network started from an EDM teacher); EDM's 'edm' for every other method.
  One table here, below the methods, so that loading a run needs no method class."""
  if config.method == "meanflow":
    return "rf"
  if config.method in ("sct", "scd"):
    return "trig" if config[config.method].time_input == "trigflow" else "trig_edm"
  return "edm"


def build_model(config, *, use_s: Optional[bool] = None) -> flow_map.FlowModel:
  """The FlowModel (network + the method's preconditioning, flow_map.PRECONDS) that config
  describes."""
  info = data.dataset_info(config.data.dataset)
  label_dim = info.num_classes if config.data.class_conditional else 0
  net = nets.build_net(config.model, use_s=uses_s(config) if use_s is None else use_s,
                       label_dim=label_dim, data_shape=info.shape,
                       compute_dtype=config.training.compute_dtype)
  return flow_map.FlowModel(net, schedule_from_config(config), config.diffusion.c_noise,
                            precond_of(config))


def example_input(config, batch: int = 1):
  info = data.dataset_info(config.data.dataset)
  return jnp.zeros((batch,) + tuple(info.shape), jnp.float32)


def example_labels(config, batch: int = 1):
  return jnp.zeros((batch,), jnp.int32) if config.data.class_conditional else None


def abstract_params(config, model: Optional[flow_map.FlowModel] = None):
  """ShapeDtypeStructs of the model's parameters (eval_shape: nothing is computed)."""
  model = model or build_model(config)
  return jax.eval_shape(lambda k: model.init(k, example_input(config), example_labels(config)),
                        jax.random.PRNGKey(0))


def checkpoint_steps(workdir: str) -> List[int]:
  """The finished checkpoint steps of a run, ascending (unfinished temporaries are ignored)."""
  d = checkpointing.checkpoint_dir(workdir)
  # Locally Orbax writes a step into a temporary directory renamed to the bare step number
  # when complete; on an object store (no atomic rename) it writes the step's own directory
  # and marks it complete with commit_success.txt.  is_path_finalized knows both.
  from orbax.checkpoint import path as ocp_path
  return sorted(int(n) for n in fileio.listdir(d)
                if n.isdigit() and ocp_path.step.is_path_finalized(fileio.path(fileio.join(d, n))))


def resolve_step(workdir: str, step: Optional[int]) -> int:
  """`step` if that checkpoint exists, the newest one for None; errors list what exists."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise NotARunError(f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise config_lib.ConfigError(f"checkpoint step {step} is not in {workdir!r}; it has {steps}")
  return step


def ema_names(config) -> List[str]:
  return train_state.ema_names(config.ema)


def choose_ema(config, ema: Optional[str] = None, field: str = "config.eval.ema") -> str:
  """The EMA to load: `ema`, else config.sampling.eval_ema, else the run's first EMA.
  RAW_PARAMS names the trained parameters themselves."""
  names = ema_names(config)
  name = ema or config.sampling.get("eval_ema", "") or names[0]
  if name != RAW_PARAMS and name not in names:
    raise config_lib.ConfigError(f"{field} = {name!r} is not an EMA of this run: accepted "
                                 f"{names + [RAW_PARAMS]}")
  return name


# load_params warns when the chosen EMA's mean weight age exceeds this fraction of the steps.
EMA_LAG_FRACTION = 0.2


def ema_mean_age(config, name: str, steps: int) -> float:
  """The mean age, in optimizer steps, of the weights EMA `name` holds after `steps` steps:
  a(s) = sum_t prod_{u=t..s-1} beta_u, from a(0) = 0 and a(t + 1) = beta_t (a(t) + 1) (the
  EMA starts as the initial weights; beta_t its decay at step t, train_state.ema_decays, so
  EDM's half-life ramp-up is included).  A fixed rate r gives r (1 - r^s) / (1 - r); the
  trained parameters (RAW_PARAMS) 0."""
  if name == RAW_PARAMS or steps <= 0:
    return 0.0
  beta = np.broadcast_to(np.asarray(train_state.ema_decays(
      config.ema, jnp.arange(steps), int(config.training.batch_size))[name], np.float64), (steps,))
  tail = np.cumprod(beta[::-1])          # prod_{u=t..s-1} beta_u for t = s-1, ..., 0
  return float(tail.sum())


def ema_lag_note(config, name: str, steps: int, field: str) -> Optional[str]:
  """A warning when EMA `name` averages over a large part of a `steps`-step run (its mean
  weight age above EMA_LAG_FRACTION of the steps): it then lags the trained weights."""
  age = ema_mean_age(config, name, steps)
  if age <= EMA_LAG_FRACTION * steps:
    return None
  return (f"{field} = {name!r}: this EMA's weights are on average {age:.0f} steps old, "
          f"{100 * age / steps:.0f}% of the {steps} steps trained, so it lags the trained "
          f"weights; '{RAW_PARAMS}' (the trained weights) or a shorter EMA may be closer")


def load_params(config, workdir: str, step: Optional[int] = None, ema: Optional[str] = None, *,
                mesh=None, field: str = "config.eval.ema") -> Tuple[Any, int, str]:
  """(params, step, ema_name): one EMA's parameters (or RAW_PARAMS) of checkpoint `step`
  (None = newest), restored alone from the saved TrainState.

  With a mesh the arrays come back as jax.Arrays laid out by the training FSDP rule on it;
  without one, as host numpy arrays.
  """
  name = choose_ema(config, ema, field)
  step = resolve_step(workdir, step)
  note = ema_lag_note(config, name, step, field)
  if note:
    logging.warning("%s", note)
  target = abstract_params(config)
  if mesh is not None:
    target = checkpointing.abstract_with_shardings(target, parallel.tree_shardings(mesh, target))
  subtree = {RAW_PARAMS: target} if name == RAW_PARAMS else {"ema": {name: target}}
  ckpt = checkpointing.Checkpointer(workdir, config.training, read_only=True)
  try:
    out = ckpt.restore_subtree(step, subtree)
  finally:
    ckpt.close()
  params = out[RAW_PARAMS] if name == RAW_PARAMS else out["ema"][name]
  return params, step, name
