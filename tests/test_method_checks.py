"""The method layer against independent references: EDM's DSM weight and per-example loss in
closed form (a stubbed network), CTM's DSM time split and s = t head, and a CTM generator step
with theta^- != theta and dropout on against a direct computation (tests/method_reference.py),
the target EMA rolled over three steps, and the adaptive weight at its clamp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_ctm, toy_edm
from ctm_jax import diffusion, flow_map, train, train_state
from ctm_jax.methods import ctm as ctm_lib
from ctm_jax.methods import edm as edm_lib
from launch_utils import tiny_toy_student
from method_reference import (Probe, check_generator_step, grad_norm_at, perturbed,
                              tree_close)

SMIN, SMAX, RHO = 0.002, 80.0, 7.0


def lam_ref(t, sd):
  """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)."""
  return (t ** 2 + sd ** 2) / (t * sd) ** 2


def test_edm_loss_weight_numbers():
  t = np.array([0.002, 0.1, 0.5, 1.0, 3.0, 80.0])
  for sd in (0.5, 0.75):
    np.testing.assert_allclose(np.asarray(diffusion.edm_loss_weight(jnp.asarray(t), sd)),
                               lam_ref(t, sd), rtol=1e-6)
  # Hand values at sd = 0.5: lambda(0.5) = 0.5 / 0.0625 = 8, lambda(1) = 1.25 / 0.25 = 5.
  np.testing.assert_allclose(np.asarray(diffusion.edm_loss_weight(jnp.array([0.5, 1.0]), 0.5)),
                             [8.0, 5.0], rtol=1e-6)


def _closed_form_dsm(x0, sigma, z, sd, f=0.0):
  """lambda(sigma) mean_d (c_skip x_t + c_out f - x0)^2 with x_t = x0 + sigma z (float64)."""
  x0, sigma, z = (np.asarray(v, np.float64) for v in (x0, sigma, z))
  x_t = x0 + sigma[:, None] * z
  c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
  c_out = sigma * sd / np.sqrt(sigma ** 2 + sd ** 2)
  d = c_skip[:, None] * x_t + (c_out * f)[:, None]
  return lam_ref(sigma, sd) * np.mean((d - x0) ** 2, axis=1)


def test_edm_dsm_loss_per_example_with_zero_network():
  sd = 0.75
  model = flow_map.FlowModel(Probe(), diffusion.Schedule(SMIN, SMAX, sd, RHO))
  x0 = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x0))
  sigma = np.array([0.002, 0.05, 0.4, 1.3, 7.0, 80.0], np.float32)
  z = np.random.default_rng(1).standard_normal((6, 2)).astype(np.float32)
  got = edm_lib.dsm_loss(model, params, jnp.asarray(x0), jnp.asarray(sigma), jnp.asarray(z), None,
                         None, train=False)
  np.testing.assert_allclose(np.asarray(got), _closed_form_dsm(x0, sigma, z, sd), rtol=2e-5)
  # The method's loss: sigma = exp(P_mean + P_std n) and z from the documented key split.
  cfg = toy_edm.get_config()
  method = edm_lib.EDM(cfg, model)
  rng = jax.random.PRNGKey(5)
  loss, _ = method.loss(params, {"x": jnp.asarray(x0)}, rng)
  k_sig, k_noise, _ = jax.random.split(rng, 3)
  sig = np.exp(cfg.edm.p_mean + cfg.edm.p_std * np.asarray(jax.random.normal(k_sig, (6,)), np.float64))
  zz = np.asarray(jax.random.normal(k_noise, x0.shape))
  np.testing.assert_allclose(float(loss), np.mean(_closed_form_dsm(x0, sig, zz, sd)), rtol=2e-5)


def test_ctm_dsm_loss_time_split_and_s_equals_t_head():
  """CTM's DSM on g(x, sigma, sigma): sigma_0..sigma_{floor(B/2)-1} log-normal, the rest on the
  Karras curve at u ~ U[0, curve_max]; the probe F = c_noise(s) shows s = sigma."""
  cfg = toy_ctm.get_config()
  sd = cfg.diffusion.sigma_data
  model = flow_map.FlowModel(Probe(b=1.0, use_s=True), diffusion.Schedule(SMIN, SMAX, sd, RHO))
  method = ctm_lib.CTM(cfg, model)
  b = 7                                           # odd: 3 log-normal, 4 on the curve
  x0 = np.random.default_rng(2).standard_normal((b, 2)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(x0))
  rng = jax.random.PRNGKey(11)
  got = float(method.dsm_loss(params, jnp.asarray(x0), None, rng))
  # The draws, reproduced from the same keys: split(rng, 3) -> (sigma, z, dropout); the sigma
  # key splits into (log-normal, curve).
  k_sig, k_z, _ = jax.random.split(rng, 3)
  k_log, k_u = jax.random.split(k_sig)
  n_log = b // 2
  c = cfg.ctm
  # Each draw is made for the whole batch; example i takes its own element of one of them.
  log_part = np.exp(c.dsm_p_mean + c.dsm_p_std * np.asarray(jax.random.normal(k_log, (b,)),
                                                            np.float64))[:n_log]
  u = np.asarray(jax.random.uniform(k_u, (b,)), np.float64)[n_log:] * c.dsm_curve_max
  curve = (SMAX ** (1 / RHO) + u * (SMIN ** (1 / RHO) - SMAX ** (1 / RHO))) ** RHO
  sigma = np.concatenate([log_part, curve])
  z = np.asarray(jax.random.normal(k_z, x0.shape))
  ref = _closed_form_dsm(x0, sigma, z, sd, f=np.log(sigma) / 4)      # F = c_noise(s), s = sigma
  np.testing.assert_allclose(got, np.mean(ref), rtol=2e-5)
  # The same draws with s = sigma_min would give a different loss (the probe sees s).
  wrong = _closed_form_dsm(x0, sigma, z, sd, f=np.full(b, np.log(SMIN) / 4))
  assert abs(np.mean(wrong) - got) > 1e-2 * got


# ----------------------------------------------------------------------------- CTM step

def _toy_ctm_cfg(**overrides):
  return tiny_toy_student(toy_ctm, **{"model.dropout": 0.2, "ctm.num_points": 8, "ctm.max_k": 7,
                                      **overrides})


def _method(cfg):
  model = train.build_model(cfg)
  return model, ctm_lib.CTM(cfg, model)


@pytest.fixture(scope="module")
def toy_setup():
  cfg = _toy_ctm_cfg()
  model, _ = _method(cfg)
  x0 = np.random.default_rng(3).standard_normal((16, 2)).astype(np.float32)
  params = jax.device_get(model.init(jax.random.PRNGKey(1), jnp.asarray(x0[:1])))
  target = perturbed(params, seed=7)
  return {"x": jnp.asarray(x0)}, params, target


def _l2(a, b):
  return jnp.mean((a - b) ** 2, axis=1)


def _check(cfg, toy_setup):
  batch, params, target = toy_setup
  _, method = _method(cfg)
  return method, check_generator_step(method, params, {"target": target}, {"teacher": {}}, batch,
                                      jax.random.PRNGKey(3), jax.random.PRNGKey(4), _l2)


@pytest.mark.parametrize("target_train_mode", [True, False])
def test_ctm_generator_step_with_target_and_dropout_matches_direct(toy_setup, target_train_mode):
  cfg = _toy_ctm_cfg(**{"ctm.target_train_mode": target_train_mode})
  _, (met, _, _) = _check(cfg, toy_setup)
  assert met["lambda_dsm"] < cfg.ctm.adaptive_max          # the unclamped case


def test_adaptive_weight_reaches_its_clamp(toy_setup):
  method, (met, gc, gd) = _check(_toy_ctm_cfg(), toy_setup)
  free = grad_norm_at(gc, method.adaptive_path) / (grad_norm_at(gd, method.adaptive_path) + 1e-4)
  cap = free / 2
  _, (met2, _, _) = _check(_toy_ctm_cfg(**{"ctm.adaptive_max": cap}), toy_setup)
  np.testing.assert_allclose(met2["lambda_dsm"], cap, rtol=1e-6)     # and grads use the cap


def test_target_ema_rolled_over_three_steps(toy_setup):
  """theta^-_{n+1} = mu theta^-_n + (1 - mu) theta_{n+1}, from theta^-_0 != theta_0."""
  batch, params, target = toy_setup
  mu = 0.9
  cfg = _toy_ctm_cfg(**{"ctm.target_ema": mu})
  _, method = _method(cfg)
  tx = train_state.make_optimizer(cfg.optim)
  state = train_state.create_state(params, tx, cfg.ema, jax.random.PRNGKey(0),
                                   {"target": target})
  step = jax.jit(method.make_step("ctm", tx))
  expect = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), target)
  for n in range(3):
    xb = {"x": batch["x"] * (1.0 + 0.1 * n)}
    state, _ = step(state, xb, {"teacher": {}})
    new = jax.device_get(state.params)
    expect = jax.tree_util.tree_map(lambda e, p: mu * e + (1 - mu) * np.asarray(p, np.float64),
                                    expect, new)
    tree_close(jax.device_get(state.extra["target"]), expect, rtol=1e-5, atol=1e-6)
  # theta^- still differs from theta (an EMA of the parameters would not remember theta^-_0).
  diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree_util.tree_leaves(state.extra["target"]),
                 jax.tree_util.tree_leaves(state.params)))
  assert diff > 0.01
