r"""Sample from a trained run: an alias of `python -m launch.eval --mode=sample`.

  python -m launch.sample --workdir=workdirs/digits_ctm --samplers=onestep,gamma:0:2

Its flags map onto config.eval fields: --samplers, --num_samples, --batch_size, --seed,
--ema, --class_label, --ode_error_samples (same names), --step=N (eval.checkpoints; -1 =
newest), --config=FILE.py (--run_config); any --config.eval.FIELD=... passes through.
"""
import sys

_SAME = ("samplers", "num_samples", "batch_size", "seed", "ema", "class_label",
         "ode_error_samples")
# The names launch.eval's errors use -> the flags typed here (common.run's rename).
RENAME = tuple((f"config.eval.{n}", f"--{n}") for n in _SAME) + (
    ("config.eval.checkpoints", "--step"), ("--run_config", "--config"))


def translate(argv):
  """launch.sample's command line -> launch.eval's."""
  out = [argv[0], "--mode=sample"]
  for arg in argv[1:]:
    name, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
    if name in _SAME and eq:
      out.append(f"--config.eval.{name}={value}")
    elif name == "step" and eq:
      out.append(f"--config.eval.checkpoints={'latest' if int(value) < 0 else value}")
    elif name == "config" and eq:
      out.append(f"--run_config={value}")
    elif name.startswith("mode"):
      sys.stderr.write("launch.sample: error: --mode is launch.eval's flag (python -m launch.eval)\n")
      sys.exit(2)
    else:
      out.append(arg)
  return out


if __name__ == "__main__":
  sys.argv = translate(sys.argv)
  from launch import common
  from launch import eval as eval_binary
  eval_binary.check_flags(sys.argv, "launch.sample", RENAME)
  common.run(eval_binary.main, "launch.sample", rename=RENAME)
