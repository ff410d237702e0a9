"""The Gaussian-mixture oracle against autodiff, scipy and Monte Carlo."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from ctm_jax import oracle


def _scipy_log_prob(gm, x, t):
  w = np.exp(np.asarray(gm.log_weights))
  covs = np.asarray(gm.covariances())
  mu = np.asarray(gm.means)
  d = gm.dim
  dens = sum(w[k] * stats.multivariate_normal(mu[k], covs[k] + t ** 2 * np.eye(d)).pdf(x)
             for k in range(len(w)))
  return np.log(dens)


def test_log_prob_matches_scipy():
  with jax.enable_x64(True):
    gm = oracle.random_mixture(0, dim=3, num_components=4)
    x = np.random.default_rng(1).normal(size=(16, 3))
    for t in [0.0, 0.1, 2.0]:
      np.testing.assert_allclose(np.asarray(gm.log_prob(jnp.asarray(x), t)),
                                 _scipy_log_prob(gm, x, t), rtol=1e-10)


def test_score_is_grad_of_log_density():
  with jax.enable_x64(True):
    gm = oracle.random_mixture(2, dim=5, num_components=3)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 5)))
    for t in [0.05, 0.7, 10.0]:
      auto = jax.vmap(jax.grad(lambda xi: gm.log_prob(xi[None], t)[0]))(x)
      np.testing.assert_allclose(np.asarray(gm.score(x, t)), np.asarray(auto), rtol=1e-9, atol=1e-12)


def test_denoiser_matches_monte_carlo_posterior_mean():
  """E[x0 | x_t] by self-normalised importance sampling with the prior as proposal."""
  with jax.enable_x64(True):
    gm = oracle.toy_mixture_2d()
    t = 0.4
    x0 = np.asarray(gm.sample(jax.random.PRNGKey(0), 400_000))
    xt = np.array([[0.3, 0.9], [-1.0, 0.1], [0.0, 0.0]])
    est = []
    for q in xt:
      logw = -0.5 * np.sum((q - x0) ** 2, 1) / t ** 2
      w = np.exp(logw - logw.max())
      est.append((w[:, None] * x0).sum(0) / w.sum())
      ess = w.sum() ** 2 / (w ** 2).sum()
      assert ess > 2_000, ess    # enough effective samples for the tolerance below
    exact = np.asarray(gm.denoise(jnp.asarray(xt), t))
    # MC error ~ posterior std / sqrt(ESS) <= 0.5 / sqrt(2000) ~ 0.011; allow 3 sigma.
    np.testing.assert_allclose(exact, np.array(est), atol=0.035)


def test_sample_moments():
  gm = oracle.toy_mixture_2d()
  x, comp = gm.sample(jax.random.PRNGKey(4), 200_000, return_components=True)
  x, comp = np.asarray(x), np.asarray(comp)
  w = np.exp(np.asarray(gm.log_weights))
  np.testing.assert_allclose(np.bincount(comp) / len(comp), w, atol=0.005)
  c0 = x[comp == 0] - np.asarray(gm.means[0])
  np.testing.assert_allclose(np.cov(c0.T), np.asarray(gm.covariances()[0]), atol=2e-4)
  assert abs(np.sqrt(x.var(0).mean()) - gm.data_std()) < 0.01


def test_denoiser_limits():
  gm = oracle.random_mixture(5, dim=4, num_components=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
  # t -> 0: D(x, t) -> x; t -> inf: D -> the data mean.
  np.testing.assert_allclose(gm.denoise(x, 1e-4), x, atol=1e-4)
  w = np.exp(np.asarray(gm.log_weights))
  mean = (w[:, None] * np.asarray(gm.means)).sum(0)
  np.testing.assert_allclose(gm.denoise(x, 1e4), np.broadcast_to(mean, (4, 4)), atol=1e-3)
  # Images: any trailing shape is flattened and restored.
  gm12 = oracle.random_mixture(6, dim=12, num_components=2)
  img = jnp.zeros((3, 2, 2, 3))
  assert gm12.denoise(img, jnp.array([0.1, 1.0, 10.0])).shape == (3, 2, 2, 3)
