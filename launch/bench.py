r"""Benchmark a config's training step (ctm_jax.bench): network calls, step per k, FLOPs, memory.

  python -m launch.bench --config=configs/cifar10_ctm.py --config.ctm.distance=l2 \
      --k=1,8,17 --batch=8 --repeats=3 --out=/tmp/bench.json

The step is built exactly as training builds it (random teacher / LPIPS weights where none
are given); --compute_dtypes=float32,bfloat16 measures both, interleaved in one process.
Prints a table and writes the JSON to --out.  Runs unchanged on CPU, GPU and TPU hosts.

A pod dry run on one CPU host (docs/performance.md): compile the real step for 64 simulated
devices on a data x fsdp mesh, nothing allocated or run, and report per device XLA's memory
analysis (arguments, outputs, temporaries), FLOPs and every collective (kind, count, bytes):

  python -m launch.bench --config=configs/cifar10_ctm.py --devices=64 --mesh=64,1 \
      --batch=256 --compile_only --out=/tmp/dry_cifar10_ctm.json
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_K = flags.DEFINE_string("k", "1,8,17", "Comma list of teacher step counts k (CTM).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch of the step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (after one warm-up round).")
_DTYPES = flags.DEFINE_string(
    "compute_dtypes", "", "Comma list of training.compute_dtype values to compare in one "
    "process ('' = the config's).")
_ALSO = flags.DEFINE_string(
    "also", "", "Comma list of more config files (configs/<name>.py) measured in the same "
    "process, interleaved, each a column named by its file (e.g. MeanFlow / sCM beside CTM on "
    "the same network).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here ('' = do not).")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "", "JAX persistent compilation cache for this run ('' = none: "
    "the compile time is a real compile).")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only lower and compile the step on abstract arguments (no state "
    "allocated, nothing timed): compile time, FLOPs and XLA's memory analysis, e.g. to find "
    "the largest batch that fits.")
_DEVICES = flags.DEFINE_integer(
    "devices", 0, "Simulate this many devices on the host's CPU (fake XLA:CPU devices, set "
    "before JAX starts; 0 = the host's own devices); with --compile_only: a pod dry run.")
_MESH = flags.DEFINE_string(
    "mesh", "", "DATA,FSDP: the mesh's data and fsdp sizes (their product = the device "
    "count; '' = the config's mesh).")
_STEP_KIND = flags.DEFINE_string(
    "step_kind", "", "Which of the method's steps to build ('' = its first: ctm, train; a GAN "
    "config also has ctm_gan and disc).")
flags.mark_flags_as_required(["config"])


def _also_config(path):
  """A config file (path[:arg]) loaded as --config loads one."""
  from ml_collections.config_flags import config_flags as cf
  return cf.ConfigFileFlagParser("also").parse(path)


def _parse_ints(name, text):
  try:
    vals = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise app.UsageError(f"--{name}={text}: must be a comma list of integers") from None
  if not vals:
    raise app.UsageError(f"--{name} is empty")
  return vals


def main(argv):
  common.start(argv, "give every setting as --flag=value or --config.FIELD=value")
  ks = _parse_ints("k", _K.value)
  if _BATCH.value < 1 or _REPEATS.value < 1:
    raise app.UsageError("--batch and --repeats must be >= 1")
  from ctm_jax import nets
  dtypes = [d for d in _DTYPES.value.split(",") if d] or [_CONFIG.value.training.compute_dtype]
  bad = [d for d in dtypes if d not in nets.DTYPES]
  if bad:
    raise app.UsageError(f"--compute_dtypes: {bad} not in {sorted(nets.DTYPES)}")
  from ctm_jax import fileio
  if _OUT.value and fileio.isdir(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} is a directory; give a file name")
  if _DEVICES.value < 0:
    raise app.UsageError(f"--devices={_DEVICES.value}: must be >= 0 (0 = the host's devices)")
  mesh = _parse_ints("mesh", _MESH.value) if _MESH.value else None
  if mesh is not None:
    n = _DEVICES.value
    if len(mesh) != 2 or min(mesh) < 1 or (n and mesh[0] * mesh[1] != n):
      raise app.UsageError(f"--mesh={_MESH.value}: must be DATA,FSDP, two integers >= 1"
                           + (f" whose product is --devices={n}" if n else ""))
  if _DEVICES.value:
    os.environ["JAX_PLATFORMS"] = "cpu"
    from ctm_jax import parallel
    parallel.configure_fake_cpu_devices(_DEVICES.value)
  if _CACHE.value:
    from ctm_jax import compile_cache
    compile_cache.use(_CACHE.value)
  from ctm_jax import bench
  configs = {}
  for d in dtypes:
    cfg = _CONFIG.value.copy_and_resolve_references()
    cfg.unlock()
    cfg.training.compute_dtype = d
    if mesh is not None:
      cfg.mesh.data, cfg.mesh.fsdp = mesh
    configs[d] = cfg
  for path in [p for p in _ALSO.value.split(",") if p.strip()]:
    name = os.path.splitext(os.path.basename(path.strip()))[0]
    if not os.path.isfile(path.strip()) or name in configs:
      raise app.UsageError(f"--also: {path!r} is not a config file, or is given twice")
    configs[name] = _also_config(path.strip())
  results = bench.measure(configs, ks, repeats=_REPEATS.value, batch=_BATCH.value,
                          log=lambda m: print(m, flush=True), compile_only=_COMPILE_ONLY.value,
                          step_kind=_STEP_KIND.value)
  results["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  results["argv"] = sys.argv[1:]
  print(bench.table(results))
  if _OUT.value:
    fileio.write_json(_OUT.value, results, indent=1)     # atomic; a local path or a URL
    print(f"wrote {_OUT.value}")
  return 0


if __name__ == "__main__":
  common.run(main, "launch.bench")
