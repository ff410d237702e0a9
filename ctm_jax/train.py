"""train_and_evaluate(config, workdir): the training loop every method runs in.

Order of work: validate the config (nothing compiled or written before), build the data
pipeline, model and method, make the device mesh, create the state with eval_shape + jit
(out_shardings) or restore it from the newest checkpoint in the workdir, then step.  The
per-step key is fold_in(base key, step) and the input position is saved with the state,
so a resumed run computes exactly what an uninterrupted run computes.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions

from ctm_jax import (checkpointing, config_lib, data, diffusion, flow_map, metric_io, methods,
                     nets, parallel, samplers, train_state, visualize)


# ----------------------------------------------------------------------------- building

def schedule_from_config(config) -> diffusion.Schedule:
  d = config.diffusion
  return diffusion.Schedule(d.sigma_min, d.sigma_max, d.sigma_data, d.rho)


def uses_s(config) -> bool:
  return methods.uses_s(config)


def build_model(config, *, use_s: Optional[bool] = None) -> flow_map.FlowModel:
  """The FlowModel (network + EDM preconditioning) that config describes."""
  info = data.dataset_info(config.data.dataset)
  label_dim = info.num_classes if config.data.class_conditional else 0
  net = nets.build_net(config.model, use_s=uses_s(config) if use_s is None else use_s,
                       label_dim=label_dim, data_shape=info.shape,
                       compute_dtype=config.training.compute_dtype)
  return flow_map.FlowModel(net, schedule_from_config(config), config.diffusion.c_noise)


def example_input(config, batch: int = 1):
  info = data.dataset_info(config.data.dataset)
  return jnp.zeros((batch,) + tuple(info.shape), jnp.float32)


def example_labels(config, batch: int = 1):
  return jnp.zeros((batch,), jnp.int32) if config.data.class_conditional else None


def make_init_fn(config, model, method, tx):
  """(key, frozen) -> a fresh TrainState (pure; used under eval_shape and jit)."""
  def init(key, frozen):
    k_param, k_extra, k_rng = jax.random.split(key, 3)
    params = model.init(k_param, example_input(config), example_labels(config))
    params = method.init_params(k_param, params, frozen)
    extra = method.init_extra(k_extra, params, frozen)
    return train_state.create_state(params, tx, config.ema, k_rng, extra)
  return init


class Experiment:
  """Everything derived from a config that does not depend on the workdir."""

  def __init__(self, config, *, mesh=None):
    self.config = config
    self.info = data.dataset_info(config.data.dataset)
    self.model = build_model(config)
    self.method = methods.build_method(config, self.model)
    self.tx = train_state.make_optimizer(config.optim)
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    self.init_fn = make_init_fn(config, self.model, self.method, self.tx)
    self.abstract_state = jax.eval_shape(self.init_fn, jax.random.PRNGKey(0),
                                         self.abstract_frozen())
    self.state_shardings = parallel.tree_shardings(self.mesh, self.abstract_state)
    self._frozen_on_mesh = None

  def abstract_frozen(self):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                  self.method.frozen())

  def frozen_on_mesh(self):
    """The method's frozen arrays (teacher, feature nets) placed on the mesh, once."""
    if self._frozen_on_mesh is None:
      fr = self.method.frozen()
      sh = parallel.tree_shardings(self.mesh, fr)
      self._frozen_on_mesh = (jax.device_put(fr, sh), sh)
    return self._frozen_on_mesh

  def init_state(self):
    key = jax.random.PRNGKey(self.config.seed)
    frozen, frozen_sh = self.frozen_on_mesh()
    return jax.jit(self.init_fn, in_shardings=(None, frozen_sh),
                   out_shardings=self.state_shardings)(key, frozen)

  def step_functions(self):
    """(frozen arrays on the mesh, {kind: jitted step(state, batch, frozen)})."""
    frozen, frozen_sh = self.frozen_on_mesh()
    batch_sh = parallel.batch_sharding(self.mesh)
    fns = {
        kind: jax.jit(self.method.make_step(kind, self.tx),
                      in_shardings=(self.state_shardings, batch_sh, frozen_sh),
                      out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
                      donate_argnums=(0,))
        for kind in self.method.step_kinds}
    return frozen, fns

  def restore_target(self):
    return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

  def eval_params(self, state):
    name = self.config.sampling.eval_ema or train_state.ema_names(self.config.ema)[0]
    if name not in state.ema:
      raise config_lib.ConfigError(
          f"config.sampling.eval_ema = {name!r} is not one of the EMAs {sorted(state.ema)}")
    return state.ema[name]


# ----------------------------------------------------------------------------- sampling

def make_sampler(exp: Experiment, fn, num: int):
  """jit(params, key) -> samples for one of the method's samplers, samples replicated."""
  cfg = exp.config
  shape = (num,) + tuple(exp.info.shape)
  labels = (jnp.arange(num, dtype=jnp.int32) % exp.info.num_classes
            if cfg.data.class_conditional else None)

  def run(params, key):
    k_init, k_run = jax.random.split(key)
    x_init = samplers.initial_noise(k_init, shape, exp.model.schedule.sigma_max)
    return fn(params, x_init, k_run, labels)

  return jax.jit(run, out_shardings=parallel.replicated(exp.mesh))


def reference_points(config, num: int, seed: int = 1234) -> np.ndarray:
  """Fresh data for the toy metrics: exact samples for toy_gmm, else the test split."""
  if config.data.dataset == "toy_gmm":
    from ctm_jax.oracle import toy_mixture_2d
    return np.asarray(toy_mixture_2d().sample(jax.random.PRNGKey(seed), num))
  return data.load_split(config.data.dataset, "test", config.data.data_dir or None,
                         max_examples=num)["x"]


def toy_metrics(samples: np.ndarray, reference: np.ndarray, seed: int = 0) -> Dict[str, float]:
  from ctm_jax.metrics import sample_quality
  n = min(len(samples), len(reference))
  return {"mmd": sample_quality.mmd_rbf(samples[:n], reference[:n]),
          "sliced_w1": sample_quality.sliced_wasserstein(samples[:n], reference[:n],
                                                         jax.random.PRNGKey(seed))}


def write_samples(exp: Experiment, state, step: int, workdir: str, writer, samplers_jit) -> Dict:
  """Sample grids (PNG under workdir/samples and TensorBoard images) and, for 2-D data,
  MMD / sliced-W1 against fresh data."""
  params = exp.eval_params(state)
  key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 0x5A4D)
  results = {}
  for name, fn in samplers_jit.items():
    x = np.asarray(parallel.to_host(fn(params, key)))
    pic = visualize.samples_picture(x, exp.info.kind)
    if jax.process_index() == 0:
      visualize.save_png(os.path.join(workdir, "samples", f"{name}_step{step:08d}.png"), pic,
                         scale=4 if exp.info.kind == "image" and pic.shape[0] < 128 else 1)
    writer.write_images(step, {f"samples/{name}": pic[None]})
    if exp.info.kind != "image":
      ref = reference_points(exp.config, len(x))
      met = toy_metrics(x, ref)
      writer.write_scalars(step, {f"eval/{name}_{k}": v for k, v in met.items()})
      results[name] = met
  if exp.config.data.dataset == "toy_gmm":
    floor = oracle_floor(exp.config, exp.config.sampling.num_samples)
    writer.write_scalars(step, {f"eval/oracle_{k}": v for k, v in floor.items()})
    results["oracle_floor"] = floor
  return results


def oracle_floor(config, num: int) -> Dict[str, float]:
  """The metrics of EDM Heun (config.sampling.heun_steps) with the exact mixture denoiser:
  the best any learned denoiser can do with that sampler and sample size."""
  from ctm_jax.oracle import toy_mixture_2d
  gm = toy_mixture_2d()
  sch = schedule_from_config(config)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A4D)
  k_init, _ = jax.random.split(key)
  x_init = samplers.initial_noise(k_init, (num, 2), sch.sigma_max)
  x = jax.jit(lambda x: samplers.edm_heun_sampler(gm.denoise, x, config.sampling.heun_steps, sch))(x_init)
  return toy_metrics(np.asarray(x), reference_points(config, num))


# ----------------------------------------------------------------------------- pre-emption

class PreemptionFlag:
  """Set by SIGTERM (single process) or JAX's preemption sync point (multi-host)."""

  def __init__(self):
    self._flag = False
    self._old = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._flag = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:
        return False
    return self._flag

  def close(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------- the loop

def _mean_metrics(buffer):
  host = jax.device_get(buffer)
  keys = sorted(set().union(*(m.keys() for m in host)))
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host if k in m])) for k in keys}


def _write_config(workdir: str, config, step: int):
  """workdir/config.json for a new run; config_resume_<step>.json when resuming."""
  name = "config.json" if step == 0 else f"config_resume_{step:08d}.json"
  path = os.path.join(workdir, name)
  if jax.process_index() == 0 and not os.path.exists(path):
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Train (or resume) the run in `workdir` to config.training.num_train_steps.

  Returns a summary: the final step, the last logged metrics, sample metrics, and whether
  the run stopped early on SIGTERM.
  """
  config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  tcfg = config.training
  pipeline = data.InputPipeline(config.data, tcfg.batch_size, config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  exp = Experiment(config)
  method = exp.method

  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(workdir, tcfg)
  latest = ckpt.latest_step()
  if latest is not None:
    logging.info("Resuming from %s at step %d", ckpt.directory, latest)
    state, data_state, _ = ckpt.restore(latest, exp.restore_target())
    batches = pipeline.iterator_from_state(data_state)
  elif config.init_from:
    state = init_from_run(exp, config.init_from, config.init_from_step)
    batches = pipeline.iterator(int(jax.device_get(state.step)))
  else:
    state = exp.init_state()
    batches = pipeline.iterator(0)
  step = int(jax.device_get(state.step))
  if batches.get_state()["next_step"] != step:
    raise RuntimeError(f"checkpoint step {step} and input position "
                       f"{batches.get_state()['next_step']} disagree")
  _write_config(workdir, config, step)

  writer = metric_io.create_writer(workdir)
  if step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=tcfg.num_train_steps, writer=writer,
                                             every_steps=tcfg.log_every)

  frozen, step_fns = exp.step_functions()
  sample_jits = {name: make_sampler(exp, fn, config.sampling.num_samples)
                 for name, fn in method.sample_fns().items()} if tcfg.sample_every else {}

  preempt = PreemptionFlag()
  buffer, last_metrics, sample_results, stopped_early = [], {}, {}, False
  t_start = time.time()
  try:
    while step < tcfg.num_train_steps:
      local = next(batches)
      batch = parallel.global_batch(local, exp.mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fns[method.step_kind(step)](state, batch, frozen)
      step += 1
      buffer.append(metrics)
      progress(step)
      is_last = step == tcfg.num_train_steps
      if step % tcfg.log_every == 0 or is_last:
        last_metrics = _mean_metrics(buffer)
        buffer = []
        bad = [k for k, v in last_metrics.items() if not np.isfinite(v)]
        if bad:
          raise FloatingPointError(f"non-finite metrics {bad} at step {step}; no checkpoint "
                                   f"is written for this state")
        writer.write_scalars(step, last_metrics)
      if tcfg.sample_every and (step % tcfg.sample_every == 0 or is_last):
        sample_results = write_samples(exp, state, step, workdir, writer, sample_jits)
      stop = preempt.should_stop(step)
      if step % tcfg.checkpoint_every == 0 or is_last or stop:
        ckpt.save(step, state, batches.get_state(), {"step": step, "method": config.method,
                                                     "dataset": config.data.dataset})
      if stop:
        stopped_early = True
        break
  finally:
    preempt.close()
    batches.close()
    ckpt.close()
    writer.flush()
  summary = {"step": step, "metrics": last_metrics, "samples": sample_results,
             "stopped_early": stopped_early, "seconds": time.time() - t_start}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
    else:
      out[key] = str(v)
  return out


# ----------------------------------------------------------------------------- loading

def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a ctm-jax run directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def merge_state(fresh, source):
  """fresh with every leaf whose path, shape and dtype match a leaf of source replaced by it.

  Returns (state, names taken, names left fresh)."""
  src = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
  taken, fresh_names = [], []

  def pick(path, leaf):
    name = jax.tree_util.keystr(path)
    v = src.get(name)
    if v is not None and v.shape == leaf.shape and v.dtype == leaf.dtype:
      taken.append(name)
      return v
    fresh_names.append(name)
    return leaf
  return jax.tree_util.tree_map_with_path(pick, fresh), taken, fresh_names


def init_from_run(exp: "Experiment", src_workdir: str, step: int = -1):
  """A new run's state started from another run's checkpoint (config.init_from)."""
  src_cfg = load_run_config(src_workdir)
  _, src_state, src_step = load_state(src_cfg, src_workdir, None if step < 0 else step)
  merged, taken, fresh = merge_state(jax.device_get(exp.init_state()), jax.device_get(src_state))
  if not any("params" in n for n in taken):
    raise config_lib.ConfigError(f"config.init_from = {src_workdir!r}: no parameter of that run "
                                 f"matches this model (different architecture?)")
  logging.info("Initialised from %s step %d: %d arrays taken, %d fresh (%s)", src_workdir,
               src_step, len(taken), len(fresh), ", ".join(fresh[:8]))
  return jax.device_put(merged, exp.state_shardings)


def load_state(config, workdir: str, step: Optional[int] = None):
  """Restore a TrainState (and its step) from a workdir, for sampling and evaluation."""
  exp = Experiment(config)
  ckpt = checkpointing.Checkpointer(workdir, config.training, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  state, _, _ = ckpt.restore(step, exp.restore_target())
  ckpt.close()
  return exp, state, step
