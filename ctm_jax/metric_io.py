"""Metric writers: TensorBoard and log lines (clu), plus a JSON-lines file.

clu's writers import TensorFlow (about 15 s here), so they are imported in create_writer,
after the config, the workdir and the data set have been checked.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Any, Mapping

import jax
import numpy as np


class _ScalarSink(abc.ABC):
  """The clu MetricWriter interface for a writer that keeps scalars only."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    raise NotImplementedError

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


class JsonlWriter(_ScalarSink):
  """Appends {"step": s, name: value, ...} lines to workdir/metrics.jsonl."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")


class ScalarLogWriter(_ScalarSink):
  """clu's log lines for scalars only ("[step] name=value, ..."): hyperparameters and
  images go to TensorBoard, not into the log."""

  def __init__(self):
    from clu.metric_writers import LoggingWriter
    self._log = LoggingWriter()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._log.write_scalars(step, scalars)


def create_writer(workdir: str):
  """TensorBoard + log lines (+ metrics.jsonl) on process 0; log lines only elsewhere."""
  from clu import metric_writers
  log = ScalarLogWriter()
  if jax.process_index() > 0:
    return metric_writers.AsyncMultiWriter([log])
  return metric_writers.MultiWriter([
      metric_writers.AsyncMultiWriter([log, metric_writers.SummaryWriter(workdir)]),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str, missing_ok: bool = False):
  """The JSON rows of a JSON-lines file (blank lines skipped); [] for a missing file when
  missing_ok."""
  if missing_ok and not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_metrics(workdir: str):
  """The rows of workdir/metrics.jsonl."""
  return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes the metrics.jsonl rows with a step past `step` (a resumed run computes them
  again) and a half-written last line; the file is replaced atomically.  Returns how many
  lines were dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("step", 0) <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)
  return len(lines) - len(keep)
