"""The evaluation binary: run loading (partial restore, import layering), sharded resumable
jobs (kill at a shard boundary, mid-shard, half-written shards), device-count invariance,
result records, and every refusal of bad settings."""
import ast
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, toy_ctm
from ctm_jax import config_lib, evaluate, metric_io, parallel, runs, train
from ctm_jax import data as data_lib
from ctm_jax.evaljob import common, jobs, report, settings, shards
from launch_utils import ROOT, set_fields, subprocess_env
from test_ctm_images import tiny_edm
from test_train import tiny_config



def tiny_toy(**overrides):
  return tiny_config(**{"training.num_train_steps": 3, "training.checkpoint_every": 2,
                        "ema.rates": (0.9, 0.99), **overrides})


def tiny_digits(**overrides):
  return tiny_edm(**{"model.model_channels": 8, "model.channel_mult": (1,),
                     "model.attn_resolutions": (), "training.num_train_steps": 2,
                     "training.checkpoint_every": 2, **overrides})


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("toy_run"))
  train.train_and_evaluate(tiny_toy(), wd)
  return wd


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("digits_run"))
  train.train_and_evaluate(tiny_digits(), wd)
  return wd


def copy_run(src, dst):
  """A copy of a run without its eval/ outputs."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
  return str(dst)


def eval_settings(workdir, **fields):
  config = runs.load_run_config(workdir)
  return settings.merge_eval(base.eval_block(), config, {f"eval.{k}": v for k, v in fields.items()}), config


def _leaves(t):
  return [np.asarray(v) for v in jax.tree_util.tree_leaves(t)]


# ----------------------------------------------------------------------------- run loading

def test_partial_restore_equals_full_restore(toy_run):
  config = runs.load_run_config(toy_run)
  _, state, step = train.load_state(config, toy_run)
  state = jax.device_get(state)
  assert step == 3
  mesh = parallel.make_mesh(config.mesh)
  for name in ("rate_0p9", "rate_0p99", runs.RAW_PARAMS):
    full = state.params if name == runs.RAW_PARAMS else state.ema[name]
    for m in (None, mesh):
      got, got_step, got_name = runs.load_params(config, toy_run, None, name, mesh=m)
      assert (got_step, got_name) == (3, name)
      assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(full)
      assert all(np.array_equal(a, b) for a, b in zip(_leaves(got), _leaves(full)))
  # The two EMAs differ (a restore of the wrong subtree would be caught).
  assert not all(np.array_equal(a, b) for a, b in
                 zip(_leaves(state.ema["rate_0p9"]), _leaves(state.ema["rate_0p99"])))
  # An older checkpoint, and the default EMA (the first rate).
  _, old, _ = train.load_state(config, toy_run, 2)
  got, s, name = runs.load_params(config, toy_run, 2)
  assert (s, name) == (2, "rate_0p9")
  assert all(np.array_equal(a, b) for a, b in zip(_leaves(got), _leaves(jax.device_get(old.ema["rate_0p9"]))))
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.ema = 'rate_0p5'.*rate_0p9"):
    runs.load_params(config, toy_run, None, "rate_0p5")
  with pytest.raises(config_lib.ConfigError, match=r"step 7 .*\[2, 3\]"):
    runs.load_params(config, toy_run, 7)


LOW_MODULES = ["ctm_jax/teacher.py", "ctm_jax/evaluate.py", "ctm_jax/runs.py",
               "ctm_jax/checkpointing.py", "ctm_jax/config_lib.py"]


def _imports_train(path):
  tree = ast.parse(open(os.path.join(ROOT, path)).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import) and any(a.name == "ctm_jax.train" for a in node.names):
      return True
    if isinstance(node, ast.ImportFrom):
      if node.module == "ctm_jax.train" or (node.module == "ctm_jax" and
                                            any(a.name == "train" for a in node.names)):
        return True
  return False


def test_nothing_below_train_imports_train(toy_run, tmp_path):
  files = LOW_MODULES + sorted(os.path.relpath(p, ROOT) for p in
                               glob.glob(os.path.join(ROOT, "ctm_jax/methods/*.py")) +
                               glob.glob(os.path.join(ROOT, "ctm_jax/evaljob/*.py")))
  assert not [f for f in files if _imports_train(f)]
  assert _imports_train("launch/train.py")               # the scanner finds a known importer
  assert _imports_train("tests/test_eval.py")
  # At run time too: a CTM teacher loaded from a checkpoint and an evaluation job.
  code = f"""
import sys
from configs import toy_ctm
from ctm_jax import teacher, evaluate, runs
from ctm_jax.methods import ctm
from ctm_jax.evaljob import jobs
c = toy_ctm.get_config(); c.unlock()
c.teacher.source = "checkpoint"; c.teacher.workdir = {toy_run!r}
c.teacher.config = runs.load_run_config({toy_run!r})
t = teacher.Teacher(c); p = t.params()
assert "ctm_jax.train" not in sys.modules, "ctm_jax.train was imported"
print("OK", len(p))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- shards

def test_results_file_reads_back_what_was_appended(tmp_path):
  """results.jsonl: none before the first record ([] for a fresh workdir, while a missing
  metrics.jsonl is an error), then exactly the records appended, in order."""
  wd = str(tmp_path)
  assert report.read_records(wd) == []
  with pytest.raises(FileNotFoundError):
    metric_io.read_metrics(wd)
  recs = [{"metric": "fid", "value": 3.5, "step": 10}, {"metric": "nll", "value": None}]
  report.append_records(wd, recs[:1])
  report.append_records(wd, recs[1:])
  with open(os.path.join(wd, "eval", "results.jsonl"), "a") as f:
    f.write("\n")                                  # a blank line is skipped
  assert report.read_records(wd) == recs


def test_shard_store_detects_incomplete_files(tmp_path):
  store = shards.ShardStore(str(tmp_path / "s"), {"a": 1}, total=10, shard_size=4)
  assert store.num_shards == 3 and [store.count(i) for i in range(3)] == [4, 4, 2]
  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  store.save(0, {"x": x})
  np.testing.assert_array_equal(store.load(0)["x"], x)
  assert store.load(1) is None                                      # missing
  with pytest.raises(ValueError, match="3 rows, expected 4"):
    store.save(1, {"x": x[:3]})
  raw = open(store.path(0), "rb").read()
  open(store.path(0), "wb").write(raw[:len(raw) // 2])              # half-written
  assert store.load(0) is None
  # One payload byte changed: the zip's CRC catches it ...
  i = raw.index(x.tobytes())
  open(store.path(0), "wb").write(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:])
  assert store.load(0) is None
  # ... and a well-formed file whose rows are not the ones written, the shard's own checksum.
  with np.load(io.BytesIO(raw)) as z:
    fields = {k: z[k] for k in z.files}
  fields["x"] = fields["x"] + 1
  np.savez(store.path(0), **fields)
  assert store.load(0) is None
  # A shard made for a larger total serves a smaller one; a shorter one does not.
  store.save(0, {"x": x})
  small = shards.ShardStore(str(tmp_path / "s"), {"a": 1}, total=3, shard_size=4)
  np.testing.assert_array_equal(small.load(0)["x"], x[:3])
  store.save(2, {"x": x[:2]})
  bigger = shards.ShardStore(str(tmp_path / "s"), {"a": 1}, total=12, shard_size=4)
  assert bigger.load(2) is None
  with pytest.raises(RuntimeError, match="other settings"):
    shards.ShardStore(str(tmp_path / "s"), {"a": 2}, total=3, shard_size=4)


def _sample_arrays(summary):
  rec = [r for r in summary["records"] if r.get("samples")][0]
  d = rec["samples"]
  files = sorted(glob.glob(os.path.join(d, "shard_*.npz")))
  return d, files, np.concatenate([np.load(f)["x"] for f in files])


def test_sample_job_resumes_identically_after_lost_and_half_written_shards(toy_run, tmp_path):
  wd = copy_run(toy_run, tmp_path / "run")
  ev, config = eval_settings(wd, num_samples=640, batch_size=64, shard_size=128,
                             reference_seeds=2)
  first = jobs.run(wd, "sample", ev, config)
  mmd = [r for r in first["records"] if r["metric"] == "mmd"][0]
  d, files, x_first = _sample_arrays(first)
  assert len(files) == 5 and x_first.shape == (640, 2)
  # x_T of batch b of shard i is sigma_max * N(fold_in(fold_in(key(seed), i), b)): check one.
  k = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 3), 1))[0]
  model = runs.build_model(config)
  params, _, _ = runs.load_params(config, wd)
  from ctm_jax import samplers
  x_T = 80.0 * jax.random.normal(k, (64, 2))
  want = samplers.edm_heun_sampler(model.denoise_fn(params), x_T, 18, model.schedule)
  np.testing.assert_allclose(x_first[3 * 128 + 64:3 * 128 + 128], want, rtol=1e-4, atol=1e-4)

  # A kill at a shard boundary loses whole shards; a kill mid-write leaves a temporary file
  # (never a half shard under the final name, but we also plant one to be sure it is caught).
  os.remove(files[1])
  raw = open(files[3], "rb").read()
  open(files[3], "wb").write(raw[:len(raw) // 3])
  stray = os.path.join(os.path.dirname(files[4]), ".tmp-999-shard_00004.npz")
  open(stray, "wb").write(raw[:100])
  result = [f for f in first["files"] if f.endswith(".json") and "toy-" in f][0]
  os.remove(result)
  second = jobs.run(wd, "sample", ev, config)
  _, files2, x_second = _sample_arrays(second)
  assert np.array_equal(x_first, x_second) and not os.path.exists(stray)
  mmd2 = [r for r in second["records"] if r["metric"] == "mmd"][0]
  assert mmd2["value"] == mmd["value"] and not mmd2.get("reused")
  # A finished setting is not recomputed: its record is reused, results.jsonl not appended.
  n_lines = len(report.read_records(wd))
  third = jobs.run(wd, "sample", ev, config)
  assert all(r.get("reused") for r in third["records"])
  assert len(report.read_records(wd)) == n_lines
  # Each invocation's summary lists its records and files, all present.
  summ = json.load(open(third["summary_path"]))
  assert all(os.path.exists(f) for f in summ["files"])


def _run_eval_cmd(workdir, *args, devices=1):
  return [sys.executable, "-m", "launch.eval", f"--workdir={workdir}",
          f"--fake_cpu_devices={devices}", *args]


@pytest.mark.slow
def test_killed_subprocess_resumes_to_the_same_samples(toy_run, tmp_path):
  args = ["--mode=sample", "--config.eval.samplers=heun:40", "--config.eval.num_samples=4096",
          "--config.eval.batch_size=256", "--config.eval.shard_size=256",
          "--config.eval.reference_seeds=1"]
  killed = copy_run(toy_run, tmp_path / "killed")
  proc = subprocess.Popen(_run_eval_cmd(killed, *args), cwd=ROOT, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if glob.glob(os.path.join(killed, "eval", "step_*", "*", "*", "samples", "shard_00001.npz")):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  done = subprocess.run(_run_eval_cmd(killed, *args), cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  # The same job uninterrupted, in this process on one device.
  ref = copy_run(toy_run, tmp_path / "ref")
  ev, config = eval_settings(ref, samplers="heun:40", num_samples=4096, batch_size=256,
                             shard_size=256, reference_seeds=1)
  summary = jobs.run(ref, "sample", ev, config, devices=jax.devices()[:1])
  _, files, x_ref = _sample_arrays(summary)
  d = glob.glob(os.path.join(killed, "eval", "step_*", "*", "*", "samples"))[0]
  x_killed = np.concatenate([np.load(f)["x"] for f in sorted(glob.glob(os.path.join(d, "shard_*.npz")))])
  assert np.array_equal(x_killed, x_ref)
  rec = lambda wd: [r for r in report.read_records(wd) if r["metric"] == "mmd"][-1]["value"]
  assert rec(killed) == rec(ref)


# ----------------------------------------------------------------------------- FID path

@pytest.fixture(scope="module")
def fid_module():
  from ctm_jax.metrics import fid
  return fid


def fake_feature_fn(seed: int = 0, dim: int = 2048):
  """uint8 NHWC images -> (B, dim): tanh of a fixed random projection of the pixels, in place
  of Inception (the jobs' bookkeeping does not depend on the network).  Row-wise."""
  cache = {}

  def fn(images):
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    if x.shape[1] not in cache:
      w = np.random.default_rng(seed).normal(size=(x.shape[1], dim))
      cache[x.shape[1]] = w / np.sqrt(x.shape[1])
    return np.tanh(x @ cache[x.shape[1]] * 3.0).astype(np.float32)
  return fn


def _weights_file(tmp_path, logits: bool = True):
  """A stand-in weights file (the features come from fake_feature_fn); with a random logits
  matrix for the Inception Score unless logits=False."""
  from ctm_jax.nets import inception
  p = tmp_path / ("inception_standin.npz" if logits else "inception_nologits.npz")
  arrays = {inception.LOGITS_KEY: np.random.default_rng(3).normal(size=(2048, 1008)).astype(
      np.float32) * 0.1} if logits else {}
  np.savez(p, w=np.zeros(3), **arrays)
  return str(p), shards.file_sha256(str(p))


FID_COMMON = dict(batch_size=32, shard_size=64, kid_subsets=10, kid_subset_size=1000,
                  fid_split="test")


@pytest.fixture(scope="module")
def digits_stats(digits_run, tmp_path_factory, fid_module):
  """Reference statistics of the digits test split with the stand-in features (one job)."""
  tmp = tmp_path_factory.mktemp("digits_stats")
  weights, sha = _weights_file(tmp)
  stats = str(tmp / "stats" / "digits-test.npz")
  wd = copy_run(digits_run, tmp / "run")
  feat = fake_feature_fn()
  ev, config = eval_settings(wd, inception_weights=weights, ref_stats=stats, **FID_COMMON)
  summary = jobs.run(wd, "fid_stats", ev, config, feature_fn=feat, feature_id=sha)
  return dict(stats=stats, weights=weights, sha=sha, feat=feat, summary=summary,
              common=dict(inception_weights=weights, ref_stats=stats, **FID_COMMON))


def _value(summary, metric):
  return [r["value"] for r in summary["records"] if r["metric"] == metric][0]


FID_RUN = dict(num_samples=160, samplers="heun:2", inception_score=True, precision_recall=True)


@pytest.fixture(scope="module")
def fid_runs(digits_run, digits_stats, tmp_path_factory):
  """The same FID job, uninterrupted, on 1 and on 2 devices (copies of the digits run)."""
  out = {}
  for n in (1, 2):
    wd = copy_run(digits_run, tmp_path_factory.mktemp(f"fid_{n}dev") / "run")
    ev, config = eval_settings(wd, **FID_RUN, **digits_stats["common"])
    out[n] = jobs.run(wd, "fid", ev, config, feature_fn=digits_stats["feat"],
                      feature_id=digits_stats["sha"], devices=jax.devices()[:n])
  return out


def test_fid_stats_and_fid_records(digits_stats, fid_runs, fid_module):
  feat, sha, stats = digits_stats["feat"], digits_stats["sha"], digits_stats["stats"]
  st = fid_module.load_stats(stats)
  data_u8 = np.rint((data_lib.load_split("digits", "test")["x"] + 1) * 127.5).astype(np.uint8)
  data_feats = feat(data_u8).astype(np.float64)
  np.testing.assert_allclose(st["mu"], data_feats.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st["sigma"], np.cov(data_feats, rowvar=False), rtol=1e-4, atol=1e-6)
  assert st["meta"]["dataset"] == "digits" and list(st["meta"]["resolution"]) == [8, 8, 1]
  assert st["meta"]["count"] == 300 and st["features"].shape == (300, 2048)
  halves = {r["metric"]: r for r in digits_stats["summary"]["records"]}
  assert halves["fid_data_halves"]["num_samples"] == 150
  # KID of 150 against 150 rows: subsets of 75 (half of each), 2 disjoint blocks per draw.
  kh = halves["kid_data_halves"]
  assert (kh["kid_subset_size"], kh["kid_blocks"], kh["kid_subsets"]) == (75, 2, 10)
  assert kh["stderr"] > 0

  summary = fid_runs[1]
  wd = summary["workdir"]
  recs = {r["metric"]: r for r in summary["records"]}
  r = recs["fid"]
  for f in ("value", "sampler", "nfe", "gamma", "num_samples", "ref_stats", "ref_count", "ema",
            "step", "weights", "weights_sha256", "seconds", "network", "resize",
            "ref_stats_sha256", "invocation", "samples", "grid"):
    assert f in r, f
  assert (r["num_samples"], r["ref_count"], r["step"], r["ema"]) == (160, 300, 2, "rate_0p999")
  assert (r["sampler"], r["nfe"], r["weights_sha256"]) == ("heun:2", 3, sha)
  assert r["ref_stats_sha256"] == shards.file_sha256(stats)
  d = os.path.dirname(r["samples"])
  fdir = glob.glob(os.path.join(d, "features-*"))[0]
  f_s = np.concatenate([np.load(f)["features"] for f in sorted(glob.glob(os.path.join(fdir, "shard_*.npz")))])
  x_s = np.concatenate([np.load(f)["x"] for f in sorted(glob.glob(os.path.join(r["samples"], "shard_*.npz")))])
  assert x_s.dtype == np.uint8 and x_s.shape == (160, 8, 8, 1)
  np.testing.assert_allclose(f_s, feat(x_s), rtol=1e-6)
  # An EDM run: its samples become uint8 by EDM's generate.py rule, (x 127.5 + 128).clip(0, 255)
  # cast, written out here on the first batch redrawn from its documented keys.
  assert r["uint8_rule"] == "round"
  config = runs.load_run_config(wd)
  model = runs.build_model(config)
  params = runs.load_params(config, wd, 2, "rate_0p999")[0]
  k_x, k_s = jax.random.split(common.batch_keys(0, 0, 0))
  x_T = 80.0 * jax.random.normal(k_x, (32, 8, 8, 1))
  x = np.asarray(evaluate.sampler_fn(model, evaluate.parse_sampler("heun:2"))(
      params, x_T, k_s, None), np.float32)
  edm = np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8)
  assert np.sum(edm != np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)) >= 10   # (most saturate)
  np.testing.assert_array_equal(x_s[:32], edm)
  # The FID of the cached features against the statistics of freshly computed data features,
  # by the d x d route (the job takes the n x n one; both are tested in test_fid.py).
  f64 = f_s.astype(np.float64)
  want = fid_module.frechet_distance(f64.mean(0), np.cov(f64, rowvar=False),
                                     data_feats.mean(0), np.cov(data_feats, rowvar=False))
  np.testing.assert_allclose(r["value"], want, rtol=1e-6)
  k = recs["kid"]
  assert k["stderr"] > 0 and k["kid_subset_size"] == 80         # half of the 160 samples
  np.testing.assert_allclose(k["value"], fid_module.kid(f_s, st["features"], num_subsets=10,
                                                        subset_size=1000, seed=0)["value"], rtol=1e-9)
  assert os.path.exists(r["grid"])
  for metric in ("fid", "kid"):
    assert os.path.exists(os.path.join(wd, "eval", "plots", f"{metric}_vs_nfe-step2-rate_0p999.png"))
  assert glob.glob(os.path.join(wd, "eval", "events.out.tfevents.*"))
  lines = report.read_records(wd)
  assert {("fid", "heun:2"), ("kid", "heun:2")} <= {(l["metric"], l.get("sampler")) for l in lines}
  # The evaluator's IS (pool3 @ the weights' logits matrix, one split of 160) and precision /
  # recall (k = 3) of the cached sample features against the reference features.
  from ctm_jax.metrics import guided_eval
  from ctm_jax.nets import inception
  w = inception.load_logits_weight(digits_stats["weights"])
  assert recs["inception_score"]["value"] == pytest.approx(
      guided_eval.inception_score(guided_eval.pool3_logits(f_s, w))["value"], rel=1e-9)
  assert recs["inception_score"]["is_splits"] == 1 and recs["inception_score"]["value"] > 1
  pr = guided_eval.precision_recall(st["features"], f_s)
  assert (recs["precision"]["value"], recs["recall"]["value"]) == (pr["precision"], pr["recall"])
  assert recs["precision"]["num_samples"] == 160 and recs["precision"]["k"] == 3


def test_sfid_and_a_guided_diffusion_reference_batch(digits_run, digits_stats, fid_module,
                                                    tmp_path):
  """config.eval.sfid against a reference batch shaped like guided-diffusion's
  VIRTUAL_imagenet64_labeled.npz (mu, sigma, mu_s, sigma_s and the images arr_0, no features):
  FID against its mu / sigma, sFID against mu_s / sigma_s, precision / recall against the
  features of its images; and --mode=fid_stats with sfid=True adds mu_s, sigma_s."""
  from ctm_jax.metrics import guided_eval
  pool, spat = digits_stats["feat"], fake_feature_fn(seed=1, dim=guided_eval.SPATIAL_DIM)
  feat = lambda images: np.concatenate([pool(images), spat(images)], axis=1)
  images = np.rint((data_lib.load_split("digits", "test")["x"] + 1) * 127.5).astype(np.uint8)
  fp, fs = pool(images).astype(np.float64), spat(images).astype(np.float64)
  batch = str(tmp_path / "VIRTUAL_digits_labeled.npz")
  np.savez(batch, arr_0=images, mu=fp.mean(0), sigma=np.cov(fp, rowvar=False), mu_s=fs.mean(0),
           sigma_s=np.cov(fs, rowvar=False))
  wd = copy_run(digits_run, tmp_path / "run")
  ev, config = eval_settings(wd, num_samples=160, samplers="heun:2", sfid=True,
                             precision_recall=True, **dict(digits_stats["common"], ref_stats=batch))
  summary = jobs.run(wd, "fid", ev, config, feature_fn=feat, feature_id=digits_stats["sha"])
  recs = {r["metric"]: r for r in summary["records"]}
  d = os.path.dirname(recs["fid"]["samples"])
  fdir = glob.glob(os.path.join(d, "features-*-sfid"))[0]
  f_all = np.concatenate([np.load(f)["features"]
                          for f in sorted(glob.glob(os.path.join(fdir, "shard_*.npz")))])
  x_s = np.concatenate([np.load(f)["x"]
                        for f in sorted(glob.glob(os.path.join(recs["fid"]["samples"], "shard_*.npz")))])
  np.testing.assert_allclose(f_all, feat(x_s), rtol=1e-6)
  f_p, f_sp = f_all[:, :2048].astype(np.float64), f_all[:, 2048:].astype(np.float64)
  # The d x d route of the Frechet distance (the job takes the n x n one; test_fid.py).
  np.testing.assert_allclose(recs["fid"]["value"], fid_module.frechet_distance(
      f_p.mean(0), np.cov(f_p, rowvar=False), fp.mean(0), np.cov(fp, rowvar=False)), rtol=1e-6)
  np.testing.assert_allclose(recs["sfid"]["value"], fid_module.frechet_distance(
      f_sp.mean(0), np.cov(f_sp, rowvar=False), fs.mean(0), np.cov(fs, rowvar=False)), rtol=1e-6)
  assert abs(recs["sfid"]["value"] - recs["fid"]["value"]) > 1.0       # another feature set
  assert recs["sfid"]["num_samples"] == 160 and recs["sfid"]["ref_stats"].endswith(
      "VIRTUAL_digits_labeled.npz")
  pr = guided_eval.precision_recall(fp.astype(np.float32), f_all[:, :2048])
  assert (recs["precision"]["value"], recs["recall"]["value"]) == (pr["precision"], pr["recall"])
  assert glob.glob(os.path.join(wd, "eval", "ref_features", "*-sfid", "shard_*.npz"))
  # fid_stats with sfid: mu_s, sigma_s of the data's spatial features beside mu, sigma.
  stats = str(tmp_path / "stats_sfid.npz")
  ev, config = eval_settings(wd, sfid=True, **dict(digits_stats["common"], ref_stats=stats))
  jobs.run(wd, "fid_stats", ev, config, feature_fn=feat, feature_id=digits_stats["sha"])
  st = fid_module.load_stats(stats)
  np.testing.assert_allclose(st["mu_s"], fs.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(st["sigma_s"], np.cov(fs, rowvar=False), rtol=1e-4, atol=1e-6)
  assert st["features"].shape == (300, 2048)


def test_two_devices_give_the_same_fid_as_one(fid_runs):
  (s1, x1), (s2, x2) = [(fid_runs[n], _sample_arrays(fid_runs[n])[2]) for n in (1, 2)]
  assert np.array_equal(x1, x2)
  assert _value(s1, "fid") == _value(s2, "fid") and _value(s1, "kid") == _value(s2, "kid")


def test_fid_resumes_identically_after_an_interrupted_feature_shard(digits_run, digits_stats,
                                                                    fid_runs, tmp_path):
  feat, sha = digits_stats["feat"], digits_stats["sha"]
  wd = copy_run(digits_run, tmp_path / "run")
  ev, config = eval_settings(wd, **FID_RUN, **digits_stats["common"])
  calls = []

  def dying(images):            # "killed" in the middle of the second feature shard
    calls.append(1)
    if len(calls) == 4:
      raise KeyboardInterrupt("killed")
    return feat(images)

  with pytest.raises(KeyboardInterrupt):
    jobs.run(wd, "fid", ev, config, feature_fn=dying, feature_id=sha, devices=jax.devices()[:1])
  assert all(r["metric"] != "fid" for r in report.read_records(wd))
  resumed = jobs.run(wd, "fid", ev, config, feature_fn=feat, feature_id=sha,
                     devices=jax.devices()[:1])
  assert _value(resumed, "fid") == _value(fid_runs[1], "fid")       # the uninterrupted job
  assert _value(resumed, "kid") == _value(fid_runs[1], "kid")


def test_nfe_lines_one_per_gamma_starting_at_the_one_step_point():
  g = lambda sampler, gamma, nfe, value, metric="fid", se=None: dict(
      metric=metric, sampler=sampler, kind="gamma", gamma=gamma, nfe=nfe, value=value, stderr=se)
  recs = [g("onestep", 0.0, 1, 9.0), g("gamma:0:2", 0.0, 2, 7.0), g("gamma:1:2", 1.0, 2, 8.0),
          g("gamma:1:4", 1.0, 4, 6.0), g("gamma:0:2", 0.0, 2, 6.5),     # a newer gamma:0:2
          dict(metric="fid", sampler="heun:18", kind="heun", gamma=None, nfe=35, value=5.0),
          g("onestep", 0.0, 1, 0.01, "kid", 0.002)]
  assert report.nfe_lines(recs) == {
      "gamma = 0": [(1, 9.0, None), (2, 6.5, None)],
      "gamma = 1": [(1, 9.0, None), (2, 8.0, None), (4, 6.0, None)],
      "EDM Heun (score head)": [(35, 5.0, None)]}
  assert report.nfe_lines(recs, "kid") == {"gamma = 0": [(1, 0.01, 0.002)]}


# ----------------------------------------------------------------------------- NLL path

def _toy_mixture_logpdf(x, sigma):
  """log density of the documented toy mixture (8 components on the unit circle, weights 2 and
  1 in turn, stds 0.12 along the ring and 0.04 across) convolved with N(0, sigma^2 I), by scipy
  (not through ctm_jax.oracle)."""
  from scipy import stats
  from scipy.special import logsumexp
  w = np.where(np.arange(8) % 2 == 0, 2.0, 1.0)
  w = w / w.sum()
  comps = []
  for k, a in enumerate(2 * np.pi * np.arange(8) / 8):
    t, r = np.array([-np.sin(a), np.cos(a)]), np.array([np.cos(a), np.sin(a)])
    cov = 0.12 ** 2 * np.outer(t, t) + 0.04 ** 2 * np.outer(r, r) + sigma ** 2 * np.eye(2)
    comps.append(np.log(w[k]) + stats.multivariate_normal(r, cov).logpdf(x))
  return logsumexp(np.stack(comps, 1), axis=1)


def test_nll_job_with_a_closed_form_logp(toy_run, tmp_path):
  """The job's bookkeeping around a likelihood function: per-example values, mean and standard
  error against numpy, the exact mixture's NLL and the gap to it against scipy, and an
  identical result after a lost shard."""
  wd = copy_run(toy_run, tmp_path / "run")
  ev, config = eval_settings(wd, nll_num_examples=200, nll_batch_size=16, shard_size=64,
                             batch_size=16)

  def logp_fn(params, x, key, labels):
    del params, labels
    gauss = -0.5 * jnp.sum(x ** 2, 1) / 4.0 - jnp.log(2 * jnp.pi * 4.0)
    return {"logp": gauss + 1e-3 * jax.random.normal(key, x.shape[:1]), "nfe": jnp.int32(7)}

  first = jobs.run(wd, "nll", ev, config, logp_fn=logp_fn)
  recs = {r["metric"]: r for r in first["records"]}
  assert set(recs) == {"nll_ode", "nll_exact_mixture", "nll_gap_to_exact"}
  x = data_lib.load_split("toy_gmm", "test", max_examples=200)["x"].astype(np.float64)
  nll = 0.5 * np.sum(x ** 2, 1) / 4.0 + np.log(2 * np.pi * 4.0)
  exact = -_toy_mixture_logpdf(x, 0.002)
  r = recs["nll_ode"]
  assert (r["unit"], r["num_examples"], r["split"]) == ("nats", 200, "test")
  assert abs(r["value"] - nll.mean()) < 3e-4
  assert abs(r["stderr"] - nll.std(ddof=1) / np.sqrt(200)) < 1e-4 and r["nfe_mean"] == 7
  e, g = recs["nll_exact_mixture"], recs["nll_gap_to_exact"]
  np.testing.assert_allclose(e["value"], exact.mean(), atol=1e-4)
  np.testing.assert_allclose(e["stderr"], exact.std(ddof=1) / np.sqrt(200), rtol=1e-3)
  np.testing.assert_allclose(g["value"], (nll - exact).mean(), atol=3e-4)
  np.testing.assert_allclose(g["stderr"], (nll - exact).std(ddof=1) / np.sqrt(200), rtol=1e-2)
  assert all(q["label"] for q in recs.values())
  d = r["shards"]
  os.remove(os.path.join(d, "shard_00001.npz"))
  os.remove(os.path.join(d, "nll.json"))
  second = jobs.run(wd, "nll", ev, config, logp_fn=logp_fn)
  assert [q["value"] for q in second["records"]] == [q["value"] for q in first["records"]]


def test_nll_job_refuses_a_solve_that_ran_out_of_steps(toy_run, tmp_path):
  """The PF-ODE runs without diffrax's in-program check (a host callback, which would not
  lower for TPU / GPU); the job checks the returned flag on the host and stops, naming the
  setting, with nothing of the failed shard saved."""
  wd = copy_run(toy_run, tmp_path / "run")
  ev, config = eval_settings(wd, nll_num_examples=32, nll_batch_size=16, shard_size=32,
                             batch_size=16, nll_metrics="nll_ode")

  def logp_fn(params, x, key, labels):
    del params, key, labels
    return {"logp": -jnp.sum(x ** 2, 1), "solver_failed": jnp.max(x[:, 0]) > -100.0}

  with pytest.raises(RuntimeError, match=r"maximum number of solver steps.*nll_max_steps"):
    jobs.run(wd, "nll", ev, config, logp_fn=logp_fn)
  assert not [f for _, _, fs in os.walk(os.path.join(wd, "eval")) for f in fs
              if f.startswith("shard_")]


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("fields,mode,pattern", [
    (dict(samplers="gamma:0:0"), "sample", r"config\.eval\.samplers: sampler .gamma:0:0.: NFE 0 is outside \[1, 1000\]"),
    (dict(samplers="heun:1"), "sample", r"config\.eval\.samplers: .*heun:<steps >= 2>"),
    (dict(samplers="gamma:0:1001"), "sample", r"config\.eval\.samplers: .*NFE 1001 is outside \[1, 1000\]"),
    (dict(samplers="gamma:1.5:2"), "sample", r"config\.eval\.samplers: .*gamma = 1\.5 is outside \[0, 1\]"),
    (dict(samplers="warp:3"), "sample", r"config\.eval\.samplers: bad sampler 'warp:3': use onestep"),
    (dict(samplers="onestep"), "sample", r"'onestep' jumps with CTM's G\(x, t, s\).*edm run.*heun"),
    (dict(samplers="cm:2"), "sample", r"'cm:2' jumps with CTM's"),
    (dict(samplers="teacher_heun:18"), "sample", r"samples a distilled run's teacher.*'edm'"),
    (dict(batch_size=12), "sample", r"config\.eval\.batch_size = 12 must be divisible by the device count 8"),
    (dict(batch_size=64, shard_size=100), "sample", r"config\.eval\.shard_size = 100 must be a multiple"),
    (dict(ema="rate_0p5"), "sample", r"config\.eval\.ema = 'rate_0p5' is not an EMA.*rate_0p9"),
    (dict(checkpoints="5"), "sample", r"config\.eval\.checkpoints: steps \[5\] .*\[2, 3\]"),
    (dict(checkpoints="newest"), "sample", r"config\.eval\.checkpoints must be 'latest', 'all'"),
    (dict(num_samples=-1), "sample", r"config\.eval\.num_samples must be in \[1, inf\)"),
    (dict(nll_divergence="exactly"), "nll", r"config\.eval\.nll_divergence must be one of"),
    (dict(nll_probes=0), "nll", r"config\.eval\.nll_probes must be in \[1, inf\)"),
    (dict(nll_rtol=0.0), "nll", r"config\.eval\.nll_rtol must be in \(0"),
    (dict(nll_split="val"), "nll", r"config\.eval\.nll_split must be one of \('', 'train', 'test'\)"),
    (dict(nll_metrics="nll_ode,bpd_elbo"), "nll", r"config\.eval\.nll_metrics = 'nll_ode,bpd_elbo': points data accepts .*'nll_ode'"),
    (dict(nll_elbo_samples=0), "nll", r"config\.eval\.nll_elbo_samples must be in \[1, inf\)"),
    (dict(nll_protocol="vdm"), "nll", r"config\.eval\.nll_protocol must be one of \('dequantized', 'point', 'score_sde', 'ctm'\)"),
    (dict(nll_protocol="ctm"), "nll", r"config\.eval\.nll_protocol = 'ctm': the protocols are for 8-bit images"),
    (dict(fid_split="all"), "sample", r"config\.eval\.fid_split must be one of \('train', 'test', 'train\+test'\)"),
    (dict(), "fid", r"--mode=fid needs an image data set"),
])
def test_bad_settings_are_refused_before_any_compute(toy_run, tmp_path, fields, mode, pattern):
  wd = copy_run(toy_run, tmp_path / "run")
  ev, config = eval_settings(wd, **fields)
  with pytest.raises(config_lib.ConfigError, match=pattern):
    jobs.run(wd, mode, ev, config)
  assert not os.path.exists(os.path.join(wd, "eval"))


def test_ema_mean_age_and_the_lag_warning(toy_run, caplog):
  """runs.ema_mean_age against the EMA of theta_t = t run step by step (age = t - EMA) with
  the decays written out (a fixed rate; EDM's half-life 0.5^(B / min(h, ratio * t * B))),
  and against r (1 - r^s) / (1 - r); load_params warns for a lagging EMA, not for params."""
  from configs import cifar10_edm
  def simulated(betas):
    avg = 0.0
    for t, b in enumerate(betas):
      avg = b * avg + (1.0 - b) * (t + 1)
    return len(betas) - avg
  c = cifar10_edm.get_config()            # rate 0.9999 and a 500 kimg half-life, batch 512
  s, bs = 3000, c.training.batch_size
  halflife = [0.5 ** (bs / max(min(500e3, 0.05 * t * bs), 1e-8)) for t in range(s)]
  np.testing.assert_allclose(runs.ema_mean_age(c, "halflife", s), simulated(halflife), rtol=1e-4)
  np.testing.assert_allclose(runs.ema_mean_age(c, "rate_0p9999", s), simulated([0.9999] * s),
                             rtol=1e-4)
  np.testing.assert_allclose(runs.ema_mean_age(c, "rate_0p9999", s),
                             0.9999 * (1 - 0.9999 ** s) / 1e-4, rtol=1e-4)
  assert runs.ema_mean_age(c, "params", s) == 0.0
  config, n = runs.load_run_config(toy_run), runs.checkpoint_steps(toy_run)[-1]
  age = 0.9 * (1 - 0.9 ** n) / 0.1                     # a few steps: rate 0.9 lags
  caplog.set_level("WARNING")
  runs.load_params(config, toy_run, None, "rate_0p9", field="config.teacher.ema")
  said = [r.getMessage() for r in caplog.records if "lags the trained weights" in r.getMessage()]
  assert said == [f"config.teacher.ema = 'rate_0p9': this EMA's weights are on average "
                  f"{age:.0f} steps old, {100 * age / n:.0f}% of the {n} steps trained, so it "
                  f"lags the trained weights; 'params' (the trained weights) or a shorter EMA "
                  f"may be closer"]
  caplog.clear()
  runs.load_params(config, toy_run, None, "params")
  assert not [r for r in caplog.records if "lags" in r.getMessage()]


def test_finished_setting_logs_its_picture(tmp_path, caplog):
  """common.finish: one log line per record, naming the grid (images) or picture (2-D)."""
  import types
  job = types.SimpleNamespace(workdir=str(tmp_path), records=[], files=[])
  caplog.set_level("INFO")
  grid = str(tmp_path / "eval" / "grid.png")
  common.finish(job, str(tmp_path / "r.json"), [{"metric": "samples", "value": 64,
                                                 "sampler": "heun:3", "grid": grid}], [grid])
  assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("samples")] == [
      f"samples = 64  [sampler=heun:3, grid={grid}]"]
  assert json.load(open(tmp_path / "r.json"))["files"] == [grid]


def test_each_mode_checks_the_batch_it_uses():
  """--mode=nll checks shard_size against nll_batch_size only: the sampling batch_size (a
  bad one for sampling here) is not its setting; --mode=sample checks it and not the NLL's."""
  from configs import toy_edm
  config = toy_edm.get_config()
  check = lambda mode, **f: settings.validate(settings.merge_eval(base.eval_block(), None, f,
                                                                   dataset=config.data.dataset),
                                              config, mode=mode, num_devices=4, process_count=1)
  check("nll", shard_size=20, batch_size=500, nll_batch_size=4)
  check("sample", shard_size=20, batch_size=4, nll_batch_size=500)
  with pytest.raises(config_lib.ConfigError, match=r"shard_size = 20 must be a multiple of "
                                                   r"config\.eval\.nll_batch_size = 8"):
    check("nll", shard_size=20, batch_size=4, nll_batch_size=8)
  with pytest.raises(config_lib.ConfigError, match=r"shard_size = 20 must be a multiple of "
                                                   r"config\.eval\.batch_size = 500"):
    check("sample", shard_size=20, batch_size=500, nll_batch_size=4)
  with pytest.raises(config_lib.ConfigError, match=r"batch_size = 6 must be divisible by the "
                                                   r"device count 4"):
    check("all", shard_size=12, batch_size=6, nll_batch_size=4)


def test_fid_stats_default_is_in_the_run_folder_and_missing_weights_say_how(tmp_path):
  """The default reference statistics are <workdir>/eval/fid_stats/<set>-<split>.npz; the
  missing-weights error gives the recipe, which the doc section it names holds too."""
  from configs import digits_edm
  config, wd = digits_edm.get_config(), str(tmp_path / "run")
  check = lambda mode, **f: settings.validate(settings.merge_eval(base.eval_block(), None, f,
                                                                   dataset=config.data.dataset),
                                              config, mode=mode, num_devices=1, process_count=1,
                                              workdir=wd)
  with pytest.raises(config_lib.ConfigError) as got:
    check("fid_stats")
  from ctm_jax.nets import inception
  recipe = inception.CONVERT_COMMAND.format(out=settings.INCEPTION_FILE)
  assert recipe in str(got.value) and "docs/evaluation.md" in str(got.value)
  with pytest.raises(config_lib.ConfigError, match="no such file; make it once with `"
                     + re.escape(recipe)):
    check("fid_stats", inception_weights=str(tmp_path / "nope.npz"))
  doc = " ".join(open(os.path.join(ROOT, "docs", "evaluation.md")).read().replace("\\\n", " ")
                 .split())
  assert " ".join(inception.CONVERT_COMMAND.format(out="inception_fid.npz").split(" && ")) in doc
  weights = tmp_path / "inception.npz"
  weights.write_bytes(b"")
  check("fid_stats", inception_weights=str(weights))
  want = os.path.join(wd, "eval", "fid_stats", "digits-train.npz")
  assert settings.stats_path(config, base.eval_block(), wd) == want
  with pytest.raises(config_lib.ConfigError, match="default config.eval.ref_stats = "
                     + re.escape(repr(want)) + ": no such file"):
    check("fid", inception_weights=str(weights))


def test_fid_inputs_are_checked(digits_run, tmp_path, fid_module):
  wd = copy_run(digits_run, tmp_path / "run")
  ev, config = eval_settings(wd, **FID_COMMON)
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.inception_weights must name"):
    jobs.run(wd, "fid", ev, config)
  ev, _ = eval_settings(wd, **FID_COMMON, inception_weights=str(tmp_path / "nope.npz"))
  with pytest.raises(config_lib.ConfigError, match=r"inception_weights = .*nope\.npz.*no such file"):
    jobs.run(wd, "fid", ev, config)
  weights, _ = _weights_file(tmp_path)
  ev, _ = eval_settings(wd, **FID_COMMON, inception_weights=weights, ref_stats=str(tmp_path / "none.npz"))
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.ref_stats = .*none\.npz.*--mode=fid_stats"):
    jobs.run(wd, "fid", ev, config)
  cases = [(dict(mu=np.zeros(64), sigma=np.eye(64)), {}, r"holds 64-d statistics.*2048-d"),
           (dict(mu=np.zeros(2048), sigma=np.eye(2048)), dict(dataset="digits", resolution=[32, 32, 3]),
            r"is of \(32, 32, 3\) images; this run makes \(8, 8, 1\)"),
           (dict(mu=np.zeros(2048), sigma=np.eye(2048)), dict(dataset="cifar10"),
            r"computed on 'cifar10'.*'digits'")]
  for i, (arrays, meta, pattern) in enumerate(cases):
    path = str(tmp_path / f"stats{i}.npz")
    fid_module.save_stats(path, arrays["mu"], arrays["sigma"], **meta)
    ev, _ = eval_settings(wd, **FID_COMMON, inception_weights=weights, ref_stats=path)
    with pytest.raises(config_lib.ConfigError, match=pattern):
      jobs.run(wd, "fid", ev, config)
  # IS from weights without the logits layer (NVIDIA's detector), precision / recall without
  # reference features: refused before any compute, naming the file that has what is missing.
  nologits, _ = _weights_file(tmp_path, logits=False)
  path = str(tmp_path / "stats_mu_sigma.npz")
  fid_module.save_stats(path, np.zeros(2048), np.eye(2048), dataset="digits")
  for fields, pattern in [
      (dict(inception_weights=nologits, inception_score=True),
       r"config\.eval\.inception_score = True: .*inception_nologits\.npz: .*lack the 1008-way "
       r"logits layer .*pt_inception-2015-12-05"),
      (dict(inception_weights=weights, precision_recall=True),
       r"config\.eval\.precision_recall = True needs the reference features or images; "
       r".*stats_mu_sigma"),
      (dict(inception_weights=weights, sfid=True),
       r"config\.eval\.sfid = True needs sFID statistics \(mu_s, sigma_s\); .*stats_mu_sigma.*"
       r"--mode=fid_stats --config\.eval\.sfid=True")]:
    ev, _ = eval_settings(wd, **FID_COMMON, ref_stats=path, **fields)
    with pytest.raises(config_lib.ConfigError, match=pattern):
      jobs.run(wd, "fid", ev, config)
  assert not os.path.exists(os.path.join(wd, "eval"))


def test_nll_needs_a_score_head_and_a_run(toy_run, tmp_path, monkeypatch):
  from ctm_jax.methods import edm
  wd = copy_run(toy_run, tmp_path / "run")
  ev, config = eval_settings(wd)
  monkeypatch.setattr(edm.EDM, "has_score_head", False)
  with pytest.raises(config_lib.ConfigError, match=r"--mode=nll: .*score head.*'edm' run has none"):
    jobs.run(wd, "nll", ev, config)
  monkeypatch.undo()          # (without a score head the default heun sampler is refused too)
  with pytest.raises(runs.NotARunError, match="not a ctm-jax run directory"):
    runs.load_run_config(str(tmp_path))
  os.makedirs(tmp_path / "empty" / "checkpoints")
  shutil.copy(os.path.join(wd, "config.json"), tmp_path / "empty")
  with pytest.raises(runs.NotARunError, match="no finished checkpoint"):
    jobs.run(str(tmp_path / "empty"), "sample", ev, config)


def test_settings_precedence(toy_run):
  config = runs.load_run_config(toy_run)
  assert "eval" in config                                     # new runs store the block
  config.eval.num_samples = 123
  config.eval.seed = 5
  ev = settings.merge_eval(base.eval_block(), config, {"eval.seed": 9})
  # run block over defaults (toy_edm's shard size 4096, base 2048), command line over both
  assert (ev.num_samples, ev.seed, ev.shard_size, ev.kid_subsets) == (123, 9, 4096, 100)
  assert base.eval_block().shard_size == 2048
  del config["eval"]                                          # a run saved before the block
  ev = settings.merge_eval(base.eval_block(), config, {})
  assert (ev.num_samples, ev.shard_size) == (10000, 2048)
  # ... and on the data sets papers report FID on, their count: 50k.
  for dataset, n in (("cifar10", 50_000), ("imagenet64", 50_000), ("mnist", 10_000)):
    config.data.dataset = dataset
    assert settings.merge_eval(base.eval_block(), config, {}).num_samples == n
  assert settings.merge_eval(base.eval_block(), config, {"num_samples": 7}).num_samples == 7
  with pytest.raises(config_lib.ConfigError, match=r"config\.eval\.nmu_samples; did you mean config\.eval\.num_samples"):
    settings.merge_eval(base.eval_block(), config, {"eval.nmu_samples": 3})


def test_cli_mistakes_end_in_one_line_and_status_2(toy_run, tmp_path):
  bad = subprocess.run(_run_eval_cmd(toy_run, "--config.eval.samplrs=heun:3"), cwd=ROOT,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "launch.eval: error: unknown field config.eval.samplrs; did you mean config.eval.samplers?")
  assert "Traceback" not in bad.stderr
  nocfg = subprocess.run(_run_eval_cmd(str(tmp_path / "official"),
                                       "--checkpoint=tests/fixtures/ctm_songunet_tiny.pt"),
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
  assert nocfg.returncode == 2 and "Traceback" not in nocfg.stderr
  assert nocfg.stderr.strip().splitlines()[-1] == (
      "launch.eval: error: --checkpoint needs --run_config (the config whose network the file "
      "holds, e.g. configs/cifar10_ctm.py)")
  assert not os.path.exists(tmp_path / "official")          # nothing written
  wd = copy_run(toy_run, tmp_path / "toy_run")
  sample = lambda *a: subprocess.run([sys.executable, "-m", "launch.sample", *a], cwd=ROOT,
                                     env=subprocess_env(), capture_output=True, text=True,
                                     timeout=300)
  notrun = sample(f"--workdir={tmp_path / 'toy_rnu'}", "--samplers=heun:3")
  assert notrun.returncode == 2 and "Traceback" not in notrun.stderr
  last = notrun.stderr.strip().splitlines()[-1]
  assert last.startswith("launch.sample: error: ") and "is not a ctm-jax run directory" in last
  assert last.endswith(f"; did you mean --workdir={wd}?"), last
  bad = sample(f"--workdir={wd}", "--samplers=heun:1", "--step=-1")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "launch.sample: error: --samplers: bad sampler 'heun:1'"), bad.stderr[-2000:]


@pytest.mark.slow
def test_launch_sample_log_is_quiet_and_names_its_picture(toy_run, tmp_path):
  """A launch.sample run: no Orbax read-only warnings, and the log names its picture."""
  wd = copy_run(toy_run, tmp_path / "run")
  good = subprocess.run([sys.executable, "-m", "launch.sample", f"--workdir={wd}",
                         "--samplers=heun:3", "--num_samples=64", "--batch_size=64",
                         "--config.eval.shard_size=64", "--config.eval.reference_seeds=1"],
                        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                        timeout=600)
  assert good.returncode == 0, good.stderr[-3000:]
  for quiet in ("Given directory is read only", "read_only=True", "Traceback"):
    assert quiet not in good.stderr, good.stderr[-3000:]
  pics = re.findall(r"picture=(\S+\.png)", good.stderr)
  assert pics and all(os.path.isfile(p) and p.startswith(wd) for p in pics), good.stderr[-3000:]


def test_launch_sample_maps_its_flags_onto_eval_fields():
  from launch import sample
  got = sample.translate(["p", "--workdir=w", "--samplers=onestep,heun:3", "--num_samples=5",
                          "--step=-1", "--config=configs/toy_edm.py", "--ema=rate_0p9"])
  assert got == ["p", "--mode=sample", "--workdir=w", "--config.eval.samplers=onestep,heun:3",
                 "--config.eval.num_samples=5", "--config.eval.checkpoints=latest",
                 "--run_config=configs/toy_edm.py", "--config.eval.ema=rate_0p9"]
  assert sample.translate(["p", "--step=400"])[-1] == "--config.eval.checkpoints=400"


# ----------------------------------------------------------------------------- CTM runs

@pytest.mark.slow
def test_ctm_samplers_teacher_and_ode_error(tmp_path):
  c = toy_ctm.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_dim = 32, 2, 16
  set_fields(c, {"training.batch_size": 64, "training.num_train_steps": 2, "training.log_every": 1,
                 "training.checkpoint_every": 2, "training.sample_every": 0, "ctm.num_points": 6,
                 "ctm.max_k": 3})
  wd = str(tmp_path / "ctm")
  train.train_and_evaluate(c, wd)
  ev, config = eval_settings(wd, samplers="onestep,gamma:0.5:3,teacher_heun:4", num_samples=128,
                             batch_size=64, shard_size=128, reference_seeds=2,
                             ode_error_samples=16)
  summary = jobs.run(wd, "sample", ev, config)
  recs = {(r["metric"], r.get("sampler")): r for r in summary["records"]}
  assert {("mmd", "onestep"), ("mmd", "gamma:0.5:3"), ("mmd", "teacher_heun:4"),
          ("ode_error", None)} <= set(recs)
  assert recs[("mmd", "teacher_heun:4")]["ema"] == "teacher"
  assert recs[("mmd", "gamma:0.5:3")]["nfe"] == 3 and recs[("mmd", "gamma:0.5:3")]["gamma"] == 0.5
  ode = recs[("ode_error", None)]
  assert ode["num_samples"] == 16 and np.isfinite(ode["value"]) and ode["value"] > 0
  # The samples are the samplers applied to the documented x_T: recompute batch 1 of shard 0.
  from ctm_jax import samplers
  from ctm_jax.oracle import toy_mixture_2d
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 1)
  k_x, k_s = jax.random.split(key)
  x_T = 80.0 * jax.random.normal(k_x, (64, 2))
  model = runs.build_model(config)
  params, _, _ = runs.load_params(config, wd, None, "rate_0p999")
  want = {"onestep": samplers.onestep(model.jump_fn(params), x_T, model.schedule),
          "teacher_heun:4": samplers.edm_heun_sampler(toy_mixture_2d().denoise, x_T, 4,
                                                      model.schedule)}
  for name, w in want.items():
    x = np.concatenate([np.load(f)["x"] for f in sorted(glob.glob(
        os.path.join(recs[("mmd", name)]["samples"], "shard_*.npz")))])
    np.testing.assert_allclose(x[64:128], w, rtol=1e-4, atol=1e-4)
  assert os.path.exists(recs[("mmd", "onestep")]["picture"])


@pytest.mark.slow
def test_training_time_2d_metrics_come_with_references(tmp_path):
  """write_samples on 2-D data: metrics at sampling.num_eval_samples points, beside the two
  references (mean and spread over seeds; not floors), and a picture with the data beside."""
  cfg = tiny_config(**{"training.num_train_steps": 2, "training.checkpoint_every": 2,
                       "training.sample_every": 2, "sampling.num_eval_samples": 256})
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  got = summary["samples"]
  assert set(got) == {"heun18", "two_sample_ref", "exact_denoiser_ref"}
  for ref in ("two_sample_ref", "exact_denoiser_ref"):
    assert got[ref]["mmd_std"] > 0 and got[ref]["sliced_w1_std"] > 0
  # Two independent exact sets of 256 points: MMD^2 is unbiased, so its mean over the seeds is
  # near 0 (within 4 of its standard errors), and a sliced W1 of that size is about 0.1 or less.
  two = got["two_sample_ref"]
  assert abs(two["mmd"]) < 4 * two["mmd_std"] / np.sqrt(train.REFERENCE_SEEDS) + 1e-6
  assert 0 < two["sliced_w1"] < 0.15
  assert os.path.exists(tmp_path / "run" / "samples" / "heun18_step00000002.png")


def test_paper_config_settings_validate_and_exact_trace_is_refused_in_high_dimension():
  from configs import cifar10_ctm, cifar10_edm, imagenet64_edm
  for mod in (cifar10_edm, cifar10_ctm, imagenet64_edm):
    c = mod.get_config()
    assert c.eval.num_samples == 50_000
    for mode in ("sample", "nll"):
      settings.validate(c.eval, c, mode=mode, num_devices=8, process_count=2)
  c = cifar10_edm.get_config()
  ev = settings.merge_eval(base.eval_block(), c, {"eval.nll_divergence": "exact"})
  with pytest.raises(config_lib.ConfigError, match=r"nll_divergence = 'exact' .* 3072 x 3072 .*'hutchinson'"):
    settings.validate(ev, c, mode="nll", num_devices=8, process_count=1)
  assert common.nll_split(ev, imagenet64_edm.get_config()) == "validation"


@pytest.mark.slow
def test_nll_of_images_gives_the_labelled_quantities(digits_run, tmp_path):
  """--mode=nll on digits through the score head, protocol 'dequantized': the PF-ODE bits/dim
  and CTM's ELBO, each against the likelihood module's estimators applied to inputs and keys
  built here from the documented formulas (y = (x + u)/128 - 1, u ~ U[0,1) from the first half
  of the batch key, the probes from the second of split(second half, 3); bits/dim
  = -log p / (64 ln 2) + 7)."""
  from ctm_jax.evaljob import nll
  from ctm_jax.metrics import likelihood
  wd = copy_run(digits_run, tmp_path / "run")
  ev, config = eval_settings(wd, nll_num_examples=4, nll_batch_size=4, batch_size=4,
                             shard_size=4, nll_elbo_samples=3, nll_rtol=1e-3, nll_atol=1e-3)
  recs = {r["metric"]: r for r in jobs.run(wd, "nll", ev, config, devices=jax.devices()[:1])["records"]}
  assert set(recs) == set(common.IMAGE_METRICS)
  u8 = np.rint((data_lib.load_split("digits", "test", max_examples=4)["x"] + 1) * 127.5)
  k_deq, k_est = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0))
  deq = (u8 + np.asarray(jax.random.uniform(k_deq, u8.shape))) / 128.0 - 1.0
  model = runs.build_model(config)
  params, _, _ = runs.load_params(config, wd)
  ode = jax.jit(lambda p, y: likelihood.pf_ode_log_likelihood(
      model.denoise_fn(p), y, jax.random.split(k_est, 3)[1], sigma_min=0.002, sigma_max=80.0, rtol=1e-3,
      atol=1e-3)["logp"])
  elbo = likelihood.sde_elbo(model.denoise_fn(params), jnp.asarray(deq, jnp.float32), k_est,
                             sigma_lo=likelihood.ctm_elbo_sigma_lo(), sigma_max=80.0,
                             num_samples=3)["elbo"]
  want = {"bpd_ode": ode(params, jnp.asarray(deq, jnp.float32)), "bpd_elbo": elbo}
  for metric, logp in want.items():
    r = recs[metric]
    bpd = -np.asarray(logp, np.float64) / (64 * np.log(2.0)) + 7.0
    assert (r["unit"], r["num_examples"], r["split"], r["label"]) == (
        "bits/dim", 4, "test", nll.LABELS[metric])
    assert (r["dequantization"], r["protocol"]) == ("uniform", "dequantized")
    # ODE: within the solver's tolerance (the job compiles the solve inside its own jit, and
    # round-off may move the adaptive steps); the ELBO has no adaptive steps.
    rtol = 1e-5 if metric == "bpd_elbo" else 2e-3
    np.testing.assert_allclose(r["value"], bpd.mean(), rtol=rtol)
    np.testing.assert_allclose(r["stderr"], bpd.std(ddof=1) / 2, rtol=50 * rtol)
    assert 1 < r["value"] < 20
  assert recs["bpd_elbo"]["elbo_samples"] == 3
  assert recs["bpd_elbo"]["sigma_lo"] == pytest.approx(likelihood.ctm_elbo_sigma_lo())


@pytest.mark.parametrize("protocol", [pytest.param("point", marks=pytest.mark.slow), "ctm"])
def test_nll_of_images_labels_inputs_and_bits_per_dim_with_a_closed_form_logp(
    digits_run, tmp_path, protocol):
  """The CI form of the test above: the PF-ODE replaced by the closed-form log-density of
  N(0, 0.05^2 I) on its input y (so the ODE record pins down the protocol's input: 'point'
  v/127.5 - 1 of the test split; 'ctm' the same values of the train split, each flipped when
  bernoulli(fold_in(first half of the batch key, 1)) says so), bits/dim = -log p / (64 ln 2) + 7,
  mean and standard error over examples; the ELBO through the real score head with one draw,
  against the likelihood module called directly (for 'ctm': train mode, decoder at 0.41302,
  one-draw prior), and the protocol written into both records."""
  from ctm_jax.evaljob import nll
  from ctm_jax.metrics import likelihood
  wd = copy_run(digits_run, tmp_path / "run")
  ev, config = eval_settings(wd, nll_num_examples=6, nll_batch_size=8, batch_size=8,
                             shard_size=8, nll_elbo_samples=1, nll_protocol=protocol)
  split = "train" if protocol == "ctm" else "test"

  # N(0, 0.05^2 I): narrow, so that sub-bin input errors move log p by nats.
  def logp_fn(params, y, key, labels):
    y = y.reshape(y.shape[0], -1)
    return {"logp": -0.5 * jnp.sum((y / 0.05) ** 2, 1) - 32.0 * jnp.log(2 * jnp.pi * 0.0025),
            "nfe": jnp.int32(3)}

  recs = {r["metric"]: r for r in jobs.run(wd, "nll", ev, config, logp_fn=logp_fn,
                                           devices=jax.devices()[:1])["records"]}
  assert set(recs) == set(common.IMAGE_METRICS)
  u8 = np.rint((data_lib.load_split("digits", split, max_examples=6)["x"] + 1) * 127.5)
  u8 = np.concatenate([u8, u8[-1:].repeat(2, 0)])          # the job pads its batch of 8
  k_deq, k_est = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0))
  y = u8 / 127.5 - 1.0
  if protocol == "ctm":
    flip = np.asarray(jax.random.bernoulli(jax.random.fold_in(k_deq, 1), 0.5, (8,)))
    assert 0 < flip.sum() < 8
    y = np.where(flip[:, None, None, None], y[:, :, ::-1], y)
  gauss = lambda y: -0.5 * np.sum((y.reshape(len(y), -1) / 0.05) ** 2, 1) - 32 * np.log(2 * np.pi * 0.0025)
  model = runs.build_model(config)
  params, _, _ = runs.load_params(config, wd)
  if protocol == "ctm":
    den = lambda x, t, k: model.denoiser(params, x, t, None, None, train=True, rng=k)
    kw = dict(decoder_sigma=likelihood.ctm_decoder_sigma_as_written(), prior="sample",
              dropout=True)
  else:
    den, kw = model.denoise_fn(params), {}
  elbo = likelihood.sde_elbo(den, jnp.asarray(y, jnp.float32), k_est,
                             sigma_lo=likelihood.ctm_elbo_sigma_lo(), sigma_max=80.0,
                             num_samples=1, **kw)["elbo"]
  want = {"bpd_ode": gauss(y), "bpd_elbo": np.asarray(elbo)}
  for metric, logp in want.items():
    r = recs[metric]
    bpd = (-np.asarray(logp, np.float64) / (64 * np.log(2.0)) + 7.0)[:6]
    assert (r["unit"], r["num_examples"], r["label"], r["split"]) == (
        "bits/dim", 6, nll.LABELS[metric], split)
    assert (r["protocol"], r["dequantization"], r["flips"]) == (protocol, "none",
                                                                protocol == "ctm")
    assert r["protocol_label"] == likelihood.PROTOCOLS[protocol].label
    np.testing.assert_allclose(r["value"], bpd.mean(), rtol=1e-5)
    np.testing.assert_allclose(r["stderr"], bpd.std(ddof=1) / np.sqrt(6), rtol=1e-4)
  assert recs["bpd_ode"]["nfe_mean"] == 3
  assert recs["bpd_elbo"]["train_mode"] == (protocol == "ctm")
  assert recs["bpd_elbo"]["decoder_sigma"] == pytest.approx(
      0.41302 if protocol == "ctm" else 2.0501e-3, rel=1e-4)


def test_every_fid_is_named_with_its_sample_count():
  assert common.record_name({"metric": "fid", "num_samples": 50000}) == "fid (50000 samples)"
  assert common.record_name({"metric": "kid", "num_samples": 160}) == "kid (160 samples)"
  assert common.record_name({"metric": "sfid", "num_samples": 512}) == "sfid (512 samples)"
  assert common.record_name({"metric": "bpd_ode", "num_examples": 4}) == "bpd_ode"
