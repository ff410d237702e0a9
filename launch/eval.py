r"""Evaluate a trained run: samples, FID / KID, NLL, FID reference statistics.

  python -m launch.eval --workdir=DIR --mode=sample|fid|nll|fid_stats|all \
      [--config.eval.FIELD=VALUE ...] [--run_config=configs/FILE.py]

An official checkpoint (a torch.save state dict such as Kim-Dongjun/ctm-cifar10's
ema_0.999_*.pt, read without torch) of the network a config describes:

  python -m launch.eval --checkpoint=ema_0.999_049000.pt --run_config=configs/cifar10_ctm.py \
      --workdir=workdirs/official_ctm --mode=fid

DIR then only receives the evaluation's files (results as step 0, EMA `file-<name>`).

Settings are config.eval (configs/base.py eval_block): the defaults, then the run's own
config.eval from DIR/config.json, then --config.eval.FIELD overrides.  The job works in shards
under DIR/eval/ and resumes from them when re-run with the same command; results go to
DIR/eval/results.jsonl (docs/evaluation.md).  A mistake in the settings ends in one line on
stderr and exit status 2 (--verbose shows the traceback).
"""
import difflib
import os
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs import base
from launch import common


def check_flags(argv, prog: str = "launch.eval", rename=()):
  """A misspelled --config.eval.X: one line and exit 2, before the config flag reads it
  (prog and rename: launch.sample's name and flags, common.run's)."""
  from ctm_jax import config_lib
  from ctm_jax.evaljob import settings
  try:
    settings.check_override_names([a for a in argv[1:] if a.startswith("--config.")],
                                  base.eval_block())
  except config_lib.ConfigError as e:
    sys.stderr.write(f"{prog}: error: {common.rename_flags(str(e), rename)}\n")
    sys.exit(2)


if __name__ == "__main__":   # before the config flag reads the command line
  check_flags(sys.argv)

_EVAL = config_flags.DEFINE_config_dict(
    "config", ml_collections.ConfigDict({"eval": base.eval_block()}),
    "Evaluation settings: --config.eval.FIELD=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_MODE = flags.DEFINE_enum("mode", "sample", ["sample", "fid", "nll", "fid_stats", "all"],
                          "What to compute.")
_RUN_CONFIG = flags.DEFINE_string(
    "run_config", "", "Use this config file for the run instead of DIR/config.json "
    "(FILE.py or FILE.py:arg).")
_FAKE_DEVICES = common.fake_cpu_devices_flag()
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "Evaluate this official-format state dict (.pt/.pth torch.save, or an .npz "
    "export) of the --run_config network instead of the workdir's checkpoints.")
flags.mark_flags_as_required(["workdir"])


def load_run_config(workdir: str, run_config: str):
  """--run_config's file, else the run's config.json (a directory that holds none: the error
  names the nearest run directory beside it, if one is close)."""
  from ctm_jax import config_lib, runs
  if run_config:
    return config_lib.load_config_file(run_config, "--run_config")
  try:
    return runs.load_run_config(workdir)
  except runs.NotARunError as e:
    raise runs.NotARunError(f"{e}{nearest_run(workdir)}") from None


def nearest_run(workdir: str) -> str:
  """'; did you mean --workdir=DIR?' for the run directory (one holding config.json) beside
  workdir whose name is closest to it (difflib), or ''."""
  from ctm_jax import fileio
  path = workdir.rstrip("/") if fileio.is_url(workdir) else os.path.normpath(workdir)
  parent = fileio.dirname(path) or "."
  if not fileio.isdir(parent):
    return ""
  runs_here = [n for n in fileio.listdir(parent)
               if fileio.isfile(fileio.join(parent, n, "config.json"))]
  close = difflib.get_close_matches(fileio.basename(path), runs_here, n=1, cutoff=0.6)
  return f"; did you mean --workdir={fileio.join(parent, close[0])}?" if close else ""


def main(argv):
  common.start(argv, "give every setting as --flag=value or --config.eval.FIELD=value",
               _FAKE_DEVICES)
  from ctm_jax import parallel
  from ctm_jax.evaljob import jobs, settings
  if _CHECKPOINT.value:
    from ctm_jax import config_lib
    if not _RUN_CONFIG.value:
      raise config_lib.UserError("--checkpoint needs --run_config (the config whose network the "
                                 "file holds, e.g. configs/cifar10_ctm.py)")
    from ctm_jax import fileio
    if not fileio.isfile(_CHECKPOINT.value):
      raise config_lib.UserError(f"--checkpoint={_CHECKPOINT.value}: no such file")
    fileio.makedirs(_WORKDIR.value)
  config = load_run_config(_WORKDIR.value, _RUN_CONFIG.value)
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  ev = settings.merge_eval(base.eval_block(), config, overrides)
  parallel.maybe_initialize_distributed(config.distributed)
  jobs.run(_WORKDIR.value, _MODE.value, ev, config, argv=sys.argv,
           checkpoint_file=_CHECKPOINT.value)


if __name__ == "__main__":
  common.run(main, "launch.eval")
