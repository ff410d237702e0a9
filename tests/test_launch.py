"""The launch experience: one-line errors with exit status 2, Ctrl-C that keeps the work,
progress output, the TFDS data directory, and validation owned by the methods."""
import io
import json
import logging as py_logging
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import toy_edm
from ctm_jax import checkpointing, config_lib, data, metric_io, parallel, progress, train
from launch import common
from launch_utils import ROOT, TINY_TOY, subprocess_env, tiny_toy_edm


def launch(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=ROOT,
                        env=subprocess_env(env), capture_output=True, text=True,
                        timeout=timeout)


def one_line_error(proc, status=2):
  """The single non-empty stderr line of a failed launch (no traceback, nothing else)."""
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == status, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


# ----------------------------------------------------------------------------- flag mistakes

TOY = "--config=configs/toy_edm.py"
E = "launch.train: error: "


@pytest.mark.parametrize("args,expected", [
    ([TOY, "--config.training.num_train_step=10"],
     E + "unknown field config.training.num_train_step, did you mean "
         "config.training.num_train_steps?"),
    ([TOY, "--config.traning.batch_size=8"],
     E + "unknown field config.traning.batch_size, did you mean config.training.batch_size?"),
    ([TOY, "--config.training.zzzz=8"],
     E + "unknown field config.training.zzzz; the fields of config.training are: "
         "async_checkpointing, batch_size, checkpoint_every, compilation_cache_dir, compute_dtype, "
         "keep_every, "
         "keep_last, log_every, microbatches, num_train_steps, sample_every"),
    ([TOY, "--config.training.batch_size=abc"],
     E + "--config.training.batch_size=abc: config.training.batch_size must be an integer, "
         "got 'abc'"),
    (["--config=configs/toy_edmm.py"],
     E + "--config=configs/toy_edmm.py: config file 'configs/toy_edmm.py' does not exist; "
         "did you mean configs/toy_edm.py?"),
    (["--config=configs/cifar10_ctm.py:bogus"],
     E + "--config=configs/cifar10_ctm.py:bogus: configs/cifar10_ctm.py takes '', 'cond', "
         "'gan' or 'cond_gan', got 'bogus'"),
    (["--config=configs/toy_edm.py:bogus"],
     E + "--config=configs/toy_edm.py:bogus: configs/toy_edm.py takes no argument after ':'"),
    (["--config=configs/base.py"],
     E + "--config=configs/base.py: configs/base.py has no get_config() function (not a "
         "config file)"),
    ([TOY, "--workdri=x"], E + "unknown flag --workdri, did you mean --workdir?"),
    ([TOY, "extra"], E + "unexpected arguments ['extra']: give every setting as --flag=value "
                         "or --config.FIELD=value"),
], ids=["misspelled", "misspelled_section", "unknown", "type", "no_file", "bad_arg",
        "arg_not_taken", "not_a_config", "unknown_flag", "positional"])
def test_flag_mistakes_are_one_line_and_exit_2(tmp_path, args, expected):
  wd = tmp_path / "run"
  assert one_line_error(launch(f"--workdir={wd}", *args)) == expected
  assert not wd.exists()


@pytest.mark.parametrize("binary,args,how", [
    ("eval", ["--workdir=w"], ": give every setting as --flag=value or --config.eval.FIELD=value"),
    ("compare", ["--config=configs/compare_toy.py"], ": give settings as --config.FIELD=value"),
    ("bench", ["--config=configs/toy_edm.py"],
     ": give every setting as --flag=value or --config.FIELD=value"),
])
def test_positional_arguments_are_refused_alike_by_every_binary(tmp_path, binary, args, how):
  """common.start: the same one line in launch.eval / compare / bench as in launch.train
  (test_flag_mistakes_are_one_line_and_exit_2), before anything runs."""
  proc = subprocess.run([sys.executable, "-m", f"launch.{binary}", *args, "extra"],
                        cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert one_line_error(proc) == f"launch.{binary}: error: unexpected arguments ['extra']{how}"


def test_orbax_read_only_warnings_are_dropped_and_others_kept():
  """The quiet log's filter on the three warnings Orbax gives for a checkpoint opened to read
  (orbax/checkpoint/checkpoint_manager.py), and not on its other warnings or other libraries'."""
  def passes(path, msg, level=py_logging.WARNING):
    rec = py_logging.LogRecord("absl", level, path, 1, msg, ("x",), None)
    return common._FILTER.filter(rec)
  orbax = "venv/lib/site-packages/orbax/checkpoint/checkpoint_manager.py"
  for msg in ("Given directory is read only=%s",
              "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
              "CheckpointManagerOptions.read_only=True, setting max_to_keep=None."):
    assert not passes(orbax, msg)
  assert passes(orbax, "Checkpoint %s is corrupt")
  assert passes("repo/ctm_jax/runs.py", "Given directory is read only=%s")


def test_missing_flag_workdir_file_and_verbose(tmp_path):
  line = one_line_error(launch(TOY))
  assert line == E + "missing required flag --workdir (Directory for checkpoints, logs and samples)"
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  line = one_line_error(launch(TOY, f"--workdir={afile}"))
  assert line == (E + f"workdir '{afile}' is an existing file, not a directory: name a new "
                  f"directory or an earlier run's directory (to resume it)")
  # --verbose and absl's -v 1 add the traceback; the last line and the status stay.
  for flag in (["--verbose"], ["-v", "1"]):
    proc = launch(TOY, f"--workdir={afile}", *flag)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == line
  assert afile.read_text() == "keep me"


def test_config_check_after_start_up_is_one_line(tmp_path):
  """A ConfigError found once the device count is known: one line, nothing else on stderr
  (no TensorFlow / JAX start-up notices), nothing written."""
  wd = tmp_path / "run"
  proc = launch(f"--workdir={wd}", TOY, "--fake_cpu_devices=4", "--config.training.batch_size=6")
  assert one_line_error(proc) == (E + "config.training.batch_size = 6 cannot be split over 4 "
                                  "devices x 1 microbatch: use a multiple of 4 (e.g. 4 or 8)")
  assert not wd.exists()


def test_conditional_discriminator_without_gan_is_one_line(tmp_path):
  wd = tmp_path / "run"
  proc = launch(f"--workdir={wd}", "--config=configs/toy_ctm.py", "--config.gan.conditional=True",
                "--config.training.num_train_steps=1")       # were it accepted: a short run
  assert one_line_error(proc) == (
      E + "config.gan.conditional = True has no effect while config.gan.enabled = False (there is "
      "no discriminator): set config.gan.enabled = True, or config.gan.conditional = False")
  assert not wd.exists()


def test_data_set_not_prepared_is_one_line(tmp_path):
  wd, empty = tmp_path / "run", tmp_path / "tfds"
  empty.mkdir()
  proc = launch(f"--workdir={wd}", "--config=configs/cifar10_edm.py", "--fake_cpu_devices=1",
                f"--config.data.data_dir={empty}", "--config.training.batch_size=8",
                "--config.model.model_channels=16")
  line = one_line_error(proc)
  assert line.startswith(E + f"TFDS data set 'cifar10' is not prepared in data_dir '{empty}'")
  assert (f"tfds.builder('cifar10', data_dir='{empty}').download_and_prepare("
          f"file_format='array_record')") in line
  assert not wd.exists() and not os.listdir(empty)


def test_non_finite_stop_is_the_last_line_exit_1(tmp_path):
  wd = tmp_path / "run"
  proc = launch(f"--workdir={wd}", "--fake_cpu_devices=1", *TINY_TOY,
                "--config.optim.lr=1e30", "--config.training.num_train_steps=6",
                "--config.training.checkpoint_every=1")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Finished" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  saved = checkpointing.Checkpointer(str(wd), toy_edm.get_config().training,
                                     read_only=True).latest_step()
  assert last.startswith(E + f"stopped at step {(saved or 0) + 1}: non-finite metrics [")
  newest = "no checkpoint yet" if saved is None else f"the newest checkpoint is step {saved}"
  assert last.endswith(f"this state is not saved ({newest})")


def test_ctrl_c_outside_the_loop_exits_130():
  code = ("from launch import common\n"
          "def main(argv):\n  raise KeyboardInterrupt\n"
          "common.run(main, 'prog')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert one_line_error(proc, status=130) == "prog: stopped by Ctrl-C (SIGINT)"


def test_unknown_field_message_suggests_the_nearest_key():
  c = ml_collections.ConfigDict(dict(a=dict(num_steps=1, batch=2), lr=0.1, seed=3))
  assert sorted(common.flat_keys(c)) == ["a", "a.batch", "a.num_steps", "lr", "seed"]
  assert common.unknown_field_message(c, "config", "a.num_step") == (
      "unknown field config.a.num_step, did you mean config.a.num_steps?")
  assert common.unknown_field_message(c, "config", "b.batch") == (
      "unknown field config.b.batch, did you mean config.a.batch?")
  assert common.unknown_field_message(c, "config", "a.qqqq") == (
      "unknown field config.a.qqqq; the fields of config.a are: batch, num_steps")
  assert common.unknown_field_message(c, "config", "a.batch") is None      # a real field


# ----------------------------------------------------------------------------- validation

def test_config_lib_imports_no_method():
  code = ("import sys, ctm_jax.config_lib\n"
          "print(sorted(m for m in sys.modules if m.startswith('ctm_jax')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120, check=True).stdout
  # the path layer (config files may live on gs://) and nothing that defines a method or model
  assert out.strip() == "['ctm_jax', 'ctm_jax.config_lib', 'ctm_jax.fileio']"


def test_methods_validate_their_own_sections():
  from ctm_jax import methods
  assert methods.method_names() == ("edm", "ctm", "cd", "ct", "ict", "direct_cd", "tcd",
                                    "meanflow", "sct", "scd")
  cfg = toy_edm.get_config()
  cfg.edm.p_std = -1.0
  config_lib.validate_common(cfg, num_devices=1, process_count=1)    # not a common field
  with pytest.raises(config_lib.ConfigError, match=r"config\.edm\.p_std"):
    train.validate_config(cfg, num_devices=1, process_count=1)
  cfg = toy_edm.get_config()
  cfg.method = "dance"
  with pytest.raises(config_lib.ConfigError, match=r"config\.method must be one of \('edm', 'ctm', 'cd'"):
    train.validate_config(cfg, num_devices=1, process_count=1)


def _valid_sizes(microbatches, devices, processes, upto):
  """The batch sizes that split, found by trying each one against the three conditions."""
  return [b for b in range(1, upto) if b % processes == 0 and b % microbatches == 0
          and (b // microbatches) % devices == 0]


@pytest.mark.parametrize("bs,mb,nd,npr", [(6, 1, 4, 1), (12, 2, 4, 1), (2, 1, 4, 1),
                                          (100, 3, 8, 2), (30, 2, 6, 4)])
def test_batch_split_message_names_the_sizes_that_work(bs, mb, nd, npr):
  ok = _valid_sizes(mb, nd, npr, 10 * bs + 100)
  below = [b for b in ok if b < bs]
  above = [b for b in ok if b > bs]
  near = (below[-1], above[0]) if below else (above[0], above[1])
  unit = ok[0]
  procs = f" on {npr} processes" if npr > 1 else ""
  mbs = "microbatch" if mb == 1 else "microbatches"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_batch_split(bs, mb, nd, npr)
  assert str(e.value) == (f"config.training.batch_size = {bs} cannot be split over {nd} devices "
                          f"x {mb} {mbs}{procs}: use a multiple of {unit} "
                          f"(e.g. {near[0]} or {near[1]})")
  for b in ok[:5]:
    config_lib.check_batch_split(b, mb, nd, npr)


# ----------------------------------------------------------------------------- progress

def test_progress_text_and_eta_to_the_second():
  assert progress.format_duration(136.36) == "0:02:16"
  assert progress.format_duration(3 * 3600 + 5 * 60 + 9.6) == "3:05:10"
  assert progress.format_duration(float("nan")) == "?"
  # 4800 steps left at 35.2 steps/s: 136.36 s.
  assert progress.progress_text(1200, 6000, 35.2) == "1200/6000 steps (20%), 35.2 steps/s, ETA 0:02:16"
  assert progress.progress_text(0, 6000, None) == "0/6000 steps (0%), ? steps/s, ETA ?"


def test_progress_bar_on_a_stream_and_log_lines_without(caplog):
  caplog.set_level(py_logging.INFO)
  console = py_logging.StreamHandler(sys.stderr)     # as absl's handler on a terminal
  py_logging.getLogger().addHandler(console)
  try:
    out = io.StringIO()
    bar = progress.Progress(5, 2, bar=True, stream=out, refresh_seconds=0.0)
    py_logging.getLogger("absl").info("a line above the bar")
    for s in (3, 4, 5):
      bar.step(s)
    bar.close()
    assert console in py_logging.getLogger().handlers      # put back
  finally:
    py_logging.getLogger().removeHandler(console)
  text = out.getvalue()
  assert "a line above the bar" in text            # written through the bar, not over it
  assert "5/5 steps (100%)" in text and "ETA 0:00:00" in text and "100%|" in text
  caplog.set_level(py_logging.INFO)
  plain = progress.Progress(10, 0, bar=False)
  plain.step(5)
  rate = plain.report(5)
  assert rate > 0
  assert any(r.getMessage().startswith("5/10 steps (50%), ") for r in caplog.records)


# ----------------------------------------------------------------------------- metrics at resume

def test_drop_rows_after_keeps_earlier_rows_exactly(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in (10, 20, 20, 30, 40)]
  lines = [json.dumps(r) + "\n" for r in rows]
  (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 50, "lo')   # cut by a kill
  assert metric_io.drop_rows_after(str(tmp_path), 20) == 3       # 30, 40 and the cut line
  assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])
  assert metric_io.drop_rows_after(str(tmp_path), 20) == 0
  assert metric_io.drop_rows_after(str(tmp_path / "nothing"), 5) == 0


# ----------------------------------------------------------------------------- Ctrl-C in the loop

def tiny_config(**overrides):
  return tiny_toy_edm(**{"training.num_train_steps": 10, "training.checkpoint_every": 2,
                         **overrides})


def _ctrl_c_at_call(monkeypatch, call, presses):
  """Press Ctrl-C `presses` times while the loop fetches batch number `call` (1-based)."""
  real, count = parallel.global_batch, [0]

  def fetch(*a, **k):
    count[0] += 1
    if count[0] == call:
      for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)        # the handler runs before os.kill returns
    return real(*a, **k)
  monkeypatch.setattr(parallel, "global_batch", fetch)


def test_first_ctrl_c_finishes_the_step_and_checkpoints(tmp_path, monkeypatch):
  before = signal.getsignal(signal.SIGINT)
  _ctrl_c_at_call(monkeypatch, 3, 1)                # while step 3 starts (checkpoints: even)
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert signal.getsignal(signal.SIGINT) is before
  assert summary["stop_reason"] == "SIGINT" and summary["step"] == 3
  ck = checkpointing.Checkpointer(str(tmp_path), tiny_config().training, read_only=True)
  assert ck.all_steps() == [2, 3]
  assert train.final_lines(summary, "W", 10)[-1] == (
      "Stopped by Ctrl-C (SIGINT): interrupted at step 3 of 10, checkpoint written; re-run the "
      "same command to resume")
  assert [r["step"] for r in metric_io.read_metrics(str(tmp_path))] == [1, 2, 3]


def test_second_ctrl_c_stops_at_once_keeping_earlier_checkpoints(tmp_path, monkeypatch, caplog):
  before = signal.getsignal(signal.SIGINT)
  _ctrl_c_at_call(monkeypatch, 4, 2)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert signal.getsignal(signal.SIGINT) is before
  ck = checkpointing.Checkpointer(str(tmp_path), tiny_config().training, read_only=True)
  assert ck.all_steps() == [2]                      # none for the interrupted step
  assert any(r.getMessage() == "Stopped at once by a second Ctrl-C at step 3: no checkpoint "
             "written for it (the newest checkpoint is step 2); re-run the same command to resume"
             for r in caplog.records)
  assert not (tmp_path / "summary.json").exists()
  # The run resumes from step 2 and finishes.
  monkeypatch.undo()
  summary = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert summary["step"] == 10 and summary["stop_reason"] is None


# ----------------------------------------------------------------------------- data directory

def test_tfds_data_dir_env_and_config_field(tmp_path, monkeypatch, capsys, caplog):
  """TFDS_DATA_DIR is where a built-in set is built and read when config.data.data_dir is
  empty; config.data.data_dir wins when set.  TFDS's download messages are not printed."""
  caplog.set_level(py_logging.INFO)
  env_dir, cfg_dir = tmp_path / "env", tmp_path / "cfg"
  monkeypatch.setenv("TFDS_DATA_DIR", str(env_dir))
  p = data.InputPipeline(dict(dataset="digits", data_dir="", prefetch=0), 32, 0, 0, 1)
  assert p.data_dir == str(env_dir) and (env_dir / "digits").is_dir()
  assert p.batch_at(0)["x"].shape == (32, 8, 8, 1)
  q = data.InputPipeline(dict(dataset="digits", data_dir=str(cfg_dir), prefetch=0), 32, 0, 0, 1)
  assert q.data_dir == str(cfg_dir) and (cfg_dir / "digits").is_dir()
  np.testing.assert_array_equal(p.batch_at(3)["x"], q.batch_at(3)["x"])
  out = capsys.readouterr()
  assert "Downloading and preparing" not in out.out + out.err
  assert sum("Building the data set digits in" in r.getMessage() for r in caplog.records) == 2


# ----------------------------------------------------------------------------- pod scripts

def _script(name, env, *args):
  full = {k: v for k, v in os.environ.items() if k not in (
      "TPU", "ZONE", "WORKDIR", "CONFIG", "DATA_DIR", "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID")}
  full.update(env)
  return subprocess.run(["bash", os.path.join(ROOT, "launch", name), *args], env=full,
                        capture_output=True, text=True, timeout=60)


def test_pod_scripts_dry_run_print_each_hosts_command():
  """--dry_run prints the exact commands (shell-quoted: an argument with spaces stays one
  argument) and runs nothing; a bad PROCESS_ID is refused."""
  import shlex
  odd = "--config.ema.rates=(0.999, 0.9999)"
  tpu = _script("tpu_pod.sh", {"TPU": "v4-64", "ZONE": "us-central2-b", "WORKDIR": "gs://b/r",
                               "CONFIG": "configs/cifar10_ctm.py"}, "--dry_run", odd)
  assert tpu.returncode == 0, tpu.stderr
  lines = [ln for ln in tpu.stdout.splitlines() if not ln.startswith("#")]
  ssh = shlex.split(lines[0])
  assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v4-64", "--zone",
                     "us-central2-b", "--worker=all"] and ssh[9] == "--command"
  assert ssh[10] == lines[1]                     # the command every host runs
  remote = shlex.split(lines[1].split("&&")[-1])
  assert remote == ["python", "-m", "launch.train", "--config=configs/cifar10_ctm.py",
                    "--workdir=gs://b/r", "--config.distributed.initialize=True",
                    "--config.data.data_dir=gs://your-bucket/tensorflow_datasets", odd]
  env = {"COORDINATOR": "10.0.0.1:1234", "NUM_PROCESSES": "3", "PROCESS_ID": "1",
         "WORKDIR": "gs://b/r", "CONFIG": "configs/imagenet64_ctm.py"}
  gpu = _script("gpu_hosts.sh", env, "--dry_run", odd)
  assert gpu.returncode == 0, gpu.stderr
  cmds = [shlex.split(ln) for ln in gpu.stdout.splitlines() if not ln.startswith("#")]
  assert len(cmds) == 3 and "# host 1 of 3 (this host):" in gpu.stdout
  for p, cmd in enumerate(cmds):
    assert cmd == ["python", "-m", "launch.train", "--config=configs/imagenet64_ctm.py",
                   "--workdir=gs://b/r", "--config.distributed.initialize=True",
                   "--config.distributed.coordinator_address=10.0.0.1:1234",
                   "--config.distributed.num_processes=3",
                   f"--config.distributed.process_id={p}", odd]
  slurm = _script("gpu_hosts.sh", {"WORKDIR": "w", "CONFIG": "c.py"}, "--dry_run")
  assert [shlex.split(ln) for ln in slurm.stdout.splitlines() if not ln.startswith("#")] == [
      ["python", "-m", "launch.train", "--config=c.py", "--workdir=w",
       "--config.distributed.initialize=True"]]
  bad = _script("gpu_hosts.sh", dict(env, PROCESS_ID="3"), "--dry_run")
  assert bad.returncode == 2 and "PROCESS_ID=3 must be in 0..NUM_PROCESSES-1" in bad.stderr
