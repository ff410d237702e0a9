"""A class-conditional digits CTM run with a conv GAN and sample_every = 1 (the sampling path at
training time), and the GAN phase against direct computations: init_from copies values and
leaves the new state fresh, the generator step (lambda_GAN by its formula away from the clip,
the GAN gradient -mean D(aug(est)) through est) and the discriminator step.

Everything runs on a tiny class-conditional EDM teacher trained here for 2 steps; the student
starts from it, as in a real run. EMAs at rate 0 (= the parameters) so that two steps already
give the teacher's and the student's outputs a visible dependence on the labels."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import digits_ctm, digits_edm
from ctm_jax import data, samplers, train
from launch_utils import set_fields, teacher_restored_once, tiny_digits_config
from method_reference import check_disc_step, check_gan_generator_step, perturbed

SAMPLES = 12
CONDITIONAL = {"data.class_conditional": True, "ema.rates": (0.0,)}


def tiny_teacher_cfg(**overrides):
  return tiny_digits_config(digits_edm, **{**CONDITIONAL,
                                           "optim.warmup_steps": 0,   # two steps move the output layer
                                           **overrides})


def tiny_gan_cfg(teacher_workdir, **overrides):
  c = tiny_digits_config(digits_ctm, **CONDITIONAL)
  c.teacher.config = tiny_teacher_cfg()
  c.teacher.workdir = str(teacher_workdir)
  c.ctm.num_points, c.ctm.max_k = 6, 5
  c.ctm.sample_nfes = (2,)
  c.gan.enabled = True
  c.gan.channels = 8
  if "conditional" in c.gan:          # a class-conditional D, where the config offers the choice
    c.gan.conditional = True
  c.sampling.eval_ema = "rate_0p0"
  c.sampling.num_samples = SAMPLES
  c.sampling.heun_steps = 3
  return set_fields(c, overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("cond_teacher")
  train.train_and_evaluate(tiny_teacher_cfg(**{"training.num_train_steps": 2,
                                               "training.checkpoint_every": 2}), str(wd))
  with teacher_restored_once():       # one restore for all the Experiments below
    yield wd


@pytest.fixture(scope="module")
def gan_run(teacher_dir, tmp_path_factory):
  """Two steps (a G step with the GAN term, then a D step) with samples at every step."""
  cfg = tiny_gan_cfg(teacher_dir, **{"training.num_train_steps": 2,
                                     "training.checkpoint_every": 1, "training.sample_every": 1})
  wd = tmp_path_factory.mktemp("gan_run")
  train.train_and_evaluate(cfg, str(wd))
  exp, state, _ = train.load_state(cfg, str(wd))
  return cfg, wd, exp.method, jax.device_get(state)


def _grid(u8, scale):
  """Our own picture of uint8 samples (N, 8, 8, 1): ceil(sqrt(N)) columns, 1-pixel black
  borders, each pixel repeated scale x scale."""
  n, h, w, _ = u8.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  g = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    g[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = u8[i, ..., 0]
  return g.repeat(scale, 0).repeat(scale, 1)


def _moved(a, b):
  return float(jnp.max(jnp.abs(a - b)))


def test_labels_change_teacher_discriminator_and_samples(gan_run):
  """The labels change the teacher's, D's and the samplers' outputs (so the direct checks
  below, which pass labels everywhere, would see them dropped anywhere), and the sample
  pictures written at every step equal a direct computation with labels cycling 0..9."""
  cfg, wd, m, state = gan_run
  frozen = m.frozen()
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32))
  y = jnp.arange(10, dtype=jnp.int32)
  perm = jnp.roll(y, 3)
  t = jnp.full((10,), 1.0)
  assert _moved(m.teacher.denoise(frozen["teacher"], x, t, y),
                m.teacher.denoise(frozen["teacher"], x, t, perm)) > 1e-4
  assert m.gan.num_classes == 10
  ex = state.extra
  logits = lambda lab: m.gan.disc.apply({"params": ex["disc"], **ex["disc_state"]}, x, lab,
                                        train=False, update_stats=False)[0]
  assert _moved(logits(y), logits(perm)) > 1e-4
  # Sample pictures at steps 1 and 2, one per sampler; the step-2 ones against our own:
  # x_T from the run's sampling key, labels cycling 0..9, the eval EMA, our own grid.
  params = state.ema[cfg.sampling.eval_ema]
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x5A4D)
  k_init, k_run = jax.random.split(key)
  x_T = samplers.initial_noise(k_init, (SAMPLES, 8, 8, 1), cfg.diffusion.sigma_max)
  cyc = jnp.arange(SAMPLES, dtype=jnp.int32) % 10
  fns = m.sample_fns()
  assert sorted(fns) == ["heun3", "nfe2_gamma0"]
  for name, fn in fns.items():
    for step in (1, 2):
      assert os.path.isfile(wd / "samples" / f"{name}_step{step:08d}.png"), name
    got = np.asarray(Image.open(wd / "samples" / f"{name}_step00000002.png"))
    run = jax.jit(fn)
    x_s = run(params, x_T, k_run, cyc)
    u8 = np.asarray(((jnp.clip(x_s, -1, 1) + 1) * 127.5).astype(jnp.uint8))
    want = _grid(u8, 4)
    assert got.shape == want.shape
    # Equal up to float round-off at a truncation edge (a few pixels off by one at most).
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, name
    assert _moved(x_s, run(params, x_T, k_run, jnp.roll(cyc, 3))) > 1e-4, name


def test_init_from_copies_values_and_starts_new_state_fresh(gan_run, teacher_dir):
  """A second GAN phase with a wider D: every array of the source run with the same name and
  shape is copied exactly, D's (new shapes) equal a fresh initialisation."""
  cfg, wd, _, src = gan_run
  cfg2 = tiny_gan_cfg(teacher_dir, **{"gan.channels": 16, "init_from": str(wd)})
  exp2 = train.Experiment(cfg2)
  merged = jax.device_get(train.init_from_run(exp2, str(wd)))
  fresh = jax.device_get(exp2.init_state())
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v)
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  fm, ff, fs = flat(merged), flat(fresh), flat(src)
  copied = [k for k in fm if k in fs and fs[k].shape == fm[k].shape]
  assert int(merged.step) == 2 and any(".params" in k for k in copied)
  assert any("target" in k for k in copied) and any(".ema" in k for k in copied)
  for k in copied:
    np.testing.assert_array_equal(fm[k], fs[k], err_msg=k)
  new = [k for k in fm if k not in copied]
  assert new and all("disc" in k for k in new), new
  for k in new:
    np.testing.assert_array_equal(fm[k], ff[k], err_msg=k)
  # The copied parameters are the trained ones, not a fresh start.
  assert any(not np.array_equal(fs[k], ff[k]) for k in copied if ".params" in k)


def _batch(cfg, step):
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  return {k: jnp.asarray(v) for k, v in pipe.batch_at(step).items()}


def test_gan_generator_step_matches_direct_computation(gan_run):
  """The summed generator gradient against tests/method_reference.gan_generator_direct, from the
  run's trained D and a target network different from theta; here lambda_GAN's free value
  ||grad_W L_CTM|| / (||grad_W L_GAN|| + 1e-4) is above its clip (measured 166), so lambda_GAN
  must be gan.weight_max (the formula inside the clip: test_paper_path)."""
  cfg, _, m, state = gan_run
  extra = dict(state.extra)
  extra["target"] = perturbed(state.params, seed=3, scale=0.02)
  c = 0.00054 * math.sqrt(64)        # digits_ctm's pseudo-Huber: sqrt(|a - b|^2 + c^2) - c (iCT)
  assert cfg.ctm.distance == "pseudo_huber" and cfg.ctm.huber_c == 0
  huber = lambda a, b: jnp.sqrt(jnp.sum(((a - b) ** 2).reshape(a.shape[0], -1), axis=1) + c * c) - c
  met, free = check_gan_generator_step(m, state.params, extra, m.frozen(), _batch(cfg, 5),
                                       jax.random.PRNGKey(21), jax.random.PRNGKey(22), huber)
  assert free > cfg.gan.weight_max and met["lambda_gan"] == cfg.gan.weight_max


def test_disc_step_matches_direct_computation(gan_run):
  cfg, _, m, state = gan_run
  state = state.replace(extra={**state.extra,
                               "target": perturbed(state.params, seed=4, scale=0.02)})
  check_disc_step(m, state, m.frozen(), _batch(cfg, 6))
