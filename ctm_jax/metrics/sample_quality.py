"""Two-sample metrics for low-dimensional samples (toy data): MMD and sliced Wasserstein."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mmd_rbf(x, y, bandwidths: Sequence[float] = (0.05, 0.1, 0.2, 0.5, 1.0)):
  """Unbiased squared MMD (Gretton et al. 2012, eq. 3) with a sum of RBF kernels
  k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))."""
  x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
  y = jnp.asarray(y, jnp.float32).reshape(y.shape[0], -1)
  return float(_mmd_rbf(x, y, tuple(float(h) for h in bandwidths)))


@functools.partial(jax.jit, static_argnums=2)
def _mmd_rbf(x, y, bandwidths):
  def kern_sums(a, b):
    d2 = jnp.sum(a ** 2, 1)[:, None] + jnp.sum(b ** 2, 1)[None] - 2 * a @ b.T
    k = sum(jnp.exp(-jnp.maximum(d2, 0.0) / (2 * h ** 2)) for h in bandwidths)
    return jnp.sum(k), jnp.trace(k)

  n, m = x.shape[0], y.shape[0]
  sxx, txx = kern_sums(x, x)
  syy, tyy = kern_sums(y, y)
  sxy, _ = kern_sums(x, y)
  return (sxx - txx) / (n * (n - 1)) + (syy - tyy) / (m * (m - 1)) - 2 * sxy / (n * m)


def sliced_wasserstein(x, y, key, num_projections: int = 256):
  """Sliced 1-Wasserstein distance: the mean over random unit directions of the 1-D W1
  between the projected samples (equal sample sizes; W1 = mean |sorted a - sorted b|)."""
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  y = np.asarray(y, np.float64).reshape(y.shape[0], -1)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"sliced_wasserstein needs equal sample sizes, got {x.shape[0]} and {y.shape[0]}")
  dirs = np.asarray(jax.random.normal(key, (x.shape[1], num_projections)), np.float64)
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  px, py = np.sort(x @ dirs, axis=0), np.sort(y @ dirs, axis=0)
  return float(np.mean(np.abs(px - py)))
