"""Gaussian-mixture data with an exact denoiser, score and log-density (the ground truth).

For p_0 = sum_k w_k N(mu_k, S_k), the data noised to level t is
p_t = sum_k w_k N(mu_k, S_k + t^2 I), and the ideal denoiser is the posterior mean

  D(x, t) = sum_k r_k(x, t) [mu_k + S_k (S_k + t^2 I)^-1 (x - mu_k)],
  r_k(x, t) = w_k N(x; mu_k, S_k + t^2 I) / p_t(x),

with score grad_x log p_t(x) = (D(x, t) - x) / t^2 (Tweedie).  Covariances are stored by
their eigendecomposition S_k = U_k diag(l_k) U_k^T, so any dimension and any covariance
(isotropic, diagonal or full) costs one rotation per component.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class GaussianMixture:
  """A mixture of Gaussians in R^D (a pytree: it can be closed over or passed to jit)."""
  log_weights: jax.Array   # (K,)
  means: jax.Array         # (K, D)
  eigvals: jax.Array       # (K, D) eigenvalues of each covariance
  eigvecs: jax.Array       # (K, D, D) columns are eigenvectors

  @classmethod
  def create(cls, weights, means, covs) -> "GaussianMixture":
    """weights (K,), means (K, D); covs: (K,) isotropic stds, (K, D) diagonal variances or
    (K, D, D) full covariances."""
    means = np.asarray(means, np.float64)
    k, d = means.shape
    weights = np.asarray(weights, np.float64)
    if weights.shape != (k,) or np.any(weights <= 0):
      raise ValueError(f"weights must be {k} positive numbers, got {weights}")
    covs = np.asarray(covs, np.float64)
    if covs.shape == (k,):
      if np.any(covs <= 0):
        raise ValueError("isotropic stds must be > 0")
      lam, vec = np.broadcast_to(covs[:, None] ** 2, (k, d)), np.broadcast_to(np.eye(d), (k, d, d))
    elif covs.shape == (k, d):
      if np.any(covs <= 0):
        raise ValueError("diagonal variances must be > 0")
      lam, vec = covs, np.broadcast_to(np.eye(d), (k, d, d))
    elif covs.shape == (k, d, d):
      lam, vec = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, 1, 2)))
      if np.any(lam <= 0):
        raise ValueError("covariances must be positive definite")
    else:
      raise ValueError(f"covs must have shape ({k},), ({k}, {d}) or ({k}, {d}, {d}), got {covs.shape}")
    lw = np.log(weights / weights.sum())
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    return cls(jnp.asarray(lw, dt), jnp.asarray(means, dt), jnp.asarray(np.array(lam), dt),
               jnp.asarray(np.array(vec), dt))

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def covariances(self):
    return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

  def data_std(self) -> float:
    """The overall standard deviation sqrt(E|x - E x|^2 / D) (a natural sigma_data)."""
    w = np.exp(np.asarray(self.log_weights))
    mu = np.asarray(self.means)
    m = (w[:, None] * mu).sum(0)
    var = (w * (np.asarray(self.eigvals).sum(1) + ((mu - m) ** 2).sum(1))).sum() / self.dim
    return float(math.sqrt(var))

  # ------------------------------------------------------------------------- sampling

  def sample(self, key, n: int, return_components: bool = False):
    """n samples x ~ p_0, shape (n, D)."""
    kc, kz = jax.random.split(key)
    comp = jax.random.categorical(kc, self.log_weights, shape=(n,))
    z = jax.random.normal(kz, (n, self.dim), self.means.dtype)
    x = self.means[comp] + jnp.einsum("nij,nj->ni", self.eigvecs[comp],
                                      jnp.sqrt(self.eigvals[comp]) * z)
    return (x, comp) if return_components else x

  # ------------------------------------------------------------------------- exact quantities

  def _per_component(self, x, t):
    """Rotated residuals y_k = U_k^T (x - mu_k), variances l_k + t^2 and log N_k(x)."""
    x = jnp.asarray(x, self.means.dtype)
    t = jnp.broadcast_to(jnp.asarray(t, self.means.dtype), x.shape[:1])
    var = self.eigvals[None] + (t ** 2)[:, None, None]                 # (B, K, D)
    y = jnp.einsum("kdj,bkd->bkj", self.eigvecs, x[:, None, :] - self.means[None])
    lognorm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + y ** 2 / var, axis=-1)   # (B, K)
    return y, var, lognorm

  def log_prob(self, x, t=0.0):
    """log p_t(x) for x of shape (B, D); t scalar or (B,) (t = 0 is the data density)."""
    _, _, lognorm = self._per_component(x, t)
    return jax.nn.logsumexp(self.log_weights[None] + lognorm, axis=-1)

  def posterior(self, x, t):
    """Component responsibilities r_k(x, t), shape (B, K)."""
    _, _, lognorm = self._per_component(x, t)
    return jax.nn.softmax(self.log_weights[None] + lognorm, axis=-1)

  def denoise(self, x, t):
    """The exact posterior mean D(x, t) = E[x_0 | x_t = x] for x of shape (B, ...)."""
    shape = x.shape
    x = x.reshape(shape[0], -1)
    y, var, lognorm = self._per_component(x, t)
    r = jax.nn.softmax(self.log_weights[None] + lognorm, axis=-1)
    shrunk = y * (self.eigvals[None] / var)                             # (B, K, D)
    comp_mean = self.means[None] + jnp.einsum("kdj,bkj->bkd", self.eigvecs, shrunk)
    return jnp.einsum("bk,bkd->bd", r, comp_mean).reshape(shape)

  def score(self, x, t):
    """grad_x log p_t(x) = (D(x, t) - x) / t^2."""
    t = jnp.asarray(t, self.means.dtype)
    tb = jnp.broadcast_to(t, x.shape[:1]).reshape((-1,) + (1,) * (x.ndim - 1))
    return (self.denoise(x, t) - x) / tb ** 2


def toy_mixture_2d() -> GaussianMixture:
  """The project's 2-D toy set: 8 anisotropic components on a ring of radius 1.

  Unequal weights (1 or 2) and covariances elongated along the ring (stds 0.12 tangential,
  0.04 radial) so that neither isotropy nor symmetry can hide a bug.
  """
  k = 8
  ang = 2 * np.pi * np.arange(k) / k
  means = np.stack([np.cos(ang), np.sin(ang)], 1)
  weights = np.where(np.arange(k) % 2 == 0, 2.0, 1.0)
  covs = []
  for a in ang:
    tangent = np.array([-np.sin(a), np.cos(a)])
    radial = np.array([np.cos(a), np.sin(a)])
    covs.append(0.12 ** 2 * np.outer(tangent, tangent) + 0.04 ** 2 * np.outer(radial, radial))
  return GaussianMixture.create(weights, means, np.stack(covs))


def random_mixture(key_seed: int, dim: int, num_components: int, spread: float = 1.0,
                   std_range=(0.05, 0.3)) -> GaussianMixture:
  """A reproducible random mixture in R^dim with full random covariances (for tests)."""
  rng = np.random.default_rng(key_seed)
  means = rng.normal(size=(num_components, dim)) * spread
  covs = []
  for _ in range(num_components):
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    stds = rng.uniform(*std_range, size=dim)
    covs.append((q * stds ** 2) @ q.T)
  weights = rng.uniform(0.5, 1.5, size=num_components)
  return GaussianMixture.create(weights, means, np.stack(covs))
