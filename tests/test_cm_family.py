"""The consistency family (CD, CT, iCT, Direct CD, TCD): each loss against a hand-written
reference (pair, teacher step, target and distance written out here with the exact oracle),
the curricula against the papers' formulas, Direct CD's masked solve against a per-example
loop, TCD's s range, the strategic stochastic sampler against the published VP equations,
the refusals, and a few real training steps of every toy config."""
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf as np_erf

from ctm_jax import data, diffusion, evaluate, parallel, samplers, solvers, train
from ctm_jax.methods import cm as cm_lib
from ctm_jax.oracle import toy_mixture_2d
from launch_utils import assert_refused, tiny_toy_student

METHODS = ("cd", "ct", "ict", "direct_cd", "tcd")
SMIN, SMAX, RHO = 0.002, 80.0, 7.0
GM = toy_mixture_2d()


def tiny(method, **overrides):
  return tiny_toy_student(importlib.import_module(f"configs.toy_{method}"), **overrides)


def setup(method, **overrides):
  cfg = tiny(method, **overrides)
  exp = train.Experiment(cfg)
  state = jax.device_get(exp.init_state())
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  batch = {k: jnp.asarray(v) for k, v in pipe.batch_at(0).items()}
  return cfg, exp, state, batch


def perturbed(params, seed, scale=0.05):
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [v + scale * rng.standard_normal(v.shape).astype(v.dtype) for v in leaves])


# ----------------------------------------------------------------------------- hand-written pieces

def karras(i, n):
  """t_i of the N-point Karras grid, float64 (EDM eq. 5)."""
  i = np.asarray(i, np.float64)
  return (SMAX ** (1 / RHO) + i / (n - 1) * (SMIN ** (1 / RHO) - SMAX ** (1 / RHO))) ** RHO


def heun(x, t, u, euler_only=False):
  """EDM Algorithm 1 step with the exact mixture denoiser."""
  d = (x - GM.denoise(x, t)) / t[:, None]
  x_e = x + (u - t)[:, None] * d
  if euler_only:
    return x_e
  d2 = (x_e - GM.denoise(x_e, u)) / u[:, None]
  return x + 0.5 * (u - t)[:, None] * (d + d2)


def f_cm(model, params, x, t, rng, sd):
  """c_skip x + c_out F(c_in x, t) with the CM scalings (Song et al. 2023, App. C)."""
  c_skip = sd ** 2 / ((t - SMIN) ** 2 + sd ** 2)
  c_out = sd * (t - SMIN) / jnp.sqrt(sd ** 2 + t ** 2)
  c_in = 1 / jnp.sqrt(t ** 2 + sd ** 2)
  out = model.raw(params, c_in[:, None] * x, t, None, train=True, rng=rng)
  return c_skip[:, None] * x + c_out[:, None] * out


def jump_G(model, params, x, t, s, rng, sd):
  """(s/t) x + (1 - s/t) g(x, t, s), g under EDM preconditioning (CTM eq. 7 / TCD)."""
  c_skip = sd ** 2 / (t ** 2 + sd ** 2)
  c_out = t * sd / jnp.sqrt(t ** 2 + sd ** 2)
  c_in = 1 / jnp.sqrt(t ** 2 + sd ** 2)
  g = c_skip[:, None] * x + c_out[:, None] * model.raw(params, c_in[:, None] * x, t, s, train=True,
                                                       rng=rng)
  r = (s / t)[:, None]
  return jnp.where((s == t)[:, None], x, r * x + (1 - r) * g)


def l2(a, b):
  return jnp.mean(jnp.mean((a - b) ** 2, axis=1))


def check_grads(loss_fn, ref_fn, params, rtol=2e-4):
  """Gradients equal to float32 round-off (atol relative to each leaf's largest entry)."""
  g1, g2 = jax.grad(loss_fn)(params), jax.grad(ref_fn)(params)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-3 * float(np.max(np.abs(b))) + 1e-8)


# ----------------------------------------------------------------------------- losses

def test_cd_loss_and_gradient_match_hand_written_reference():
  cfg, exp, state, batch = setup("cd", **{"cd.num_points": 6, "cd.target_ema": 0.9})
  m, model, sd = exp.method, exp.model, cfg.diffusion.sigma_data
  extra = {"target": perturbed(state.params, 1)}        # theta^- != theta
  rng = jax.random.PRNGKey(7)
  x0 = batch["x"]
  k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
  i = np.asarray(jax.random.randint(k_idx, (16,), 0, 5))
  t, u = jnp.asarray(karras(i, 6), jnp.float32), jnp.asarray(karras(i + 1, 6), jnp.float32)
  x_t = x0 + t[:, None] * jax.random.normal(k_z, x0.shape)
  x_u = heun(x_t, t, u)                                  # one oracle Heun step t_i -> t_{i+1}
  target = f_cm(model, extra["target"], x_u, u, k_drop, sd)
  ref = lambda p: l2(f_cm(model, p, x_t, t, k_drop, sd), jax.lax.stop_gradient(target))
  loss_fn = lambda p: m.loss(p, extra, {"teacher": {}}, batch, rng, 0)[0]
  np.testing.assert_allclose(loss_fn(state.params), ref(state.params), rtol=1e-5)
  check_grads(loss_fn, ref, state.params)


def test_ct_loss_uses_shared_noise_and_the_curriculum_grid():
  step = 700
  cfg, exp, state, batch = setup("ct", **{"training.num_train_steps": 1000})
  m, model, sd = exp.method, exp.model, cfg.diffusion.sigma_data
  s0, s1 = cfg.ct.s0, cfg.ct.s1
  n = math.ceil(math.sqrt(step / 1000 * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1  # CM paper
  extra = {"target": perturbed(state.params, 2)}
  rng = jax.random.PRNGKey(8)
  x0 = batch["x"]
  k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
  i = np.asarray(jax.random.randint(k_idx, (16,), 0, n - 1))
  t, u = jnp.asarray(karras(i, n), jnp.float32), jnp.asarray(karras(i + 1, n), jnp.float32)
  z = jax.random.normal(k_z, x0.shape)
  target = f_cm(model, extra["target"], x0 + u[:, None] * z, u, k_drop, sd)
  ref = lambda p: l2(f_cm(model, p, x0 + t[:, None] * z, t, k_drop, sd), target)
  loss, met = m.loss(state.params, extra, {}, batch, rng, jnp.int32(step))
  assert int(met["num_points"]) == n
  np.testing.assert_allclose(loss, ref(state.params), rtol=1e-5)


def ict_probs_np(n, p_mean=-1.1, p_std=2.0):
  """iCT eq. 11 in float64: p(sigma_i) ~ erf((ln s_{i+1} - Pm)/(sqrt2 Ps)) - erf((ln s_i - Pm)/(sqrt2 Ps))
  over the ascending grid s_1 < ... < s_N; returned for our descending index (pair t_i > t_{i+1})."""
  asc = karras(np.arange(n), n)[::-1]
  c = np_erf((np.log(asc) - p_mean) / (math.sqrt(2) * p_std))
  p = c[1:] - c[:-1]                      # interval [s_j, s_{j+1}], j = 0..N-2 ascending
  return (p / p.sum())[::-1]              # descending index i = N-2-j


def test_ict_loss_and_gradient_match_hand_written_reference():
  step = 1300
  cfg, exp, state, batch = setup("ict", **{"training.num_train_steps": 4000})
  m, model = exp.method, exp.model
  sd = cfg.diffusion.sigma_data
  kp = math.floor(4000 / (math.log2(math.floor(1280 / 10)) + 1))            # K' = 500
  n = min(10 * 2 ** (step // kp), 1280) + 1                                  # 41
  rng = jax.random.PRNGKey(9)
  x0 = batch["x"]
  k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
  logits = np.full(1280, -np.inf)
  logits[:n - 1] = np.log(ict_probs_np(n))
  i = np.asarray(jax.random.categorical(k_idx, jnp.asarray(logits, jnp.float32), shape=(16,)))
  t, u = jnp.asarray(karras(i, n), jnp.float32), jnp.asarray(karras(i + 1, n), jnp.float32)
  z = jax.random.normal(k_z, x0.shape)
  c = 0.00054 * math.sqrt(2)

  def ref(p):
    target = jax.lax.stop_gradient(f_cm(model, p, x0 + u[:, None] * z, u, k_drop, sd))  # sg(theta)
    d = jnp.sqrt(jnp.sum((f_cm(model, p, x0 + t[:, None] * z, t, k_drop, sd) - target) ** 2, 1)
                 + c * c) - c
    return jnp.mean(d / (t - u))
  loss_fn = lambda p: m.loss(p, {}, {}, batch, rng, jnp.int32(step))[0]
  assert int(m.loss(state.params, {}, {}, batch, rng, jnp.int32(step))[1]["num_points"]) == n
  np.testing.assert_allclose(loss_fn(state.params), ref(state.params), rtol=1e-5)
  check_grads(loss_fn, ref, state.params)


def test_direct_cd_loss_matches_per_example_heun_loop():
  cfg, exp, state, batch = setup("direct_cd", **{"direct_cd.num_points": 7})
  m, model, sd = exp.method, exp.model, cfg.diffusion.sigma_data
  rng = jax.random.PRNGKey(10)
  x0 = batch["x"]
  k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
  i = np.asarray(jax.random.randint(k_idx, (16,), 0, 6))
  t = jnp.asarray(karras(i, 7), jnp.float32)
  x_t = x0 + t[:, None] * jax.random.normal(k_z, x0.shape)
  ends = []
  for b in range(16):                      # each example on its own, Heun to sigma_min
    x = x_t[b:b + 1]
    for j in range(i[b], 6):
      x = heun(x, jnp.asarray(karras([j], 7), jnp.float32), jnp.asarray(karras([j + 1], 7), jnp.float32))
    ends.append(x)
  x_end = jnp.concatenate(ends)
  ref = lambda p: l2(f_cm(model, p, x_t, t, k_drop, sd), x_end)
  loss, met = m.loss(state.params, {}, {"teacher": {}}, batch, rng, 0)
  np.testing.assert_allclose(loss, ref(state.params), rtol=1e-4)
  assert int(met["teacher_steps"]) == 6 - i.min()


def test_tcd_loss_matches_hand_written_reference():
  cfg, exp, state, batch = setup("tcd", **{"tcd.num_points": 8, "tcd.skip": 2})
  m, model, sd = exp.method, exp.model, cfg.diffusion.sigma_data
  extra = {"target": perturbed(state.params, 3)}
  rng = jax.random.PRNGKey(11)
  x0 = batch["x"]
  k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
  k_i, k_j = jax.random.split(k_idx)
  i = jax.random.randint(k_i, (16,), 0, 8 - 2)
  j = jax.random.randint(k_j, (16,), i + 2, 8)            # s_min = sigma_min: J = N - 1
  t, u, s = [jnp.asarray(karras(np.asarray(v), 8), jnp.float32) for v in (i, i + 2, j)]
  x_t = x0 + t[:, None] * jax.random.normal(k_z, x0.shape)
  x_u = heun(x_t, t, u)                    # ONE teacher step across the skip t_i -> t_{i+2}
  target = jump_G(model, extra["target"], x_u, u, s, k_drop, sd)
  ref = lambda p: l2(jump_G(model, p, x_t, t, s, k_drop, sd), target)
  loss_fn = lambda p: m.loss(p, extra, {"teacher": {}}, batch, rng, 0)[0]
  np.testing.assert_allclose(loss_fn(state.params), ref(state.params), rtol=1e-5)
  check_grads(loss_fn, ref, state.params)


# ----------------------------------------------------------------------------- curricula

@pytest.mark.parametrize("k", [0, 1, 137, 2500, 5000, 9999, 10000])
def test_ct_curriculum_matches_paper(k):
  K, s0, s1, mu0 = 10000, 2, 150, 0.9
  n = math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
  assert int(cm_lib.ct_num_points(k, K, s0, s1)) == n
  np.testing.assert_allclose(cm_lib.ct_target_ema(n, s0, mu0, "paper"),
                             math.exp(s0 * math.log(mu0) / n), rtol=1e-6)
  np.testing.assert_allclose(cm_lib.ct_target_ema(n, s0, mu0, "code"),
                             math.exp(s0 * math.log(mu0) / (n - 1)), rtol=1e-6)


def test_ct_curriculum_end_points():
  assert int(cm_lib.ct_num_points(0, 800000, 2, 150)) == 2
  assert int(cm_lib.ct_num_points(800000, 800000, 2, 150)) == 151
  np.testing.assert_allclose(cm_lib.ct_target_ema(2, 2, 0.9), 0.9, rtol=1e-6)   # mu(0) = mu0


@pytest.mark.parametrize("k", [0, 49999, 50000, 99999, 100000, 250000, 349999, 350000, 399999])
def test_ict_doubling_curriculum_matches_paper(k):
  K, s0, s1 = 400000, 10, 1280
  kp = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
  assert kp == 50000 and cm_lib.ict_stage_length(K, s0, s1) == kp
  assert int(cm_lib.ict_num_points(k, K, s0, s1)) == min(s0 * 2 ** (k // kp), s1) + 1


@pytest.mark.parametrize("n", [11, 81, 1281])
def test_ict_discrete_lognormal_probabilities(n):
  logits = cm_lib.ict_index_logits(n, 1281, -1.1, 2.0, diffusion.Schedule())
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  ref = ict_probs_np(n)
  np.testing.assert_allclose(p[:n - 1], ref, rtol=2e-3, atol=1e-7)
  assert np.all(p[n - 1:] == 0)


def test_karras_sigma_at_matches_static_grid_with_one_compilation():
  fn = jax.jit(lambda n: diffusion.karras_sigma_at(jnp.arange(1281), n))
  for n in (2, 3, 18, 150, 1281):
    np.testing.assert_allclose(np.asarray(fn(n))[:n], karras(np.arange(n), n), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(fn(n))[:n], np.asarray(diffusion.karras_sigmas(n)), rtol=2e-6)
  assert fn._cache_size() == 1


# ----------------------------------------------------------------------------- Direct CD solve

@pytest.mark.parametrize("method,last", [("heun", "heun"), ("heun", "euler"), ("euler", "heun")])
def test_solve_to_end_matches_per_example_loop(method, last):
  n = 9
  grid = diffusion.karras_sigmas(n)
  rng = np.random.default_rng(0)
  start = np.array([0, 3, 8, 5, 7, 2])
  x = jnp.asarray(rng.normal(size=(6, 2)) * karras(start, n)[:, None], jnp.float32)
  got = solvers.solve_to_end(GM.denoise, x, grid, start, method, last)
  for b in range(6):
    xb = x[b:b + 1]
    for j in range(start[b], n - 1):
      t, u = jnp.asarray(karras([j], n), jnp.float32), jnp.asarray(karras([j + 1], n), jnp.float32)
      xb = heun(xb, t, u, euler_only=(method == "euler" or (last == "euler" and j + 1 == n - 1)))
    np.testing.assert_allclose(got[b:b + 1], xb, rtol=2e-4, atol=2e-5)
  np.testing.assert_array_equal(got[2], x[2])               # start at sigma_min: untouched


def test_direct_cd_step_compiles_once_and_teacher_cost_follows_batch_max():
  cfg = tiny("direct_cd", **{"direct_cd.num_points": 8, "training.batch_size": 8})
  exp = train.Experiment(cfg)
  calls = []
  inner = exp.method.teacher._denoise

  def counting(params, x, t, labels):
    jax.debug.callback(lambda: calls.append(1))
    return inner(params, x, t, labels)
  exp.method.teacher._denoise = counting
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  pipe = data.InputPipeline(cfg.data, 8, cfg.seed, 0, 1)
  seen = set()
  for s in range(8):
    calls.clear()
    state, met = fns["train"](state, parallel.global_batch(pipe.batch_at(s), exp.mesh), frozen)
    steps = int(jax.device_get(met)["teacher_steps"])
    jax.effects_barrier()
    assert len(calls) == 2 * steps, (steps, len(calls))    # Heun: 2 calls per step
    seen.add(steps)
  assert fns["train"]._cache_size() == 1
  assert len(seen) >= 2, seen


# ----------------------------------------------------------------------------- TCD

def test_tcd_s_range():
  cfg = tiny("tcd", **{"tcd.num_points": 12, "tcd.skip": 3})
  grid = np.asarray(diffusion.karras_sigmas(12))
  cfg.tcd.s_min = float(grid[7])
  m = train.Experiment(cfg).method
  i, j = (np.asarray(v) for v in m.sample_times(jax.random.PRNGKey(0), 20000))
  assert i.min() == 0 and i.max() == 12 - 1 - 3
  assert np.all(j >= i + 3)
  # s = t_j in [s_min, t_{i+k}], unless t_{i+k} < s_min already (then s = t_{i+k})
  ok = i + 3 <= 7
  assert np.all(j[ok] <= 7) and np.all(j[~ok] == i[~ok] + 3)
  # uniform over the allowed grid indices
  sel = i == 2
  counts = np.bincount(j[sel], minlength=12)[5:8]
  assert counts.min() > 0.8 * counts.max()


def test_tcd_s_input_switch_builds_the_network_with_or_without_s():
  assert not train.build_model(tiny("tcd")).uses_s          # TCD's network is the default
  assert train.build_model(tiny("tcd", **{"tcd.s_input": True})).uses_s
  assert not train.build_model(tiny("cd")).uses_s


def test_tcd_default_jump_is_the_trajectory_consistency_function_of_one_x0_estimate():
  """TCD's f(x_t, t, s) = a_s x0_hat(x_t, t) + sigma_s eps_hat(x_t, t) (VE: x0_hat + s eps_hat,
  eps_hat = (x_t - x0_hat) / t) with x0_hat and eps_hat that do not depend on s; the s-input
  variant's x0 estimate does."""
  cfg, exp, state, _ = setup("tcd")
  model, params = exp.model, perturbed(state.params, 1, 0.3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)) * 3, jnp.float32)
  t = jnp.full((6,), 5.0)
  x0 = model.denoiser(params, x, t)
  for s in (0.002, 0.3, 2.0):
    eps = (x - x0) / 5.0
    np.testing.assert_allclose(model.jump(params, x, t, jnp.full((6,), s)), x0 + s * eps,
                               rtol=1e-5, atol=1e-5)
  cfg_s, exp_s, state_s, _ = setup("tcd", **{"tcd.s_input": True})
  p_s = perturbed(state_s.params, 1, 0.3)
  g = lambda s: exp_s.model.denoiser(p_s, x, t, jnp.full((6,), s))
  assert float(jnp.max(jnp.abs(g(0.002) - g(2.0)))) > 1e-3


def sd_alphas_cumprod():
  """Stable Diffusion's scaled-linear schedule (diffusers' TCDScheduler default), written out."""
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def tcd_timesteps(num_steps, original_steps=50, train_steps=1000):
  """TCDScheduler.set_timesteps (strength 1): every k-th training step, k = 1000 // 50, then
  num_steps of them at floor(linspace(0, 50, num_steps, endpoint=False)) of the reversed list."""
  k = train_steps // original_steps
  origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
  return origin[np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(int)]


def stand_in_eps(x, k):
  """A fixed eps-prediction network of the VP input and the discrete timestep."""
  return np.tanh(0.7 * x + 0.001 * k) + 0.1 * np.sin(x * (1 + k / 1000.0))


@pytest.mark.parametrize("num_steps,gamma", [(4, 0.3), (4, 0.0), (4, 1.0), (3, 0.6), (1, 0.3)])
def test_sss_ve_sampler_equals_tcd_scheduler(num_steps, gamma):
  """samplers.sss_sampler in the VE frame == diffusers' TCDScheduler.step loop (eps-prediction,
  SD schedule) written out, on the same eps network, x_T and noise:
    s = floor((1 - gamma) prev); x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);
    x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps; x' = sqrt(a'/a_s) x_s + sqrt(1 - a'/a_s) z (not last)."""
  a = sd_alphas_cumprod()
  ts = tcd_timesteps(num_steps)
  rng = np.random.default_rng(num_steps)
  x_vp = rng.normal(size=(8, 3))
  key = jax.random.PRNGKey(3)
  zs = [np.asarray(jax.random.normal(jax.random.fold_in(key, n), (8, 3)), np.float64)
        for n in range(num_steps)]
  x = x_vp.copy()
  for n, t in enumerate(ts):
    prev = ts[n + 1] if n + 1 < len(ts) else 0
    s = int(np.floor((1 - gamma) * prev))
    eps = stand_in_eps(x, t)
    x0 = (x - np.sqrt(1 - a[t]) * eps) / np.sqrt(a[t])
    x_s = np.sqrt(a[s]) * x0 + np.sqrt(1 - a[s]) * eps
    x = x_s if (gamma == 0 or n == len(ts) - 1) else (
        np.sqrt(a[prev] / a[s]) * x_s + np.sqrt(1 - a[prev] / a[s]) * zs[n])

  sig = np.sqrt((1 - a) / a)
  sch = diffusion.Schedule(sigma_min=float(sig[0]), sigma_max=float(sig[ts[0]]))

  def jump(x_ve, t_ve, s_ve):
    k = int(np.argmin(np.abs(sig - float(t_ve[0]))))
    eps = jnp.asarray(stand_in_eps(np.sqrt(a[k]) * np.asarray(x_ve, np.float64), k), jnp.float32)
    return x_ve - t_ve[:, None] * eps + s_ve[:, None] * eps      # x0_hat + s eps_hat

  times = [float(sig[t]) for t in ts] + [float(sig[0])]
  got = samplers.sss_sampler(
      jump, jnp.asarray(x_vp / np.sqrt(a[ts[0]]), jnp.float32), key, num_steps, gamma, sch, times,
      vp_schedule="sd_scaled_linear")
  np.testing.assert_allclose(np.sqrt(a[0]) * np.asarray(got, np.float64), x, rtol=2e-4, atol=2e-4)


def test_sss_end_point_on_sd_schedule_is_tcds_not_the_sigma_rule():
  """The issue's numbers: 4 steps, gamma 0.3, SD schedule: s_0 = sigma(floor(0.7 * 759) = 531)
  = 1.80, where (1 - gamma) sigma(759) would be 2.98."""
  a = sd_alphas_cumprod()
  sig = np.sqrt((1 - a) / a)
  ts = tcd_timesteps(4)
  assert list(ts) == [999, 759, 499, 259]
  grid = [sig[t] for t in ts] + [sig[0]]
  sch = diffusion.Schedule(sigma_min=float(sig[0]), sigma_max=float(sig[999]))
  s = samplers.sss_s_values(grid, 0.3, sch, "sd_scaled_linear")
  np.testing.assert_allclose(s[0], sig[531], rtol=1e-12)
  assert abs(s[0] - 1.80) < 0.01 and abs(0.7 * sig[759] - 2.98) < 0.01
  np.testing.assert_allclose(s[1:3], [sig[349], sig[181]], rtol=1e-12)
  assert s[3] == grid[4]


def test_sss_ve_sampler_limits():
  """gamma = 0: the deterministic chain of jumps; gamma = 1: CM multistep (same noise)."""
  sch = diffusion.Schedule()
  x_T = samplers.initial_noise(jax.random.PRNGKey(0), (64, 2))
  key = jax.random.PRNGKey(1)
  from ctm_jax.flow_map import oracle_jump_fn
  jump = oracle_jump_fn(GM.denoise)
  grid = np.asarray(samplers.gamma_time_grid(4, sch))
  x = x_T
  for n in range(4):
    x = jump(x, jnp.full((64,), grid[n]), jnp.full((64,), grid[n + 1]))
  np.testing.assert_allclose(samplers.sss_sampler(jump, x_T, key, 4, 0.0, sch), x, rtol=1e-5, atol=1e-6)
  f = lambda x, t: jump(x, t, jnp.full_like(t, SMIN))
  np.testing.assert_allclose(samplers.sss_sampler(jump, x_T, key, 4, 1.0, sch),
                             samplers.cm_multistep(f, x_T, key, grid[1:-1], sch), rtol=1e-5, atol=1e-6)
  # gamma = 0.5 at step n: s = sigma_DDPM(floor(0.5 k')), k' the DDPM timestep of t_{n+1}
  a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  sig = np.sqrt((1 - a) / a)
  k = int(np.argmin(np.abs(np.log(sig / grid[1]))))
  s = sig[k // 2]
  x = jump(x_T, jnp.full((64,), grid[0]), jnp.full((64,), s))
  x = x + np.sqrt(grid[1] ** 2 - s ** 2) * jax.random.normal(jax.random.fold_in(key, 0), x.shape)
  x = jump(x, jnp.full((64,), grid[1]), jnp.full((64,), grid[4]))
  np.testing.assert_allclose(samplers.sss_sampler(jump, x_T, key, 2, 0.5, sch,
                                                  times=grid[[0, 1, 4]]), x, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- targets

def test_ct_target_is_an_ema_with_the_curriculum_rate():
  cfg = tiny("ct", **{"training.num_train_steps": 50})
  exp = train.Experiment(cfg)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  pipe = data.InputPipeline(cfg.data, 16, cfg.seed, 0, 1)
  rates = []
  for s in range(3):
    prev = jax.device_get(state.extra["target"])
    state, met = fns["train"](state, parallel.global_batch(pipe.batch_at(s), exp.mesh), frozen)
    new = jax.device_get(state)
    s0, s1, mu0 = cfg.ct.s0, cfg.ct.s1, cfg.ct.mu0
    # openai/consistency_models cm/script_util.py (adaptive / progressive), written out:
    # scales = max(ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1), 1); mu = exp(ln(mu0) s0 / scales);
    # N = scales + 1 grid points.
    scales = max(math.ceil(math.sqrt(s / 50 * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1), 1)
    mu = math.exp(math.log(mu0) * s0 / scales)
    rates.append(mu)
    np.testing.assert_allclose(float(met["target_ema"]), mu, rtol=1e-6)
    expect = jax.tree_util.tree_map(lambda a, b: mu * a + (1 - mu) * b, prev, new.params)
    for a, b in zip(jax.tree_util.tree_leaves(new.extra["target"]), jax.tree_util.tree_leaves(expect)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert len(set(rates)) == 3                       # N(k) changed at each step, one compilation
  assert fns["train"]._cache_size() == 1


def test_ict_and_direct_cd_keep_no_target():
  for method in ("ict", "direct_cd"):
    assert train.Experiment(tiny(method)).abstract_state.extra == {}


# ----------------------------------------------------------------------------- refusals

REFUSALS = [
    ("ct", "teacher", "consistency TRAINING"),
    ("ict", "teacher", "consistency TRAINING"),
    ("cd", "no_teacher", "config.teacher is missing"),
    ("direct_cd", {"direct_cd.teacher_solver": "euler_ancestral"}, r"direct_cd\.teacher_solver"),
    ("direct_cd", {"teacher.source": "checkpoint", "teacher.workdir": "x",
                   "teacher.config.method": "ctm"}, r"teacher\.config\.method"),
    ("cd", {"cd.teacher_solver": "dpm"}, r"cd\.teacher_solver"),
    ("cd", {"cd.teacher_solver": "ddim"}, r"cd\.teacher_solver = 'ddim' is the same update as 'euler'"),
    ("tcd", {"tcd.s_min": 0.001}, r"tcd\.s_min .*outside \[sigma_min, t\]"),
    ("tcd", {"tcd.s_min": 80.0}, r"tcd\.s_min"),
    ("tcd", {"tcd.skip": 18}, r"tcd\.skip"),
    ("ct", {"ct.s1": 1}, r"ct\.s1"),
    ("ct", {"ct.s0": 0}, r"ct\.s0"),
    ("ct", {"ct.mu0": 1.0}, r"ct\.mu0"),
    ("ct", {"ct.mu_form": "other"}, r"ct\.mu_form"),
    ("ict", {"ict.curriculum_steps": 5}, r"ict\.curriculum_steps"),
    ("ict", {"ict.p_std": 0.0}, r"ict\.p_std"),
    ("cd", {"cd.weighting": "karras"}, r"cd\.weighting"),
    ("cd", {"cd.distance": "lpips"}, r"cd\.lpips_weights"),
    ("cd", {"cd.sample_times": (0.5, 1.0)}, r"cd\.sample_times"),
    ("cd", {"cd.target_ema": 1.0}, r"cd\.target_ema"),
    ("tcd", {"tcd.sample_gamma": 1.5}, r"tcd\.sample_gamma"),
]


@pytest.mark.parametrize("method,change,message", REFUSALS)
def test_bad_settings_are_refused_with_the_field_named(method, change, message):
  assert_refused(tiny(method), change, message)


def test_samplers_are_checked_against_what_the_model_learned():
  cd = train.Experiment(tiny("cd")).method
  for ok in ("onestep", "cm:2", "cm:4"):
    cd.check_sampler(evaluate.parse_sampler(ok))
  for bad, msg in (("gamma:0:2", "only the map f"), ("gamma:1:2", "only the map f"),
                   ("heun:18", "no denoiser")):
    with pytest.raises(ValueError, match=msg):
      cd.check_sampler(evaluate.parse_sampler(bad))
  tcd = train.Experiment(tiny("tcd")).method
  tcd.check_sampler(evaluate.parse_sampler("gamma:0.3:4"))
  with pytest.raises(ValueError, match="no denoiser"):
    tcd.check_sampler(evaluate.parse_sampler("heun:18"))
  assert (cd.generator_kind, cd.has_score_head, tcd.generator_kind, tcd.has_score_head) == (
      "cm_f", False, "jump", False)


def test_ode_error_of_a_consistency_model_uses_f():
  cfg, exp, state, _ = setup("cd")
  x_T = np.asarray(samplers.initial_noise(jax.random.PRNGKey(3), (32, 2)))
  ref = np.asarray(GM.sample(jax.random.PRNGKey(4), 32))
  f = exp.model.cm_f(state.params, jnp.asarray(x_T), jnp.full((32,), SMAX))
  got = evaluate.ode_error(exp.model, state.params, x_T, ref, exp.method.generator_kind)
  np.testing.assert_allclose(got, np.mean((np.asarray(f, np.float64) - ref) ** 2), rtol=1e-5)


# ----------------------------------------------------------------------------- the loop

@pytest.mark.parametrize("method", METHODS)
def test_toy_config_trains_through_the_loop(method, tmp_path):
  extra = {"ict.curriculum_steps": 1000} if method == "ict" else {}
  cfg = tiny(method, **{"training.num_train_steps": 4, "training.log_every": 2,
                        "training.sample_every": 4, "sampling.num_eval_samples": 64,
                        f"{method}.sample_nfes": (2,), **extra})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["step"] == 4 and np.isfinite(summary["metrics"]["loss"])
  names = {k for k in summary["samples"] if not k.endswith("_ref")}     # less the references
  assert len(names) == 1 and next(iter(names)).startswith("nfe2_")
  for met in summary["samples"].values():
    assert np.isfinite(met["mmd"]) and np.isfinite(met["sliced_w1"])
