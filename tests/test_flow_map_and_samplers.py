"""Flow-map identities and samplers, checked with the exact oracle and independent algorithms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ctm_jax import diffusion, flow_map, oracle, samplers, solvers
from ctm_jax.nets.mlp import ToyMLP

SCH = diffusion.Schedule(sigma_data=0.7)


@pytest.fixture(scope="module")
def student():
  model = flow_map.FlowModel(ToyMLP(out_dim=2, hidden=32, num_blocks=2, emb_dim=16, use_s=True), SCH)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 2)))
  # Perturb every parameter so no layer is trivially zero.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  return model, params


def test_jump_to_same_time_is_identity_exactly(student):
  model, params = student
  x = jax.random.normal(jax.random.PRNGKey(2), (7, 2)) * 5
  t = jnp.array([80.0, 10.0, 1.0, 0.5, 0.1, 0.01, 0.002])
  out = model.jump(params, x, t, t)
  assert np.array_equal(np.asarray(out), np.asarray(x))


def test_cm_endpoint_is_identity_at_sigma_min(student):
  model, params = student
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 2))
  out = model.cm_f(params, x, jnp.full((5,), SCH.sigma_min))
  assert np.array_equal(np.asarray(out), np.asarray(x))


def test_jump_formula_and_s_dependence(student):
  model, params = student
  x = jax.random.normal(jax.random.PRNGKey(4), (4, 2)) * 3
  t = jnp.full((4,), 3.0)
  s1, s2 = jnp.full((4,), 1.0), jnp.full((4,), 0.01)
  g1 = model.denoiser(params, x, t, s1)
  np.testing.assert_allclose(model.jump(params, x, t, s1), (1 / 3) * x + (2 / 3) * g1, rtol=1e-5, atol=1e-6)
  # The s input reaches the network: g(x, t, s1) != g(x, t, s2).
  assert np.abs(np.asarray(g1 - model.denoiser(params, x, t, s2))).max() > 1e-3
  # The denoiser head is g(x, t, t) with EDM preconditioning written out by hand.
  c_skip = 0.49 / (9 + 0.49)
  c_out = 3 * 0.7 / np.sqrt(9 + 0.49)
  c_in = 1 / np.sqrt(9 + 0.49)
  f = model.net.apply({"params": params}, c_in * x, jnp.log(t) / 4, jnp.log(t) / 4)
  np.testing.assert_allclose(model.denoiser(params, x, t), c_skip * x + c_out * f, rtol=1e-5, atol=1e-6)


def test_gamma_zero_with_exact_denoiser_is_a_ddim_solve():
  gm = oracle.toy_mixture_2d()
  jump = flow_map.oracle_jump_fn(gm.denoise)
  x_T = samplers.initial_noise(jax.random.PRNGKey(5), (16, 2))
  for m in [1, 3, 8]:
    out = samplers.gamma_sampler(jump, x_T, jax.random.PRNGKey(6), m, 0.0)
    ref = solvers.solve_grid(gm.denoise, x_T, diffusion.karras_sigmas(m + 1), "euler")
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_gamma_one_is_cm_multistep():
  gm = oracle.toy_mixture_2d()
  jump = flow_map.oracle_jump_fn(gm.denoise)
  x_T = samplers.initial_noise(jax.random.PRNGKey(7), (16, 2))
  key = jax.random.PRNGKey(8)
  grid = np.asarray(diffusion.karras_sigmas(5))
  f_fn = lambda x, t: jump(x, t, jnp.full_like(t, 0.002))
  # CM multistep draws its n-th noise with fold_in(key, n) before the n-th refinement.
  cm = samplers.cm_multistep(f_fn, x_T, key, list(grid[1:-1]))
  for shift in (True, False):         # the clamp to sigma_min makes both forms CM sampling
    g = samplers.gamma_sampler(jump, x_T, key, 4, 1.0, shift_sigma_min=shift)
    np.testing.assert_allclose(g, cm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma", [0.5, 0.9999999, 1.0])
def test_gamma_sampler_times_and_noise(gamma):
  """A recording jump (returns zeros, so the next input is the added noise alone): the (t_n, s_n)
  pairs, s_n = max(sqrt(1 - gamma^2) t_{n+1}, sigma_min), noise of std sqrt(t_{n+1}^2 - s_n^2)
  drawn with fold_in(key, n), and the last jump to sigma_min."""
  calls = []

  def jump(x, t, s):
    calls.append((np.asarray(t), np.asarray(s), np.asarray(x)))
    return jnp.zeros_like(x)

  m, key = 5, jax.random.PRNGKey(14)
  x_T = samplers.initial_noise(jax.random.PRNGKey(15), (64, 2))
  samplers.gamma_sampler(jump, x_T, key, m, gamma)
  grid = 80.0 ** (1 / 7) + np.arange(m + 1) / m * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))
  grid = grid ** 7                                                    # EDM eq. 5, in float64
  s_exp = [max(np.sqrt(1 - gamma ** 2) * grid[n + 1], 0.002) for n in range(m - 1)] + [0.002]
  assert len(calls) == m
  np.testing.assert_array_equal(calls[0][2], x_T)
  for n, (t, s, x_in) in enumerate(calls):
    np.testing.assert_allclose(t, grid[n], rtol=1e-6)
    np.testing.assert_allclose(s, s_exp[n], rtol=1e-6)
    if n:
      z = jax.random.normal(jax.random.fold_in(key, n - 1), x_T.shape)
      np.testing.assert_allclose(x_in, np.sqrt(grid[n] ** 2 - s_exp[n - 1] ** 2) * z, rtol=1e-5)
  if gamma > 0.99:                                         # the clamp acts at the small times
    assert s_exp[m - 2] == 0.002


def test_gamma_one_never_jumps_below_sigma_min():
  """gamma = 1 without the shift: every jump lands at sigma_min or above (a network's
  c_noise(s) = ln(s)/4 is -inf at s = 0; the trained digits CTM gave all-NaN samples), and the
  result is CM multistep sampling, the shifted sampler's gamma = 1."""
  gm = oracle.toy_mixture_2d()
  exact = flow_map.oracle_jump_fn(gm.denoise)
  jump = lambda x, t, s: exact(x, t, s) + jnp.where(s < 0.002 * (1 - 1e-6), jnp.nan, 0.0)[:, None]
  x_T = samplers.initial_noise(jax.random.PRNGKey(7), (16, 2))
  key = jax.random.PRNGKey(8)
  for m in (2, 4):
    g = jax.jit(lambda x: samplers.gamma_sampler(jump, x, key, m, 1.0))(x_T)   # as the jobs
    assert np.all(np.isfinite(g))
    shifted = samplers.gamma_sampler(exact, x_T, key, m, 1.0, shift_sigma_min=True)
    np.testing.assert_allclose(g, shifted, rtol=1e-5, atol=1e-5)


def test_more_deterministic_jumps_approach_the_ode_solution():
  """With the exact denoiser, gamma = 0 sampling converges to the PF-ODE solution as NFE grows."""
  with jax.enable_x64(True):
    gm = oracle.toy_mixture_2d()
    jump = flow_map.oracle_jump_fn(gm.denoise)
    x_T = samplers.initial_noise(jax.random.PRNGKey(9), (8, 2), dtype=jnp.float64)

    def rhs(t, y):
      x = jnp.asarray(y.reshape(8, 2))
      return np.asarray((x - gm.denoise(x, t)) / t).ravel()

    ref = solve_ivp(rhs, (80.0, 0.002), np.asarray(x_T).ravel(), method="DOP853", rtol=1e-10,
                    atol=1e-10).y[:, -1].reshape(8, 2)
    errs = [float(np.mean((np.asarray(samplers.gamma_sampler(jump, x_T, None, m, 0.0)) - ref) ** 2))
            for m in [1, 2, 4, 8, 16]]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_edm_heun_sampler_nfe_and_last_euler_step():
  gm = oracle.toy_mixture_2d()
  calls = []

  def counting(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return gm.denoise(x, t)

  x_T = samplers.initial_noise(jax.random.PRNGKey(10), (4, 2))
  out = jax.jit(lambda x: samplers.edm_heun_sampler(counting, x, 18))(x_T)
  jax.block_until_ready(out)
  assert len(calls) == 35
  sig = diffusion.karras_sigmas(18)
  pre = solvers.solve(gm.denoise, x_T, sig, 0, 17, "heun")
  np.testing.assert_allclose(out, gm.denoise(pre, jnp.full((4,), sig[-1])), rtol=1e-5, atol=1e-5)


def test_onestep_and_uint8():
  gm = oracle.toy_mixture_2d()
  jump = flow_map.oracle_jump_fn(gm.denoise)
  x_T = samplers.initial_noise(jax.random.PRNGKey(11), (4, 2))
  np.testing.assert_allclose(samplers.onestep(jump, x_T), gm.denoise(x_T, jnp.full((4,), 80.0)) * (1 - 0.002 / 80) + x_T * 0.002 / 80, rtol=1e-5, atol=1e-5)
  u8 = np.asarray(samplers.to_uint8(jnp.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])))
  np.testing.assert_array_equal(u8, [0, 0, 127, 254, 255, 255])
  # The two rules written out: CTM's sample script ((x + 1) * 127.5).clamp(0, 255).to(uint8),
  # EDM's generate.py (x * 127.5 + 128).clip(0, 255).to(uint8); they differ on about half the
  # values (round vs truncate), never by more than one level.
  x = np.concatenate([np.array([-2.0, -1.0, -0.996, 0.0, 0.999, 1.0, 3.0], np.float32),
                      np.random.default_rng(0).uniform(-1.1, 1.1, 1000).astype(np.float32)])
  ctm = np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)
  edm = np.clip(x * 127.5 + 128, 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(samplers.to_uint8(jnp.asarray(x), "truncate")), ctm)
  np.testing.assert_array_equal(np.asarray(samplers.to_uint8(jnp.asarray(x), "round")), edm)
  np.testing.assert_array_equal(edm[:7], [0, 0, 1, 128, 255, 255, 255])
  assert 0.3 < np.mean(edm != ctm) < 0.7 and np.all(np.abs(edm.astype(int) - ctm) <= 1)
  with pytest.raises(ValueError, match="rule must be one of"):
    samplers.to_uint8(jnp.asarray(x), "floor")


def test_sampler_argument_errors():
  jump = lambda x, t, s: x
  with pytest.raises(ValueError, match="gamma"):
    samplers.gamma_sampler(jump, jnp.ones((1, 2)), None, 2, 1.5)
  with pytest.raises(ValueError, match="times"):
    samplers.gamma_sampler(jump, jnp.ones((1, 2)), None, 2, 0.0, times=[80.0, 1.0])


def _karras_index(i, n, smin=0.002, smax=80.0, rho=7.0):
  """t of grid index i of n in openai's multistep sampler (ascending index, t_0 = t_max)."""
  return (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


@pytest.mark.parametrize("clip", [True, False])
def test_cm_multistep_equals_openai_stochastic_iterative_sampler(clip):
  """openai/consistency_models' stochastic_iterative_sampler written out, ts = (0, 11, 17) of 18
  (the CIFAR-10 CD times): x0 = clamp(f(x, t), -1, 1); x = x0 + z sqrt(t'^2 - t_min^2); then the
  final clamp; here through the spec cm:2:<t_11> of a consistency model."""
  from ctm_jax import evaluate
  f = lambda x, t: 3.0 * jnp.tanh(x / (1.0 + t[:, None])) + 0.5    # reaches outside [-1, 1]
  ts = (0, 11, 17)
  key = jax.random.PRNGKey(5)
  x_T = samplers.initial_noise(jax.random.PRNGKey(4), (16, 3))
  x = np.asarray(x_T, np.float64)
  for i in range(len(ts) - 1):
    t = _karras_index(ts[i], 18)
    x0 = np.asarray(f(jnp.asarray(x, jnp.float32), jnp.full((16,), t, jnp.float32)), np.float64)
    x0 = np.clip(x0, -1, 1) if clip else x0
    t_next = np.clip(_karras_index(ts[i + 1], 18), 0.002, 80.0)
    z = np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape)) if i < len(ts) - 2 else 0
    x = x0 + z * np.sqrt(max(t_next ** 2 - 0.002 ** 2, 0.0))
  ref = np.clip(x, -1, 1) if clip else x
  spec = evaluate.parse_sampler(f"cm:2:{_karras_index(11, 18):.8f}")
  assert spec.cm and spec.nfe == 2 and abs(spec.times[0] - 0.585348) < 1e-5

  class FakeModel:
    schedule = diffusion.Schedule()
    def cm_jump_fn(self, params, labels):
      return lambda x, t, s: f(x, t)
  got = evaluate.sampler_fn(FakeModel(), spec, "cm_f", clip_x0=clip)(None, x_T, key, None)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if not clip:
    assert np.abs(got).max() > 1.2


def test_cm_spec_times_are_checked_and_clipping_follows_the_data():
  from ctm_jax import evaluate
  from configs import cifar10_cd, toy_cd
  for bad in ("cm:3:0.8", "cm:3:0.5,0.8", "cm:2:x"):
    with pytest.raises(evaluate.SamplerSpecError, match="cm:"):
      evaluate.parse_sampler(bad)
  assert evaluate.parse_sampler("cm:3").times is None
  assert samplers.clips_x0(cifar10_cd.get_config()) and not samplers.clips_x0(toy_cd.get_config())
  from ctm_jax.evaljob import settings
  from configs import cifar10_ict
  for mod, tau in ((cifar10_cd, _karras_index(11, 18)), (cifar10_ict, 0.821)):
    spec = evaluate.parse_sampler(settings.default_samplers(mod.get_config()).split(",")[1])
    assert spec.cm and spec.nfe == 2 and abs(spec.times[0] - tau) < 1e-5
