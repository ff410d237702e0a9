"""What the evaluation's settings, jobs and NLL share, in one home below them: the Job, its
keys, records and result files, and the NLL quantity names (imports run settings -> common,
nll -> common, jobs -> {settings, nll, common}; nothing here imports them)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from ctm_jax import config_lib, data, fileio, parallel
from ctm_jax.evaljob import report
from ctm_jax.evaljob.shards import read_json, write_json_atomic

FeatureFn = Callable[[np.ndarray], np.ndarray]     # uint8 NHWC -> (B, 2048)
LogpFn = Callable[..., Dict[str, Any]]             # (params, x, key, labels) -> {'logp', ...}


@dataclasses.dataclass
class Job:
  workdir: str
  config: ml_collections.ConfigDict       # the run's config
  ev: ml_collections.ConfigDict           # the merged config.eval
  mode: str
  mesh: Any
  info: Any
  model: Any
  invocation: str
  records: List[dict] = dataclasses.field(default_factory=list)   # this invocation's
  files: List[str] = dataclasses.field(default_factory=list)
  feature_fn: Optional[FeatureFn] = None
  feature_id: str = ""                     # sha256 of the Inception weights
  logp_fn: Optional[LogpFn] = None
  checkpoint_file: str = ""                # an official-format state dict instead of the run's
  _teacher: Any = None
  _refs: Dict = dataclasses.field(default_factory=dict)    # 2-D references, per sampler kind
  cache: Dict = dataclasses.field(default_factory=dict)    # jitted functions built once per job

  def reference(self, name: str, fn, *args):
    """A 2-D reference computed once per invocation."""
    key = (name,) + args
    if key not in self._refs:
      self._refs[key] = fn(self.config, *args)
    return self._refs[key]

  @property
  def num_classes(self) -> int:
    return self.info.num_classes if self.config.data.class_conditional else 0


def global_batch(mesh, arr: np.ndarray):
  """A host array (the same on every process) as a batch-sharded global jax.Array."""
  sh = parallel.batch_sharding(mesh)
  return jax.make_array_from_callback(arr.shape, sh, lambda idx: arr[idx])


def batch_keys(seed: int, shard: int, batch: int):
  """fold_in(fold_in(key(seed), shard), batch): the key of batch `batch` of shard `shard`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), shard), batch)


def base_record(job: Job, spec=None, step=None, ema=None) -> dict:
  r = {"workdir": fileio.absolute(job.workdir), "invocation": job.invocation,
       "dataset": job.config.data.dataset, "method": job.config.method,
       "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
  if spec is not None:
    r.update(sampler=spec.name, kind=spec.kind, nfe=spec.nfe,
             gamma=spec.gamma if spec.kind == "gamma" else None, seed=job.ev.seed)
    if spec.kind == "teacher_heun":
      step, ema = None, "teacher"
  r.update(step=step, ema=ema)
  if job.checkpoint_file and ema != "teacher":
    r["checkpoint_file"] = fileio.absolute(job.checkpoint_file)
  return r


def finish(job: Job, result_path: str, records: List[dict], files: List[str]) -> List[dict]:
  """Write a setting's result file (its records and files), then append the records; one
  log line each, with the picture it drew (grid / picture) when there is one."""
  if jax.process_index() == 0:
    write_json_atomic(result_path, {"records": records, "files": files})
  report.append_records(job.workdir, records)
  job.records.extend(records)
  job.files.extend(files + [result_path])
  for r in records:
    logging.info("%s = %s%s  [%s]", record_name(r), _fmt(r["value"]),
                 f" +- {_fmt(r['stderr'])}" if r.get("stderr") is not None else "",
                 ", ".join(f"{k}={r[k]}" for k in ("sampler", "split", "step", "ema",
                                                    "num_samples", "num_examples", "grid",
                                                    "picture") if r.get(k) is not None))
  return records


def record_name(r: dict) -> str:
  """A record's metric with its sample count beside it for the sample-based image metrics
  ('fid (50000 samples)'): FID at 10k sits ~2 points above FID at 50k on CIFAR-10."""
  if r["metric"] in SAMPLE_COUNTED and r.get("num_samples") is not None:
    return f"{r['metric']} ({r['num_samples']} samples)"
  return r["metric"]


SAMPLE_COUNTED = ("fid", "kid", "sfid", "fid_data_halves", "kid_data_halves", "inception_score",
                  "precision", "recall")


def _fmt(v):
  return f"{v:.6g}" if isinstance(v, float) else str(v)


def reuse(job: Job, result_path: str) -> Optional[List[dict]]:
  """The records of a finished setting (not recomputed unless config.eval.recompute)."""
  if job.ev.recompute or not fileio.exists(result_path):
    return None
  got = read_json(result_path)
  logging.info("already evaluated (config.eval.recompute=True redoes it): %s", result_path)
  for r in got["records"]:
    job.records.append(dict(r, reused=True))
  job.files.extend(got["files"] + [result_path])
  return got["records"]


# ----------------------------------------------------------------------------- NLL quantities

IMAGE_METRICS = ("bpd_ode", "bpd_elbo")
POINT_METRICS = ("nll_ode",)
ODE_METRICS = ("bpd_ode", "nll_ode")


def split_list(value: str) -> List[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def nll_split(ev, config) -> str:
  """config.eval.nll_split; '' = the split of image data's config.eval.nll_protocol ('train'
  for 'ctm'), else the data set's test (or validation) split."""
  info = data.dataset_info(config.data.dataset)
  if ev.nll_split:
    return ev.nll_split
  if info.kind == "image":
    from ctm_jax.metrics import likelihood
    return likelihood.protocol(ev.nll_protocol).split or info.eval_split
  return info.eval_split


def metrics_for(ev, info) -> List[str]:
  """config.eval.nll_metrics as a list; '' = every quantity for the data kind."""
  names = split_list(ev.nll_metrics)
  return names or list(IMAGE_METRICS if info.kind == "image" else POINT_METRICS)


def check_metrics(ev, info) -> None:
  allowed = IMAGE_METRICS if info.kind == "image" else POINT_METRICS
  names = metrics_for(ev, info)
  bad = [n for n in names if n not in allowed]
  if bad or len(set(names)) != len(names):
    raise config_lib.ConfigError(
        f"config.eval.nll_metrics = {ev.nll_metrics!r}: {info.kind} data accepts a comma list "
        f"of {allowed} without repeats ('' = all)")
