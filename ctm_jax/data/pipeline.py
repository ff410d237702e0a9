"""Deterministic, process-count invariant input pipeline over TFDS array_record data sources.

The example stream of a run is the concatenation of epoch permutations of the split, epoch e
permuted by np.random.default_rng([seed, e]). Global batch n is stream positions
[n*B, (n+1)*B): a pure function of (dataset, split, seed, n, B), so any process count sees the
same global batches and resuming at step n is exact. In 'global' sharding process p of P reads
only rows [p*B/P, (p+1)*B/P) of each global batch. In 'split' sharding process p reads only its
contiguous sub-split (tfds.split_for_jax_process) and shuffles it on its own; batches then
depend on the process count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from ctm_jax.data import builders

SHARDING_MODES = ("global", "split")
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1
_FLIP_SALT = 0x5EED_F11B
_READ_CHUNK = 4096
# Built-in sets read whole: one read per (data_dir, name, split, sharding part) per process.
_MEMORY_CACHE: dict[tuple, dict[str, np.ndarray]] = {}
_MEMORY_LOCK = threading.Lock()


def _mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def flip_mask(seed: int, positions: np.ndarray, salt: int = 0) -> np.ndarray:
  """Bernoulli(1/2) flip decisions, a pure function of (seed, salt, stream position)."""
  key = _mix64(np.array([(seed * 0x1000193 + salt + _FLIP_SALT) & _MASK64], np.uint64))
  return (_mix64(positions.astype(np.uint64) ^ key) >> np.uint64(63)).astype(bool)


def _cfg_get(cfg, key, default=None):
  try:
    value = cfg.get(key, default)
  except AttributeError as e:
    raise TypeError(f"data_cfg must be a ConfigDict or a mapping, got {type(cfg).__name__}") from e
  return default if value is None else value


def _check_int(name, value, lo, hi=None):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < lo or (hi is not None and value > hi):
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{name} must be in {rng}, got {value}")
  return int(value)


class InputPipeline:
  """Batches of one split for one process; see the module docstring for the example order.

  data_cfg fields: dataset, data_dir (None = TFDS default), split ('train'), random_flip
  (False), sharding ('global'), prefetch (2), and optionally standardize (False, 2-D sets:
  per-coordinate train-split mean/std), in_memory (None = auto: built-in sets are read whole
  once and kept in memory, stock sets are read record by record), num_workers (1 thread
  producing batches), prepare (True: build a missing built-in set in data_dir).
  """

  def __init__(self, data_cfg, global_batch_size: int, seed: int, process_index: int | None = None,
               process_count: int | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.process_count = _check_int("process_count", process_count, 1)
    self.process_index = _check_int("process_index", process_index, 0, self.process_count - 1)
    self.global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
    self.seed = _check_int("seed", seed, 0, 2**63 - 1)
    if self.global_batch_size % self.process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be divisible by "
                       f"process_count={process_count}")
    self.local_batch_size = self.global_batch_size // self.process_count

    name = _cfg_get(data_cfg, "dataset")
    if name not in builders.DATASETS:
      raise ValueError(f"data.dataset={name!r} is not known; accepted: {sorted(builders.DATASETS)}")
    self.info = builders.dataset_info(name)
    self.data_dir = _cfg_get(data_cfg, "data_dir") or builders.default_data_dir()
    self.split = _cfg_get(data_cfg, "split", "train")
    if self.split not in ("train", self.info.eval_split):
      raise ValueError(f"data.split={self.split!r} is not a split of {name}; accepted: "
                       f"'train', {self.info.eval_split!r}")
    self.sharding = _cfg_get(data_cfg, "sharding", "global")
    if self.sharding not in SHARDING_MODES:
      raise ValueError(f"data.sharding={self.sharding!r}; accepted: {SHARDING_MODES}")
    self.random_flip = bool(_cfg_get(data_cfg, "random_flip", False))
    if self.random_flip and self.info.kind != "image":
      raise ValueError(f"data.random_flip=True needs an image data set; {name} holds 2-D points")
    self.standardize = bool(_cfg_get(data_cfg, "standardize", False))
    if self.standardize and self.info.kind != "points":
      raise ValueError(f"data.standardize=True applies to 2-D point sets only, not {name}")
    self.prefetch = _check_int("data.prefetch", _cfg_get(data_cfg, "prefetch", 2), 0)
    self.num_workers = _check_int("data.num_workers", _cfg_get(data_cfg, "num_workers", 1), 1)
    in_memory = _cfg_get(data_cfg, "in_memory", None)
    self.in_memory = self.info.built_in if in_memory is None else bool(in_memory)

    if self.info.built_in and _cfg_get(data_cfg, "prepare", True):
      self.tfds_name = builders.prepare(name, self.data_dir)
    else:
      self.tfds_name = builders.resolve_tfds_name(name, self.data_dir)
    self.source = self._open_source(self.split)
    self.num_records = len(self.source)
    if self.sharding == "global" and self.global_batch_size > self.num_records:
      raise ValueError(f"global_batch_size={self.global_batch_size} is larger than the "
                       f"{self.split} split of {self.tfds_name} ({self.num_records} examples)")
    if self.sharding == "split" and self.local_batch_size > self.num_records:
      raise ValueError(f"local batch {self.local_batch_size} (global_batch_size / process_count) "
                       f"is larger than this process's sub-split ({self.num_records} examples)")
    self._has_label = "label" in self.source.dataset_info.features
    # ImageNet sets: labels in the standard (sorted WordNet id) order the official weights use.
    self._label_map = (builders.standard_label_map(
        self.source.dataset_info.features["label"].names) if self._has_label else None)
    self._data_key = "image" if self.info.kind == "image" else "x"
    self._lock = threading.Lock()
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._memory = self._read_all() if self.in_memory else None
    self._mean_std = self._train_stats() if self.standardize else None

  # ------------------------------------------------------------------------- reading

  def _open_source(self, split: str):
    builder = tfds.builder(self.tfds_name, data_dir=self.data_dir)
    if not builder.is_prepared():
      raise builders.DatasetNotPreparedError(
          builders.not_prepared_message(self.tfds_name, self.data_dir))
    fmt = builder.info.file_format
    if fmt is None or getattr(fmt, "value", fmt) != "array_record":
      raise ValueError(
          f"{self.tfds_name} in {self.data_dir} is stored as {getattr(fmt, 'value', fmt)}; "
          f"random access needs array_record: rebuild it with --file_format=array_record")
    if self.sharding == "split":
      split = tfds.split_for_jax_process(split, process_index=self.process_index,
                                         process_count=self.process_count)
    return tfds.data_source(self.tfds_name, split=split, data_dir=self.data_dir, download=False)

  def _read(self, indices: np.ndarray, source=None) -> dict[str, np.ndarray]:
    """Raw arrays (uint8 images or float32 points, int32 labels) of records `indices`."""
    source = self.source if source is None else source
    data, labels = [], []
    for lo in range(0, len(indices), _READ_CHUNK):
      records = source.__getitems__([int(i) for i in indices[lo:lo + _READ_CHUNK]])
      data.extend(r[self._data_key] for r in records)
      if self._has_label:
        labels.extend(r["label"] for r in records)
    shape = (len(indices),) + tuple(self.info.shape)
    out = {"x": np.stack(data).reshape(shape) if data else np.zeros(shape, np.uint8)}
    if self._has_label:
      out["label"] = np.asarray(labels, np.int32).reshape(len(indices))
      if self._label_map is not None:
        out["label"] = self._label_map[out["label"]]
    return out

  def _read_all(self) -> dict[str, np.ndarray]:
    """The whole (sub-)split as read-only arrays, cached per process."""
    part = (self.process_index, self.process_count) if self.sharding == "split" else None
    key = (self.data_dir, self.tfds_name, self.split, part)
    with _MEMORY_LOCK:
      if key not in _MEMORY_CACHE:
        arrays = self._read(np.arange(self.num_records))
        for v in arrays.values():
          v.flags.writeable = False
        _MEMORY_CACHE[key] = arrays
      return _MEMORY_CACHE[key]

  def _train_stats(self):
    """Per-coordinate mean and std of the full train split (float64)."""
    if self.split == "train" and self.sharding == "global" and self._memory is not None:
      x = self._memory["x"]
    else:
      src = tfds.data_source(self.tfds_name, split="train", data_dir=self.data_dir, download=False)
      x = self._read(np.arange(len(src)), src)["x"]
    x = x.astype(np.float64)
    return x.mean(0), x.std(0)

  # ------------------------------------------------------------------------- the index stream

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        words = [self.seed, epoch] if self.sharding == "global" else [
            self.seed, epoch, self.process_index, self.process_count]
        self._perms[epoch] = np.random.default_rng(words).permutation(self.num_records)
        while len(self._perms) > 3:
          self._perms.popitem(last=False)
      return self._perms[epoch]

  def positions(self, step: int) -> np.ndarray:
    """Stream positions of this process's rows of batch `step` (global stream in 'global'
    mode, this process's own stream in 'split' mode)."""
    step = _check_int("step", step, 0)
    b = self.local_batch_size
    if self.sharding == "global":
      start = step * self.global_batch_size + self.process_index * b
    else:
      start = step * b
    return np.arange(start, start + b, dtype=np.int64)

  def local_indices(self, step: int) -> np.ndarray:
    """Record indices (into self.source) of this process's rows of batch `step`."""
    pos = self.positions(step)
    n = self.num_records
    epochs, offsets = pos // n, pos % n
    out = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._perm(int(e))[offsets[sel]]
    return out

  # ------------------------------------------------------------------------- batches

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of batch `step`: {'x': float32 (B_local, ...), 'label': int32}."""
    idx = self.local_indices(step)
    if self._memory is not None:
      raw = {k: v[idx] for k, v in self._memory.items()}
    else:
      raw = self._read(idx)
    return self._preprocess(raw, self.positions(step))

  def _preprocess(self, raw, positions):
    out = {}
    if self.info.kind == "image":
      x = raw["x"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
      if self.random_flip:
        salt = 0 if self.sharding == "global" else 1 + self.process_index
        m = flip_mask(self.seed, positions, salt)
        x[m] = x[m, :, ::-1, :]
    else:
      x = raw["x"].astype(np.float32)
      if self._mean_std is not None:
        mean, std = self._mean_std
        x = ((x - mean) / std).astype(np.float32)
    out["x"] = x
    if "label" in raw:
      out["label"] = raw["label"].astype(np.int32)
    return out

  # ------------------------------------------------------------------------- iteration

  def state_at(self, next_step: int) -> dict[str, Any]:
    """The JSON-serialisable iterator state whose next batch is `next_step`."""
    return {
        "version": STATE_VERSION, "next_step": int(next_step), "seed": self.seed,
        "dataset": self.tfds_name, "split": self.split,
        "global_batch_size": self.global_batch_size, "sharding": self.sharding,
        "random_flip": self.random_flip, "standardize": self.standardize,
        # Only binding in 'split' mode; 'global' batches do not depend on it.
        "process_count": self.process_count,
    }

  def iterator(self, start_step: int = 0) -> "BatchIterator":
    """Local batches start_step, start_step + 1, ... with background prefetch."""
    return BatchIterator(self, _check_int("start_step", start_step, 0))

  def iterator_from_state(self, state: Mapping[str, Any]) -> "BatchIterator":
    """Resumes exactly at the batch after the one last taken when `state` was saved."""
    if not isinstance(state, Mapping) or "next_step" not in state:
      raise ValueError(f"not an input pipeline state: {state!r}")
    mine = self.state_at(0)
    keys = ["version", "seed", "dataset", "split", "global_batch_size", "sharding",
            "random_flip", "standardize"]
    if self.sharding == "split":
      keys.append("process_count")
    bad = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
    if bad:
      raise ValueError("input pipeline state was written by a different stream and cannot be "
                       "resumed exactly (" + "; ".join(bad) + ")")
    return self.iterator(state["next_step"])

  def to_global(self, local_batch: Mapping[str, np.ndarray], mesh, data_axis="data"):
    """Process-local batch -> dict of jax.Array sharded NamedSharding(mesh, P(data_axis)).

    Row order of the global array follows the processes' device order along data_axis; with
    the usual process-major meshes it equals the global batch row for row.
    """
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    out = {}
    for k, v in local_batch.items():
      v = np.asarray(v)
      if v.shape[0] != self.local_batch_size:
        raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows, expected the local batch size "
                         f"{self.local_batch_size}")
      global_shape = (self.global_batch_size,) + v.shape[1:]
      out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


class BatchIterator:
  """Iterator over local batches; worker threads compute up to `prefetch` batches ahead."""

  def __init__(self, pipeline: InputPipeline, start_step: int):
    self._pipeline = pipeline
    self._next = start_step
    self._pending: collections.deque = collections.deque()
    self._pool = None
    if pipeline.prefetch > 0:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          pipeline.num_workers, thread_name_prefix="ctm-data")
      self._fill()

  def _fill(self):
    while len(self._pending) < self._pipeline.prefetch:
      step = self._next + len(self._pending)
      self._pending.append(self._pool.submit(self._pipeline.batch_at, step))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._pool is None:
      batch = self._pipeline.batch_at(self._next)
    else:
      if not self._pending:
        self._fill()
      batch = self._pending.popleft().result()
    self._next += 1
    if self._pool is not None:
      self._fill()
    return batch

  def get_state(self) -> dict[str, Any]:
    """Small JSON-serialisable state; pipeline.iterator_from_state(state) resumes here."""
    return self._pipeline.state_at(self._next)

  def close(self):
    """Stops the worker threads (pending batches are dropped)."""
    if self._pool is not None:
      for f in self._pending:
        f.cancel()
      self._pending.clear()
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def load_split(name: str, split: str, data_dir: str | None = None,
               max_examples: int | None = None, standardize: bool = False) -> dict[str, np.ndarray]:
  """The first `max_examples` records of a split in stored order (TFDS's fixed hash order, a
  pseudo-random subset), preprocessed like batches but never flipped: {'x', 'label'?}."""
  cfg = dict(dataset=name, data_dir=data_dir, split=split, prefetch=0, in_memory=False,
             standardize=standardize)
  pipe = InputPipeline(cfg, 1, 0, process_index=0, process_count=1)
  n = pipe.num_records
  if max_examples is not None:
    n = min(_check_int("max_examples", max_examples, 1), n)
  idx = np.arange(n)
  return pipe._preprocess(pipe._read(idx), idx)  # pylint: disable=protected-access


dataset_info = builders.dataset_info
