"""The ImageNet metrics of guided-diffusion's evaluator (evaluations/evaluator.py), which CTM's
ImageNet 64 table uses with the reference batch VIRTUAL_imagenet64_labeled.npz.

  IS         exp(E_x KL(p(y|x) || p(y))) per split of `split_size` consecutive samples, averaged
             over splits; p(y|x) = softmax(pool3 @ W) over the detector's 1008 classes, W the
             `softmax/logits` matrix WITHOUT its bias (the evaluator multiplies by the MatMul's
             weight only; torch-fidelity's `logits_unbiased` likewise).  Salimans et al. 2016.
  FID        the Frechet distance of pool3 statistics (ctm_jax.metrics.fid.frechet_distance).
  sFID       the same of the spatial features: `mixed_6/conv` (Mixed_6d's 1x1 branch after its
             ReLU, 17 x 17 x 192) cut to its first 7 channels and flattened (17 * 17 * 7 = 2023),
             `spatial_features`; the network gives them (InceptionV3(spatial=True)).
             Nash et al. 2021.
  precision  the fraction of samples inside the reference manifold, recall the fraction of
  / recall   references inside the sample manifold; a manifold is the union of balls around each
             point whose squared radius is the squared distance to its k-th nearest neighbour
             (k = 3, the point itself not counted).  Kynkaanniemi et al. 2019.

Statistics (mu, sigma) use np.cov (ddof 1) as the evaluator does.  The evaluator computes the
squared distances in float16 (float32 only when float16 overflows); here they are float64.
A reference batch (.npz: mu, sigma, mu_s, sigma_s, arr_0) is read by
ctm_jax.metrics.fid.load_stats as config.eval.ref_stats.
"""
from __future__ import annotations

import numpy as np

NUM_LOGITS = 1008
POOL_DIM = 2048
SPATIAL_SHAPE = (17, 17, 192)          # mixed_6/conv of the 299 x 299 network
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_SHAPE[0] * SPATIAL_SHAPE[1] * SPATIAL_CHANNELS     # 2023
IS_SPLIT_SIZE = 5000
NHOOD_SIZE = 3
ROW_CHUNK = 1024                       # rows per distance block (1024 x 50k float64: 0.4 GB)


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> dict:
  """The evaluator's `compute_inception_score` from (N, 1008) logits (pool3 @ W, no bias).

  Splits of split_size consecutive rows (the last one shorter when split_size does not divide
  N); per split exp(mean_i sum_y p_iy (ln p_iy - ln mean_j p_jy)); value = their mean, std =
  their spread (np.std, reported by torch-fidelity, not by the evaluator)."""
  lg = np.asarray(logits, np.float64)
  if lg.ndim != 2 or lg.shape[0] < 1:
    raise ValueError(f"inception_score: expected logits of shape (n, classes), got {lg.shape}")
  if not isinstance(split_size, int) or split_size < 1:
    raise ValueError(f"inception_score: split_size must be an int >= 1, got {split_size!r}")
  p = _softmax(lg)
  scores = []
  for i in range(0, len(p), split_size):
    part = p[i:i + split_size]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(float(np.exp(np.mean(np.sum(kl, axis=1)))))
  return dict(value=float(np.mean(scores)), std=float(np.std(scores)), splits=len(scores))


def pool3_logits(features, weight) -> np.ndarray:
  """(N, 2048) pool3 features times the (2048, 1008) logits matrix, no bias (the evaluator's
  `_create_softmax_graph`)."""
  f, w = np.asarray(features, np.float64), np.asarray(weight, np.float64)
  if f.ndim != 2 or w.shape != (f.shape[1], NUM_LOGITS):
    raise ValueError(f"pool3_logits: features (n, {POOL_DIM}) and weight ({POOL_DIM}, "
                     f"{NUM_LOGITS}) expected, got {f.shape} and {w.shape}")
  return f @ w


def spatial_features(mixed_6_conv) -> np.ndarray:
  """sFID features from the (N, 17, 17, 192) NHWC output of mixed_6/conv: the first 7 channels,
  flattened in (h, w, c) order to (N, 2023) (the evaluator's `spatial[..., :7]` then reshape).
  Arrays stay what they are (a jax array inside the Inception network's trace)."""
  a = mixed_6_conv if hasattr(mixed_6_conv, "reshape") else np.asarray(mixed_6_conv)
  if a.ndim != 4 or a.shape[-1] < SPATIAL_CHANNELS:
    raise ValueError(f"spatial_features: expected (n, h, w, c >= {SPATIAL_CHANNELS}) activations, "
                     f"got {a.shape}")
  return a[..., :SPATIAL_CHANNELS].reshape(a.shape[0], -1)


def squared_distances(u, v) -> np.ndarray:
  """(n, m) squared Euclidean distances max(|u|^2 - 2 u.v + |v|^2, 0), in float64."""
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  d = (u * u).sum(1)[:, None] - 2.0 * (u @ v.T) + (v * v).sum(1)[None, :]
  return np.maximum(d, 0.0)


def manifold_radii(features, k: int = NHOOD_SIZE, chunk: int = ROW_CHUNK) -> np.ndarray:
  """(n,) squared distance of each row to its k-th nearest neighbour, the row itself (distance
  0) counted as the 0-th (the evaluator's partition at index k); `chunk` rows at a time."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] <= k:
    raise ValueError(f"manifold_radii: needs more than k = {k} rows, got shape {f.shape}")
  return np.concatenate([np.partition(squared_distances(f[i:i + chunk], f), k, axis=1)[:, k]
                         for i in range(0, len(f), chunk)])


def precision_recall(ref_features, sample_features, k: int = NHOOD_SIZE,
                     chunk: int = ROW_CHUNK) -> dict:
  """Improved precision and recall (the evaluator's `compute_prec_recall`): precision = the
  fraction of samples within radius_j of some reference j (squared distances, <=), recall = the
  fraction of references within radius_i of some sample i.  Distances `chunk` rows at a time
  (memory chunk x n)."""
  ref, smp = np.asarray(ref_features, np.float64), np.asarray(sample_features, np.float64)
  if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
    raise ValueError(f"precision_recall: feature sets of one width expected, got {ref.shape} "
                     f"and {smp.shape}")
  r_ref, r_smp = manifold_radii(ref, k, chunk), manifold_radii(smp, k, chunk)
  in_ref = np.concatenate([np.any(squared_distances(smp[i:i + chunk], ref) <= r_ref[None, :],
                                  axis=1) for i in range(0, len(smp), chunk)])
  in_smp = np.concatenate([np.any(squared_distances(ref[i:i + chunk], smp) <= r_smp[None, :],
                                  axis=1) for i in range(0, len(ref), chunk)])
  return dict(precision=float(np.mean(in_ref)), recall=float(np.mean(in_smp)), k=k)
