"""Lowering a program for accelerators this host does not have, and reading compiled HLO.

`export_for(fn, args, platforms)` lowers a jitted function with `jax.export` for other
platforms (TPU, CUDA) from abstract arguments (ShapeDtypeStructs, no weights), and
`check_portable` refuses what would not run there: a host callback (a Python call back to the
host), or a custom call outside the targets `jax.export` guarantees stable across platforms
and versions, or one that exists only on XLA:CPU (LAPACK, DUCC, the CPU callbacks).

`collectives(hlo_text)` lists the collectives of a compiled SPMD program (one partition's
HLO after XLA's partitioner): kind, count and the bytes each moves per step, so that a
dry run can compare them with what the sharding design says (data parallel: all-reduces of
about one gradient; FSDP: plus all-gathers / reduce-scatters of parameters).
"""
from __future__ import annotations

import collections
import re
from typing import Any, Dict, Iterable, List, Sequence

import jax
import numpy as np

PLATFORMS = ("tpu", "cuda")

# Custom-call targets that are not platform-specific kernels: sharding annotations and the
# export's own shape assertions (jax.export's guaranteed-stable list holds these too).
_SHARDING_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                     "annotate_device_placement", "shape_assertion", "AllocateBuffer"}
_CPU_ONLY = re.compile(r"^(lapack_|ducc_|cpu_|xla_cpu_|xla_python_cpu|xla_ffi_python_cpu)")
_CALLBACK = re.compile(r"callback", re.IGNORECASE)
_TARGET_RE = re.compile(r"(?:stablehlo\.custom_call\s+@([\w.$-]+)|call_target_name\s*=\s*\"([^\"]+)\")")


class NotPortableError(AssertionError):
  """A lowered program that would not run on the platforms it was lowered for."""


def stable_targets() -> frozenset:
  """The custom-call targets jax.export accepts without disabling its safety checks."""
  from jax._src.export import _export
  return frozenset(_export._CUSTOM_CALL_TARGETS_GUARANTEED_STABLE)


def custom_call_targets(module_text: str) -> List[str]:
  """Every custom-call target named in a StableHLO / HLO module's text (with repeats)."""
  return [a or b for a, b in _TARGET_RE.findall(module_text)]


def check_portable(module_text: str, platforms: Sequence[str] = PLATFORMS, what: str = "") -> Dict[str, int]:
  """Raise NotPortableError naming the offenders if the module holds a host callback or a
  custom call that is CPU-only or not guaranteed stable; return {target: count}."""
  counts = collections.Counter(custom_call_targets(module_text))
  allowed = stable_targets() | _SHARDING_TARGETS
  bad = {}
  for t in counts:
    if _CALLBACK.search(t):
      bad[t] = "host callback"
    elif _CPU_ONLY.search(t):
      bad[t] = "exists only on XLA:CPU"
    elif t not in allowed:
      bad[t] = "not a stable cross-platform custom call"
  if bad:
    raise NotPortableError(f"{what or 'program'} lowered for {tuple(platforms)} holds " +
                           ", ".join(f"{t!r} x{counts[t]} ({why})" for t, why in sorted(bad.items())))
  return dict(counts)


def abstract(tree) -> Any:
  """ShapeDtypeStructs (keeping a sharding where the leaf has one) for a pytree of arrays."""
  def one(a):
    if isinstance(a, jax.ShapeDtypeStruct):
      return a
    return jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, "sharding", None))
  return jax.tree_util.tree_map(one, tree)


def export_for(fn, args: Sequence[Any], platforms: Sequence[str] = PLATFORMS, what: str = ""):
  """jax.export of `fn` (a jax.jit-wrapped function) for `platforms` on abstract `args`;
  checks it (check_portable) and returns (exported, {custom-call target: count})."""
  if not hasattr(fn, "lower"):
    fn = jax.jit(fn)
  exported = jax.export.export(fn, platforms=tuple(platforms))(*abstract(args))
  text = exported.mlir_module()
  return exported, check_portable(text, platforms, what)


# ----------------------------------------------------------------------------- collectives

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                    "collective-permute", "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# `%name = <result shape(s)> kind(` or kind-start( for the async forms; -done ops carry no data.
_OP_RE = re.compile(r"=\s*(.+?)\s+(" + "|".join(re.escape(k) for k in COLLECTIVE_KINDS) +
                    r")(-start)?\(")


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE_RE.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def collectives(hlo_text: str) -> Dict[str, Dict[str, Any]]:
  """{kind: {'count', 'bytes', 'ops': [(result shape text, bytes)]}} of one partition's
  compiled HLO: the result size of every collective (an all-reduce's and a
  collective-permute's result equal their operand; an all-gather's is the gathered array;
  a reduce-scatter's the scattered piece).  An async `-start` op's result tuple also holds
  its operands, so its bytes count the last element only.  Ops inside a loop body are
  counted once (as XLA's cost analysis counts a loop body)."""
  out: Dict[str, Dict[str, Any]] = {}
  for line in hlo_text.splitlines():
    m = _OP_RE.search(line)
    if not m:
      continue
    shape_text, kind, start = m.group(1), m.group(2), m.group(3)
    if start and shape_text.startswith("("):
      parts = _SHAPE_RE.findall(shape_text)
      shape_text = f"{parts[-1][0]}[{parts[-1][1]}]" if parts else shape_text
    b = _shape_bytes(shape_text)
    rec = out.setdefault(kind, {"count": 0, "bytes": 0, "ops": []})
    rec["count"] += 1
    rec["bytes"] += b
    rec["ops"].append((shape_text.strip(), b))
  return out


def summarize(colls: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, int]]:
  """{kind: {'count', 'bytes'}} without the per-op list (for JSON / tables)."""
  return {k: {"count": v["count"], "bytes": v["bytes"]} for k, v in sorted(colls.items())}


def tree_bytes(tree: Iterable) -> int:
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))
