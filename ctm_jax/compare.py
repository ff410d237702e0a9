"""The few-step family side by side (issue 10): CTM, CD, CT, iCT, Direct CD, TCD, MeanFlow, sCT
and sCD trained from ONE teacher in the same loop, evaluated by the evaluation jobs
(ctm_jax.evaljob), and one table (markdown + JSON) and plots.

Per method and seed: the ODE error E = mean |one-step map(x_T) - x_exact|^2 / dim against the
teacher's PF-ODE solution from the same x_T (Vouitsis et al. 2024: the exact mixture ODE on
toy_gmm; the teacher network's ODE solved by scipy's DOP853 on images), sample quality at each
NFE (2-D: MMD / sliced W1 and the cross-entropy gap E_model[-log p] - E_data[-log p] under the
exact mixture density; images: FID / KID), and the training cost per step.

Layout under config.workdir:
  runs/<method>-s<seed>/          a normal ctm-jax run; its eval/ holds the evaluation jobs'
                                  shards and result files
  ode_error/<seed>-<hash>.npz     images: the teacher's exact solutions (shared by the methods)
  table.md, table.json, plots/*.png
A re-run skips finished trainings (a checkpoint at num_train_steps) and finished evaluations
(the jobs' result files; the cached ODE references).
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ctm_jax import config_lib, evaluate, fileio, progress, runs, samplers

# An entry is configs/<prefix>_<entry>.py; tcd_s is TCD with CTM's s-input network (tcd.s_input).
FAMILY = ("ctm", "cd", "ct", "ict", "direct_cd", "tcd", "tcd_s", "meanflow", "sct", "scd")
MODES = ("sample", "fid")


# ----------------------------------------------------------------------------- the plan

def run_config(cmp, method: str, seed: int) -> ml_collections.ConfigDict:
  """The method's config file (config.run_configs[method], FILE.py or FILE.py:arg, loaded as
  launch.train loads --config) with the comparison's overrides, steps, seed and teacher."""
  c = config_lib.load_config_file(cmp.run_configs[method], f"config.run_configs.{method}")
  c.unlock()
  fields = flatten(cmp.overrides)
  fields.update(flatten(cmp.method_overrides.get(method, {})))
  fields.update({"seed": int(seed), "training.num_train_steps": int(cmp.num_train_steps)})
  if "teacher" in c and cmp.teacher_workdir:
    fields["teacher.workdir"] = cmp.teacher_workdir
  for name, value in fields.items():
    _set_dotted(c, name, value, method)
  c.lock()
  return c


def flatten(tree, prefix: str = "") -> Dict[str, Any]:
  """Nested dicts / ConfigDicts -> {'a.b.c': leaf}."""
  out = {}
  for k, v in (tree or {}).items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _set_dotted(c, name: str, value, method: str):
  node, parts = c, name.split(".")
  for p in parts[:-1]:
    if p not in node:
      raise config_lib.ConfigError(f"config override {name!r} (for {method}): the run config "
                                   f"has no field {p!r}")
    node = node[p]
  if parts[-1] not in node:
    raise config_lib.ConfigError(f"config override {name!r} (for {method}): the run config has "
                                 f"no field {parts[-1]!r}; it has {sorted(node.keys())}")
  node[parts[-1]] = value


def samplers_of(cmp, method: str) -> List[Tuple[str, int, str]]:
  """(label, nfe, sampler spec) for each NFE and each template of config.samplers[method]
  ('{n}' is the NFE; at NFE 1 every template is the one-step map 'onestep')."""
  out, seen = [], set()
  for template in str(cmp.samplers[method]).split(","):
    template = template.strip()
    label = template.replace(":{n}", "").replace("{n}", "").replace(":", "")
    for n in cmp.nfes:
      spec = "onestep" if n == 1 else template.replace("{n}", str(n))
      if spec not in seen:
        seen.add(spec)
        out.append((label, int(n), spec))
  return out


def sampler_labels(cmp, method: str) -> List[str]:
  """The method's sampler families (one table row each), in config order."""
  return list(dict.fromkeys(label for label, _, _ in samplers_of(cmp, method)))


def eval_settings(cmp, config, method: str):
  """The merged config.eval of one run (comparison entry `method`) for the comparison (the run config's eval block <
  config.eval); the evaluation seed is the run's seed."""
  from ctm_jax.evaljob import settings
  over = dict(cmp.eval)
  over["seed"] = int(config.seed)
  over["samplers"] = ",".join(s for _, _, s in samplers_of(cmp, method))
  return settings.merge_eval(config.eval, None, over, dataset=config.data.dataset)


def run_dir(cmp, method: str, seed: int) -> str:
  return fileio.join(cmp.workdir, "runs", f"{method}-s{seed}")


def validate(cmp) -> List[Tuple[str, int, ml_collections.ConfigDict, Any]]:
  """Every check before any training: the comparison's fields, each run's config (the
  training checks) and its evaluation settings (samplers against the method).  Returns the
  plan [(method, seed, run config, eval settings)]."""
  from ctm_jax import train
  from ctm_jax.evaljob import settings
  if not cmp.get("workdir"):
    raise config_lib.ConfigError("config.workdir must be set")
  methods = list(cmp.methods)
  bad = [m for m in methods if m not in FAMILY]
  if bad or not methods or len(set(methods)) != len(methods):
    raise config_lib.ConfigError(f"config.methods = {tuple(methods)}: each once, from {FAMILY}")
  missing = [m for m in methods if not cmp.run_configs.get(m)]
  if missing:
    raise config_lib.ConfigError(f"config.run_configs has no config file for {missing} "
                                 f"(method -> 'configs/FILE.py' or 'FILE.py:arg')")
  missing = [m for m in methods if m not in cmp.samplers]
  if missing:
    raise config_lib.ConfigError(f"config.samplers has no entry for {missing} (a comma list of "
                                 f"sampler templates with '{{n}}' for the NFE)")
  config_lib.check_choice(cmp, "mode", MODES)
  config_lib.check_number(cmp, "num_train_steps", 1, integer=True)
  if not cmp.seeds or any(int(s) != s or s < 0 for s in cmp.seeds):
    raise config_lib.ConfigError(f"config.seeds = {tuple(cmp.seeds)} must be integers >= 0")
  if not cmp.nfes or any(int(n) != n or n < 1 for n in cmp.nfes):
    raise config_lib.ConfigError(f"config.nfes = {tuple(cmp.nfes)} must be integers >= 1")
  dataset = _dataset(cmp, methods)
  if dataset != "toy_gmm":
    reference_config(cmp, 0)
  plan = []
  for method in methods:
    for seed in cmp.seeds:
      c = run_config(cmp, method, seed)
      train.validate_config(c, num_devices=jax.device_count(), process_count=jax.process_count())
      if c.data.dataset != dataset:
        raise config_lib.ConfigError(f"config.run_configs.{method} = "
                                     f"{cmp.run_configs[method]!r} trains on {c.data.dataset}, "
                                     f"the others on {dataset}")
      ev = eval_settings(cmp, c, method)
      try:
        settings.validate(ev, c, mode=cmp.mode, num_devices=jax.device_count(),
                          process_count=jax.process_count(),
                          workdir=run_dir(cmp, method, seed))
        settings.sampler_specs(ev, c)
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"{method}: {e}") from None
      plan.append((method, int(seed), c, ev))
  return plan


def reference_config(cmp, seed: int) -> ml_collections.ConfigDict:
  """The run config whose teacher defines E's reference on images: the first method of
  config.methods that distils (CT / iCT have no teacher; their E is measured against the same
  teacher's ODE as the others')."""
  for method in cmp.methods:
    c = run_config(cmp, method, seed)
    if "teacher" in c:
      return c
  raise config_lib.ConfigError(
      f"config.methods = {tuple(cmp.methods)}: the ODE error E on images is measured against "
      f"a teacher's PF-ODE; add a distillation method (ctm, cd, direct_cd, tcd)")


def _dataset(cmp, methods):
  return run_config(cmp, methods[0], 0).data.dataset


# ----------------------------------------------------------------------------- training

def finished(workdir: str, steps: int) -> bool:
  return bool(runs.checkpoint_steps(workdir)) and runs.checkpoint_steps(workdir)[-1] >= steps


def train_cost(workdir: str) -> Dict[str, float]:
  """Seconds per training step: 1 / the median of the logged steps_per_sec after the first
  log interval (which holds the compilation)."""
  rates = []
  path = fileio.join(workdir, "metrics.jsonl")
  if fileio.exists(path):
    from ctm_jax import metric_io
    rates = [float(r["steps_per_sec"]) for r in metric_io.read_jsonl(path)
             if "steps_per_sec" in r]
  rates = rates[1:] if len(rates) > 1 else rates
  if not rates:
    return {"sec_per_step": float("nan"), "intervals": 0}
  return {"sec_per_step": float(1.0 / np.median(rates)), "intervals": len(rates)}


def train_run(method: str, seed: int, config, workdir: str) -> Dict[str, Any]:
  from ctm_jax import train
  t0 = time.time()
  steps = config.training.num_train_steps
  if finished(workdir, steps):
    logging.info("compare: %s seed %d is trained (step %d), skipping", method, seed, steps)
    return {"trained_now": False, **train_cost(workdir)}
  logging.info("compare: training %s seed %d for %d steps in %s", method, seed, steps, workdir)
  summary = train.train_and_evaluate(config, workdir)
  # Ctrl-C / SIGTERM stops the whole comparison, also one that came during the last step
  # (the loop then finishes the run, and only summary["signal"] tells of it).
  received = summary.get("stop_reason") or summary.get("signal")
  if received:
    how = "interrupted" if summary.get("stop_reason") else "finished"
    raise KeyboardInterrupt(progress.stopped_by(
        received, f" while training {method} seed {seed} ({how} at step {summary['step']} of "
                  f"{steps}, checkpoint written)"))
  return {"trained_now": True, "train_seconds": time.time() - t0, **train_cost(workdir)}


@contextlib.contextmanager
def _ctrl_c_context(doing: str, kept: str):
  """A bare KeyboardInterrupt (Ctrl-C outside the training loop's handler, or a second
  Ctrl-C inside it) gets a message: what was being done and what is kept."""
  try:
    yield
  except KeyboardInterrupt as e:
    if str(e):
      raise
    raise KeyboardInterrupt(progress.stopped_by("SIGINT", f" while {doing} ({kept})")) from None


# ----------------------------------------------------------------------------- evaluation

def _samples(rec) -> np.ndarray:
  d = rec["samples"]
  files = [f for f in fileio.listdir(d) if f.startswith("shard_") and f.endswith(".npz")]
  return np.concatenate([fileio.load_npz(fileio.join(d, f))["x"] for f in files])


def cross_entropy_gap(x: np.ndarray, reference: np.ndarray) -> float:
  """E_model[-log p(x)] - E_data[-log p(x)] under the exact toy mixture density p: 0 for
  exact samples (up to sampling noise); > 0 for mass where p is small."""
  from ctm_jax.oracle import toy_mixture_2d
  gm = toy_mixture_2d()
  lp = lambda z: np.asarray(gm.log_prob(jnp.asarray(z, jnp.float32)), np.float64)
  return float(np.mean(-lp(x)) - np.mean(-lp(reference)))


def teacher_ode_reference(cmp, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """(x_T, x_exact): the comparison teacher's PF-ODE solution sigma_max -> sigma_min from x_T
  (scipy DOP853, rtol = atol = config.ode_rtol; the teacher of reference_config, so the same
  for every method, CT / iCT included), cached under workdir/ode_error/."""
  config = reference_config(cmp, seed)
  from ctm_jax import teacher as teacher_lib
  from ctm_jax.evaljob.shards import settings_hash
  n = int(cmp.ode_error_samples)
  sch = runs.schedule_from_config(config)
  key = settings_hash({"teacher": fileio.absolute(config.teacher.workdir), "n": n, "seed": seed,
                       "rtol": cmp.ode_rtol, "sigma": [sch.sigma_min, sch.sigma_max]})
  path = fileio.join(cmp.workdir, "ode_error", f"s{seed}-{key}.npz")
  if fileio.exists(path):
    got = fileio.load_npz(path)
    return got["x_T"], got["x_exact"]
  info_shape = runs.example_input(config).shape[1:]
  x_T = np.asarray(samplers.initial_noise(jax.random.PRNGKey(seed + 1), (n,) + info_shape,
                                          sch.sigma_max))
  teacher = teacher_lib.Teacher(config)
  params = teacher.params()
  denoise = jax.jit(lambda x, t: teacher.denoise(params, x, t, None))
  ref = evaluate.exact_ode_solution(denoise, x_T, sch.sigma_max, sch.sigma_min, cmp.ode_rtol)
  fileio.save_npz(path, x_T=x_T, x_exact=ref)
  return x_T, ref


def evaluate_run(cmp, method: str, seed: int, config, ev, workdir: str) -> List[Dict[str, Any]]:
  """Rows {method, seed, metric, value, nfe, sampler, label, num_samples} of one trained run."""
  from ctm_jax.evaljob import jobs
  summary = jobs.run(workdir, cmp.mode, ev, config, argv=["ctm_jax.compare"])
  labels = {spec: (label, nfe) for label, nfe, spec in samplers_of(cmp, method)}
  rows = []
  for r in summary["records"]:
    base = {"method": method, "seed": seed, "metric": r["metric"], "value": r["value"],
            "stderr": r.get("stderr"), "num_samples": r.get("num_samples")}
    if r["metric"] == "ode_error":
      rows.append(dict(base, nfe=1, sampler="onestep", label="", reference=r.get("reference")))
      continue
    if r.get("sampler") not in labels:
      continue
    label, nfe = labels[r["sampler"]]
    row = dict(base, nfe=nfe, sampler=r["sampler"], label=label)
    rows.append(row)
    if r["metric"] == "mmd" and config.data.dataset == "toy_gmm":
      x = _samples(r)
      ref = evaluate.reference_points(config, len(x), seed=4242)
      rows.append(dict(row, metric="xent_gap", value=cross_entropy_gap(x, ref), stderr=None))
  if config.data.dataset != "toy_gmm":
    x_T, ref = teacher_ode_reference(cmp, seed)
    params, _, _ = runs.load_params(config, workdir, None, ev.ema or None)
    model = runs.build_model(config)
    e = evaluate.ode_error(model, params, x_T, ref, evaluate.generator_kind(config))
    rows.append({"method": method, "seed": seed, "metric": "ode_error", "value": e,
                 "stderr": None, "num_samples": len(x_T), "nfe": 1, "sampler": "onestep",
                 "label": "", "reference": f"teacher PF-ODE, scipy DOP853 rtol={cmp.ode_rtol}"})
  return rows


# ----------------------------------------------------------------------------- table

QUALITY = {"sample": ("mmd", "sliced_w1", "xent_gap"), "fid": ("fid", "kid")}


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Mean and standard deviation over seeds of each (method, label, nfe, metric)."""
  groups: Dict[tuple, List[float]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["label"], r["nfe"], r["metric"]), []).append(r["value"])
  out = []
  for (m, label, nfe, metric), v in groups.items():
    v = np.asarray(v, np.float64)
    out.append({"method": m, "label": label, "nfe": nfe, "metric": metric,
                "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                "seeds": len(v)})
  return out


def _cell(agg, method, label, nfe, metric):
  for a in agg:
    if (a["method"], a["nfe"], a["metric"]) == (method, nfe, metric) and (
        nfe == 1 or a["label"] == label):
      s = f"{a['mean']:.4g}"
      return s + (f" ± {a['std']:.2g}" if a["std"] is not None else "")
  return "—"


SAME = "″"     # a cell that does not depend on the sampler: the value of the row above
SAME_NOTE = (f"{SAME} = the row above: NFE 1 is the one-step map (sampler 'onestep') whatever "
             f"the sampler, so E, the NFE-1 metrics and s/step are measured once per method.")


def markdown_table(cmp, agg, costs) -> str:
  """One row per (method, sampler family); columns: E, each metric at each NFE, s/step.

  E, NFE 1 (the one-step map for every sampler) and s/step are one measurement per method:
  its first row gives them, its other rows the mark SAME (explained under the table)."""
  metrics = QUALITY[cmp.mode]
  head = ["method", "sampler", "E (NFE 1)"]
  for n in cmp.nfes:
    head.append(f"NFE {n}: " + " / ".join(metrics))
  head.append("s/step")
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  marked = False
  for method in cmp.methods:
    c = [v["sec_per_step"] for (m, _), v in costs.items() if m == method]
    for i, label in enumerate(sampler_labels(cmp, method)):
      e = _cell(agg, method, "", 1, "ode_error")
      quality = [" / ".join(_cell(agg, method, label, n, m) for m in metrics) for n in cmp.nfes]
      cost = f"{np.mean(c):.3g}" if c else "—"
      if i > 0:                       # E, NFE 1 and s/step: the first row's
        e, cost, marked = SAME, SAME, True
        quality = [SAME if n == 1 else q for n, q in zip(cmp.nfes, quality)]
      lines.append("| " + " | ".join([method, label, e, *quality, cost]) + " |")
  return "\n".join(lines) + "\n" + (f"\n{SAME_NOTE}\n" if marked else "")


def quality_series(cmp, agg, metric: str) -> List[Tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
  """(legend label, NFEs, means, standard deviations) of each (method, sampler family) for the
  quality-against-NFE plot.  The NFE-1 point (the one-step map, shared by the method's
  samplers) belongs to the method's first family only, so it is drawn once per method."""
  out = []
  for method in cmp.methods:
    for i, label in enumerate(sampler_labels(cmp, method)):
      pts = sorted((a["nfe"], a["mean"], a["std"] or 0.0) for a in agg
                   if a["method"] == method and a["metric"] == metric
                   and ((a["nfe"] == 1 and i == 0) or (a["nfe"] != 1 and a["label"] == label)))
      if pts:
        n, m, sd = map(np.asarray, zip(*pts))
        out.append((f"{method} {label}", n, m, sd))
  return out


def plots(cmp, agg, out_dir: str) -> List[str]:
  """Sample quality against NFE (one panel per metric), and E against one-step quality."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = QUALITY[cmp.mode][:2]
  paths = []
  # One colour per method, one line style per sampler of that method.
  colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(cmp.methods)}
  styles = ("-", "--", ":", "-.")
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.6, 3.2))
  for ax, metric in zip(np.atleast_1d(axes), metrics):
    seen: Dict[str, int] = {}
    for name, n, m, sd in quality_series(cmp, agg, metric):
      method = name.split()[0]
      k = seen[method] = seen.get(method, -1) + 1
      ax.errorbar(n, m, yerr=sd, marker="o", ms=3, capsize=2, label=name,
                  color=colour.get(method), linestyle=styles[k % len(styles)])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
  np.atleast_1d(axes)[-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
  fig.tight_layout()
  p = fileio.join(out_dir, f"{cmp.name}_quality_vs_nfe.png")
  fileio.save_figure(fig, p, dpi=80)
  plt.close(fig)
  paths.append(p)
  fig, ax = plt.subplots(figsize=(4.2, 3.2))
  for method in cmp.methods:
    e = [a["mean"] for a in agg if a["method"] == method and a["metric"] == "ode_error"]
    q = [a["mean"] for a in agg if a["method"] == method and a["metric"] == metrics[0]
         and a["nfe"] == 1]
    if e and q:
      ax.scatter(e[:1], q[:1], color=colour.get(method))
      ax.annotate(method, (e[0], q[0]), fontsize=7)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("ODE error E")
  ax.set_ylabel(f"{metrics[0]} at NFE 1")
  fig.tight_layout()
  p = fileio.join(out_dir, f"{cmp.name}_ode_error_vs_quality.png")
  fileio.save_figure(fig, p, dpi=80)
  plt.close(fig)
  paths.append(p)
  return paths


# ----------------------------------------------------------------------------- driver

def run(cmp) -> Dict[str, Any]:
  """Validate everything, train what is not trained, evaluate, write the table and plots."""
  t_start = time.time()
  plan = validate(cmp)
  fileio.makedirs(cmp.workdir)
  rows, costs, timing = [], {}, {}
  for method, seed, config, _ in plan:
    with _ctrl_c_context(f"training {method} seed {seed}", "its earlier checkpoints are kept"):
      costs[(method, seed)] = train_run(method, seed, config, run_dir(cmp, method, seed))
  for method, seed, config, ev in plan:
    t0 = time.time()
    with _ctrl_c_context(f"evaluating {method} seed {seed}",
                         "the finished evaluations and sample shards are kept"):
      rows.extend(evaluate_run(cmp, method, seed, config, ev, run_dir(cmp, method, seed)))
    timing[f"eval {method}-s{seed}"] = time.time() - t0
  agg = aggregate(rows)
  table = markdown_table(cmp, agg, costs)
  pics = plots(cmp, agg, fileio.join(cmp.workdir, "plots"))
  result = {"name": cmp.name, "config": cmp.to_dict(), "rows": rows, "aggregate": agg,
            "train_cost": [{"method": m, "seed": s, **v} for (m, s), v in costs.items()],
            "eval_seconds": timing, "seconds": time.time() - t_start, "plots": pics}
  fileio.write_text(fileio.join(cmp.workdir, "table.md"), table)   # atomic: never half a table
  fileio.write_text(fileio.join(cmp.workdir, "table.json"),
                    json.dumps(result, indent=1, default=str))
  logging.info("compare: finished in %.0f s; %s", time.time() - t_start,
               fileio.join(cmp.workdir, "table.md"))
  print(table)
  return result
