"""Frechet Inception distance, kernel Inception distance and reference-statistics files.

FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to two feature sets,
  d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}),
with mu the mean and S the unbiased covariance (np.cov, ddof 1), as pytorch-fid, EDM's fid.py
and fid-helper-pytorch compute them (in float64).  StyleGAN2-ADA/3's metric_utils divides by n
(ddof 0); guided-diffusion's evaluator uses `np.cov` (ddof 1).  At 50k samples the two
differ by a factor 1 + 2e-5 in S, a few 1e-4 in FID.

KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 with the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (disjoint blocks of at most half
of each set, so that its standard error is one; see `kid`).

Statistics files are .npz with `mu` (d,) and `sigma` (d, d): the layout of EDM's
`fid-refs/cifar10-32x32.npz` and pytorch-fid's `--save-stats` files, both of which `load_stats`
reads; ours may add `features` (n, d) for KID and `meta` (a JSON string).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np

# The Inception pool3 width (= ctm_jax.nets.inception.FEATURE_DIM; checked by the tests).
INCEPTION_FEATURE_DIM = 2048


def _as_features(features, name: str) -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'{name}: expected features of shape (n >= 2, d), got {f.shape}')
  if not np.all(np.isfinite(f)):
    raise ValueError(f'{name}: features contain non-finite values')
  return f


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64: the mean and the unbiased covariance np.cov(features, rowvar=False)."""
  f = _as_features(features, 'feature_statistics')
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _clip_noise(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with those below its rounding floor set to 0: |w| <= d eps max|w|
  (np.linalg.matrix_rank's tolerance). sqrt would magnify that noise (1e-16 -> 1e-8 each)."""
  tol = w.size * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
  return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues at the rounding floor -> 0)."""
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(_clip_noise(w))) @ v.T


def _check_gaussian(mu, sigma, name: str):
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{name}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{name}: non-finite mu or sigma')
  return mu, 0.5 * (sigma + sigma.T)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr (S1 S2)^{1/2}.

  Tr (S1 S2)^{1/2} = Tr (A S2 A)^{1/2} with A = S1^{1/2} (S1 S2 = A (A S2 A) A^{-1} has the
  eigenvalues of the symmetric PSD A S2 A), so it is sum_i sqrt(lambda_i) from eigvalsh: real,
  no complex sqrtm. Eigenvalues at the rounding floor count as 0, so singular S1 / S2 (fewer
  samples than dimensions) do not pick up sqrt(1e-16)-sized terms: FID(P, P) = 0 to 1e-12.
  """
  mu1, s1 = _check_gaussian(mu1, sigma1, 'frechet_distance (first)')
  mu2, s2 = _check_gaussian(mu2, sigma2, 'frechet_distance (second)')
  if mu1.shape != mu2.shape:
    raise ValueError(f'frechet_distance: the statistics have {mu1.shape[0]} and {mu2.shape[0]} '
                     f'features')
  a = _psd_sqrt(s1)
  m = a @ s2 @ a
  tr_sqrt = np.sum(np.sqrt(_clip_noise(np.linalg.eigvalsh(0.5 * (m + m.T)))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def frechet_distance_from_features(features, mu2, sigma2) -> float:
  """frechet_distance(mean(f), cov(f), mu2, sigma2) of n feature rows f against statistics.

  With fewer rows than features (n <= d) it avoids the d x d square root: cov(f) = B^T B with
  B = (f - mean f) / sqrt(n - 1) (n x d), and B^T (B S2) has the nonzero eigenvalues of the
  n x n PSD matrix B S2 B^T, so Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(B S2 B^T)) and
  Tr S1 = |B|_F^2: the same number (an identity, not an approximation) in O(n d^2 + n^3)
  instead of O(d^3).  With n > d it is frechet_distance of the statistics.
  """
  f = _as_features(features, 'frechet_distance_from_features')
  mu2, s2 = _check_gaussian(mu2, sigma2, 'frechet_distance_from_features (statistics)')
  n, d = f.shape
  if d != mu2.shape[0]:
    raise ValueError(f'frechet_distance_from_features: the features have {d} dimensions, the '
                     f'statistics {mu2.shape[0]}')
  if n > d:
    return frechet_distance(*feature_statistics(f), mu2, s2)
  mu1 = f.mean(axis=0)
  b = (f - mu1) / np.sqrt(n - 1.0)
  m = b @ s2 @ b.T
  tr_sqrt = np.sum(np.sqrt(_clip_noise(np.linalg.eigvalsh(0.5 * (m + m.T)))))
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(b * b) + np.trace(s2) - 2.0 * tr_sqrt)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two equal-size samples with k(a, b) = (a.b / d + 1)^3:
  sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
  m, d = x.shape
  kxx = (x @ x.T / d + 1.0) ** 3
  kyy = (y @ y.T / d + 1.0) ** 3
  kxy = (x @ y.T / d + 1.0) ** 3
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.sum() / m ** 2)


def kid(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict:
  """Kernel Inception distance: `polynomial_mmd2` averaged over subsets, with a standard error.

  Subsets of m = min(subset_size, n_a // 2, n_b // 2) rows come in partitions: each partition
  splits a random permutation of a, and one of b, into k = min(n_a // m, n_b // m) >= 2
  disjoint blocks of m rows (block j pairs rows [j m, (j + 1) m) of both), and there are
  R = ceil(num_subsets / k) partitions (permutations of a then b, in turn, from
  np.random.default_rng(seed)).  value = the mean of the R k block MMD^2s (unbiased for the
  MMD^2 of the two distributions at any m).  stderr = sqrt(mean over partitions of
  var_blocks(ddof=1) / k): the standard error of one partition's mean, estimated from its
  independent blocks, which bounds that of the average over the (correlated) partitions.

  Why not the usual recipes: torch-fidelity / Binkowski et al. draw overlapping subsets and
  report their spread (the error of one subset, and std / sqrt(subsets) of overlapping subsets
  is far too small); clean-fid and StyleGAN clamp m to min(n_a, n_b, subset_size) and report
  only the mean, and with m = n_a = n_b every subset is the whole set.  Capping m at half of
  each set keeps at least two independent blocks.  Needs n_a, n_b >= 4.

  Returns {'value', 'stderr', 'subset_size' (m), 'num_subsets' (R k), 'blocks' (k),
  'partitions' (R)}.
  """
  a = _as_features(features_a, 'kid (first)')
  b = _as_features(features_b, 'kid (second)')
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'kid: the feature sets have {a.shape[1]} and {b.shape[1]} dimensions')
  if num_subsets < 1 or subset_size < 2:
    raise ValueError(f'kid: num_subsets must be >= 1 and subset_size >= 2, got {num_subsets}, '
                     f'{subset_size}')
  m = min(subset_size, a.shape[0] // 2, b.shape[0] // 2)
  if m < 2:
    raise ValueError(f'kid: needs at least 4 rows in each set (two blocks of 2), got '
                     f'{a.shape[0]} and {b.shape[0]}')
  k = min(a.shape[0] // m, b.shape[0] // m)
  parts = -(-num_subsets // k)
  rng = np.random.default_rng(seed)
  vals = np.empty((parts, k))
  for r in range(parts):
    pa, pb = rng.permutation(a.shape[0]), rng.permutation(b.shape[0])
    for j in range(k):
      vals[r, j] = polynomial_mmd2(a[pa[j * m:(j + 1) * m]], b[pb[j * m:(j + 1) * m]])
  stderr = float(np.sqrt(np.mean(vals.var(axis=1, ddof=1) / k)))
  return dict(value=float(vals.mean()), stderr=stderr, subset_size=m, num_subsets=parts * k,
              blocks=k, partitions=parts)


# ------------------------------------------------------------------------------------------------
# Statistics files.


def save_stats(path, mu, sigma, features=None, mu_s=None, sigma_s=None, **meta) -> None:
  """Write `mu`, `sigma` (float64), optional `features` (float32), optional sFID statistics
  `mu_s`, `sigma_s` (as guided-diffusion's reference batches hold them) and `meta` (JSON)
  atomically through ctm_jax.fileio (a local path or a URL; an existing file survives a
  failure)."""
  from ctm_jax import fileio
  path = os.fspath(path)
  mu, sigma = _check_gaussian(mu, sigma, f'save_stats({path})')
  arrays = dict(mu=mu, sigma=sigma)
  if (mu_s is None) != (sigma_s is None):
    raise ValueError(f'save_stats({path}): mu_s and sigma_s go together')
  if mu_s is not None:
    arrays['mu_s'], arrays['sigma_s'] = _check_gaussian(mu_s, sigma_s, f'save_stats({path}) sFID')
  if features is not None:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != mu.shape[0]:
      raise ValueError(f'save_stats({path}): features must be (n, {mu.shape[0]}), got '
                       f'{features.shape}')
    arrays['features'] = features
  try:
    arrays['meta'] = np.asarray(json.dumps(meta, sort_keys=True))
  except TypeError as e:
    raise ValueError(f'save_stats({path}): meta must be JSON-serialisable ({e})') from None
  fileio.save_npz(path, **arrays)


def read_npz(path: str, what: str) -> dict:
  """{name: array} of an .npz (allow_pickle=False); ValueError naming the file and `what` it
  should have been when it is absent or unreadable."""
  from ctm_jax import fileio
  if not fileio.isfile(path):
    raise ValueError(f'{path}: no such {what}')
  try:
    return fileio.load_npz(path)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f'{path}: not an .npz {what} ({type(e).__name__}: {e})') from None


def load_stats(path, feature_dim: Optional[int] = INCEPTION_FEATURE_DIM) -> dict:
  """{'mu', 'sigma', 'features', 'mu_s', 'sigma_s', 'images' (each None if absent), 'meta'
  (dict)} from an .npz with `mu`, `sigma`.

  Reads ours, EDM's `cifar10-32x32.npz`, pytorch-fid's stats files and guided-diffusion's
  reference batches (sFID's `mu_s`, `sigma_s`; `arr_0`, the reference images). `feature_dim`
  (default the Inception pool3 width; None: any) is the width the features must have. Errors
  name the file and the problem.
  """
  path = os.fspath(path)
  data = read_npz(path, 'statistics file')
  missing = [k for k in ('mu', 'sigma') if k not in data]
  if missing:
    raise ValueError(f'{path}: statistics file lacks {missing} (has {sorted(data)})')
  mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{path}: mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}')
  if feature_dim is not None and mu.shape[0] != feature_dim:
    raise ValueError(f'{path}: the reference statistics have {mu.shape[0]} features, the network '
                     f'gives {feature_dim}')
  features = data.get('features')
  if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
    raise ValueError(f'{path}: features must be (n, {mu.shape[0]}), got {features.shape}')
  mu_s = sigma_s = None
  if 'mu_s' in data or 'sigma_s' in data:
    if not ('mu_s' in data and 'sigma_s' in data):
      raise ValueError(f'{path}: holds one of mu_s, sigma_s (sFID statistics) without the other')
    mu_s, sigma_s = (np.asarray(data[k], np.float64) for k in ('mu_s', 'sigma_s'))
    if mu_s.ndim != 1 or sigma_s.shape != (mu_s.shape[0], mu_s.shape[0]):
      raise ValueError(f'{path}: mu_s must be (d,) and sigma_s (d, d), got {mu_s.shape} and '
                       f'{sigma_s.shape}')
  images = data.get('arr_0')
  if images is not None and (images.dtype != np.uint8 or images.ndim != 4):
    raise ValueError(f'{path}: arr_0 (reference images) must be uint8 NHWC, got {images.dtype} '
                     f'{images.shape}')
  meta = {}
  if 'meta' in data:
    try:
      meta = json.loads(str(data['meta']))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: meta is not JSON ({e})') from None
  return dict(mu=mu, sigma=sigma, features=features, mu_s=mu_s, sigma_s=sigma_s, images=images,
              meta=meta)
