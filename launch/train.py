r"""Train a model: an absl main that parses flags and calls train_and_evaluate.

  python -m launch.train --config=configs/toy_edm.py --workdir=workdirs/toy_edm \
      --config.training.batch_size=256

Re-running the same command resumes from the newest checkpoint in --workdir.
Multi-host: add --config.distributed.initialize=True (and, off TPU/SLURM, the
coordinator_address / num_processes / process_id fields).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_FAKE_DEVICES = flags.DEFINE_integer(
    "fake_cpu_devices", 0, "Testing only: run on this many fake CPU devices (before JAX starts).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  common.begin(argv, _FAKE_DEVICES.value)
  import jax
  from ctm_jax import parallel, train
  parallel.maybe_initialize_distributed(_CONFIG.value.distributed)
  logging.info("JAX process %d/%d, %d devices (%d local)", jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count())
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Finished at step %d: %s", summary["step"], summary["metrics"])


if __name__ == "__main__":
  app.run(main)
