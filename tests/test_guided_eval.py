"""guided-diffusion evaluator metrics (ctm_jax/metrics/guided_eval.py) against the evaluator's
formulas written out here with scipy on small random feature sets, and closed-form cases."""
import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial import distance

from ctm_jax.metrics import fid, guided_eval as ge


def _is_reference(logits, split_size):
  """torch-fidelity / improved-gan / the evaluator: per split exp(mean_i KL(p_i || mean p))."""
  p = special.softmax(np.asarray(logits, np.float64), axis=1)
  out = []
  for i in range(0, len(p), split_size):
    part = p[i:i + split_size]
    marginal = part.mean(0)
    out.append(np.exp(np.mean([stats.entropy(row, marginal) for row in part])))
  return np.mean(out)


def test_inception_score_matches_the_formula_and_closed_forms():
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((230, ge.POOL_DIM)).astype(np.float32)
  w = rng.standard_normal((ge.POOL_DIM, ge.NUM_LOGITS)) * 0.05
  logits = ge.pool3_logits(feats, w)
  np.testing.assert_allclose(logits, feats.astype(np.float64) @ w, rtol=1e-12)
  for split in (5000, 100, 77):           # one split; 100, 100, 30; a ragged last split
    got = ge.inception_score(logits, split_size=split)
    assert got["splits"] == -(-230 // split)
    np.testing.assert_allclose(got["value"], _is_reference(logits, split), rtol=1e-10)
  # Closed forms: equal predictions give IS = 1; confident predictions spread evenly over c
  # classes give IS = c.
  assert ge.inception_score(np.zeros((50, ge.NUM_LOGITS)))["value"] == pytest.approx(1.0)
  one_hot = 60.0 * np.eye(ge.NUM_LOGITS)[np.arange(200) % 8]
  assert ge.inception_score(one_hot, 200)["value"] == pytest.approx(8.0, rel=1e-9)
  with pytest.raises(ValueError, match="split_size"):
    ge.inception_score(logits, 0)
  with pytest.raises(ValueError, match=r"weight \(2048, 1008\)"):
    ge.pool3_logits(feats, w[:, :1000])


def test_spatial_features_take_the_first_seven_channels_in_hwc_order():
  a = np.arange(2 * 17 * 17 * 192, dtype=np.float32).reshape(2, 17, 17, 192)
  got = ge.spatial_features(a)
  assert got.shape == (2, ge.SPATIAL_DIM) == (2, 2023)
  # Row 0, position (h, w), channel c sits at index (h * 17 + w) * 7 + c.
  h, w, c = 5, 11, 6
  assert got[1, (h * 17 + w) * 7 + c] == a[1, h, w, c]
  np.testing.assert_array_equal(got[0, :7], a[0, 0, 0, :7])
  np.testing.assert_array_equal(got[0, 7:14], a[0, 0, 1, :7])


def _pr_reference(ref, smp, k):
  """Brute force with scipy: radii = k-th smallest squared distance within the set (self = 0th)."""
  d_rr = distance.cdist(ref, ref, "sqeuclidean")
  d_ss = distance.cdist(smp, smp, "sqeuclidean")
  r_ref = np.sort(d_rr, axis=1)[:, k]
  r_smp = np.sort(d_ss, axis=1)[:, k]
  d = distance.cdist(ref, smp, "sqeuclidean")
  precision = np.mean([any(d[j, i] <= r_ref[j] for j in range(len(ref))) for i in range(len(smp))])
  recall = np.mean([any(d[j, i] <= r_smp[i] for i in range(len(smp))) for j in range(len(ref))])
  return precision, recall


def test_precision_recall_match_the_formula_and_closed_forms():
  rng = np.random.default_rng(1)
  ref = rng.standard_normal((120, 16))
  smp = 0.7 * rng.standard_normal((90, 16)) + 0.6       # narrower, shifted: P and R in (0, 1)
  got = ge.precision_recall(ref, smp)
  want = _pr_reference(ref, smp, 3)
  print("precision, recall", got, want)
  assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
  assert 0.05 < got["precision"] < 0.95 and 0.05 < got["recall"] < 0.95
  assert got["precision"] != got["recall"]
  chunked = ge.precision_recall(ref, smp, chunk=7)        # blocks of 7 rows: the same answer
  assert (chunked["precision"], chunked["recall"]) == (got["precision"], got["recall"])
  # The same set: every point is inside its own ball -> 1, 1.  Far apart sets -> 0, 0.
  same = ge.precision_recall(ref, ref)
  assert (same["precision"], same["recall"]) == (1.0, 1.0)
  far = ge.precision_recall(ref, smp + 100.0)
  assert (far["precision"], far["recall"]) == (0.0, 0.0)
  np.testing.assert_allclose(ge.manifold_radii(ref, 1), np.sort(distance.cdist(ref, ref, "sqeuclidean"), 1)[:, 1])
  with pytest.raises(ValueError, match="more than k = 3 rows"):
    ge.manifold_radii(ref[:3])


def test_reference_batch_is_read_as_fid_and_sfid_statistics(tmp_path):
  """A VIRTUAL_imagenet64_labeled.npz-shaped file (config.eval.ref_stats) gives back its pool3
  and spatial statistics (float64) and images; a lone mu_s, a wrong shape and non-uint8 images
  are named."""
  rng = np.random.default_rng(2)
  stats_in = dict(mu=rng.standard_normal(ge.POOL_DIM).astype(np.float32),
                  sigma=np.eye(ge.POOL_DIM, dtype=np.float32) * 2,
                  mu_s=rng.standard_normal(ge.SPATIAL_DIM), sigma_s=np.eye(ge.SPATIAL_DIM) * 3)
  images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
  path = tmp_path / "VIRTUAL_tiny.npz"
  np.savez(path, arr_0=images, **stats_in)
  got = fid.load_stats(path)
  np.testing.assert_array_equal(got["images"], images)
  for k, v in stats_in.items():
    assert got[k].dtype == np.float64
    np.testing.assert_array_equal(got[k], v.astype(np.float64))
  assert got["features"] is None and got["meta"] == {}
  bad = tmp_path / "bad.npz"
  np.savez(bad, arr_0=images, mu=stats_in["mu"], sigma=stats_in["sigma"], mu_s=stats_in["mu_s"])
  with pytest.raises(ValueError, match=r"bad\.npz: holds one of mu_s, sigma_s"):
    fid.load_stats(bad)
  np.savez(bad, mu=stats_in["mu"], sigma=stats_in["sigma"], mu_s=stats_in["mu_s"][:100],
           sigma_s=stats_in["sigma_s"])
  with pytest.raises(ValueError, match=r"mu_s must be \(d,\) and sigma_s \(d, d\), got \(100,\)"):
    fid.load_stats(bad)
  np.savez(bad, arr_0=images.astype(np.float32), mu=stats_in["mu"], sigma=stats_in["sigma"])
  with pytest.raises(ValueError, match=r"arr_0 \(reference images\) must be uint8 NHWC"):
    fid.load_stats(bad)
