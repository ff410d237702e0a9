"""Metric writers: clu's default writers (TensorBoard + log) plus a JSON-lines file."""
from __future__ import annotations

import json
import logging as py_logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  """Appends {"step": s, name: value, ...} lines to workdir/metrics.jsonl (scalars only)."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + logging (+ metrics.jsonl) on process 0; logging only elsewhere."""
  default = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return default
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_metrics(workdir: str):
  """The rows of workdir/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class _QuietLibraries(py_logging.Filter):
  """Drops INFO chatter from checkpoint internals (warnings and errors still pass)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs():
  for h in py_logging.getLogger("absl").handlers + py_logging.getLogger().handlers:
    h.addFilter(_QuietLibraries())
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
