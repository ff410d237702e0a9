"""Metric writers: TensorBoard and log lines (clu), plus a JSON-lines file.

clu's writers import TensorFlow (about 15 s here), so they are imported in create_writer,
after the config, the workdir and the data set have been checked.  Files go through
ctm_jax.fileio (a workdir may be a gs:// URL); TensorBoard's event files of a URL workdir
are written locally by clu (TensorFlow's gfile) and copied up (MirroredSummaryWriter).
"""
from __future__ import annotations

import abc
import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from ctm_jax import fileio


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
    fileio.append_text(self._path, json.dumps(row) + "\n")


class ScalarLogWriter(_ScalarSink):
  """clu's log lines for scalars only ("[step] name=value, ..."): hyperparameters and
  images go to TensorBoard, not into the log."""

  def __init__(self):
    from clu.metric_writers import LoggingWriter
    self._log = LoggingWriter()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._log.write_scalars(step, scalars)


class MirroredSummaryWriter:
  """clu's TensorBoard SummaryWriter for a URL workdir: TensorFlow's gfile would talk to the
  object store itself (and ignores emulator settings), so the event files are written to a
  local folder (logged) and copied to the same names in `workdir` through ctm_jax.fileio on
  flush and close, and after a write at most every `every_s` seconds; close removes the
  local folder.  An object store replaces the copy whole, so a reader sees an older or a
  newer event file, never half of one."""

  def __init__(self, workdir: str, every_s: float = 60.0):
    from clu import metric_writers
    self._workdir, self._every_s, self._last = workdir, every_s, time.monotonic()
    self._local = tempfile.mkdtemp(prefix="ctm_jax_tensorboard_")
    logging.info("TensorBoard events for %s are written to %s and copied there", workdir,
                 self._local)
    self._writer = metric_writers.SummaryWriter(self._local)

  def _upload(self, force: bool = False):
    if not force and time.monotonic() - self._last < self._every_s:
      return
    self._writer.flush()
    for name in sorted(os.listdir(self._local)):
      with open(os.path.join(self._local, name), "rb") as f:
        fileio.write_bytes(fileio.join(self._workdir, name), f.read())
    self._last = time.monotonic()

  def __getattr__(self, name):                   # write_scalars, write_images, ...
    fn = getattr(self._writer, name)

    def call(*args, **kwargs):
      out = fn(*args, **kwargs)
      self._upload()
      return out
    return call

  def flush(self):
    self._upload(force=True)

  def close(self):
    self._upload(force=True)
    self._writer.close()
    shutil.rmtree(self._local, ignore_errors=True)


def summary_writer(logdir: str):
  """clu's TensorBoard writer for `logdir`; MirroredSummaryWriter for a URL."""
  from clu import metric_writers
  if fileio.is_url(logdir):
    return MirroredSummaryWriter(logdir)
  return metric_writers.SummaryWriter(logdir)


def create_writer(workdir: str):
  """TensorBoard + log lines (+ metrics.jsonl) on process 0; log lines only elsewhere."""
  from clu import metric_writers
  log = ScalarLogWriter()
  if jax.process_index() > 0:
    return metric_writers.AsyncMultiWriter([log])
  return metric_writers.MultiWriter([
      metric_writers.AsyncMultiWriter([log, summary_writer(workdir)]),
      JsonlWriter(fileio.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str, missing_ok: bool = False):
  """The JSON rows of a JSON-lines file (blank lines skipped); [] for a missing file when
  missing_ok."""
  if missing_ok and not fileio.exists(path):
    return []
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]


def read_metrics(workdir: str):
  """The rows of workdir/metrics.jsonl."""
  return read_jsonl(fileio.join(workdir, "metrics.jsonl"))


def drop_rows_after(workdir: str, step: int) -> int:
  """Removes the metrics.jsonl rows with a step past `step` (a resumed run computes them
  again) and a half-written last line; the file is replaced atomically.  Returns how many
  lines were dropped."""
  path = fileio.join(workdir, "metrics.jsonl")
  if not fileio.exists(path):
    return 0
  lines = fileio.read_text(path).splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row.get("step", 0) <= step:
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    fileio.write_text(path, "".join(keep))
  return len(lines) - len(keep)
