"""The training system: validation, exact resume after SIGKILL/SIGTERM/SIGINT, the training
log, device and process count invariance, FSDP, accumulation, EMA, checkpoint retention and
failure safety."""
import json
import os
import random
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_edm
from ctm_jax import checkpointing, config_lib, data, metric_io, parallel, train, train_state
from launch_utils import run_train, start_train, tiny_toy_edm, wait_until


tiny_config = tiny_toy_edm


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _final_state(config, workdir):
  _, state, step = train.load_state(config, workdir)
  return jax.device_get(state), step


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("path,value,field", [
    ("training.batch_size", -4, "training.batch_size"),
    ("training.batch_size", 60, "training.batch_size"),          # 60 % 8 devices != 0
    ("diffusion.sigma_min", 100.0, "diffusion.sigma_min"),
    ("data.dataset", "nope", "data.dataset"),
    ("method", "dance", "method"),
    ("optim.name", "sgd", "optim.name"),
    ("ema.rates", (1.5,), "ema.rates"),
    ("training.microbatches", 3, "training.batch_size"),
    ("training.compute_dtype", "float16", "training.compute_dtype"),
    ("mesh.fsdp", 3, "mesh.fsdp"),
    ("data.random_flip", True, "data.random_flip"),
])
def test_bad_config_fails_before_anything_is_written(tmp_path, path, value, field):
  cfg = tiny_config(**{path: value})
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    train.train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()


def test_eval_ema_typo_fails_before_anything_is_written(tmp_path):
  """The loop samples config.sampling.eval_ema at sample_every: a name that is no EMA of the run
  is refused at start-up, not at the first sample."""
  cfg = tiny_config(**{"training.sample_every": 5, "sampling.eval_ema": "rate_0p5"})
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match=r"config\.sampling\.eval_ema = 'rate_0p5' is "
                     r"not an EMA of this run: accepted \['rate_0p999', 'params'\]"):
    train.train_and_evaluate(cfg, str(workdir))
  assert not workdir.exists()
  for ok in ("", "rate_0p999", "params"):
    train.validate_config(tiny_config(**{"training.sample_every": 5, "sampling.eval_ema": ok}),
                          num_devices=8, process_count=1)


def test_locked_config_rejects_unknown_key():
  cfg = toy_edm.get_config()
  with pytest.raises(AttributeError):
    cfg.training.batchsize = 3


# ----------------------------------------------------------------------------- pieces

def test_accumulated_gradients_equal_full_batch_gradient():
  w = {"a": jnp.array([0.3, -0.2]), "b": jnp.array(0.1)}
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (12, 2))}

  def grad_fn(params, b, rng):
    loss = lambda p: jnp.mean((b["x"] @ p["a"] + p["b"]) ** 2)
    return jax.grad(loss)(params), {"n": jnp.float32(b["x"].shape[0])}

  full, _ = grad_fn(w, batch, None)
  acc, met = train_state.accumulate_gradients(grad_fn, w, batch, jax.random.PRNGKey(1), 4)
  for k in w:
    np.testing.assert_allclose(acc[k], full[k], rtol=1e-5, atol=1e-7)
  assert float(met["n"]) == 3.0


def test_accumulated_gradients_carry_state_from_part_to_part():
  """Each part sees the state the previous one left (a power-iteration-like update); checked
  against a plain Python loop over the parts."""
  w = jnp.array([0.5, -1.0, 2.0])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(2), (8, 3))}
  rng = jax.random.PRNGKey(3)

  def grad_fn(params, u, b, r):
    noise = jax.random.normal(r, (3,))
    loss = lambda p: jnp.mean((b["x"] @ (p * u) + noise[0]) ** 2)
    u_new = u + jnp.mean(b["x"], axis=0) + noise
    return jax.grad(loss)(params), {"u0": u[0]}, u_new

  u0 = jnp.ones(3)
  got_g, got_m, got_u = jax.jit(lambda: train_state.accumulate_gradients_with_state(
      grad_fn, w, u0, batch, rng, 4))()
  u, gs, ms = u0, [], []
  for m in range(4):
    part = {"x": batch["x"][2 * m:2 * m + 2]}
    g, met, u = grad_fn(w, u, part, jax.random.fold_in(rng, m))
    gs.append(g)
    ms.append(met["u0"])
  np.testing.assert_allclose(got_g, np.mean(gs, axis=0), rtol=1e-5)
  np.testing.assert_allclose(got_m["u0"], np.mean(ms), rtol=1e-5)
  np.testing.assert_allclose(got_u, u, rtol=1e-5)


def test_edm_halflife_ema_matches_formula():
  cfg = tiny_config()
  cfg.ema.rates = (0.99,)
  cfg.ema.halflife_kimg = 0.5
  cfg.ema.rampup_ratio = 0.05
  for step, batch in [(0, 64), (100, 64), (10_000, 512)]:
    d = train_state.ema_decays(cfg.ema, jnp.int32(step), batch)
    seen = step * batch             # EDM training_loop.py: cur_nimg before the step
    h = min(500.0, 0.05 * seen)     # half-life in images with ramp-up
    np.testing.assert_allclose(float(d["halflife"]), 0.5 ** (batch / h) if h else 0.0, rtol=1e-6)
    assert float(d["rate_0p99"]) == pytest.approx(0.99)


def test_warmup_schedule():
  cfg = tiny_config(**{"optim.warmup_steps": 10, "optim.lr": 2e-3})
  sched = train_state.learning_rate_schedule(cfg.optim)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(50)), 2e-3, rtol=1e-6)


def _run_steps(config, mesh, n):
  exp = train.Experiment(config, mesh=mesh)
  pipe = data.InputPipeline(config.data, config.training.batch_size, config.seed, 0, 1)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  losses = []
  for step in range(n):
    state, met = fns["train"](state, parallel.global_batch(pipe.batch_at(step), exp.mesh), frozen)
    losses.append(float(met["loss"]))
  return jax.device_get(state.params), losses


def test_fsdp_mesh_matches_data_parallel_and_shards_params():
  cfg = tiny_config(**{"model.hidden": 256})
  p_dp, l_dp = _run_steps(cfg, parallel.make_mesh(cfg.mesh), 3)
  cfg2 = tiny_config(**{"model.hidden": 256, "mesh.fsdp": 2})
  exp = train.Experiment(cfg2)
  big = [s for s in jax.tree_util.tree_leaves(exp.state_shardings.params) if s.spec != ()]
  assert big, "FSDP should split the large kernels"
  p_fs, l_fs = _run_steps(cfg2, exp.mesh, 3)
  np.testing.assert_allclose(l_fs, l_dp, rtol=2e-5)
  for a, b in zip(jax.tree_util.tree_leaves(p_fs), jax.tree_util.tree_leaves(p_dp)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints

def test_retention_keeps_last_and_every_k(tmp_path):
  cfg = tiny_config(**{"training.num_train_steps": 10, "training.checkpoint_every": 1,
                       "training.keep_last": 2, "training.keep_every": 4})
  train.train_and_evaluate(cfg, str(tmp_path))
  ck = checkpointing.Checkpointer(str(tmp_path), cfg.training, read_only=True)
  assert sorted(ck.all_steps()) == [4, 8, 9, 10]


def test_failed_run_keeps_good_checkpoints(tmp_path):
  cfg = tiny_config(**{"training.num_train_steps": 4, "training.checkpoint_every": 2})
  train.train_and_evaluate(cfg, str(tmp_path))
  before, _ = _final_state(cfg, str(tmp_path))
  files_before = sorted(os.listdir(checkpointing.checkpoint_dir(str(tmp_path))))
  # Resume with a learning rate that blows the parameters up: the loss becomes non-finite.
  bad = tiny_config(**{"training.num_train_steps": 12, "training.checkpoint_every": 2,
                       "optim.lr": 1e30})
  with pytest.raises(FloatingPointError, match="non-finite"):
    train.train_and_evaluate(bad, str(tmp_path))
  ck = checkpointing.Checkpointer(str(tmp_path), cfg.training, read_only=True)
  assert ck.latest_step() == 4
  assert sorted(os.listdir(checkpointing.checkpoint_dir(str(tmp_path)))) == files_before
  after, _ = _final_state(cfg, str(tmp_path))
  assert _leaves_equal(before, after)


# ----------------------------------------------------------------------------- pre-emption

STEPS = 40           # 5 checkpoints and 4 log lines: what 150 steps showed, at a quarter the cost
RESUME_ARGS = [f"--config.training.num_train_steps={STEPS}", "--config.training.checkpoint_every=7",
               "--config.training.log_every=10", "--config.training.async_checkpointing=True"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp("uninterrupted")
  proc = run_train(wd, *RESUME_ARGS)
  cfg = tiny_config(**{"training.num_train_steps": STEPS})
  state, step = _final_state(cfg, str(wd))
  return state, step, proc.stderr, metric_io.read_metrics(str(wd)), wd


def test_training_log_is_quiet_and_ends_with_the_results(uninterrupted):
  """The log of a run that is not on a terminal: no library start-up chatter, one progress
  line per log_every steps, then where the results are and "Finished"."""
  *_, log, rows, wd = uninterrupted
  for noise in ("oneDNN", "Unable to initialize backend", "Load dataset info",
                "Downloading and preparing", "absl::InitializeLog", "Hyperparameters",
                "Setting work unit notes", "Traceback"):
    assert noise not in log, noise
  progress = re.findall(rf"\] (\d+)/{STEPS} steps \((\d+)%\), ([0-9.]+) steps/s, ETA (\d+):(\d\d):(\d\d)$",
                        log, re.M)
  assert [int(p[0]) for p in progress] == list(range(10, STEPS + 1, 10))
  assert [int(p[1]) for p in progress] == [round(100 * s / STEPS) for s in range(10, STEPS + 1, 10)]
  assert progress[-1][3:] == ("0", "00", "00")             # nothing left at the end
  assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))   # one row per log step
  assert all(r["steps_per_sec"] > 0 for r in rows)
  tail = [ln.split("] ", 1)[1] for ln in log.strip().splitlines()[-6:]]
  assert tail == [f"Results in {wd}:",
                  f"  metrics: {wd}/metrics.jsonl",
                  f"  summary: {wd}/summary.json",
                  f"  checkpoints: {wd}/checkpoints",
                  f"  TensorBoard: tensorboard --logdir {wd}",
                  tail[-1]]
  assert re.fullmatch(rf"Finished at step {STEPS} in \d+:\d\d:\d\d \(loss [0-9.e-]+\)", tail[-1])


def _files(root):
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, fs in os.walk(root) for f in fs}


def test_rerun_of_a_finished_run_changes_nothing_and_a_resume_logs_what_changed(
    tmp_path, uninterrupted):
  """The same command again: one line, exit 0, every file of the run byte for byte as it was
  (summary.json kept).  A resume with more steps: one line naming the changed field, recorded
  in config_resume_<step>.json."""
  run = tmp_path / "run"
  shutil.copytree(uninterrupted[-1], run)
  before = _files(run)
  proc = run_train(run, *RESUME_ARGS)
  last = proc.stderr.strip().splitlines()[-1].split("] ", 1)[1]
  assert last == (f"Already trained to step {STEPS} (training.num_train_steps = {STEPS}): "
                  f"nothing to do; {run}/summary.json is kept"), proc.stderr[-2000:]
  assert _files(run) == before
  proc = run_train(run, *RESUME_ARGS[1:], f"--config.training.num_train_steps={STEPS + 2}")
  said = [ln.split("] ", 1)[1] for ln in proc.stderr.splitlines() if "changed settings" in ln]
  assert said == [f"Resuming with changed settings (recorded in config_resume_{STEPS:08d}.json): "
                  f"training.num_train_steps {STEPS} -> {STEPS + 2}"], proc.stderr[-2000:]
  with open(run / f"config_resume_{STEPS:08d}.json") as f:
    assert json.load(f)["training"]["num_train_steps"] == STEPS + 2
  with open(run / "summary.json") as f:
    assert json.load(f)["step"] == STEPS + 2


def _wait_for_checkpoint(workdir, min_step, proc, timeout=300):
  ck_dir = checkpointing.checkpoint_dir(str(workdir))

  def done():
    steps = [int(d) for d in os.listdir(ck_dir) if d.isdigit()] if os.path.isdir(ck_dir) else []
    return bool(steps) and max(steps) >= min_step
  wait_until(proc, done, f"a checkpoint at step >= {min_step}", timeout)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_interrupted_run_resumes_bitwise(tmp_path, uninterrupted, sig):
  ref_state, ref_step, _, ref_rows, _ = uninterrupted
  wd = tmp_path / "run"
  rng = random.Random(int(sig))
  proc = start_train(wd, *RESUME_ARGS, log_path=str(tmp_path / "first.log"))
  _wait_for_checkpoint(wd, rng.choice([7, 14]), proc)
  time.sleep(rng.uniform(0.0, 0.1))
  proc.send_signal(sig)
  rc = proc.wait(timeout=120)
  log = open(tmp_path / "first.log").read()
  if sig in (signal.SIGTERM, signal.SIGINT):
    # A checkpoint at the step where it stopped; SIGTERM exits 0, Ctrl-C 130.
    assert rc == (0 if sig == signal.SIGTERM else 130), log[-3000:]
    with open(wd / "summary.json") as f:
      summary = json.load(f)
    n = summary["step"]
    assert summary["stopped_early"] and n < STEPS
    assert summary["stop_reason"] == signal.Signals(sig).name
    ck = checkpointing.Checkpointer(str(wd), tiny_config().training, read_only=True)
    assert ck.latest_step() == n
    last = log.strip().splitlines()[-1].split("] ", 1)[1]
    if sig == signal.SIGINT:
      assert last == (f"Stopped by Ctrl-C (SIGINT): interrupted at step {n} of {STEPS}, "
                      f"checkpoint written; re-run the same command to resume")
    else:
      assert last == (f"Stopped by SIGTERM at step {n} of {STEPS}, checkpoint written; "
                      f"re-run the same command to resume")
    assert "Finished" not in log
  else:
    assert rc == -signal.SIGKILL
  run_train(wd, *RESUME_ARGS)
  state, step = _final_state(tiny_config(**{"training.num_train_steps": STEPS}), str(wd))
  assert step == ref_step == STEPS
  assert _leaves_equal(state.params, ref_state.params)
  assert _leaves_equal(state.ema, ref_state.ema)
  assert _leaves_equal(state.opt_state, ref_state.opt_state)
  # metrics.jsonl: the rows past the restored step were dropped at resume, so each logged
  # step appears once, as in the uninterrupted run.
  rows = metric_io.read_metrics(str(wd))
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]


# ----------------------------------------------------------------------------- devices / hosts

def test_one_and_eight_devices_give_the_same_losses(tmp_path):
  args = ["--config.training.num_train_steps=15", "--config.training.checkpoint_every=15"]
  run_train(tmp_path / "d1", *args, devices=1)
  run_train(tmp_path / "d8", *args, devices=8)
  l1 = [r["loss"] for r in metric_io.read_metrics(str(tmp_path / "d1")) if "loss" in r]
  l8 = [r["loss"] for r in metric_io.read_metrics(str(tmp_path / "d8")) if "loss" in r]
  assert len(l1) == len(l8) == 15
  np.testing.assert_allclose(l8, l1, rtol=1e-5)


def test_two_processes_train_the_same_model_as_one(tmp_path):
  args = ["--config.training.num_train_steps=12", "--config.training.checkpoint_every=6"]
  run_train(tmp_path / "single", *args, devices=4)
  port = 20000 + random.randrange(20000)
  procs = [start_train(tmp_path / "multi", *args,
                       "--config.distributed.initialize=True",
                       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                       "--config.distributed.num_processes=2",
                       f"--config.distributed.process_id={i}", devices=2,
                       log_path=str(tmp_path / f"p{i}.log")) for i in range(2)]
  for i, p in enumerate(procs):
    assert p.wait(timeout=600) == 0, open(tmp_path / f"p{i}.log").read()[-3000:]
  cfg = tiny_config(**{"training.num_train_steps": 12})
  s1, _ = _final_state(cfg, str(tmp_path / "single"))
  s2, _ = _final_state(cfg, str(tmp_path / "multi"))
  for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  l1 = [r["loss"] for r in metric_io.read_metrics(str(tmp_path / "single")) if "loss" in r]
  l2 = [r["loss"] for r in metric_io.read_metrics(str(tmp_path / "multi")) if "loss" in r]
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
