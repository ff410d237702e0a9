"""The evaluation settings (config.eval): merging and validation, before any compute.

Precedence: the defaults (configs/base.py eval_block) < the run's own config.eval (stored in
its config.json; runs saved before the block existed have none) < command-line overrides.
Every check raises ctm_jax.config_lib.ConfigError naming config.eval.FIELD and what it accepts.
"""
from __future__ import annotations

import difflib
from typing import Dict, List, Optional, Sequence

import ml_collections
import numpy as np

from ctm_jax import config_lib, data, evaluate, fileio, methods, runs, samplers
from ctm_jax.evaljob import report
from ctm_jax.evaljob.common import ODE_METRICS, check_metrics, metrics_for, split_list

MODES = ("sample", "fid", "nll", "fid_stats", "all")
FEATURE_DIM = 2048                     # ctm_jax.nets.inception.FEATURE_DIM (pool3)
INCEPTION_FILE = "workdirs/inception_fid.npz"     # where the recipe in the errors writes it
# config.eval.num_samples = 0: 50k on the data sets whose FIDs papers report (FID at 10k sits
# about 2 points above FID at 50k on CIFAR-10), 10k elsewhere.
PAPER_FID_DATASETS = ("cifar10", "imagenet64")
PAPER_FID_SAMPLES, OTHER_FID_SAMPLES = 50_000, 10_000
# config.eval.uint8_rule = '': how each method's reference code turns samples into uint8:
# EDM's generate.py rounds (x 127.5 + 128, clip, cast), diffusers (TCD) rounds; CTM, CM and
# score_sde truncate ((x + 1) 127.5, cast).
ROUNDING_METHODS = ("edm", "tcd")


def merge_eval(defaults: ml_collections.ConfigDict, run_config, overrides: Dict,
               dataset: Optional[str] = None) -> ml_collections.ConfigDict:
  """defaults < run_config.eval < overrides ({'eval.FIELD': value} or {'FIELD': value}); then
  num_samples = 0 becomes the count for the data set (dataset, else run_config's)."""
  ev = ml_collections.ConfigDict(defaults.to_dict())
  stored = run_config.get("eval") if run_config is not None else None
  for k, v in (stored.items() if stored is not None else ()):
    if k in ev:
      ev[k] = type(ev[k])(v) if isinstance(ev[k], float) and isinstance(v, int) else v
  for k, v in overrides.items():
    k = k[len("eval."):] if k.startswith("eval.") else k
    if k not in ev:
      raise config_lib.ConfigError(unknown_field_message(k, ev.keys()))
    ev[k] = v
  dataset = dataset or (run_config.data.dataset if run_config is not None else None)
  if ev.num_samples == 0 and dataset is not None:
    ev.num_samples = PAPER_FID_SAMPLES if dataset in PAPER_FID_DATASETS else OTHER_FID_SAMPLES
  return ev


def uint8_rule(ev, config) -> str:
  """config.eval.uint8_rule, '' = the rule of the method's reference code (samplers.to_uint8):
  'round' for EDM-family runs (edm, tcd), 'truncate' for the others (CTM, CM)."""
  return ev.uint8_rule or ("round" if config.method in ROUNDING_METHODS else "truncate")


def unknown_field_message(name: str, known: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, list(known), n=1)
  hint = f"; did you mean config.eval.{close[0]}?" if close else ""
  return f"unknown field config.eval.{name}{hint} (fields: {', '.join(sorted(known))})"


def check_override_names(argv: Sequence[str], defaults) -> None:
  """Refuse --config.eval.X flags whose X is not a field, with the closest name."""
  for arg in argv:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      parts = path.split(".")
      if parts[0] != "eval" or len(parts) != 2:
        raise config_lib.ConfigError(f"{arg.split('=', 1)[0]}: only config.eval.FIELD can be "
                                     f"set here (the run's own config is fixed)")
      if parts[1] not in defaults:
        raise config_lib.ConfigError(unknown_field_message(parts[1], defaults.keys()))


def default_samplers(config) -> str:
  if config.method == "ctm":
    return "onestep,gamma:0:2"
  if config.method == "tcd":
    return f"onestep,sss:{config.tcd.sample_gamma:g}:2"
  if evaluate.generator_kind(config) == "cm_f":
    times = tuple(config[config.method].get("sample_times", ()))   # the reference's times
    return (f"onestep,cm:{len(times) + 1}:{','.join(f'{t:.6g}' for t in times)}" if times
            else "onestep,cm:2")
  return f"heun:{config.sampling.heun_steps}"


def sampler_specs(ev, config) -> List[evaluate.SamplerSpec]:
  """The parsed, run-checked sampler list of config.eval.samplers."""
  specs = []
  for s in split_list(ev.samplers or default_samplers(config)):
    try:
      spec = evaluate.parse_sampler(s)
      evaluate.check_sampler_for_run(spec, config)
    except evaluate.SamplerSpecError as e:
      raise config_lib.ConfigError(f"config.eval.samplers: {e}") from None
    specs.append(spec)
  if len({s.name for s in specs}) != len(specs):
    raise config_lib.ConfigError(f"config.eval.samplers lists a sampler twice: {ev.samplers!r}")
  return specs


def checkpoint_steps(ev, workdir: str) -> List[int]:
  """config.eval.checkpoints: 'latest', 'all' or a comma list of steps that exist."""
  have = runs.checkpoint_steps(workdir)
  if not have:
    raise runs.NotARunError(f"{workdir!r} has no finished checkpoint (checkpoints/<step>/)")
  spec = str(ev.checkpoints).strip()
  if spec == "latest":
    return [have[-1]]
  if spec == "all":
    return have
  try:
    steps = [int(v) for v in split_list(spec)]
  except ValueError:
    raise config_lib.ConfigError(f"config.eval.checkpoints must be 'latest', 'all' or a comma "
                                 f"list of steps, got {spec!r}") from None
  missing = [s for s in steps if s not in have]
  if missing or not steps:
    raise config_lib.ConfigError(f"config.eval.checkpoints: steps {missing or spec!r} are not "
                                 f"checkpoints of this run; it has {have}")
  return steps


def ema_list(ev, config) -> List[str]:
  """config.eval.ema: '' (sampling.eval_ema or the first), 'all', 'params' or a comma list."""
  names = runs.ema_names(config)
  spec = str(ev.ema).strip()
  if spec == "all":
    return names
  chosen = split_list(spec) or [runs.choose_ema(config, None, "config.sampling.eval_ema")]
  for name in chosen:
    runs.choose_ema(config, name, "config.eval.ema")
  return chosen


def default_stats_path(config, ev, workdir: str) -> str:
  """<workdir>/eval/fid_stats/<dataset>-<fid_split>.npz: the run's own reference statistics."""
  name = config.data.dataset.replace("/", "_")
  return fileio.join(report.eval_dir(workdir), "fid_stats", f"{name}-{ev.fid_split}.npz")


def stats_path(config, ev, workdir: str) -> str:
  """config.eval.ref_stats, '' meaning default_stats_path (inside the run's folder)."""
  return ev.ref_stats or default_stats_path(config, ev, workdir)


def needs_fid(mode: str) -> bool:
  return mode in ("fid", "fid_stats", "all")


def needs_nll(mode: str) -> bool:
  return mode in ("nll", "all")


def validate(ev, config, *, mode: str, num_devices: int, process_count: int,
             workdir: str = "") -> None:
  """Every eval field and its fit to the run (in workdir) and the mode; nothing is computed."""
  c = ml_collections.ConfigDict({"eval": ev.to_dict()})
  if mode not in MODES:
    raise config_lib.ConfigError(f"--mode must be one of {MODES}, got {mode!r}")
  info = data.dataset_info(config.data.dataset)
  shard = config_lib.check_number(c, "eval.shard_size", 1, integer=True)
  if mode != "nll":        # the sampling / feature batch; --mode=nll has its own below
    bs = config_lib.check_number(c, "eval.batch_size", 1, integer=True)
    if bs % num_devices:
      raise config_lib.ConfigError(f"config.eval.batch_size = {bs} must be divisible by the "
                                   f"device count {num_devices}")
    if bs % process_count:
      raise config_lib.ConfigError(f"config.eval.batch_size = {bs} must be divisible by the "
                                   f"process count {process_count}")
    if shard % bs:
      raise config_lib.ConfigError(f"config.eval.shard_size = {shard} must be a multiple of "
                                   f"config.eval.batch_size = {bs}")
  # FID needs 2 samples for a covariance; KID two blocks of 2 (ctm_jax.metrics.fid.kid).
  config_lib.check_number(c, "eval.num_samples", 4 if needs_fid(mode) else 1, integer=True)
  config_lib.check_number(c, "eval.seed", 0, integer=True)
  config_lib.check_choice(c, "eval.uint8_rule", ("",) + samplers.UINT8_RULES)
  ncls = info.num_classes if config.data.class_conditional else 0
  config_lib.check_number(c, "eval.class_label", -1, max(ncls - 1, -1), integer=True)
  config_lib.check_number(c, "eval.kid_subsets", 1, integer=True)
  config_lib.check_number(c, "eval.kid_subset_size", 2, integer=True)
  config_lib.check_number(c, "eval.reference_seeds", 1, integer=True)
  config_lib.check_number(c, "eval.ode_error_samples", 1, integer=True)
  for f in ("recompute", "inception_score", "precision_recall", "sfid"):
    if not isinstance(ev[f], bool):
      raise config_lib.ConfigError(f"config.eval.{f} must be True or False, got {ev[f]!r}")
  splits = ("train", info.eval_split)
  config_lib.check_choice(c, "eval.fid_split", splits + (f"train+{info.eval_split}",))
  config_lib.check_choice(c, "eval.nll_split", ("",) + splits)
  ema_list(ev, config)
  if mode in ("sample", "fid", "all"):
    sampler_specs(ev, config)
  if needs_fid(mode):
    if info.kind != "image":
      raise config_lib.ConfigError(
          f"--mode={mode} needs an image data set; {config.data.dataset!r} holds 2-D points "
          f"(--mode=sample reports MMD / sliced W1 for them)")
    check_inception_file(ev)
  if mode in ("fid", "all"):
    check_reference_stats(stats_path(config, ev, workdir), config, ev)
  if needs_nll(mode):
    if not methods.method_class(config.method).has_score_head:
      raise config_lib.ConfigError(
          f"--mode={mode}: the NLL integrates the PF-ODE of the score head g(x, t, t); this "
          f"{config.method!r} run has none")
    config_lib.check_number(c, "eval.nll_num_examples", 0, integer=True)
    nb = config_lib.check_number(c, "eval.nll_batch_size", 1, integer=True)
    if nb % num_devices or nb % process_count:
      raise config_lib.ConfigError(f"config.eval.nll_batch_size = {nb} must be divisible by the "
                                   f"device count {num_devices} and the process count "
                                   f"{process_count}")
    if shard % nb:
      raise config_lib.ConfigError(f"config.eval.shard_size = {shard} must be a multiple of "
                                   f"config.eval.nll_batch_size = {nb}")
    from ctm_jax.metrics import likelihood
    config_lib.check_choice(c, "eval.nll_protocol", tuple(likelihood.PROTOCOLS))
    if info.kind != "image" and ev.nll_protocol != "dequantized":
      raise config_lib.ConfigError(
          f"config.eval.nll_protocol = {ev.nll_protocol!r}: the protocols are for 8-bit images; "
          f"{config.data.dataset!r} holds 2-D points (leave it at 'dequantized')")
    check_metrics(ev, info)
    config_lib.check_choice(c, "eval.nll_divergence", likelihood.DIVERGENCES)
    dim = int(np.prod(info.shape))
    uses_ode = any(m in ODE_METRICS for m in metrics_for(ev, info))
    if uses_ode and ev.nll_divergence == "exact" and dim > likelihood.EXACT_MAX_DIM:
      raise config_lib.ConfigError(
          f"config.eval.nll_divergence = 'exact' builds a {dim} x {dim} jacobian per example; "
          f"it is accepted up to {likelihood.EXACT_MAX_DIM} dimensions: use 'hutchinson'")
    config_lib.check_number(c, "eval.nll_probes", 1, integer=True)
    config_lib.check_choice(c, "eval.nll_solver", likelihood.SOLVERS)
    config_lib.check_number(c, "eval.nll_rtol", 0, lo_open=True)
    config_lib.check_number(c, "eval.nll_atol", 0, lo_open=True)
    config_lib.check_number(c, "eval.nll_max_steps", 1, integer=True)
    config_lib.check_number(c, "eval.nll_elbo_samples", 1, integer=True)
    config_lib.check_choice(c, "eval.nll_elbo_form", likelihood.ELBO_FORMS)


def check_inception_file(ev) -> None:
  from ctm_jax.nets import inception
  path = ev.inception_weights
  make = (f"make it once with `{inception.CONVERT_COMMAND.format(out=INCEPTION_FILE)}` and "
          f"pass --config.eval.inception_weights={INCEPTION_FILE} (docs/evaluation.md, "
          f"'Weights')")
  if not path:
    raise config_lib.ConfigError(
        f"config.eval.inception_weights must name the FID Inception-v3 weights .npz: {make}")
  if not fileio.isfile(path):
    raise config_lib.ConfigError(f"config.eval.inception_weights = {path!r}: no such file; "
                                 f"{make}")
  if ev.inception_score:
    from ctm_jax.nets import inception
    try:
      inception.load_logits_weight(path)
    except inception.InceptionWeightsError as e:
      raise config_lib.ConfigError(f"config.eval.inception_score = True: {e}") from None


def check_reference_stats(path: str, config, ev, stats: Optional[dict] = None) -> dict:
  """Load the FID reference statistics and check that they fit the run: 2048 features, and
  (when their meta records them) the same data set and resolution."""
  field = "config.eval.ref_stats" if ev.ref_stats else "the default config.eval.ref_stats"
  if stats is None:
    if not fileio.isfile(path):
      raise config_lib.ConfigError(
          f"{field} = {path!r}: no such file; make it with --mode=fid_stats (or pass EDM's "
          f"reference .npz as --config.eval.ref_stats=PATH)")
    from ctm_jax.metrics import fid
    try:
      stats = fid.load_stats(path, feature_dim=None)   # the width is checked below
    except (ValueError, KeyError, OSError) as e:
      raise config_lib.ConfigError(f"{field} = {path!r} is not FID statistics: {e}") from None
  mu = stats["mu"]
  if ev.precision_recall and stats.get("features") is None and stats.get("images") is None:
    raise config_lib.ConfigError(
        f"config.eval.precision_recall = True needs the reference features or images; {field} "
        f"= {path!r} holds neither (make it with --mode=fid_stats, or pass a guided-diffusion "
        f"reference batch, which holds its images as arr_0)")
  if ev.sfid:
    from ctm_jax.metrics import guided_eval
    if stats.get("mu_s") is None:
      raise config_lib.ConfigError(
          f"config.eval.sfid = True needs sFID statistics (mu_s, sigma_s); {field} = {path!r} "
          f"has none (a guided-diffusion reference batch holds them; or make them with "
          f"--mode=fid_stats --config.eval.sfid=True)")
    if stats["mu_s"].shape != (guided_eval.SPATIAL_DIM,):
      raise config_lib.ConfigError(
          f"{field} = {path!r} holds {stats['mu_s'].shape[-1]}-d sFID statistics; the network "
          f"gives {guided_eval.SPATIAL_DIM}-d spatial features")
  if mu.shape != (FEATURE_DIM,) or stats["sigma"].shape != (FEATURE_DIM, FEATURE_DIM):
    raise config_lib.ConfigError(f"{field} = {path!r} holds {mu.shape[-1]}-d statistics; the "
                                 f"FID network gives {FEATURE_DIM}-d features")
  meta = stats.get("meta") or {}
  info = data.dataset_info(config.data.dataset)
  if meta.get("dataset") not in (None, config.data.dataset):
    raise config_lib.ConfigError(f"{field} = {path!r} was computed on {meta['dataset']!r}, "
                                 f"this run's data set is {config.data.dataset!r}")
  res = meta.get("resolution")
  if res is not None and list(res) != list(info.shape):
    raise config_lib.ConfigError(f"{field} = {path!r} is of {tuple(res)} images; this run "
                                 f"makes {tuple(info.shape)}")
  return stats
