"""Toy sample metrics against direct computations (scipy's 1-D Wasserstein, explicit loops)."""
import jax
import numpy as np
from scipy import stats

from ctm_jax.metrics import sample_quality


def test_sliced_wasserstein_matches_scipy_per_direction():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + [1.0, 0.0]
  key = jax.random.PRNGKey(0)
  sw = sample_quality.sliced_wasserstein(x, y, key, num_projections=16)
  dirs = np.asarray(jax.random.normal(key, (2, 16)), np.float64)
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  ref = np.mean([stats.wasserstein_distance(x @ d, y @ d) for d in dirs.T])
  np.testing.assert_allclose(sw, ref, rtol=1e-10)


def test_mmd_matches_explicit_sum_and_separates():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(40, 2)), rng.normal(size=(30, 2)) * 1.5
  h = (0.5, 1.0)
  k = lambda a, b: sum(np.exp(-np.sum((a - b) ** 2) / (2 * s ** 2)) for s in h)
  sxx = sum(k(x[i], x[j]) for i in range(40) for j in range(40) if i != j) / (40 * 39)
  syy = sum(k(y[i], y[j]) for i in range(30) for j in range(30) if i != j) / (30 * 29)
  sxy = sum(k(a, b) for a in x for b in y) / (40 * 30)
  np.testing.assert_allclose(sample_quality.mmd_rbf(x, y, h), sxx + syy - 2 * sxy, rtol=1e-4, atol=1e-6)
  same = sample_quality.mmd_rbf(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)))
  diff = sample_quality.mmd_rbf(rng.normal(size=(500, 2)), rng.normal(size=(500, 2)) + 0.5)
  assert abs(same) < 0.01 < diff
