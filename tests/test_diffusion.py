"""Diffusion math against the closed forms written out independently (EDM / CM papers)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax import diffusion


def test_karras_grid_end_points_and_monotone():
  sig = np.asarray(diffusion.karras_sigmas(18))
  assert sig.shape == (18,)
  assert sig[0] == np.float32(80.0) and sig[-1] == np.float32(0.002)
  assert np.all(np.diff(sig) < 0)
  # EDM eq. 5 in float64, written out directly.
  i = np.arange(18)
  ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(sig, ref, rtol=2e-6)
  sig0 = np.asarray(diffusion.karras_sigmas(18, append_zero=True))
  assert sig0.shape == (19,) and sig0[-1] == 0.0


def test_karras_grid_rejects_too_few_points():
  with pytest.raises(ValueError, match="n >= 2"):
    diffusion.karras_sigmas(1)


def test_schedule_validation_names_the_field():
  with pytest.raises(ValueError, match="sigma_min"):
    diffusion.Schedule(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(ValueError, match="sigma_data"):
    diffusion.Schedule(sigma_data=0.0)


def test_edm_scalings_closed_form():
  t = np.array([0.002, 0.5, 5.0, 80.0])
  sd = 0.5
  c_skip, c_out, c_in = map(np.asarray, diffusion.edm_scalings(jnp.asarray(t), sd))
  np.testing.assert_allclose(c_skip, sd ** 2 / (t ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_out, t * sd / np.sqrt(t ** 2 + sd ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(t ** 2 + sd ** 2), rtol=1e-6)
  # Unit-variance property of EDM: Var(c_in x_t) = 1 when Var(x0) = sd^2.
  np.testing.assert_allclose(c_in ** 2 * (sd ** 2 + t ** 2), 1.0, rtol=1e-6)


def test_cm_scalings_boundary():
  c_skip, c_out = diffusion.cm_scalings(jnp.asarray([0.002]), 0.5, 0.002)
  assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
  t = 3.0
  c_skip, c_out = diffusion.cm_scalings(t, 0.5, 0.002)
  np.testing.assert_allclose(c_skip, 0.25 / ((t - 0.002) ** 2 + 0.25), rtol=1e-6)
  np.testing.assert_allclose(c_out, 0.5 * (t - 0.002) / np.sqrt(0.25 + t ** 2), rtol=1e-6)


def test_c_noise_conventions():
  t = jnp.asarray([0.002, 1.0, 80.0])
  np.testing.assert_allclose(diffusion.c_noise(t, "log4"), np.log(np.asarray(t)) / 4, rtol=1e-6)
  np.testing.assert_allclose(diffusion.c_noise(t, "250log"), 250 * np.log(np.asarray(t)), rtol=1e-6)
  with pytest.raises(ValueError, match="c_noise kind"):
    diffusion.c_noise(t, "bad")


def test_lognormal_sampler_moments():
  sig = diffusion.sample_lognormal_sigma(jax.random.PRNGKey(0), (200_000,), -1.2, 1.2)
  ls = np.log(np.asarray(sig))
  assert abs(ls.mean() + 1.2) < 0.01 and abs(ls.std() - 1.2) < 0.01


def test_ctm_dsm_mixture():
  b = 100_000
  sig = np.asarray(diffusion.sample_ctm_dsm_sigma(jax.random.PRNGKey(1), b))
  log_half, curve_half = np.log(sig[: b // 2]), sig[b // 2:]
  assert abs(log_half.mean() + 1.2) < 0.02
  # Curve half: u = (sigma_max^(1/rho) - sigma^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho)) ~ U[0, 0.7].
  u = (80 ** (1 / 7) - curve_half ** (1 / 7)) / (80 ** (1 / 7) - 0.002 ** (1 / 7))
  assert u.min() >= -1e-5 and u.max() <= 0.7 + 1e-5
  hist, _ = np.histogram(u, bins=7, range=(0, 0.7))
  np.testing.assert_allclose(hist / hist.sum(), 1 / 7, atol=0.01)


def test_k_sampling_proportional_to_k():
  keys = jax.random.split(jax.random.PRNGKey(2), 60_000)
  ks = np.asarray(jax.vmap(lambda k: diffusion.sample_k_proportional(k, 17))(keys))
  assert ks.min() >= 1 and ks.max() <= 17
  freq = np.bincount(ks, minlength=18)[1:] / len(ks)
  np.testing.assert_allclose(freq, np.arange(1, 18) / np.arange(1, 18).sum(), atol=0.006)


def test_ctm_indices_ranges_and_uniformity():
  n, k = 18, 5
  i, j = diffusion.sample_ctm_indices(jax.random.PRNGKey(3), 100_000, n, k)
  i, j = np.asarray(i), np.asarray(j)
  assert i.min() == 0 and i.max() == n - 1 - k
  assert np.all(j >= i + k) and np.all(j <= n - 1)
  np.testing.assert_allclose(np.bincount(i) / len(i), 1 / (n - k), atol=0.006)
  # Given i, j is uniform on i+k..N-1.
  sel = j[i == 0]
  np.testing.assert_allclose(np.bincount(sel - k) / len(sel), 1 / (n - k), atol=0.03)
