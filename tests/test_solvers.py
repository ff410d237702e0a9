"""Solvers against a tight scipy solution of the oracle's PF-ODE, and k-step solves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ctm_jax import diffusion, oracle, solvers

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002


def _reference_solution(gm, x_T):
  """scipy DOP853 (rtol = atol = 1e-10) for dx/dt = (x - D(x, t)) / t from sigma_max to sigma_min."""
  shape = x_T.shape
  drift = jax.jit(lambda x, t: (x - gm.denoise(x, t)) / t)

  def rhs(t, y):
    return np.asarray(drift(jnp.asarray(y.reshape(shape)), t)).ravel()

  sol = solve_ivp(rhs, (SIGMA_MAX, SIGMA_MIN), np.asarray(x_T).ravel(), method="DOP853",
                  rtol=1e-10, atol=1e-10)
  assert sol.success
  return sol.y[:, -1].reshape(shape)


@pytest.fixture(scope="module")
def order_problem():
  """A 3-D mixture, x_T and its DOP853 solution in float64, shared by the order tests."""
  with jax.enable_x64(True):
    gm = oracle.random_mixture(11, dim=3, num_components=3, spread=0.8, std_range=(0.2, 0.5))
    x_T = SIGMA_MAX * jax.random.normal(jax.random.PRNGKey(0), (6, 3), jnp.float64)
    return gm, x_T, _reference_solution(gm, x_T)


def _fitted_orders(problem, method):
  gm, x_T, ref = problem
  with jax.enable_x64(True):
    steps, errs = [], []
    for n in [16, 32, 64, 128]:
      sig = diffusion.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, 7.0, dtype=jnp.float64)
      out = solvers.solve_grid(gm.denoise, x_T, sig, method)
      steps.append(n - 1)
      errs.append(np.abs(np.asarray(out) - ref).max())
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return -slope, errs


def test_heun_is_second_order(order_problem):
  order, errs = _fitted_orders(order_problem, "heun")
  print(f"Heun fitted order {order:.3f}, errors {errs}")
  assert 1.8 < order < 2.3, (order, errs)


def test_euler_is_first_order(order_problem):
  order, errs = _fitted_orders(order_problem, "euler")
  print(f"Euler fitted order {order:.3f}, errors {errs}")
  assert 0.85 < order < 1.2, (order, errs)


def test_ddim_written_in_vp_is_the_ve_euler_step_and_the_name_is_refused():
  """DDIM (eta 0) on the DDPM schedule: x' = sqrt(a') x0 + sqrt(1 - a') eps, x0 = D, eps =
  (x_VP - sqrt(a) x0) / sqrt(1 - a); mapped to VE (x / sqrt(abar)) it is euler_step t -> u."""
  gm = oracle.toy_mixture_2d()
  a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  k, k_prev = 700, 420
  t, u = np.sqrt((1 - a[k]) / a[k]), np.sqrt((1 - a[k_prev]) / a[k_prev])
  x_ve = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (5, 2)), np.float64) * t
  x_vp = np.sqrt(a[k]) * x_ve
  x0 = np.asarray(gm.denoise(jnp.asarray(x_ve, jnp.float32), jnp.full((5,), t, jnp.float32)), np.float64)
  eps = (x_vp - np.sqrt(a[k]) * x0) / np.sqrt(1 - a[k])
  ref = (np.sqrt(a[k_prev]) * x0 + np.sqrt(1 - a[k_prev]) * eps) / np.sqrt(a[k_prev])
  got = solvers.euler_step(gm.denoise, jnp.asarray(x_ve, jnp.float32), jnp.full((5,), t, jnp.float32),
                           jnp.full((5,), u, jnp.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="same update as 'euler'"):
    solvers.step(gm.denoise, got, 1.0, 0.5, "ddim")


def test_heun_last_step_options():
  gm = oracle.toy_mixture_2d()
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 2)) * 80
  sig = diffusion.karras_sigmas(6)
  heun_all = solvers.solve_grid(gm.denoise, x, sig, "heun", "heun")
  heun_eul = solvers.solve_grid(gm.denoise, x, sig, "heun", "euler")
  # Same up to the last step, then the two differ: Heun vs Euler from sig[-2] to sig[-1].
  x_pre = solvers.solve(gm.denoise, x, sig, 0, 4, "heun")
  np.testing.assert_allclose(heun_eul, solvers.euler_step(gm.denoise, x_pre, sig[-2], sig[-1]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(heun_all, solvers.heun_step(gm.denoise, x_pre, sig[-2], sig[-1]), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(heun_all - heun_eul)).max() > 1e-4
  # A step to 0 is Euler whatever the option (the EDM sampler's last step).
  zero = solvers.heun_step(gm.denoise, x_pre, sig[-2], 0.0)
  np.testing.assert_allclose(zero, gm.denoise(x_pre, jnp.full((4,), sig[-2])), rtol=1e-5, atol=1e-5)


def test_k_step_solve_equals_k_single_steps_with_per_example_start():
  gm = oracle.toy_mixture_2d()
  sig = diffusion.karras_sigmas(18)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 2)) * 10
  start = jnp.array([0, 4, 9])
  k = 5
  multi = solvers.solve(gm.denoise, x, sig, start, k, "heun")
  for b in range(3):
    y = x[b:b + 1]
    for j in range(k):
      i = int(start[b]) + j
      y = solvers.heun_step(gm.denoise, y, sig[i], sig[i + 1])
    np.testing.assert_allclose(multi[b], y[0], rtol=1e-5, atol=1e-5)


def test_traced_k_compiles_once_and_work_is_proportional_to_k():
  gm = oracle.toy_mixture_2d()
  sig = diffusion.karras_sigmas(18)
  calls = []

  def counting_denoise(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return gm.denoise(x, t)

  fn = jax.jit(lambda x, i, k: solvers.solve(counting_denoise, x, sig, i, k, "heun"))
  x = jnp.ones((2, 2))
  i = jnp.zeros((2,), jnp.int32)
  counts = {}
  for k in [1, 4, 9, 17]:
    calls.clear()
    jax.block_until_ready(fn(x, i, jnp.int32(k)))
    counts[k] = len(calls)
  assert fn._cache_size() == 1
  assert counts == {1: 2, 4: 8, 9: 18, 17: 34}, counts   # two denoiser calls per Heun step


def test_bad_method_is_rejected():
  with pytest.raises(ValueError, match="solver method"):
    solvers.solve(lambda x, t: x, jnp.ones((1, 2)), diffusion.karras_sigmas(3), 0, 1, "rk4")
