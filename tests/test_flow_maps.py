"""MeanFlow and sCM (sCT / sCD) against the exact flow map of the mixture oracle, their losses
against hand-written references, their maps to and from the EDM frame, the refusals, and a few
real training steps of each toy config.

The exact flow Phi(x, sigma -> s) of a Gaussian mixture is the PF-ODE dx/d ln(sigma) = x - D(x,
sigma) with the oracle's exact denoiser D, integrated here by RK4 in ln(sigma) (differentiable,
float64) and, independently, by scipy's DOP853 at rtol 1e-11."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ctm_jax import evaluate, flow_map, oracle, train
from ctm_jax.methods import meanflow as mf
from ctm_jax.methods import scm
from launch_utils import assert_refused
from test_cm_family import setup, tiny     # a toy config of a method, its Experiment and batch

FLOW_METHODS = ("meanflow", "sct", "scd")


# ----------------------------------------------------------------------------- exact flow

def rk4_flow(gm, x, sig0, sig1, steps=400):
  """Phi(x, sig0 -> sig1) per example: RK4 on dx/dl = x - D(x, e^l), l = ln(sigma)."""
  l0, l1 = jnp.log(sig0), jnp.log(sig1)
  h = (l1 - l0) / steps
  rhs = lambda y, l: y - gm.denoise(y, jnp.exp(l))

  def body(i, y):
    l = l0 + i * h
    hb = h[:, None]
    k1 = rhs(y, l)
    k2 = rhs(y + 0.5 * hb * k1, l + 0.5 * h)
    k3 = rhs(y + 0.5 * hb * k2, l + 0.5 * h)
    k4 = rhs(y + hb * k3, l + h)
    return y + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return jax.lax.fori_loop(0, steps, body, x)


def scipy_flow(gm, x, sig0, sig1):
  """The same flow by scipy DOP853 (rtol = atol = 1e-11), all examples in one system over
  s in [0, 1] with ln(sigma) = (1 - s) ln(sig0) + s ln(sig1) per example."""
  x = np.asarray(x, np.float64)
  l0, l1 = np.log(np.asarray(sig0, np.float64)), np.log(np.asarray(sig1, np.float64))
  den = jax.jit(gm.denoise)

  def rhs(s, y):
    y = y.reshape(x.shape)
    d = np.asarray(den(jnp.asarray(y), jnp.asarray(np.exp(l0 + s * (l1 - l0)))))
    return ((l1 - l0)[:, None] * (y - d)).ravel()
  sol = solve_ivp(rhs, (0.0, 1.0), x.ravel(), method="DOP853", rtol=1e-11, atol=1e-11)
  return sol.y[:, -1].reshape(x.shape)


def mixture():
  return oracle.random_mixture(3, 3, 4, spread=1.0)


def rf_points(gm, n, seed):
  """(z, r, t, x0, e): z = (1 - t) x0 + t e, 0.02 < r < t < 0.97."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(0.08, 0.97, n)
  r = rng.uniform(0.02, t - 0.03)
  x0 = np.asarray(gm.sample(jax.random.PRNGKey(seed), n), np.float64)
  e = rng.standard_normal(x0.shape)
  z = (1 - t)[:, None] * x0 + t[:, None] * e
  return z, r, t, x0, e


def test_meanflow_target_of_the_exact_average_velocity_is_the_exact_flow():
  """u_tgt = v - (t - r) du/dt by the JVP with tangent (v, 0, 1), for u the exact average
  velocity and v the exact marginal velocity, equals (z_t - z_r) / (t - r) of the exact flow."""
  with jax.enable_x64(True):
    gm = mixture()
    z, r, t, _, _ = rf_points(gm, 48, 0)

    def u_exact(zz, rr, tt):       # (z - z_r) / (t - r), the flow taken in the EDM frame
      s_t, s_r = flow_map.rf_sigma(tt), flow_map.rf_sigma(rr)
      z_r = (1 - rr)[:, None] * rk4_flow(gm, zz / (1 - tt)[:, None], s_t, s_r)
      return (zz - z_r) / (tt - rr)[:, None]

    sig_t = flow_map.rf_sigma(jnp.asarray(t))
    v = (z - np.asarray(gm.denoise(jnp.asarray(z / (1 - t)[:, None]), sig_t))) / t[:, None]
    u, u_tgt = mf.meanflow_target(u_exact, jnp.asarray(z), jnp.asarray(r), jnp.asarray(t),
                                  jnp.asarray(v))
    z_r = (1 - r)[:, None] * scipy_flow(gm, z / (1 - t)[:, None], t / (1 - t), r / (1 - r))
    ref = (z - z_r) / (t - r)[:, None]
    np.testing.assert_allclose(np.asarray(u), ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(u_tgt), ref, rtol=0, atol=2e-6)
    assert np.abs(ref).max() > 0.5 and np.abs(ref - v).max() > 0.05    # u is not v here


def f_exact(gm, x_t, t, sd, eps=1e-4):
  """The oracle's consistency function in TrigFlow: Phi(x_t / cos t, sd tan t -> eps)."""
  return rk4_flow(gm, x_t / jnp.cos(t)[:, None], sd * jnp.tan(t), jnp.full_like(t, eps))


def F_of_f(fn, sd):
  """The network output F (EDM sign) that gives f: f = cos(t) x_t + sin(t) sd F."""
  return lambda x_t, t: (fn(x_t, t) - jnp.cos(t)[:, None] * x_t) / (jnp.sin(t) * sd)[:, None]


def trig_points(gm, n, seed, sd):
  rng = np.random.default_rng(seed)
  t = rng.uniform(0.05, 1.5, n)
  x0 = np.asarray(gm.sample(jax.random.PRNGKey(seed), n), np.float64)
  z = sd * rng.standard_normal(x0.shape)
  return jnp.asarray(np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * z), jnp.asarray(t), x0, z


def test_scm_tangent_is_the_exact_total_derivative_of_the_oracle_consistency_function():
  """sCT: g = cos(t) d/dt f(x_t, t) along x_t = cos t x0 + sin t z, against a central finite
  difference of the exact f; sCD with the oracle as teacher: the PF-ODE tangent of the exact
  consistency function is 0 (f is constant on trajectories) while its parts are O(1)."""
  with jax.enable_x64(True):
    gm, sd = mixture(), 0.8
    x_t, t, x0, z = trig_points(gm, 32, 1, sd)
    fn = lambda xx, tt: f_exact(gm, xx, tt, sd)
    F_fn = F_of_f(fn, sd)
    dxdt = jnp.asarray(np.cos(t)[:, None] * z - np.sin(t)[:, None] * x0)
    _, g = scm.scm_tangent(F_fn, x_t, t, dxdt, sd, 1.0)
    h = 1e-5
    path = lambda tt: fn(jnp.asarray(np.cos(tt)[:, None] * x0 + np.sin(tt)[:, None] * z), tt)
    fd = (np.asarray(path(t + h)) - np.asarray(path(t - h))) / (2 * h)
    np.testing.assert_allclose(np.asarray(g), np.cos(t)[:, None] * fd, rtol=0, atol=2e-6)
    assert np.abs(fd).max() > 0.3

    x = x_t / jnp.cos(t)[:, None]
    v = scm.trig_velocity_from_denoiser(x_t, t, gm.denoise(x, sd * jnp.tan(t)))
    F, g0 = scm.scm_tangent(F_fn, x_t, t, v, sd, 1.0)
    parts = np.abs(np.cos(t)[:, None] ** 2 * np.asarray(v + sd * F)).max()
    assert parts > 0.3 and np.abs(np.asarray(g0)).max() < 1e-6 * parts


# ----------------------------------------------------------------------------- the EDM frame

def test_meanflow_network_is_a_jump_in_the_edm_frame():
  """G(x, sigma, s) = z_r / (1 - r), z_r = z - (t - r) u(z, r, t), z = (1 - t) x, t = sigma /
  (1 + sigma); G(x, t, t) = x; the score head g(x, sigma, sigma) = z - t v."""
  cfg, exp, state, _ = setup("meanflow")
  model, p = exp.model, state.params
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 2)) * 3, jnp.float32)
  sig = jnp.asarray(np.exp(rng.uniform(np.log(0.01), np.log(80), 16)), jnp.float32)
  s = sig * jnp.asarray(rng.uniform(0.01, 1, 16), jnp.float32)
  t, r = sig / (1 + sig), s / (1 + s)
  z = (1 - t)[:, None] * x
  u = model.average_velocity(p, z, r, t)
  want = (z - (t - r)[:, None] * u) / (1 - r)[:, None]
  np.testing.assert_allclose(np.asarray(model.jump(p, x, sig, s)), np.asarray(want), rtol=2e-5,
                             atol=2e-5)
  np.testing.assert_array_equal(np.asarray(model.jump(p, x, sig, sig)), np.asarray(x))
  v = model.average_velocity(p, z, t, t)
  np.testing.assert_allclose(np.asarray(model.denoiser(p, x, sig)),
                             np.asarray(z - t[:, None] * v), rtol=2e-5, atol=2e-5)


def test_scm_network_is_the_trigflow_consistency_function():
  """cm_f(x, sigma) = cos(t) x_t - sin(t) sd F_trig(x_t / sd, t) with x_t = cos(t) x,
  t = arctan(sigma / sd) and F_trig = -F; the network's time input is t itself."""
  cfg, exp, state, _ = setup("sct")
  model, p, sd = exp.model, state.params, cfg.diffusion.sigma_data
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 2)) * 2, jnp.float32)
  sig = jnp.asarray(np.exp(rng.uniform(np.log(0.01), np.log(80), 16)), jnp.float32)
  t = jnp.arctan(sig / sd)
  x_t = jnp.cos(t)[:, None] * x
  F_trig = -model.net.apply({"params": p}, x_t / sd, t, None, None, train=False)
  want = jnp.cos(t)[:, None] * x_t - (jnp.sin(t) * sd)[:, None] * F_trig
  np.testing.assert_allclose(np.asarray(model.cm_f(p, x, sig)), np.asarray(want), rtol=2e-5,
                             atol=2e-5)


# ----------------------------------------------------------------------------- losses

def total_derivative(fn, x, t, v):
  """d/dt fn(x(t), t) with dx/dt = v, per example, by reverse mode and the chain rule written
  out: sum_d dfn_k/dx_d v_d + dfn_k/dt (examples are independent: gradients of batch sums)."""
  out = []
  for k in range(x.shape[1]):
    gx, gt = jax.grad(lambda xx, tt: jnp.sum(fn(xx, tt)[:, k]), argnums=(0, 1))(x, t)
    out.append(np.sum(np.asarray(gx, np.float64) * v, axis=1) + np.asarray(gt, np.float64))
  return np.stack(out, 1)


def test_meanflow_loss_matches_a_hand_written_reference():
  """The (r, t) draw, z, v, the target with du/dt by reverse mode and the chain rule (not a
  JVP), and the adaptive weight, written out here."""
  cfg, exp, state, batch = setup("meanflow", **{"meanflow.ratio": 0.5})
  params, c = state.params, cfg.meanflow
  rng = jax.random.PRNGKey(7)
  got, _ = exp.method.loss(params, state.extra, {}, batch, rng, 0)
  x0 = np.asarray(batch["x"], np.float64)
  n = x0.shape[0]
  k_time, k_e, k_drop, _ = jax.random.split(rng, 4)
  k_t, k_r, k_eq = jax.random.split(k_time, 3)
  sigm = lambda a: 1 / (1 + np.exp(-a))
  a = sigm(c.p_mean_t + c.p_std_t * np.asarray(jax.random.normal(k_t, (n,)), np.float64))
  b = sigm(c.p_mean_r + c.p_std_r * np.asarray(jax.random.normal(k_r, (n,)), np.float64))
  t, r = np.maximum(a, b), np.minimum(a, b)
  r = np.where(np.asarray(jax.random.uniform(k_eq, (n,))) < c.ratio, r, t)
  assert 0 < np.sum(r < t) < n
  e = np.asarray(jax.random.normal(k_e, x0.shape), np.float64)
  z, v = (1 - t)[:, None] * x0 + t[:, None] * e, e - x0
  u = lambda zz, tt: exp.model.average_velocity(params, zz, jnp.asarray(r, jnp.float32), tt,
                                                train=True, rng=k_drop)
  zf, tf = jnp.asarray(z, jnp.float32), jnp.asarray(t, jnp.float32)
  uu, dudt = np.asarray(u(zf, tf), np.float64), total_derivative(u, zf, tf, v)
  err = uu - (v - (t - r)[:, None] * dudt)
  sq = np.sum(err ** 2, axis=1)
  want = np.mean(sq / (sq + c.norm_eps) ** c.norm_p)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_scm_loss_matches_a_hand_written_reference(method):
  """sigma ~ logN, x_t, dx_t/dt (sCT: cos t z - sin t x0; sCD: the oracle's PF-ODE in TrigFlow),
  dF/dt by reverse mode and the chain rule (not a JVP), the
  warm-up, normalisation, prior and adaptive weight written out here; phi set non-zero."""
  cfg, exp, state, batch = setup(method, **{f"{method}.warmup_steps": 100,
                                            f"{method}.prior_weighting": method == "scd",
                                            f"{method}.adaptive_weighting": True})
  params, c, sd = state.params, cfg[method], cfg.diffusion.sigma_data
  step = 40
  phi = {"w": jnp.asarray(np.random.default_rng(2).standard_normal(scm.NUM_FOURIER), jnp.float32),
         "b": jnp.float32(0.3)}
  rng = jax.random.PRNGKey(5)
  got, _ = exp.method.loss(params, {**state.extra, "weight": phi}, exp.method.frozen(), batch,
                           rng, step)
  x0 = np.asarray(batch["x"], np.float64)
  n = x0.shape[0]
  k_time, k_z, k_drop, _ = jax.random.split(rng, 4)
  sigma = np.exp(c.p_mean + c.p_std * np.asarray(jax.random.normal(k_time, (n,)), np.float64))
  t = np.arctan(sigma / sd)
  z = sd * np.asarray(jax.random.normal(k_z, x0.shape), np.float64)
  cos, sin = np.cos(t)[:, None], np.sin(t)[:, None]
  x_t = cos * x0 + sin * z
  if method == "sct":
    v = cos * z - sin * x0
  else:
    x = x_t / cos
    d = np.asarray(oracle.toy_mixture_2d().denoise(jnp.asarray(x, jnp.float32),
                                                   jnp.asarray(sigma, jnp.float32)), np.float64)
    v = (x - d) / sin - sin * x       # d/dt [cos t x(sd tan t)], dx/dsigma = (x - d) / sigma
  F = lambda xx, tt: exp.model.raw(params, xx / sd, sd * jnp.tan(tt), train=True, rng=k_drop)
  xf, tf = jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32)
  F0, dF = np.asarray(F(xf, tf), np.float64), total_derivative(F, xf, tf, v)
  warm = min(1.0, step / c.warmup_steps)
  g = cos * (cos * (v + sd * F0) - warm * sin * (x_t - sd * dF))
  g = g / (np.linalg.norm(g, axis=1, keepdims=True) + c.tangent_c)
  sq = np.mean(g ** 2, axis=1)                   # F_theta - F_minus = 0 in value
  feats = np.sqrt(2) * np.cos(2 * np.pi * (t[:, None] * np.asarray(exp.method.fourier_freqs)
                                           + np.asarray(exp.method.fourier_phases)))
  w = feats @ np.asarray(phi["w"], np.float64) / np.sqrt(scm.NUM_FOURIER) + 0.3
  prior = 1 / (sd * np.tan(t)) if c.prior_weighting else 1.0
  want = np.mean(prior * np.exp(w) * sq - w)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  # Without the adaptive weighting (the toy sCD config): the prior-weighted mean alone.
  _, exp2, _, _ = setup(method, **{f"{method}.warmup_steps": 100,
                                   f"{method}.prior_weighting": method == "scd",
                                   f"{method}.adaptive_weighting": False})
  got2, _ = exp2.method.loss(params, {**state.extra, "weight": phi}, exp2.method.frozen(), batch,
                             rng, step)
  np.testing.assert_allclose(float(got2), np.mean(prior * sq), rtol=2e-5)


def test_scm_adaptive_weight_is_trained_and_the_tangent_warms_up():
  cfg, exp, state, batch = setup("sct", **{"sct.warmup_steps": 4})
  step = jax.jit(exp.method.make_step("train", exp.tx))
  frozen = exp.method.frozen()
  warm = []
  for _ in range(3):
    state, met = step(state, batch, frozen)
    warm.append(float(met["tangent_warmup"]))
  assert warm == [0.0, 0.25, 0.5]
  assert float(jnp.abs(state.extra["weight"]["w"]).max()) > 0


# ----------------------------------------------------------------------------- config, loop

REFUSALS = [
    ("meanflow", {"meanflow.ratio": 1.5}, r"meanflow\.ratio"),
    ("meanflow", {"meanflow.norm_eps": 0.0}, r"meanflow\.norm_eps"),
    ("meanflow", {"meanflow.p_std_r": 0.0}, r"meanflow\.p_std_r"),
    ("meanflow", "teacher", r"config\.teacher"),
    ("sct", {"sct.tangent_c": 0.0}, r"sct\.tangent_c"),
    ("sct", {"sct.warmup_steps": -1}, r"sct\.warmup_steps"),
    ("sct", {"sct.p_std": 0.0}, r"sct\.p_std"),
    ("sct", "teacher", r"config\.teacher"),
    ("scd", "no_teacher", r"config\.teacher"),
    ("scd", {"scd.sample_times": (0.5, 1.0)}, r"scd\.sample_times"),
    ("scd", {"scd.init_from_teacher": True}, r"scd\.time_input"),
    ("sct", {"sct.time_input": "sigma"}, r"sct\.time_input"),
]


@pytest.mark.parametrize("method,change,message", REFUSALS)
def test_bad_settings_are_refused_with_the_field_named(method, change, message):
  assert_refused(tiny(method), change, message)


def test_samplers_are_checked_against_what_each_map_learned():
  m = train.Experiment(tiny("meanflow")).method
  for ok in ("onestep", "gamma:0:2", "gamma:0.5:4", "heun:18"):
    m.check_sampler(evaluate.parse_sampler(ok))
  s = train.Experiment(tiny("sct")).method
  s.check_sampler(evaluate.parse_sampler("cm:2"))
  for bad, msg in (("gamma:0:2", "only the map f"), ("heun:18", "no denoiser")):
    with pytest.raises(ValueError, match=msg):
      s.check_sampler(evaluate.parse_sampler(bad))


@pytest.mark.slow
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_toy_config_trains_through_the_loop(method, tmp_path):
  cfg = tiny(method, **{"training.num_train_steps": 3, "training.log_every": 3,
                        "training.sample_every": 3, "sampling.num_eval_samples": 64,
                        f"{method}.sample_nfes": (2,), f"{method}.sample_times": ()})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["step"] == 3 and np.isfinite(summary["metrics"]["loss"])
  names = {k for k in summary["samples"] if not k.endswith("_ref")}
  assert len(names) == 1 and next(iter(names)).startswith("nfe2_")


@pytest.mark.slow
def test_reduced_comparison_of_meanflow_and_sct(tmp_path):
  """Both in launch.compare with their one- and two-step samplers; E of each one-step map
  (MeanFlow: the jump G(x_T, sigma_max, sigma_min); sCT: f(x_T, sigma_max)) recomputed from the
  saved EMA against test_compare's numpy RK4 solve of the hand-written mixture denoiser."""
  from ctm_jax import compare, runs, samplers
  from test_compare import rk4_solve, small
  cmp = small(tmp_path / "cmp", methods=("meanflow", "sct"))
  cmp.samplers = {"meanflow": "gamma:0:{n}", "sct": "cm:{n}"}
  saved = compare.run(cmp)
  rows = {(r["method"], r["metric"], r["sampler"]): r["value"] for r in saved["rows"]}
  assert ("meanflow", "mmd", "gamma:0:2") in rows and ("sct", "mmd", "cm:2") in rows
  for method in ("meanflow", "sct"):
    config = compare.run_config(cmp, method, 0)
    params, _, _ = runs.load_params(config, compare.run_dir(cmp, method, 0))
    model = runs.build_model(config)
    n, smax, smin = 32, config.diffusion.sigma_max, config.diffusion.sigma_min
    x_T = np.asarray(samplers.initial_noise(jax.random.PRNGKey(1), (n, 2), smax))
    xb = jnp.asarray(x_T)
    if method == "meanflow":
      t, r = smax / (1 + smax), smin / (1 + smin)        # the rectified-flow times
      z = (1 - t) * xb
      u = model.average_velocity(params, z, jnp.full((n,), r), jnp.full((n,), t))
      out = (z - (t - r) * u) / (1 - r)
    else:
      out = model.cm_f(params, xb, jnp.full((n,), smax))
    want = np.mean((np.asarray(out, np.float64) - rk4_solve(x_T.astype(np.float64), smax, smin))
                   ** 2)
    np.testing.assert_allclose(rows[(method, "ode_error", "onestep")], want, rtol=1e-3)
