r"""Train a model: parses the flags and calls ctm_jax.train.train_and_evaluate.

  python -m launch.train --config=configs/toy_edm.py --workdir=workdirs/toy_edm \
      --config.training.batch_size=256

Re-running the same command resumes from the newest checkpoint in --workdir.  Ctrl-C (or
SIGTERM) finishes the current step, writes a checkpoint and stops (exit status 130 for
Ctrl-C, 0 for SIGTERM); a second Ctrl-C stops at once.  A mistake in a flag or the config
ends in one line and exit status 2 (--verbose adds the traceback).
Multi-host: add --config.distributed.initialize=True (and, off TPU/SLURM, the
coordinator_address / num_processes / process_id fields).
"""
import sys

from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples")
_FAKE_DEVICES = common.fake_cpu_devices_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.start(argv, "give every setting as --flag=value or --config.FIELD=value", _FAKE_DEVICES)
  from ctm_jax import config_lib
  config_lib.check_workdir(_WORKDIR.value)          # before jax and the data start
  from ctm_jax import parallel, train
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                     progress_bar=sys.stderr.isatty())
  return 130 if summary["stop_reason"] == "SIGINT" else 0


if __name__ == "__main__":
  common.run(main, "launch.train")
