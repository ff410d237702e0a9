"""Test helpers for the evaluation jobs: a cheap feature function in place of Inception, and,
only while ctm_jax.metrics.fid is not part of this checkout, a numpy/scipy stand-in for it
(installed into sys.modules by `ensure_fid_module`; the real module is used whenever present).
"""
import importlib
import json
import sys
import types

import numpy as np
import scipy.linalg

DIM = 2048


def fake_feature_fn(seed: int = 0):
  """uint8 NHWC images -> (B, 2048): tanh of a fixed random projection of the pixels.
  Deterministic and row-wise (a row's features do not depend on the rest of the batch)."""
  cache = {}

  def fn(images):
    x = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0
    if x.shape[1] not in cache:
      cache[x.shape[1]] = np.random.default_rng(seed).normal(size=(x.shape[1], DIM)) / np.sqrt(x.shape[1])
    return np.tanh(x @ cache[x.shape[1]] * 3.0).astype(np.float32)
  return fn


def scipy_fid(f1, f2):
  """FID by the textbook formula with scipy's sqrtm (an independent reference)."""
  m1, m2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _standin_fid_module():
  m = types.ModuleType("ctm_jax.metrics.fid")
  m.__doc__ = "TEST STAND-IN (tests/eval_standins.py) for ctm_jax.metrics.fid."

  def feature_statistics(features):
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)

  def frechet_distance(mu1, s1, mu2, s2):
    # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), a symmetric PSD matrix: eigenvalues only.
    w, v = np.linalg.eigh(s1)
    h = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    tr = np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh(h @ s2 @ h), 0)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)

  def kid(fa, fb, *, num_subsets=100, subset_size=1000, seed=0):
    rng = np.random.default_rng(seed)
    d = fa.shape[1]
    vals = []
    for _ in range(num_subsets):
      x = fa[rng.choice(len(fa), subset_size, replace=False)].astype(np.float64)
      y = fb[rng.choice(len(fb), subset_size, replace=False)].astype(np.float64)
      k = lambda a, b: (a @ b.T / d + 1) ** 3
      kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
      n = subset_size
      vals.append((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) +
                  (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())
    vals = np.asarray(vals)
    return float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0

  def save_stats(path, mu, sigma, features=None, **meta):
    arrays = {"mu": mu, "sigma": sigma, "meta": np.asarray(json.dumps(meta))}
    if features is not None:
      arrays["features"] = features
    with open(path, "wb") as f:
      np.savez(f, **arrays)

  def load_stats(path, feature_dim=None):
    with np.load(path) as z:
      return {"mu": z["mu"], "sigma": z["sigma"],
              "features": z["features"] if "features" in z.files else None,
              "meta": json.loads(str(z["meta"])) if "meta" in z.files else {}}

  for f in (feature_statistics, frechet_distance, kid, save_stats, load_stats):
    setattr(m, f.__name__, f)
  return m


def ensure_fid_module():
  """The FID statistics module: the real one, or the stand-in while it is absent."""
  try:
    return importlib.import_module("ctm_jax.metrics.fid")
  except ImportError:
    m = _standin_fid_module()
    sys.modules["ctm_jax.metrics.fid"] = m
    import ctm_jax.metrics
    ctm_jax.metrics.fid = m
    return m
