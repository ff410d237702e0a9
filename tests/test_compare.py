"""The comparison (ctm_jax/compare.py, python -m launch.compare): a reduced toy comparison
whose table is checked for structure and whose numbers are recomputed independently (the
ODE error against a numpy RK4 solve of a hand-written mixture denoiser, the cross-entropy gap
with scipy's Gaussian densities), resumption, and the refusals."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ctm_jax import checkpointing, compare, config_lib, evaluate, runs, samplers
from tests import launch_utils

METHODS = ("ctm", "cd", "tcd")     # the three kinds of generator: G (gamma), f (cm), G (SSS)


def small(workdir, methods=METHODS):
  from configs import compare_toy
  c = compare_toy.get_config()
  c.workdir = str(workdir)
  c.methods = methods
  c.seeds = (0,)
  c.num_train_steps = 2
  c.nfes = (1, 2)
  c.overrides = {"training": {"sample_every": 0, "checkpoint_every": 2, "log_every": 1,
                              "batch_size": 64},
                 "model": {"hidden": 32, "num_blocks": 2}}
  c.samplers = {"ctm": "gamma:0:{n},cm:{n}", "cd": "cm:{n}", "tcd": "sss:0.3:{n}"}
  c.eval = {"num_samples": 64, "batch_size": 64, "shard_size": 64, "reference_seeds": 2,
            "ode_error_samples": 32}
  return c


# The toy mixture written out from its definition (oracle.toy_mixture_2d's docstring): 8
# components on the unit ring, weights 2, 1, 2, 1, ..., stds 0.12 along the ring, 0.04 across.
def mixture():
  ang = 2 * np.pi * np.arange(8) / 8
  means = np.stack([np.cos(ang), np.sin(ang)], 1)
  w = np.where(np.arange(8) % 2 == 0, 2.0, 1.0)
  covs = np.stack([0.0144 * np.outer([-np.sin(a), np.cos(a)], [-np.sin(a), np.cos(a)])
                   + 0.0016 * np.outer([np.cos(a), np.sin(a)], [np.cos(a), np.sin(a)])
                   for a in ang])
  return w / w.sum(), means, covs


def np_denoise(x, t):
  """E[x0 | x_t = x] of the mixture under x_t = x0 + t z."""
  w, means, covs = mixture()
  logr, post = [], []
  for k in range(8):
    c = covs[k] + t * t * np.eye(2)
    logr.append(np.log(w[k]) + stats.multivariate_normal(means[k], c).logpdf(x))
    post.append(means[k] + (x - means[k]) @ np.linalg.solve(c, covs[k]).T)
  logr = np.stack(logr, 1)
  r = np.exp(logr - logr.max(1, keepdims=True))
  r /= r.sum(1, keepdims=True)
  return np.einsum("bk,kbd->bd", r, np.stack(post))


def rk4_solve(x, t0, t1, steps=400):
  """dx/du = x - D(x, e^u) with u = ln t (the PF-ODE dx/dt = (x - D)/t), classical RK4."""
  f = lambda y, u: y - np_denoise(y, np.exp(u))
  us = np.linspace(np.log(t0), np.log(t1), steps + 1)
  for a, b in zip(us[:-1], us[1:]):
    h = b - a
    k1 = f(x, a)
    k2 = f(x + h / 2 * k1, a + h / 2)
    k3 = f(x + h / 2 * k2, a + h / 2)
    k4 = f(x + h * k3, b)
    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return x


def log_density(x):
  w, means, covs = mixture()
  return np.log(sum(w[k] * stats.multivariate_normal(means[k], covs[k]).pdf(x)
                    for k in range(8)))


def test_reduced_comparison_table_numbers_and_resume(tmp_path):
  cmp = small(tmp_path / "cmp")
  out = compare.run(cmp)
  # structure: one row per (method, sampler family), E, every NFE, the cost
  table = open(os.path.join(cmp.workdir, "table.md")).read().strip().splitlines()
  assert table[0] == ("| method | sampler | E (NFE 1) | NFE 1: mmd / sliced_w1 / xent_gap | "
                      "NFE 2: mmd / sliced_w1 / xent_gap | s/step |")
  assert [ln.split("|")[1:3] for ln in table[2:6]] == [
      [" ctm ", " gamma0 "], [" ctm ", " cm "], [" cd ", " cm "], [" tcd ", " sss0.3 "]]
  assert all("—" not in ln for ln in table[2:6])
  assert table[6:] == ["", compare.SAME_NOTE]          # CTM's second row marks E, NFE 1, s/step
  saved = json.load(open(os.path.join(cmp.workdir, "table.json")))
  for m in METHODS:
    got = {(r["metric"], r["nfe"], r["sampler"]) for r in saved["rows"] if r["method"] == m}
    assert ("ode_error", 1, "onestep") in got and ("mmd", 1, "onestep") in got
    assert ("xent_gap", 2, {"ctm": "cm:2", "cd": "cm:2", "tcd": "sss:0.3:2"}[m]) in got
  assert {c["method"] for c in saved["train_cost"]} == set(METHODS)
  assert all(c["sec_per_step"] > 0 for c in saved["train_cost"])
  for p in saved["plots"]:
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

  # E of CD: f(x_T, T) of the saved EMA called directly, against an RK4 solve of the mixture
  # denoiser written above, from the x_T the evaluation draws (PRNGKey(seed + 1))
  config = compare.run_config(cmp, "cd", 0)
  params, _, _ = runs.load_params(config, compare.run_dir(cmp, "cd", 0))
  model = runs.build_model(config)
  n, smax, smin = 32, config.diffusion.sigma_max, config.diffusion.sigma_min
  x_T = np.asarray(samplers.initial_noise(jax.random.PRNGKey(1), (n, 2), smax))
  f = np.asarray(model.cm_f(params, jnp.asarray(x_T), jnp.full((n,), smax)), np.float64)
  want = np.mean((f - rk4_solve(x_T.astype(np.float64), smax, smin)) ** 2)
  got = [r["value"] for r in saved["rows"] if (r["method"], r["metric"]) == ("cd", "ode_error")]
  np.testing.assert_allclose(got, [want], rtol=1e-3)

  # the cross-entropy gap of TCD's SSS samples, with scipy's densities
  gap = next(r["value"] for r in saved["rows"] if (r["method"], r["metric"], r["sampler"]) ==
             ("tcd", "xent_gap", "sss:0.3:2"))
  sample_dir = _sample_dir(compare.run_dir(cmp, "tcd", 0), "sss_0.3_2")
  x = np.concatenate([np.load(os.path.join(sample_dir, f))["x"]
                      for f in sorted(os.listdir(sample_dir)) if f.endswith(".npz")])
  assert x.shape == (64, 2)
  ref = evaluate.reference_points(compare.run_config(cmp, "tcd", 0), len(x), seed=4242)
  np.testing.assert_allclose(gap, np.mean(-log_density(x)) - np.mean(-log_density(ref)),
                             rtol=1e-4, atol=1e-6)

  # a re-run trains nothing and reuses every evaluation: the same numbers
  again = compare.run(cmp)
  assert not any(c["trained_now"] for c in again["train_cost"])
  key = lambda r: (r["method"], r["metric"], r["sampler"])
  assert sorted((key(r), r["value"]) for r in again["rows"]) == sorted(
      (key(r), r["value"]) for r in out["rows"])


def _agg(method, label, nfe, metric, mean, std=None):
  return {"method": method, "label": label, "nfe": nfe, "metric": metric, "mean": mean,
          "std": std, "seeds": 1 if std is None else 2}


def test_nfe_1_is_shown_once_per_method_in_table_and_plots(tmp_path):
  """A hand-made aggregate: NFE 1 is the one-step map for every sampler of a method, so the
  table gives E, NFE 1 and s/step in the method's first row and the mark below it, and the
  plot has one NFE-1 point per method."""
  cmp = small(tmp_path / "cmp", methods=("ctm", "tcd"))
  cmp.samplers = {"ctm": "gamma:0:{n},cm:{n}", "tcd": "sss:0:{n},sss:0.3:{n},sss:1:{n}"}
  q = lambda method, label, nfe, mmd, sw1, xent: [
      _agg(method, label, nfe, "mmd", mmd, 0.01), _agg(method, label, nfe, "sliced_w1", sw1),
      _agg(method, label, nfe, "xent_gap", xent)]
  agg = [_agg("ctm", "", 1, "ode_error", 0.0037, 0.0002), _agg("tcd", "", 1, "ode_error", 0.0049),
         *q("ctm", "gamma0", 1, 0.194, 0.355, 1.11), *q("ctm", "gamma0", 2, 0.237, 0.363, 0.6),
         *q("ctm", "cm", 2, 0.24, 0.302, 1.12),
         *q("tcd", "sss0", 1, 0.326, 0.436, 1.73), *q("tcd", "sss0", 2, 0.242, 0.387, 1.54),
         *q("tcd", "sss0.3", 2, 0.251, 0.334, 1.73), *q("tcd", "sss1", 2, 0.252, 0.355, 1.46)]
  costs = {("ctm", 0): {"sec_per_step": 0.36}, ("ctm", 1): {"sec_per_step": 0.38},
           ("tcd", 0): {"sec_per_step": 0.24}}
  got = compare.markdown_table(cmp, agg, costs).splitlines()
  assert got[2:] == [
      "| ctm | gamma0 | 0.0037 ± 0.0002 | 0.194 ± 0.01 / 0.355 / 1.11 | "
      "0.237 ± 0.01 / 0.363 / 0.6 | 0.37 |",
      "| ctm | cm | ″ | ″ | 0.24 ± 0.01 / 0.302 / 1.12 | ″ |",
      "| tcd | sss0 | 0.0049 | 0.326 ± 0.01 / 0.436 / 1.73 | 0.242 ± 0.01 / 0.387 / 1.54 | 0.24 |",
      "| tcd | sss0.3 | ″ | ″ | 0.251 ± 0.01 / 0.334 / 1.73 | ″ |",
      "| tcd | sss1 | ″ | ″ | 0.252 ± 0.01 / 0.355 / 1.46 | ″ |",
      "",
      "″ = the row above: NFE 1 is the one-step map (sampler 'onestep') whatever the sampler, "
      "so E, the NFE-1 metrics and s/step are measured once per method."]

  series = compare.quality_series(cmp, agg, "mmd")
  assert [(name, list(n), list(m)) for name, n, m, _ in series] == [
      ("ctm gamma0", [1, 2], [0.194, 0.237]), ("ctm cm", [2], [0.24]),
      ("tcd sss0", [1, 2], [0.326, 0.242]), ("tcd sss0.3", [2], [0.251]),
      ("tcd sss1", [2], [0.252])]
  for p in compare.plots(cmp, agg, str(tmp_path / "plots")):
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _sample_dir(workdir, safe_name):
  for root, dirs, _ in os.walk(os.path.join(workdir, "eval")):
    for d in dirs:
      if d.startswith(safe_name + "-"):
        return os.path.join(root, d, "samples")
  raise AssertionError(f"no samples of {safe_name} under {workdir}")


@pytest.mark.parametrize("field,value,message", [
    ("methods", ("cd", "dm"), "each once, from"),
    ("samplers", {"ctm": "gamma:0:{n}", "cd": "gamma:0:{n}", "tcd": "sss:0.3:{n}"},
     "only the map f"),
    ("overrides", {"training": {"batch_sise": 64}}, "no field 'batch_sise'"),
    ("nfes", (0, 2), "config.nfes"),
    ("mode", "nll", "config.mode"),
    ("run_configs", {"ctm": "configs/toy_ctm.py", "cd": "configs/toy_dc.py",
                     "tcd": "configs/toy_tcd.py"},
     r"config.run_configs.cd=configs/toy_dc.py: no such config file"),
    ("run_configs", {"ctm": "configs/toy_ctm.py", "tcd": "configs/toy_tcd.py"},
     r"config.run_configs has no config file for \['cd'\]"),
])
def test_bad_comparison_settings_are_refused_before_training(tmp_path, field, value, message):
  cmp = small(tmp_path / "cmp")
  cmp[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    compare.validate(cmp)
  assert not os.path.exists(cmp.workdir)


def test_run_configs_are_config_files_loaded_like_launch_train(tmp_path):
  """config.run_configs names files (FILE.py[:arg]) anywhere, as --config does: a file
  outside configs/ whose get_config(arg) changes one field of configs/toy_cd.py."""
  mine = tmp_path / "my_cd.py"
  mine.write_text("from configs import toy_cd\n\n\ndef get_config(arg):\n"
                  "  c = toy_cd.get_config()\n  c.sampling.heun_steps = int(arg)\n  return c\n")
  cmp = small(tmp_path / "cmp")
  cmp.run_configs.cd = f"{mine}:7"
  got = compare.run_config(cmp, "cd", 3).to_dict()
  want = compare.run_config(small(tmp_path / "cmp"), "cd", 3).to_dict()
  assert got["sampling"].pop("heun_steps") == 7 != want["sampling"].pop("heun_steps")
  assert got == want and got["seed"] == 3 and got["method"] == "cd"
  cmp.run_configs.cd = "configs/toy_tcd.py"              # the file decides the method
  assert compare.run_config(cmp, "cd", 0).method == "tcd"


def test_launch_compare_bad_setting_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.compare", "--config=configs/compare_toy.py",
       f"--config.workdir={tmp_path / 'cmp'}", "--config.mode=nll", "--fake_cpu_devices=1"],
      cwd=launch_utils.ROOT, env=launch_utils.subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("launch.compare: error: config.mode"), lines
  assert not os.path.exists(tmp_path / "cmp")


# ----------------------------------------------------------------------------- Ctrl-C

def config_file(cmp, path):
  """A config file for `python -m launch.compare --config=<path>` holding cmp's fields."""
  lines = ["from configs import compare_toy", "", "", "def get_config():",
           "  c = compare_toy.get_config()"]
  for k, v in cmp.items():
    lines.append(f"  c.{k} = {v.to_dict() if hasattr(v, 'to_dict') else v!r}")
  with open(path, "w") as f:
    f.write("\n".join(lines + ["  return c", ""]))
  return str(path)


def start_compare(tmp_path, name):
  """launch.compare on two one-step runs (CD, then TCD), NFE 1 only, one device, in a
  subprocess whose log is tmp_path/<name>.log.  The persistent compilation cache is the
  comparison's own (a fresh folder), so the first step compiles for seconds."""
  cmp = small(tmp_path / "cmp", methods=("cd", "tcd"))
  cmp.num_train_steps, cmp.nfes = 1, (1,)
  cmp.overrides.training.checkpoint_every = 1
  cmd = [sys.executable, "-m", "launch.compare", f"--config={config_file(cmp, tmp_path / 'c.py')}",
         "--fake_cpu_devices=1"]
  log = str(tmp_path / f"{name}.log")
  return cmp, launch_utils.start(cmd, log, {"JAX_COMPILATION_CACHE_DIR": ""}), log


def stop_with_ctrl_c(proc, log, pattern):
  """One SIGINT once `pattern` is in the log; returns (exit status, last log line)."""
  launch_utils.wait_until(proc, launch_utils.log_shows(log, pattern), f"{pattern!r} in the log")
  proc.send_signal(signal.SIGINT)
  rc = proc.wait(timeout=300)                     # hang detector: it used to go on training
  return rc, open(log).read().strip().splitlines()[-1]


def test_ctrl_c_in_the_last_step_stops_the_whole_comparison(tmp_path):
  """Ctrl-C while CD's only step compiles: the step finishes, its checkpoint is written and
  the comparison stops there (TCD is not started, no table), exit status 130, one line."""
  cmp, proc, log = start_compare(tmp_path, "first")
  rc, last = stop_with_ctrl_c(proc, log, r"Training steps 0 to 1 in \S*cd-s0")
  assert rc == 130, open(log).read()[-3000:]
  assert last == ("launch.compare: stopped by Ctrl-C (SIGINT) while training cd seed 0 (finished "
                  "at step 1 of 1, checkpoint written); re-run the same command to resume"), last
  config = compare.run_config(cmp, "cd", 0)
  ck = checkpointing.Checkpointer(compare.run_dir(cmp, "cd", 0), config.training, read_only=True)
  assert ck.all_steps() == [1]
  assert not os.path.exists(compare.run_dir(cmp, "tcd", 0))
  assert not os.path.exists(os.path.join(cmp.workdir, "table.md"))


@pytest.mark.slow
def test_ctrl_c_in_evaluation_keeps_what_is_done_and_a_rerun_finishes(tmp_path):
  """Ctrl-C when TCD's evaluation starts: exit 130 at once (no checkpointing step to finish),
  CD's finished evaluation kept; the same command again trains nothing, reuses CD's
  evaluation and writes the table."""
  cmp, proc, log = start_compare(tmp_path, "first")
  rc, last = stop_with_ctrl_c(proc, log, r"eval sample of \S*tcd-s0")
  assert rc == 130, open(log).read()[-3000:]
  assert last == ("launch.compare: stopped by Ctrl-C (SIGINT) while evaluating tcd seed 0 (the "
                  "finished evaluations and sample shards are kept); re-run the same command to "
                  "resume"), last
  cd_results = os.path.join(compare.run_dir(cmp, "cd", 0), "eval", "results.jsonl")
  kept = open(cd_results).read()
  assert {json.loads(ln)["metric"] for ln in kept.splitlines()} >= {"mmd", "ode_error"}
  assert not os.path.exists(os.path.join(cmp.workdir, "table.md"))

  _, proc, log = start_compare(tmp_path, "again")
  assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]
  saved = json.load(open(os.path.join(cmp.workdir, "table.json")))
  assert not any(c["trained_now"] for c in saved["train_cost"])
  assert open(cd_results).read() == kept                  # not evaluated again
  assert {r["method"] for r in saved["rows"] if r["metric"] == "mmd"} == {"cd", "tcd"}


def test_image_ode_error_reference_is_the_comparisons_teacher_also_for_ct(tmp_path):
  """CT / iCT have no teacher of their own: E on images is against the comparison's teacher
  (the first distilling method's run config), and a comparison with none is refused."""
  from configs import compare_digits
  cmp = compare_digits.get_config()
  cmp.workdir = str(tmp_path / "cmp")
  cmp.teacher_workdir = "workdirs/some_digits_edm"
  cmp.methods = ("ct", "ict", "tcd", "cd")
  ref = compare.reference_config(cmp, 0)
  assert ref.method == "tcd" and ref.teacher.workdir == "workdirs/some_digits_edm"
  assert "teacher" not in compare.run_config(cmp, "ct", 0)
  cmp.methods = ("ct", "ict")
  with pytest.raises(config_lib.ConfigError, match="add a distillation method"):
    compare.validate(cmp)
  assert not os.path.exists(cmp.workdir)
