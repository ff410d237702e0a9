"""Test helpers: `python -m launch.train` in subprocesses, dotted config overrides, the tiny toy
and digits configs the tests train, a teacher checkpoint restored once per module."""
import contextlib
import os
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The toy MLP of the tests (configs/toy_*.py).
TINY_MLP = {"model.hidden": 32, "model.num_blocks": 2, "model.emb_dim": 16}
# configs/toy_edm.py as the training-system tests run it: a log row every step, no sampling in
# the loop, no warm-up.
TINY_TOY_FIELDS = {**TINY_MLP, "training.batch_size": 64, "training.log_every": 1,
                   "training.sample_every": 0, "optim.warmup_steps": 0}
TINY_TOY = ["--config=configs/toy_edm.py",
            *(f"--config.{k}={v}" for k, v in TINY_TOY_FIELDS.items()),
            "--config.data.prefetch=2"]
# One resolution, no attention: compile time on a CPU grows with every layer of the digits U-Net.
TINY_UNET = {"model.model_channels": 16, "model.num_blocks": 1, "model.channel_mult_emb": 2,
             "model.channel_mult": (1,), "model.attn_resolutions": ()}


def subprocess_env(extra=None):
  env = dict(os.environ)
  # Each subprocess picks its own fake device count with --fake_cpu_devices.
  env["XLA_FLAGS"] = ""
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra or {})
  return env


def train_cmd(workdir, *overrides, devices=1):
  return [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
          f"--fake_cpu_devices={devices}", *TINY_TOY, *overrides]


def run_train(workdir, *overrides, devices=1, timeout=600, check=True, extra_env=None):
  proc = subprocess.run(train_cmd(workdir, *overrides, devices=devices), cwd=ROOT,
                        env=subprocess_env(extra_env), capture_output=True, text=True,
                        timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"launch.train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def start(cmd, log_path=None, extra_env=None):
  """cmd in a subprocess from the repository root, stdout and stderr to log_path."""
  out = open(log_path, "w") if log_path else subprocess.DEVNULL
  return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(extra_env), stdout=out,
                          stderr=subprocess.STDOUT)


def start_train(workdir, *overrides, devices=1, log_path=None, extra_env=None):
  return start(train_cmd(workdir, *overrides, devices=devices), log_path, extra_env)


def wait_until(proc, done, what, timeout=300):
  """Poll done() every 50 ms until it is true; fails if proc ends first or after timeout
  seconds (a hang detector, not a timing check)."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"the process ended (status {proc.returncode}) before {what}")
    if done():
      return
    time.sleep(0.05)
  raise AssertionError(f"{what}: not within {timeout} s")


def log_shows(log_path, pattern):
  """A done() for wait_until: the regular expression `pattern` occurs in the log."""
  return lambda: re.search(pattern, open(log_path).read(), re.M) is not None


def set_fields(config, overrides):
  """Set dotted config fields, e.g. {"training.batch_size": 16}; returns the config."""
  for path, v in overrides.items():
    node = config
    parts = path.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return config


def tiny_toy_edm(**overrides):
  """configs/toy_edm.py with TINY_TOY_FIELDS, then `overrides` (dotted fields)."""
  from configs import toy_edm
  return set_fields(toy_edm.get_config(), {**TINY_TOY_FIELDS, **overrides})


def tiny_toy_student(config_module, **overrides):
  """A toy CTM / CM config (configs.toy_ctm, toy_cd, ...) with TINY_MLP, batch 16 and no sampling
  in the loop, then `overrides` (dotted fields)."""
  return set_fields(config_module.get_config(), {**TINY_MLP, "training.batch_size": 16,
                                                 "training.sample_every": 0, **overrides})


def tiny_digits_config(config_module, **overrides):
  """A digits config (configs.digits_edm, digits_ctm) with TINY_UNET, batch 16, a log row every
  step and no sampling in the loop, then `overrides` (dotted fields)."""
  return set_fields(config_module.get_config(), {**TINY_UNET, "training.batch_size": 16,
                                                 "training.log_every": 1,
                                                 "training.sample_every": 0, **overrides})


@contextlib.contextmanager
def teacher_restored_once():
  """Within the block each teacher (source, run, step, EMA, npz) is restored from disk once;
  every later Teacher (one per Experiment: training, load_state, init_from) gets the same host
  arrays. Yields the list of real loads."""
  from ctm_jax import teacher as teacher_lib
  real = teacher_lib.Teacher._load
  cache, loads = {}, []

  def load(self):
    tc = self.config.teacher
    key = (tc.source, str(tc.workdir), tc.step, tc.ema, tc.npz_path, tc.get("path", ""))
    if key not in cache:
      loads.append(key)
      cache[key] = real(self)
    return cache[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(teacher_lib.Teacher, "_load", load)
    yield loads
