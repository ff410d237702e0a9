"""Step benchmark: the training step of a config, built exactly as training builds it.

measure(configs, ks, repeats) times, in one process and interleaved (repeat r runs every
variant, every k and every network call once before repeat r + 1, so slow drifts of a shared
machine hit all of them alike):
  - the jitted training step (Experiment.step_functions: the same jit, shardings and donation
    as train_and_evaluate), with k forced for CTM (step(state, batch, frozen, k));
  - each network evaluation the step makes, jitted alone: the student forward in train mode,
    the student forward + backward (gradient of the output's sum w.r.t. the parameters), the
    teacher forward, and the teacher forward inside a while loop (n chained calls / n);
  - the step / sum-of-network-calls ratio, with the step's call counts from `network_calls`;
  - XLA's FLOP count (compiled.cost_analysis(); per device: one SPMD partition's program)
    and the achieved FLOP/s of all the mesh's devices together; XLA counts a while loop's
    body once, so the step's count at k adds (k - 1) teacher loop bodies;
  - XLA's memory analysis of the step (arguments + outputs - donated aliases + temporaries);
  - every collective of the compiled step (ctm_jax.lowering.collectives: kind, count, bytes),
    against the gradient's size (a pod dry run: launch.bench --devices=64 --mesh=D,F);
  - the lowering and compile times, and the host's peak resident memory (getrusage).
Teacher and LPIPS weights that are not at hand are random ones of the right shapes (the
timing and memory do not depend on the values).
"""
from __future__ import annotations

import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import config_lib, fileio, lowering, parallel, train

JVP_METHODS = ("meanflow", "sct", "scd")   # steps with a forward-mode pass through the network
LOOP_CALLS = 4        # teacher calls chained inside one while loop (per-call time = total / n)


# ----------------------------------------------------------------------------- config

def bench_config(config, batch: int, scratch_dir: str):
  """A copy of config for benchmarking at global batch `batch`: a random teacher where its
  weights are not at hand (checkpoint workdir / npz missing) and random LPIPS weights where
  the distance or the discriminator needs them and none are given.  Returns (config, notes)."""
  from ctm_jax.nets import lpips
  cfg = copy.deepcopy(config)
  cfg.unlock()
  notes = []
  cfg.training.batch_size = int(batch)
  if "teacher" in cfg:
    tc = cfg.teacher
    where = {"checkpoint": tc.workdir, "torch_npz": tc.npz_path}.get(tc.source,
                                                                       tc.get("path", ""))
    missing = ((tc.source == "checkpoint" and not (where and fileio.isdir(where)))
               or (tc.source in ("torch_npz", "edm_pkl", "torch_pt")
                   and not (where and fileio.isfile(where))))
    if missing:
      notes.append(f"teacher: random weights (no {tc.source} at {where!r})")
      tc.source = "random"
  if cfg.method == "ctm":
    needs = []
    if cfg.ctm.distance == "lpips":
      needs.append("ctm.lpips_weights")
    if cfg.gan.enabled and cfg.gan.discriminator == "projected":
      needs.append("gan.feature_weights")
    for field in needs:
      sec, name = field.split(".")
      if not (cfg[sec][name] and fileio.isfile(cfg[sec][name])):
        path = fileio.join(scratch_dir, "lpips_random.npz")
        if not fileio.isfile(path):
          lpips.random_lpips_npz(path, seed=0)
        cfg[sec][name] = path
        notes.append(f"{field}: random VGG16 weights")
  cfg.lock()
  return cfg, notes


def network_calls(config, k: int) -> Dict[str, int]:
  """How many network evaluations of each kind one step makes at k teacher steps, counted
  in evaluations of the step's batch B (what the per-call timings are measured on).

  EDM: one student forward + backward.  CTM (METHODS.md section 3): the target's two student
  forwards (inner jump with theta, outer map with theta^-), the estimate's two forward +
  backward passes (the outer map's backward is w.r.t. its input only, so this count is an
  upper bound), one more for DSM (traced as one call on 2B examples with the estimate's inner
  map: ctm.py student_pass; counted here as the two evaluations of B it costs), and 2 teacher
  calls per Heun step (k steps; the corrector is skipped only for a step to sigma = 0, which
  the CTM grid never takes).  The GAN's discriminator and the LPIPS network are not counted."""
  if config.method == "edm":
    return {"student_forward_backward": 1}
  if config.method in JVP_METHODS:
    # MeanFlow: u and du/dt by one JVP (its primal output is also the forward whose backward
    # is taken: counted once more here, an upper bound).  sCM: (F_{theta^-}, dF/dt) by one JVP,
    # F_theta forward + backward; sCD one teacher call for dx_t/dt.
    calls = {"student_jvp": 1, "student_forward_backward": 1}
    if config.method == "scd":
      calls["teacher_forward"] = 1
    return calls
  fb = 2 + (0 if config.ctm.dsm_weight_mode == "off" else 1)
  return {"student_forward": 2, "student_forward_backward": fb, "teacher_forward_in_loop": 2 * k}


def check_ks(config, ks: Sequence[int]):
  if config.method != "ctm":
    return
  bad = [k for k in ks if not 1 <= k <= config.ctm.max_k]
  if bad:
    raise config_lib.ConfigError(f"--k: {bad} outside 1..config.ctm.max_k = {config.ctm.max_k}")


# ----------------------------------------------------------------------------- one variant

def _memory(compiled) -> Dict[str, int]:
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


class Variant:
  """One config's step and network calls, compiled (what `measure` times)."""

  def __init__(self, name: str, config, example_batch, compile_only: bool = False,
               step_kind: str = ""):
    """compile_only: lower and compile the step on abstract arguments (nothing allocated for
    the state, the frozen networks or the batch; no network calls): compile time, FLOPs,
    memory and collectives only.  step_kind: which of the method's steps ('' = the first)."""
    self.name, self.config = name, config
    self.exp = exp = train.Experiment(config)
    self.method = exp.method
    self.kind = step_kind or exp.method.step_kinds[0]
    if self.kind not in exp.method.step_kinds:
      raise config_lib.ConfigError(f"--step_kind={step_kind!r}: this {config.method} config's "
                                   f"steps are {list(exp.method.step_kinds)}")
    self.takes_k = self.kind in exp.method.k_step_kinds
    if compile_only:
      self.state = exp.restore_target()
      self.frozen, fns = exp.abstract_step_functions(forced_k=True)
      self.batch = exp.abstract_batch(int(example_batch["x"].shape[0]))
    else:
      self.state = exp.init_state()
      self.frozen, fns = exp.step_functions(forced_k=True)
      self.batch = parallel.global_batch(example_batch, exp.mesh)
    step_args = (self.state, self.batch, self.frozen) + ((jnp.int32(1),) if self.takes_k else ())
    t0 = time.perf_counter()
    lowered = fns[self.kind].lower(*step_args)
    t1 = time.perf_counter()
    self.step = lowered.compile()
    t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.step_flops_xla = _flops(self.step)
    self.memory = _memory(self.step)
    self.collectives = lowering.summarize(lowering.collectives(self.step.as_text()))
    self.state_bytes = lowering.tree_bytes(self.state)
    self.frozen_bytes = lowering.tree_bytes(self.frozen)
    self.calls, self.call_flops = {}, {}
    if not compile_only:
      self._build_calls()

  def _build_calls(self):
    """The network evaluations the step makes, each jitted alone on this batch."""
    model, cfg = self.exp.model, self.config
    x = self.batch["x"]
    b = x.shape[0]
    labels = self.method.labels(self.batch)
    t = jnp.full((b,), 2.0, jnp.float32)
    s = jnp.full((b,), 0.5, jnp.float32) if model.uses_s else None
    key = jax.random.PRNGKey(1)

    def student(params, x):
      return model.denoiser(params, x, t, s, labels, train=True, rng=key)

    def fwd_bwd(params, x):
      return jax.grad(lambda p: jnp.sum(student(p, x)))(params)

    def jvp(params, x):     # forward mode along (x, t): the tangent of a JVP step
      return jax.jvp(lambda xx, tt: model.denoiser(params, xx, tt, s, labels, train=True, rng=key),
                     (x, t), (x, jnp.ones_like(t)))

    params = jax.tree_util.tree_map(jnp.copy, self.state.params)   # the step donates its own
    calls = {"student_forward": (jax.jit(student), (params, x)),
             "student_forward_backward": (jax.jit(fwd_bwd), (params, x))}
    if cfg.method in JVP_METHODS:
      calls["student_jvp"] = (jax.jit(jvp), (params, x))
    teacher = getattr(self.method, "teacher", None)
    if teacher is not None:
      tp = self.frozen["teacher"]
      den = lambda p, y: teacher.denoise(p, y, t, labels)

      def in_loop(p, y, n):
        return jax.lax.fori_loop(0, n, lambda i, z: den(p, z), y)
      calls["teacher_forward"] = (jax.jit(den), (tp, x))
      calls["teacher_forward_in_loop"] = (jax.jit(in_loop), (tp, x, jnp.int32(LOOP_CALLS)))
    self.calls, self.call_flops = {}, {}
    for name, (fn, args) in calls.items():
      compiled = fn.lower(*args).compile()
      flops = _flops(compiled)
      self.calls[name] = (compiled, args)
      self.call_flops[name] = flops
    if "teacher_forward" in self.call_flops:
      # XLA counts the loop body once: the loop's count is one call's.
      self.call_flops["teacher_forward_in_loop"] = self.call_flops["teacher_forward"]

  def run_step(self, k: Optional[int]) -> float:
    args = (self.state, self.batch, self.frozen) + ((jnp.int32(k),) if self.takes_k else ())
    (self.state, _), dt = _timed(self.step, *args)
    return dt

  def run_call(self, name: str) -> float:
    fn, args = self.calls[name]
    _, dt = _timed(fn, *args)
    return dt / (LOOP_CALLS if name == "teacher_forward_in_loop" else 1)

  def step_flops(self, k: int) -> float:
    """XLA's count with the loop body counted once, plus (k - 1) more bodies of 2 teacher
    calls (CTM); EDM: XLA's count."""
    if not self.takes_k:
      return self.step_flops_xla
    return self.step_flops_xla + (k - 1) * 2 * self.call_flops.get("teacher_forward", 0.0)


def _stats(times_s: List[float]) -> Dict[str, Any]:
  ms = [1e3 * v for v in times_s]
  return {"median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": ms}


def example_batch(config, batch: int, seed: int = 0) -> Dict[str, np.ndarray]:
  from ctm_jax import data
  info = data.dataset_info(config.data.dataset)
  rng = np.random.default_rng(seed)
  out = {"x": rng.uniform(-1, 1, (batch,) + tuple(info.shape)).astype(np.float32)}
  if config.data.class_conditional:
    out["label"] = rng.integers(0, info.num_classes, batch).astype(np.int32)
  return out


# ----------------------------------------------------------------------------- measuring

def measure(configs: Dict[str, Any], ks: Sequence[int], repeats: int = 3, batch: int = 8,
            warmup: int = 1, log=None, compile_only: bool = False,
            step_kind: str = "") -> Dict[str, Any]:
  """Benchmark each named config (e.g. {'float32': cfg, 'bfloat16': cfg16}) at global batch
  `batch` and k in ks, interleaved; returns the JSON-able results (module docstring).
  compile_only: no timings (repeats = 0): compile time, FLOPs, memory and collectives of the
  step.  step_kind: which of the method's steps ('' = its first: 'ctm', 'train', ...)."""
  if compile_only:
    repeats, warmup = 0, 0
  log = log or (lambda msg: None)
  ks = [int(k) for k in ks]
  variants, notes = {}, {}
  with tempfile.TemporaryDirectory(prefix="ctm_bench_") as scratch:
    for name, config in configs.items():
      cfg, notes[name] = bench_config(config, batch, scratch)
      train.validate_config(cfg, num_devices=jax.device_count(), process_count=jax.process_count())
      check_ks(cfg, ks)
      log(f"[{name}] building and compiling the {cfg.method} step at batch {batch}")
      variants[name] = Variant(name, cfg, example_batch(cfg, batch, cfg.seed), compile_only,
                               step_kind)
      log(f"[{name}] compiled in {variants[name].compile_s:.1f} s "
          f"(lowering {variants[name].lower_s:.1f} s)")
  step_ks = {n: (ks if v.takes_k else [None]) for n, v in variants.items()}
  times = {n: {"step": {str(k): [] for k in step_ks[n]}, "calls": {c: [] for c in v.calls}}
           for n, v in variants.items()}
  for r in range(warmup + repeats):
    for n, v in variants.items():
      for c in v.calls:
        dt = v.run_call(c)
        if r >= warmup:
          times[n]["calls"][c].append(dt)
      for k in step_ks[n]:
        dt = v.run_step(k)
        if r >= warmup:
          times[n]["step"][str(k)].append(dt)
          log(f"[{n}] repeat {r - warmup + 1}/{repeats} step k={k}: {1e3 * dt:,.0f} ms")
  results = {}
  for n, v in variants.items():
    calls = {c: _stats(ts) for c, ts in times[n]["calls"].items()}
    steps, expected, ratio, flops, flops_s = {}, {}, {}, {}, {}
    for k in step_ks[n]:
      key = str(k)
      if v.calls:      # the teacher's count is known from its own compile
        flops[key] = v.step_flops(k or 0)
      if not times[n]["step"][key]:
        continue       # compile_only
      steps[key] = _stats(times[n]["step"][key])
      counts = network_calls(v.config, k or 0)
      expected[key] = sum(cnt * calls[c]["median_ms"] for c, cnt in counts.items())
      ratio[key] = steps[key]["median_ms"] / expected[key]
      flops_s[key] = flops[key] * v.exp.mesh.size / (steps[key]["median_ms"] / 1e3)
    results[n] = {
        "method": v.config.method, "compute_dtype": v.config.training.compute_dtype,
        "remat": v.config.model.get("remat", "none"),
        "notes": notes[n], "step_kind": v.kind,
        "params_student": int(sum(np.prod(x.shape) for x in
                                  jax.tree_util.tree_leaves(v.state.params))),
        "params_teacher": int(sum(np.prod(x.shape) for x in
                                  jax.tree_util.tree_leaves(v.frozen.get("teacher", {})))),
        "lower_s": v.lower_s, "compile_s": v.compile_s,
        "network_calls_ms": calls, "network_call_flops": v.call_flops,
        "network_calls_per_step": {str(k): network_calls(v.config, k or 0) for k in step_ks[n]},
        "step_ms": steps, "sum_of_network_calls_ms": expected, "step_over_calls": ratio,
        "step_flops": flops, "step_flops_xla": v.step_flops_xla, "step_flops_per_s": flops_s,
        "mesh_devices": int(v.exp.mesh.size),
        "mesh": {ax: int(n) for ax, n in v.exp.mesh.shape.items()},
        "memory": v.memory, "state_bytes": v.state_bytes, "frozen_bytes": v.frozen_bytes,
        "gradient_bytes": lowering.tree_bytes(v.state.params), "collectives": v.collectives,
    }
  return {
      "batch": int(batch), "ks": ks, "repeats": int(repeats), "warmup": int(warmup),
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(), "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_peak_rss_bytes": host_peak_rss_bytes(),
      "variants": results,
  }


def host_peak_rss_bytes() -> int:
  """Peak resident memory of this process (getrusage; kilobytes on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


# ----------------------------------------------------------------------------- table

def _gib(v):
  return f"{v / 2**30:.2f} GiB"


def table(results: Dict[str, Any]) -> str:
  """The results as a text table: one row per quantity, one column per variant."""
  names = list(results["variants"])
  rows = []
  vs = results["variants"]
  first = vs[names[0]]
  union = lambda field: list(dict.fromkeys(c for n in names for c in vs[n][field]))
  for c in union("network_calls_ms"):
    rows.append((c.replace("_", " ") + " (ms)",
                 [f"{vs[n]['network_calls_ms'][c]['median_ms']:,.1f}"
                  if c in vs[n]["network_calls_ms"] else "-" for n in names]))
  cell = lambda n, field, k, fmt: fmt(vs[n][field][k]) if k in vs[n][field] else "-"
  for k in union("step_ms"):       # k = 'None': a step without a teacher-step count
    label = "step" + (f" k={k}" if k != "None" else "")
    rows.append((label + " (ms)", [cell(n, "step_ms", k, lambda v: f"{v['median_ms']:,.1f}")
                                   for n in names]))
    rows.append((label + " / sum of its network calls",
                 [cell(n, "step_over_calls", k, lambda v: f"{v:.2f}") for n in names]))
    rows.append((label + " GFLOP/s", [cell(n, "step_flops_per_s", k, lambda v: f"{v / 1e9:.1f}")
                                      for n in names]))
  rows.append(("XLA step FLOPs per device (loop once)",
               [f"{vs[n]['step_flops_xla'] / 1e9:.1f} G" for n in names]))
  rows.append(("peak memory per device (XLA)", [_gib(vs[n]["memory"]["peak_bytes"]) for n in names]))
  rows.append(("  of which temporaries", [_gib(vs[n]["memory"]["temp_bytes"]) for n in names]))
  rows.append(("  arguments / outputs", [f"{_gib(vs[n]['memory']['argument_bytes'])} / "
                                         f"{_gib(vs[n]['memory']['output_bytes'])}" for n in names]))
  rows.append(("network remat", [vs[n].get("remat", "none") for n in names]))
  rows.append(("mesh (data x fsdp)", ["{data} x {fsdp}".format(**vs[n]["mesh"]) for n in names]))
  rows.append(("gradient (MiB)", [f"{vs[n]['gradient_bytes'] / 2**20:,.1f}" for n in names]))
  kinds = sorted({k for n in names for k in vs[n]["collectives"]})
  for k in kinds:
    rows.append((f"{k}s per device: count, MiB", [
        "{count}, {mib:,.1f}".format(count=vs[n]["collectives"][k]["count"],
                                     mib=vs[n]["collectives"][k]["bytes"] / 2**20)
        if k in vs[n]["collectives"] else "0" for n in names]))
  rows.append(("compile (s)", [f"{vs[n]['compile_s']:.1f}" for n in names]))
  rows.append(("lowering (s)", [f"{vs[n]['lower_s']:.1f}" for n in names]))
  w0 = max(len(r[0]) for r in rows)
  ws = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
  head = " " * w0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, ws))
  lines = [head] + [r[0].ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(r[1], ws))
                    for r in rows]
  lines.append(f"state {_gib(first['state_bytes'])}, frozen {_gib(first['frozen_bytes'])}")
  lines.append(f"host peak RSS: {_gib(results['host_peak_rss_bytes'])}; batch {results['batch']}, "
               f"{results['repeats']} repeats (medians), {results['backend']} x "
               f"{results['device_count']} ({results['device_kind']})")
  return "\n".join(lines)
