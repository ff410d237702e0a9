"""train_and_evaluate(config, workdir): the training loop every method runs in.

Order of work: validate the config (the common fields, then the method's section) and the
workdir, build the model, method and mesh, then the data pipeline (nothing compiled or
written before), create the state with eval_shape + jit
(out_shardings) or restore it from the newest checkpoint in the workdir, then step.  The
per-step key is fold_in(base key, step) and the input position is saved with the state,
so a resumed run computes exactly what an uninterrupted run computes.
"""
from __future__ import annotations

import functools
import json
import signal
import threading
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ctm_jax import (checkpointing, compile_cache, config_lib, data, evaluate, fileio, metric_io,
                     methods, parallel, runs, samplers, train_state, visualize)
from ctm_jax import progress as progress_lib
from ctm_jax.evaljob import report
# Model building and run loading live below the loop (ctm_jax.runs); re-exported here.
from ctm_jax.runs import (build_model, example_input, example_labels, load_run_config,  # noqa: F401
                          schedule_from_config, uses_s)


# ----------------------------------------------------------------------------- building

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

  def step_functions(self, *, forced_k: bool = False):
    """(frozen arrays on the mesh, {kind: jitted step(state, batch, frozen)}).

    forced_k: the kinds of method.k_step_kinds take a fourth argument, k (an int32 scalar,
    replicated), in place of drawing it (benchmarks; the rest of the step is unchanged)."""
    frozen, frozen_sh = self.frozen_on_mesh()
    return frozen, self._jit_steps(frozen_sh, forced_k)

  def abstract_step_functions(self, *, forced_k: bool = False):
    """step_functions on abstract frozen arrays (ShapeDtypeStructs carrying their shardings;
    nothing placed on the devices): for lowering and compile-only dry runs."""
    fr = self.abstract_frozen()
    sh = parallel.tree_shardings(self.mesh, fr)
    return checkpointing.abstract_with_shardings(fr, sh), self._jit_steps(sh, forced_k)

  def abstract_batch(self, batch_size: int):
    """The step's batch as ShapeDtypeStructs split over the mesh (x, and label if any)."""
    sh = parallel.batch_sharding(self.mesh)
    out = {"x": jax.ShapeDtypeStruct((batch_size,) + tuple(self.info.shape), jnp.float32,
                                     sharding=sh)}
    if self.config.data.class_conditional:
      out["label"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sh)
    return out

  def _jit_steps(self, frozen_sh, forced_k: bool):
    batch_sh = parallel.batch_sharding(self.mesh)
    rep = parallel.replicated(self.mesh)

    def jit(kind):
      with_k = forced_k and kind in self.method.k_step_kinds
      return jax.jit(parallel.gather_for_compute(self.method.make_step(kind, self.tx), self.mesh),
                     in_shardings=(self.state_shardings, batch_sh, frozen_sh)
                     + ((rep,) if with_k else ()),
                     out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    return {kind: jit(kind) for kind in self.method.step_kinds}

  def restore_target(self):
    return checkpointing.abstract_with_shardings(self.abstract_state, self.state_shardings)

  def eval_params(self, state):
    """The parameters sampled at sample_every: runs.choose_ema's pick of config.sampling.eval_ema."""
    name = runs.choose_ema(self.config, None, "config.sampling.eval_ema")
    return state.params if name == runs.RAW_PARAMS else state.ema[name]


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


def sample_count(config) -> int:
  """Samples drawn at sample_every: the grid's count for images; for 2-D data
  sampling.num_eval_samples, enough that the metrics' sampling noise is below the differences
  they show (the standard deviation of MMD^2 over seeds is 0.0014 at 2000 points, 0.0008 at
  4096 on the mixture; docs/evaluation.md)."""
  info = data.dataset_info(config.data.dataset)
  return config.sampling.num_samples if info.kind == "image" else config.sampling.num_eval_samples


def write_samples(exp: Experiment, state, step: int, workdir: str, writer, samplers_jit) -> Dict:
  """Sample pictures (PNG under workdir/samples and TensorBoard images) and, for 2-D data,
  MMD / sliced-W1 against fresh data, beside the references of evaluate.py."""
  params = exp.eval_params(state)
  key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 0x5A4D)
  results = {}
  points = exp.info.kind != "image"
  for name, fn in samplers_jit.items():
    x = np.asarray(parallel.to_host(fn(params, key)))
    pic = visualize.samples_picture(x, exp.info.kind)
    if jax.process_index() == 0:
      path = fileio.join(workdir, "samples", f"{name}_step{step:08d}.png")
      if points:
        ref = evaluate.reference_points(exp.config, len(x))
        report.points_figure(x, ref, path, f"{name}, step {step}")
      else:
        visualize.save_png(path, pic, scale=4 if pic.shape[0] < 128 else 1)
    writer.write_images(step, {f"samples/{name}": pic[None]})
    if points:
      met = evaluate.toy_metrics(x, evaluate.reference_points(exp.config, len(x)))
      writer.write_scalars(step, {f"eval/{name}_{k}": v for k, v in met.items()})
      results[name] = met
  if points:
    refs = sample_references(exp.config)
    for ref_name, vals in refs.items():
      writer.write_scalars(step, {f"eval/{ref_name}_{k}": v for k, v in vals.items()})
    results.update(refs)
  return results


REFERENCE_SEEDS = 5


@functools.lru_cache(maxsize=4)
def _references(config_json: str) -> Dict[str, Dict[str, float]]:
  config = ml_collections.ConfigDict(json.loads(config_json))
  num = sample_count(config)
  refs = {"two_sample_ref": evaluate.two_sample_reference(config, num, REFERENCE_SEEDS)}
  if config.data.dataset == "toy_gmm":
    refs["exact_denoiser_ref"] = evaluate.exact_denoiser_reference(
        config, num, config.sampling.heun_steps, REFERENCE_SEEDS, config.seed)
  return refs


def sample_references(config) -> Dict[str, Dict[str, float]]:
  """The references of the 2-D sample metrics at the training-time sample count (computed
  once per run): two independent data sets and, for toy_gmm, EDM Heun with the exact
  mixture denoiser; each the mean and standard deviation over REFERENCE_SEEDS seeds.  They
  carry sampling noise like the model's numbers: references, not floors."""
  return _references(config.to_json_best_effort())


# ----------------------------------------------------------------------------- stopping

class NonFiniteError(FloatingPointError):
  """The training metrics turned non-finite; the state of that step is not saved."""


STOP_REASONS = progress_lib.STOP_REASONS   # summary["stop_reason"] -> how the log says it


class PreemptionFlag:
  """Asks the loop to stop after the current step (it then writes a checkpoint).

  Single process: SIGTERM or a first SIGINT (Ctrl-C) set `reason`; a second SIGINT raises
  KeyboardInterrupt at once (no checkpoint; the ones written before are complete).
  Multi-host: JAX's pre-emption sync point (all processes stop at the same step)."""

  def __init__(self):
    self.reason: Optional[str] = None
    self._old = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    if signum == signal.SIGINT and self.reason is not None:
      signal.signal(signal.SIGINT, self._old[signal.SIGINT])   # a third Ctrl-C: the default
      raise KeyboardInterrupt
    self.reason = signal.Signals(signum).name
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: finishing this step and writing a checkpoint (press Ctrl-C "
                      "again to stop at once, without one)")
    else:
      logging.warning("SIGTERM received: finishing this step and writing a checkpoint")

  def should_stop(self, step: int) -> Optional[str]:
    """The reason to stop after `step` (a key of STOP_REASONS), or None."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return "preemption" if multihost_utils.reached_preemption_sync_point(step) else None
      except RuntimeError:
        return None
    return self.reason

  def close(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


# ----------------------------------------------------------------------------- the loop

def _mean_metrics(buffer):
  host = jax.device_get(buffer)
  keys = sorted(set().union(*(m.keys() for m in host)))
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in host if k in m])) for k in keys}


def _write_config(workdir: str, config, step: int):
  """workdir/config.json for a new run; config_resume_<step>.json when resuming."""
  name = "config.json" if step == 0 else f"config_resume_{step:08d}.json"
  path = fileio.join(workdir, name)
  if jax.process_index() == 0 and not fileio.exists(path):
    fileio.write_text(path, config.to_json_best_effort(indent=2))


def _finished_summary(workdir: str, total_steps: int) -> Optional[Dict[str, Any]]:
  """The saved summary.json of a run that already trained to total_steps (its newest
  checkpoint is that summary's step, at or past total_steps), else None."""
  path = fileio.join(workdir, "summary.json")
  steps = runs.checkpoint_steps(workdir) if fileio.isfile(path) else []
  if not steps or steps[-1] < total_steps:
    return None
  summary = fileio.read_json(path)
  return summary if summary.get("step") == steps[-1] else None


def _config_changes(workdir: str, config) -> list:
  """'field old -> new' for each field of config that differs from the run's newest saved
  config (config.json or the last config_resume_<step>.json): what a resume changes."""
  saved = [n for n in fileio.listdir(workdir) if n.startswith("config_resume_")
           and n.endswith(".json")]
  path = fileio.join(workdir, saved[-1] if saved else "config.json")
  if not fileio.isfile(path):
    return []
  old = _flatten(fileio.read_json(path))
  new = _flatten(json.loads(config.to_json_best_effort()))
  return [f"{k} {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}"
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int):
  """Every config check: the fields all methods share, then the chosen method's own section
  (raises config_lib.ConfigError naming the field and what is accepted)."""
  config_lib.validate_common(config, num_devices=num_devices, process_count=process_count)
  if config.training.sample_every:              # the loop samples eval_params: a typo fails now
    runs.choose_ema(config, None, "config.sampling.eval_ema")
  methods.validate_method_config(config)


def _newest(saved: Optional[int]) -> str:
  return "no checkpoint yet" if saved is None else f"the newest checkpoint is step {saved}"


def final_lines(summary: Dict[str, Any], workdir: str, total_steps: int) -> list:
  """The last lines of a training log: where the results are, then how the run ended."""
  join = lambda name: fileio.join(workdir, name)
  lines = [f"Results in {workdir}:"]
  if fileio.isdir(join("samples")):
    lines.append(f"  sample pictures (PNG): {join('samples')}")
  lines += [f"  metrics: {join('metrics.jsonl')}",
            f"  summary: {join('summary.json')}",
            f"  checkpoints: {join('checkpoints')}",
            f"  TensorBoard: tensorboard --logdir {workdir}"]
  step, reason = summary["step"], summary.get("stop_reason")
  if reason is None:
    loss = summary["metrics"].get("loss")
    lines.append(f"Finished at step {step} in {progress_lib.format_duration(summary['seconds'])}"
                 + (f" (loss {loss:.4g})" if loss is not None else ""))
  elif reason == "SIGINT":
    lines.append(f"Stopped by {STOP_REASONS[reason]}: interrupted at step {step} of "
                 f"{total_steps}, checkpoint written; re-run the same command to resume")
  else:
    lines.append(f"Stopped by {STOP_REASONS[reason]} at step {step} of {total_steps}, "
                 f"checkpoint written; re-run the same command to resume")
  return lines


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress_bar: bool = False) -> Dict[str, Any]:
  """Train (or resume) the run in `workdir` to config.training.num_train_steps.

  Start-up order: every check that needs no data (config, workdir, model and method shapes)
  before the data set is built, and all of them before anything is compiled or written.
  progress_bar: a tqdm bar (for a terminal) instead of progress log lines.
  Returns a summary: the final step, the last logged metrics, sample metrics,
  stop_reason (None, or a key of STOP_REASONS when the run stopped early) and signal (the
  signal received, 'SIGINT' / 'SIGTERM', even one that came during the last step or the
  final checkpoint and so stopped nothing: a caller that runs more work after this run, such
  as launch.compare, stops on it).  Raises
  NonFiniteError (nothing saved for that state) and KeyboardInterrupt (a second Ctrl-C).
  """
  validate_config(config, num_devices=jax.device_count(), process_count=jax.process_count())
  config_lib.check_workdir(workdir)
  tcfg = config.training
  done = _finished_summary(workdir, tcfg.num_train_steps)
  if done is not None:                       # a re-run of a finished run changes nothing
    logging.info("Already trained to step %d (training.num_train_steps = %d): nothing to do; "
                 "%s is kept", done["step"], tcfg.num_train_steps,
                 fileio.join(workdir, "summary.json"))
    return done
  cache_dir = compile_cache.setup(tcfg.get("compilation_cache_dir", compile_cache.AUTO), workdir)
  exp = Experiment(config)
  method = exp.method
  pipeline = data.InputPipeline(config.data, tcfg.batch_size, config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
  logging.info("JAX process %d of %d, %d %s devices (%d local); data: %s in %s",
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.default_backend(), jax.local_device_count(), pipeline.tfds_name,
               pipeline.data_dir)

  fileio.makedirs(workdir)        # a no-op on object stores, which have no folders
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
  if latest is not None and jax.process_index() == 0:
    dropped = metric_io.drop_rows_after(workdir, step)
    if dropped:
      logging.info("Dropped %d metrics.jsonl rows past step %d (they are computed again)",
                   dropped, step)
  changes = _config_changes(workdir, config) if latest is not None else []
  _write_config(workdir, config, step)
  if changes:
    logging.info("Resuming with changed settings (recorded in config_resume_%08d.json): %s",
                 step, "; ".join(changes))

  writer = metric_io.create_writer(workdir)
  if step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})

  frozen, step_fns = exp.step_functions()
  sample_jits = {name: make_sampler(exp, fn, sample_count(config))
                 for name, fn in method.sample_fns().items()} if tcfg.sample_every else {}

  preempt = PreemptionFlag()
  logging.info("Training steps %d to %d in %s (compiling the step first; compilation cache: "
               "%s)", step, tcfg.num_train_steps, workdir, cache_dir or "none")
  progress = progress_lib.Progress(tcfg.num_train_steps, step, bar=progress_bar)
  buffer, last_metrics, sample_results, stop_reason = [], {}, {}, None
  last_saved = latest
  t_start = time.time()
  try:
    while step < tcfg.num_train_steps:
      local = next(batches)
      batch = parallel.global_batch(local, exp.mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fns[method.step_kind(step)](state, batch, frozen)
      step += 1
      buffer.append(metrics)
      progress.step(step)
      is_last = step == tcfg.num_train_steps
      if step % tcfg.log_every == 0 or is_last:
        last_metrics = _mean_metrics(buffer)
        buffer = []
        bad = [k for k, v in last_metrics.items() if not np.isfinite(v)]
        if bad:
          raise NonFiniteError(
              f"stopped at step {step}: non-finite metrics {bad}; this state is not saved "
              f"({_newest(last_saved)})")
        writer.write_scalars(step, dict(last_metrics, steps_per_sec=progress.report(step)))
      if tcfg.sample_every and (step % tcfg.sample_every == 0 or is_last):
        sample_results = write_samples(exp, state, step, workdir, writer, sample_jits)
      stop_reason = None if is_last else preempt.should_stop(step)
      if step % tcfg.checkpoint_every == 0 or is_last or stop_reason:
        ckpt.save(step, state, batches.get_state(), {"step": step, "method": config.method,
                                                     "dataset": config.data.dataset})
        last_saved = step
      if stop_reason:
        break
  except KeyboardInterrupt:
    progress.close()
    logging.warning("Stopped at once by a second Ctrl-C at step %d: no checkpoint written "
                    "for it (%s); re-run the same command to resume", step,
                    _newest(last_saved))
    raise
  finally:
    try:
      progress.close()
      batches.close()
      ckpt.close()                # waits for an asynchronous save: a Ctrl-C meanwhile is noted
      writer.close()               # a URL workdir: the last TensorBoard copy goes up
    finally:
      preempt.close()
  summary = {"step": step, "metrics": last_metrics, "samples": sample_results,
             "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
             "signal": preempt.reason, "seconds": time.time() - t_start}
  if jax.process_index() == 0:
    fileio.write_json(fileio.join(workdir, "summary.json"), summary, indent=2)
    for line in final_lines(summary, workdir, tcfg.num_train_steps):
      logging.info("%s", line)
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
