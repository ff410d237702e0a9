"""Numbered shard files of a resumable batch job: atomic writes, completeness checks, progress.

A job computes `total` examples in shards of `shard_size` (the last may be shorter).  Shard i
is a pure function of the job's settings and i (its random keys are fold_in(key, i)), so a
shard lost in a kill is recomputed with identical content and the job's final number does not
depend on where it was interrupted.  Each shard is one .npz written atomically through
ctm_jax.fileio (locally a temporary name renamed into place, on an object store one upload),
holding its arrays, its row count and a sha256 of the arrays; a file that does not load, has the wrong count or fails its checksum is
reported and recomputed, never used.

Multi-process: every process takes part in the computation and holds the whole shard (the
device results are gathered to every host); process 0 alone writes, and the processes
agree (process 0's view, broadcast) on which shards are already on disk.  The shard directory
must be on storage all processes see (a shared file system or a gs:// URL), as the
checkpoints are.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Callable, Dict, List, Optional

import jax
import numpy as np
from absl import logging

from ctm_jax import fileio
from ctm_jax.progress import format_duration

_COUNT = "__count__"
_SHA = "__sha256__"


def settings_hash(settings: dict) -> str:
  """8 hex digits identifying a settings dict (keys sorted, JSON)."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def arrays_sha256(arrays: Dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.ascontiguousarray(arrays[k])
    h.update(k.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with fileio.path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
  """obj as indented JSON at `path`, atomically (ctm_jax.fileio)."""
  fileio.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


read_json = fileio.read_json


def _is_main() -> bool:
  return jax.process_index() == 0


def _agree(value: bool) -> bool:
  """Process 0's value on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class ShardStore:
  """shard_00000.npz ... in `directory`, plus manifest.json (the settings that made them)."""

  def __init__(self, directory: str, settings: dict, total: int, shard_size: int):
    if shard_size < 1 or total < 1:
      raise ValueError(f"shard_size and total must be >= 1, got {shard_size}, {total}")
    self.directory = directory
    self.settings = settings
    self.total = int(total)
    self.shard_size = int(shard_size)
    if _is_main():
      fileio.makedirs(directory)
      fileio.remove_temporaries(directory)     # left by a job killed while writing
      manifest = fileio.join(directory, "manifest.json")
      if not fileio.exists(manifest):
        write_json_atomic(manifest, settings)
      elif read_json(manifest) != json.loads(json.dumps(settings, default=str)):
        raise RuntimeError(f"{manifest} holds other settings than this job's; the directory "
                           f"name is a hash of them, so it was edited by hand: remove it")

  @property
  def num_shards(self) -> int:
    return -(-self.total // self.shard_size)

  def count(self, i: int) -> int:
    return min(self.shard_size, self.total - i * self.shard_size)

  def path(self, i: int) -> str:
    return fileio.join(self.directory, f"shard_{i:05d}.npz")

  def load(self, i: int) -> Optional[Dict[str, np.ndarray]]:
    """Shard i's arrays, or None when it is missing or incomplete (then it is logged).

    A shard holding more rows than this job needs (made for a larger total) is cut."""
    path = self.path(i)
    if not fileio.exists(path):
      return None
    want = self.count(i)
    try:
      arrays = fileio.load_npz(path)
      count = int(arrays.pop(_COUNT))
      sha = str(arrays.pop(_SHA))
      if arrays_sha256(arrays) != sha:
        raise ValueError("checksum mismatch")
      if count < want or any(len(v) != count for v in arrays.values()):
        raise ValueError(f"{count} rows, {want} needed")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("shard %s is incomplete or damaged (%s): recomputing it", path, e)
      return None
    return {k: v[:want] for k, v in arrays.items()}

  def save(self, i: int, arrays: Dict[str, np.ndarray]) -> None:
    """Write shard i atomically (process 0); every array has count(i) rows."""
    want = self.count(i)
    for k, v in arrays.items():
      if len(v) != want:
        raise ValueError(f"shard {i}: array {k!r} has {len(v)} rows, expected {want}")
    if not _is_main():
      return
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    fileio.save_npz(self.path(i), **arrays, **{_COUNT: np.asarray(want),
                                               _SHA: np.asarray(arrays_sha256(arrays))})

  def run(self, compute: Callable[[int, int, int], Dict[str, np.ndarray]], label: str,
          recompute: bool = False) -> Dict[str, np.ndarray]:
    """All shards, each loaded or computed as compute(i, start, count) and saved; returns
    the concatenated arrays.  Logs shards and examples done, the rate and the ETA."""
    parts: List[Dict[str, np.ndarray]] = []
    t0, computed, n_done = time.time(), 0, 0
    for i in range(self.num_shards):
      got = None if recompute else self.load(i)
      if not _agree(got is not None):
        got = compute(i, i * self.shard_size, self.count(i))
        self.save(i, got)
        _barrier(f"{self.directory}:{i}")
        computed += self.count(i)
        rate = computed / max(time.time() - t0, 1e-9)
        left = self.total - n_done - self.count(i)
        logging.info("%s: shard %d/%d written, %d/%d examples, %.1f examples/s, ETA %s",
                     label, i + 1, self.num_shards, n_done + self.count(i), self.total, rate,
                     format_duration(left / rate) if rate > 0 else "?")
      elif got is not None and i == 0:
        logging.info("%s: reusing shards on disk in %s", label, self.directory)
      parts.append(got)
      n_done += self.count(i)
    if any(p is None for p in parts):   # processes > 0 that skipped a shard read it now
      parts = [p if p is not None else self.load(i) for i, p in enumerate(parts)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
