"""CTM gamma-sampling (Kim et al. 2024, Alg. 2) against the algorithm written out here: a jump
function that records its calls gives the (t_n, s_n) pairs, the noise added between jumps (its
standard deviation sqrt(t_{n+1}^2 - s_n^2), its independence across steps) and the last jump to
sigma_min; and a network with c_noise(s) = ln(s)/4 samples finite values for every gamma in
[0, 1] through every entry point (samplers, evaluate's sampler specs, CTM.sample_fns)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_ctm
from ctm_jax import diffusion, evaluate, samplers, train
from ctm_jax.methods import ctm as ctm_lib
from launch_utils import set_fields

SMIN, SMAX, RHO = 0.002, 80.0, 7.0
SCH = diffusion.Schedule(SMIN, SMAX, 0.5, RHO)


def karras64(m):
  """EDM eq. 5 in float64: t_i = (T^(1/rho) + i/m (sigma_min^(1/rho) - T^(1/rho)))^rho."""
  a, b = SMAX ** (1 / RHO), SMIN ** (1 / RHO)
  return (a + np.arange(m + 1) / m * (b - a)) ** RHO


def expected_s(grid, gamma, shift):
  """Alg. 2's s_n = sqrt(1 - gamma^2) t_{n+1}, never below sigma_min (c_noise(0) = -inf); the
  reference code's form sqrt(1 - gamma^2)(t_{n+1} - sigma_min) + sigma_min; s_{M-1} = sigma_min."""
  m = len(grid) - 1
  r = np.sqrt(1.0 - gamma ** 2)
  s = [r * (grid[n + 1] - SMIN) + SMIN if shift else max(r * grid[n + 1], SMIN)
       for n in range(m - 1)]
  return np.array(s + [SMIN])


def record(gamma, shift, times=None, m=5, b=4096):
  """Runs the sampler with a jump that returns the constant 10 (n + 1) at its n-th call, so the
  n-th call's input minus 10 n is the noise added after jump n - 1 alone."""
  calls = []

  def jump(x, t, s):
    calls.append((np.asarray(t), np.asarray(s), np.asarray(x)))
    return jnp.full_like(x, 10.0 * len(calls))

  x_T = samplers.initial_noise(jax.random.PRNGKey(1), (b, 2), SMAX)
  out = samplers.gamma_sampler(jump, x_T, jax.random.PRNGKey(2), m, gamma, SCH, times, shift)
  return calls, np.asarray(x_T), np.asarray(out)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("times", [None, (80.0, 9.0, 1.5, 0.3, 0.05, 0.002)])
def test_gamma_half_times_noise_and_last_jump(shift, times):
  gamma, m = 0.5, 5
  calls, x_T, out = record(gamma, shift, times, m)
  grid = karras64(m) if times is None else np.array(times)
  s = expected_s(grid, gamma, shift)
  assert len(calls) == m
  np.testing.assert_array_equal(calls[0][2], x_T)                   # G(x_T, T, s_0) first
  noises = []
  for n, (t, s_n, x_in) in enumerate(calls):
    assert t.shape == s_n.shape == (x_T.shape[0],)
    np.testing.assert_allclose(t, grid[n], rtol=1e-6)
    np.testing.assert_allclose(s_n, s[n], rtol=1e-6)
    if n:
      noise = x_in - 10.0 * n                  # the jump's output plus fresh noise
      std = np.sqrt(grid[n] ** 2 - s[n - 1] ** 2)
      assert abs(noise.mean()) < 0.05 * std, n
      np.testing.assert_allclose(noise.std(), std, rtol=0.03)
      noises.append(noise.ravel() / std)
  # Fresh noise at every step: no correlation between the draws of different steps.
  c = np.corrcoef(np.stack(noises))
  assert np.abs(c - np.eye(len(noises))).max() < 0.05
  np.testing.assert_array_equal(out, 10.0 * m)      # nothing added after the last jump
  np.testing.assert_allclose(calls[-1][1], SMIN, rtol=1e-6)


def test_gamma_zero_is_the_deterministic_chain():
  """gamma = 0: s_n = t_{n+1} in both forms, and nothing is added between the jumps. (gamma near
  and at 1, where s_n clamps to sigma_min: test_flow_map_and_samplers.py.)"""
  m = 5
  grid = karras64(m)
  for shift in (False, True):
    calls, _, _ = record(0.0, shift, None, m, b=64)
    np.testing.assert_allclose(expected_s(grid, 0.0, shift), grid[1:], rtol=1e-12)
    for n, (t, s_n, x_in) in enumerate(calls):
      np.testing.assert_allclose(t, grid[n], rtol=1e-6)
      np.testing.assert_allclose(s_n, grid[n + 1], rtol=1e-6)
      if n:
        np.testing.assert_array_equal(x_in, 10.0 * n)


@pytest.fixture(scope="module")
def student():
  """A toy CTM student with CTM's s input (c_noise(s) = ln(s)/4: -inf at s = 0) and the
  toy CTM method around it, parameters perturbed so the s path matters."""
  cfg = set_fields(toy_ctm.get_config(), {
      "model.hidden": 32, "model.num_blocks": 2, "model.emb_dim": 16,
      "ctm.sample_nfes": (1, 3)})
  model = train.build_model(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 2)))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  return cfg, model, params


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.75, 0.99, 1.0])
def test_every_gamma_samples_finite_values_on_every_entry_point(student, gamma):
  cfg, model, params = student
  sch = model.schedule
  x_T = samplers.initial_noise(jax.random.PRNGKey(3), (8, 2), sch.sigma_max)
  key = jax.random.PRNGKey(4)
  outs = {}
  for shift in (False, True):
    for times in (None, [sch.sigma_max, 1.5, 0.2, sch.sigma_min]):
      outs[f"gamma_sampler shift={shift} times={times}"] = samplers.gamma_sampler(
          model.jump_fn(params), x_T, key, 3, gamma, sch, times, shift)
  for spec in (f"gamma:{gamma:g}:4", f"gamma:{gamma:g}:3:{sch.sigma_max:g},1.5,0.2,"
               f"{sch.sigma_min:g}", f"gamma_shift:{gamma:g}:4", "onestep", "cm:4"):
    fn = evaluate.sampler_fn(model, evaluate.parse_sampler(spec))
    outs[f"evaluate {spec}"] = fn(params, x_T, key, None)
  cfg = set_fields(cfg, {"ctm.sample_gamma": gamma})
  for name, fn in ctm_lib.CTM(cfg, model).sample_fns().items():     # the training-time samplers
    outs[f"CTM.sample_fns {name}"] = fn(params, x_T, key, None)
  assert any(k.startswith("CTM.sample_fns nfe3") for k in outs)
  bad = [k for k, v in outs.items() if not np.isfinite(np.asarray(v)).all()]
  assert not bad, bad
