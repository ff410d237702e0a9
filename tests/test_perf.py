"""Performance tooling: the step benchmark (ctm_jax.bench, launch.bench), the persistent
compilation cache of training runs, and bf16 compute with float32 master weights."""
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_ctm
from ctm_jax import bench, compile_cache, data, parallel, train
from launch_utils import ROOT, TINY_TOY, set_fields, subprocess_env
from test_train import tiny_config

H, E, BLOCKS = 64, 16, 2        # the tiny CTM student / teacher MLP


def tiny_ctm(**overrides):
  c = toy_ctm.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_dim = H, BLOCKS, E
  c.training.batch_size = 8
  c.training.log_every = 1
  c.training.sample_every = 0
  return set_fields(c, overrides)


def mlp_matmul_flops(batch, dim=2, use_s=True):
  """2 * batch * (in * out) summed over the ToyMLP's Dense layers (nets/mlp.py)."""
  per = [(E, E), (E, E)] * (2 if use_s else 1)              # map_t (and map_s) embeddings
  per += [(dim, H)]                                          # inp
  per += [(E, H)] * BLOCKS * (2 if use_s else 1)             # block emb (and emb_s)
  per += [(H, H), (H, H)] * BLOCKS                           # fc0, fc1
  per += [(H, dim)]                                          # out
  return 2 * batch * sum(a * b for a, b in per)


@pytest.fixture(scope="module")
def ctm_results():
  return bench.measure({"float32": tiny_ctm()}, ks=[1, 3], repeats=1, batch=8)


def test_bench_counts_and_json_fields(ctm_results):
  r = ctm_results
  assert (r["batch"], r["ks"], r["repeats"], r["backend"]) == (8, [1, 3], 1, "cpu")
  assert r["host_peak_rss_bytes"] > 2**20
  v = r["variants"]["float32"]
  assert (v["method"], v["compute_dtype"], v["step_kind"]) == ("ctm", "float32", "ctm")
  json.dumps(r)                                             # JSON-able as written
  names = {"student_forward", "student_forward_backward", "teacher_forward",
           "teacher_forward_in_loop"}
  assert set(v["network_calls_ms"]) == names
  for st in list(v["network_calls_ms"].values()) + list(v["step_ms"].values()):
    assert len(st["all_ms"]) == 1 and st["median_ms"] > 0
  assert v["compile_s"] > 0 and v["lower_s"] > 0
  # XLA's count of the student forward (per device: the batch is split over the mesh): the
  # Dense layers' 2 B in out (by hand) plus a few elementwise operations (layer norms, SiLU,
  # the preconditioning): within 25 % above.
  f = v["network_call_flops"]["student_forward"]
  ref = mlp_matmul_flops(8 // v["mesh_devices"])
  assert ref <= f <= 1.25 * ref, (f, ref)
  # The step's count at k adds a loop body of two teacher calls per extra Heun step; at k = 1
  # it is XLA's own count (which has the loop body once).
  assert v["step_flops"]["1"] == v["step_flops_xla"]
  np.testing.assert_allclose(v["step_flops"]["3"] - v["step_flops"]["1"],
                             2 * 2 * v["network_call_flops"]["teacher_forward"], rtol=1e-9)
  # Step / sum of its network calls, from the reported medians and the counts.
  for k in ("1", "3"):
    counts = v["network_calls_per_step"][k]
    assert counts == {"student_forward": 2, "student_forward_backward": 3,
                      "teacher_forward_in_loop": 2 * int(k)}
    total = sum(n * v["network_calls_ms"][c]["median_ms"] for c, n in counts.items())
    np.testing.assert_allclose(v["step_over_calls"][k], v["step_ms"][k]["median_ms"] / total)
    np.testing.assert_allclose(v["step_flops_per_s"][k],
                               v["step_flops"][k] * v["mesh_devices"]
                               / (v["step_ms"][k]["median_ms"] / 1e3))
  # Memory: the arguments hold the state, the batch, the teacher (none: the oracle) and k;
  # the donated state is aliased to the new state.  Sizes summed here from the shapes.
  exp = train.Experiment(bench.bench_config(tiny_ctm(), 8, "")[0])
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                    for x in jax.tree_util.tree_leaves(exp.abstract_state))
  m = v["memory"]
  assert v["state_bytes"] == state_bytes
  assert v["mesh_devices"] == jax.device_count() == 8
  assert m["argument_bytes"] >= state_bytes + 2 * 4 + 4     # replicated state, a batch shard
  assert m["alias_bytes"] >= 0.9 * state_bytes
  assert m["peak_bytes"] == (m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"]
                             + m["temp_bytes"])
  assert "step k=3 / sum of its network calls" in bench.table(r)


def test_network_call_counts_match_the_traced_step(monkeypatch):
  """network_calls against the step itself: count the student and teacher evaluations traced
  into one CTM step, in examples / B (the loop body is traced once: its teacher calls are per
  Heun step).  The student is traced 4 times: the target's two maps, the estimate's outer map
  and ONE call on 2B examples for the estimate's inner map and DSM's denoiser head."""
  cfg = tiny_ctm()
  exp = train.Experiment(cfg)
  b = 8
  counts = {"student": 0, "teacher": 0}
  traced = {"student": 0, "teacher": 0}
  raw, den = exp.model.raw, exp.method.teacher._denoise

  def count(name, fn):
    def wrapped(params, x, *a, **kw):
      counts[name] += x.shape[0] // b
      traced[name] += 1
      return fn(params, x, *a, **kw)
    return wrapped
  object.__setattr__(exp.model, "raw", count("student", raw))
  exp.method.teacher._denoise = count("teacher", den)
  step = exp.method.make_step("ctm", exp.tx)
  batch = {"x": jnp.zeros((b, 2))}
  jax.make_jaxpr(lambda s, b, f: step(s, b, f, jnp.int32(3)))(
      exp.abstract_state, batch, exp.abstract_frozen())
  per = bench.network_calls(cfg, 1)
  assert counts["student"] == per["student_forward"] + per["student_forward_backward"]
  assert traced["student"] == 4
  assert counts["teacher"] == per["teacher_forward_in_loop"]    # 2 per Heun step, k = 1


def test_forced_k_is_the_k_the_step_uses():
  cfg = tiny_ctm()
  exp = train.Experiment(cfg)
  state = exp.init_state()
  frozen, fns = exp.step_functions(forced_k=True)
  pipe = data.InputPipeline(cfg.data, 8, cfg.seed, 0, 1)
  batch = parallel.global_batch(pipe.batch_at(0), exp.mesh)
  for k in (1, 5, 17):
    state, met = fns["ctm"](state, batch, frozen, jnp.int32(k))
    assert float(met["k"]) == k


def test_launch_bench_edm_writes_json(tmp_path):
  out = tmp_path / "b.json"
  tiny = [a for a in TINY_TOY if not a.startswith("--config.training.batch_size")]
  proc = subprocess.run([sys.executable, "-m", "launch.bench", *tiny, "--k=1", "--batch=16",
                         "--repeats=1", f"--out={out}"], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  v = r["variants"]["float32"]
  assert v["method"] == "edm" and list(v["step_ms"]) == ["None"]
  assert set(v["network_calls_ms"]) == {"student_forward", "student_forward_backward"}
  assert v["network_calls_per_step"]["None"] == {"student_forward_backward": 1}
  assert "peak memory per device" in proc.stdout and r["batch"] == 16
  bad = subprocess.run([sys.executable, "-m", "launch.bench", "--config=configs/toy_ctm.py",
                        "--k=0,40"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode == 2 and "config.ctm.max_k" in bad.stderr, bad.stderr[-2000:]


def test_launch_bench_dry_run_on_simulated_devices(tmp_path):
  """--devices=N --mesh=D,F --compile_only: the step compiled for N simulated devices on a
  data x fsdp mesh; per device XLA's memory analysis and the collectives (design: one
  gradient reduced, each split weight gathered once; docs/performance.md)."""
  out = tmp_path / "dry.json"
  tiny = [a for a in TINY_TOY if not a.startswith("--config.training.batch_size")]
  tiny = [a for a in tiny if not a.startswith("--config.model.hidden")] + [
      "--config.model.hidden=128"]                     # 128 x 128 kernels: split under FSDP
  proc = subprocess.run([sys.executable, "-m", "launch.bench", *tiny, "--devices=4",
                         "--mesh=2,2", "--batch=8", "--compile_only", f"--out={out}"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  v = r["variants"]["float32"]
  assert r["device_count"] == 4 and v["mesh"] == {"data": 2, "fsdp": 2} and not v["step_ms"]
  assert {"argument_bytes", "output_bytes", "temp_bytes"} <= set(v["memory"])
  assert set(v["collectives"]) <= {"all-reduce", "all-gather", "reduce-scatter"}
  grad = v["gradient_bytes"]
  assert 0.5 * grad < v["collectives"]["all-gather"]["bytes"] <= grad
  assert "all-gathers per device: count, MiB" in proc.stdout and "2 x 2" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "launch.bench", *tiny, "--devices=4",
                        "--mesh=3,2", "--compile_only"], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "--mesh=3,2" in bad.stderr and "--devices=4" in bad.stderr


# ----------------------------------------------------------------------------- compile cache

def test_cache_dir_resolution(tmp_path):
  wd = str(tmp_path / "runs" / "a")
  assert compile_cache.resolve("auto", wd, None) == str(tmp_path / "runs" / ".jax_cache")
  assert compile_cache.resolve("auto", wd + "/", None) == str(tmp_path / "runs" / ".jax_cache")
  assert compile_cache.resolve("auto", wd, "/elsewhere") is None      # JAX's own is kept
  assert compile_cache.resolve("", wd, None) is None
  mine = str(tmp_path / "c")
  assert compile_cache.resolve(mine, wd, "/elsewhere") == mine


@pytest.fixture
def fresh_cache_settings():
  """No JAX cache directory set and every compile cached; the old settings restored after."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", None)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
  cc.reset_cache()


def test_resumed_run_reuses_the_compiled_step(tmp_path, fresh_cache_settings, caplog):
  workdir = str(tmp_path / "runs" / "toy")
  cache = tmp_path / "runs" / ".jax_cache"                  # the default: beside the workdir
  cfg = tiny_config(**{"training.num_train_steps": 2, "training.checkpoint_every": 2})
  caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
  train.train_and_evaluate(cfg, workdir)
  hits = lambda: [r.getMessage() for r in caplog.records
                  if r.getMessage().startswith("Persistent compilation cache hit for 'jit_step'")]
  assert cache.is_dir() and len(os.listdir(cache)) > 0
  assert not hits()
  caplog.clear()
  cfg2 = tiny_config(**{"training.num_train_steps": 4, "training.checkpoint_every": 2})
  train.train_and_evaluate(cfg2, workdir)                   # resumes at step 2
  assert len(hits()) == 1, [r.getMessage() for r in caplog.records][:20]


# ----------------------------------------------------------------------------- bf16

def _ctm_steps(cfg, n=3):
  exp = train.Experiment(cfg)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  losses = []
  for step in range(n):
    state, met = fns["ctm"](state, parallel.global_batch(pipe.batch_at(step), exp.mesh), frozen)
    losses.append(float(met["loss"]))
  return jax.device_get(state), np.asarray(losses)


BF16_RTOL = 0.01      # bf16: 8-bit mantissa; measured 0.02-0.18 % on these 3 losses


def test_bf16_ctm_keeps_fp32_master_weights_and_emas():
  s32, l32 = _ctm_steps(tiny_ctm(**{"training.batch_size": 64}))
  s16, l16 = _ctm_steps(tiny_ctm(**{"training.batch_size": 64,
                                    "training.compute_dtype": "bfloat16"}))
  for tree in (s16.params, s16.ema, s16.extra["target"], s16.opt_state):
    assert all(x.dtype in (np.float32, np.int32) for x in jax.tree_util.tree_leaves(tree))
  np.testing.assert_allclose(l16, l32, rtol=BF16_RTOL)
  # ... and bf16 is really used: the losses differ by more than float32 rounding.
  assert np.max(np.abs(l16 - l32) / np.abs(l32)) > 1e-4, (l16, l32)
