r"""Train the few-step family from one teacher and compare them: one table and plots.

  python -m launch.compare --config=configs/compare_toy.py [--config.FIELD=VALUE ...]

Trains CTM, CD, CT, iCT, Direct CD and TCD (config.methods) for config.seeds, evaluates each
with the evaluation jobs, and writes <config.workdir>/table.md, table.json and plots/
(ctm_jax/compare.py).  A re-run skips finished trainings and evaluations.  A bad setting ends
in one line on stderr and exit status 2, before anything is trained.  Ctrl-C (or SIGTERM) in a
training finishes its step, writes a checkpoint and stops the whole comparison; in an
evaluation it stops at once, keeping the finished evaluations; either way the last line is
'launch.compare: stopped by ...; re-run the same command to resume' and exit status 130.
"""
from absl import flags
from ml_collections import config_flags

from launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Comparison config (configs/compare_*.py).")
_FAKE_DEVICES = common.fake_cpu_devices_flag()
flags.mark_flags_as_required(["config"])


def main(argv):
  common.start(argv, "give settings as --config.FIELD=value", _FAKE_DEVICES)
  from ctm_jax import compare
  compare.run(_CONFIG.value)


if __name__ == "__main__":
  common.run(main, "launch.compare", on_ctrl_c="re-run the same command to resume")
