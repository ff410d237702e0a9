"""Tests of ctm_jax.nets.lpips against an independent NumPy LPIPS (Zhang et al. 2018, Eq. 1).

The reference re-implements, in float64 and without the code under test: torch's bilinear resize
(align_corners=False; the source-index formula of ATen's upsample_bilinear2d), torchvision's VGG16
conv stack (cross-correlation, OIHW weights), the three poolings (2x2 max, 2x2 average, piq's
L2Pool2d with the 3x3 Hann kernel [[1,2,1],[2,4,2],[1,2,1]]/16, stride 2, padding 1), piq's
ImageNet standardisation and the channel-unit-normalised, head-weighted, spatially averaged sum.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.nets import lpips

TINY = (4, 8, 8, 16, 16)   # small block widths: same layer names, fast on CPU
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


# ------------------------------------------------------------------------------------------------
# NumPy reference.


def np_resize(x, size):
  """torch F.interpolate(mode='bilinear', align_corners=False) on NHWC, one axis at a time."""
  def along(x, axis, n_out):
    n_in = x.shape[axis]
    rows = []
    for o in range(n_out):
      src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
      i0 = int(src)
      i1 = i0 + 1 if i0 < n_in - 1 else i0
      l1 = src - i0
      rows.append((1 - l1) * np.take(x, i0, axis=axis) + l1 * np.take(x, i1, axis=axis))
    return np.stack(rows, axis=axis)
  return along(along(x, 1, size), 2, size)


def np_conv3x3(x, w, b):
  h, wd = x.shape[1:3]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(x.shape[:3] + (w.shape[0],))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum('bhwc,oc->bhwo', xp[:, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
  return out + b


def np_pool(x, kind):
  b, h, w, c = x.shape
  if kind in ('max', 'avg'):
    t = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return t.max(axis=(2, 4)) if kind == 'max' else t.mean(axis=(2, 4))
  k = np.array([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16.0
  xp = np.pad(x ** 2, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  out = np.zeros((b, ho, wo, c))
  for i in range(ho):
    for j in range(wo):
      out[:, i, j] = np.einsum('bhwc,hw->bc', xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], k)
  return np.sqrt(out + 1e-12)


def np_lpips(sd, a, b, pooling, resize_to):
  def feats(x):
    x = np.asarray(x, np.float64)
    if x.shape[-1] == 1:
      x = np.concatenate([x] * 3, axis=-1)
    if resize_to is not None and x.shape[1] < 256:
      x = np_resize(x, resize_to)
    h = ((x + 1) / 2 - MEAN) / STD
    out = []
    for blk, convs in enumerate(CONVS):
      if blk:
        h = np_pool(h, pooling)
      for i in convs:
        h = np.maximum(np_conv3x3(h, sd[f'features.{i}.weight'], sd[f'features.{i}.bias']), 0)
      out.append(h)
    return out
  total = 0.0
  for l, (fa, fb) in enumerate(zip(feats(a), feats(b))):
    na = fa / (np.sqrt((fa ** 2).sum(-1, keepdims=True)) + 1e-10)
    nb = fb / (np.sqrt((fb ** 2).sum(-1, keepdims=True)) + 1e-10)
    w = sd[f'lin{l}.model.1.weight'].reshape(-1)
    total = total + (((na - nb) ** 2) * w).sum(-1).mean(axis=(1, 2))
  return total


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  path = lpips.random_lpips_npz(tmp_path_factory.mktemp('lpips') / 'tiny.npz', seed=3, widths=TINY)
  with np.load(path) as z:
    sd = {k: z[k].astype(np.float64) for k in z.files}
  return lpips.load_lpips_params(path), sd, path


def _images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['max', 'avg', 'l2'])
@pytest.mark.parametrize('size', [6, 7])
def test_pooling_matches_numpy(kind, size):
  x = _images(0, (2, size, size, 3)) * 2
  np.testing.assert_allclose(np.asarray(lpips.pool2d(jnp.asarray(x), kind)),
                             np_pool(x.astype(np.float64), kind), rtol=1e-5, atol=1e-6)


def test_hann_kernel_and_resize_helpers():
  np.testing.assert_allclose(lpips.hann_kernel(3), np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
  x = _images(1, (1, 5, 7, 2))
  np.testing.assert_allclose(np.asarray(lpips.resize_bilinear(jnp.asarray(x), (12, 12))),
                             np_resize(x.astype(np.float64), 12), rtol=1e-5, atol=1e-6)
  down = np.asarray(lpips.resize_bilinear(jnp.asarray(x), (3, 3)))   # downsampling: no antialias
  np.testing.assert_allclose(down, np_resize(x.astype(np.float64), 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('pooling', ['avg', 'max', 'l2'])
def test_lpips_matches_numpy(tiny, pooling):
  params, sd, _ = tiny
  a, b = _images(1, (2, 8, 8, 3)), _images(2, (2, 8, 8, 3))
  got = lpips.lpips_distance(params, a, b, pooling=pooling, resize_to=32)
  assert got.shape == (2,)
  np.testing.assert_allclose(np.asarray(got), np_lpips(sd, a, b, pooling, 32), rtol=2e-4, atol=1e-7)


def test_lpips_default_path_224(tiny):
  """Defaults: pooling='avg' (piq replace_pooling=True), resize 32x32 -> 224x224."""
  params, sd, _ = tiny
  a, b = _images(3, (1, 32, 32, 3)), _images(4, (1, 32, 32, 3))
  got = lpips.lpips_distance(params, a, b)
  np.testing.assert_allclose(np.asarray(got), np_lpips(sd, a, b, 'avg', 224), rtol=2e-4, atol=1e-7)


def test_identity_symmetry_and_grey(tiny):
  params, _, _ = tiny
  a, b = _images(1, (2, 8, 8, 3)), _images(2, (2, 8, 8, 3))
  d = lambda x, y: np.asarray(lpips.lpips_distance(params, x, y, pooling='avg', resize_to=32))
  np.testing.assert_array_less(np.abs(d(a, a)), 1e-12)
  np.testing.assert_allclose(d(a, b), d(b, a), rtol=1e-6)
  assert np.all(d(a, b) > 0)
  ga, gb = a[..., :1], b[..., :1]
  got = np.asarray(lpips.lpips_distance(params, ga, gb, pooling='avg', resize_to=32))
  np.testing.assert_allclose(got, d(np.repeat(ga, 3, -1), np.repeat(gb, 3, -1)), rtol=1e-6)


def test_gradient_finite_and_matches_finite_difference(tiny):
  params, _, _ = tiny
  a, b = jnp.asarray(_images(1, (2, 8, 8, 3))), jnp.asarray(_images(2, (2, 8, 8, 3)))
  f = lambda x, y: lpips.lpips_distance(params, x, y, pooling='avg', resize_to=32).sum()
  g = jax.grad(f)(a, b)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  # Directional derivative against a float64 central difference of the NumPy reference.
  _, sd, _ = tiny
  v = _images(5, a.shape).astype(np.float64)
  a64, b64, eps = np.asarray(a, np.float64), np.asarray(b, np.float64), 1e-5
  fd = (np_lpips(sd, a64 + eps * v, b64, 'avg', 32).sum()
        - np_lpips(sd, a64 - eps * v, b64, 'avg', 32).sum()) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(g, jnp.asarray(v, jnp.float32))), fd, rtol=1e-3)
  g0 = jax.grad(f)(a, a)               # at a == b: finite (zero-norm features give 0, not NaN)
  assert bool(jnp.all(jnp.isfinite(g0)))
  gp = jax.grad(lambda p: lpips.lpips_distance(p, a, b, pooling='avg', resize_to=32).sum())(params)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree_util.tree_leaves(gp))  # frozen


def test_loader_errors_and_full_size_layout(tiny, tmp_path):
  _, sd, _ = tiny
  bad = {k: v for k, v in sd.items() if k != 'features.12.bias'}
  bad['extra.weight'] = np.zeros(1)
  np.savez(tmp_path / 'bad.npz', **bad)
  msg = r"missing: \['features.12.bias'\].*unexpected: \['extra.weight'\]"
  with pytest.raises(ValueError, match=msg):
    lpips.load_lpips_params(tmp_path / 'bad.npz')
  neg = dict(sd)
  neg['lin2.model.1.weight'] = -neg['lin2.model.1.weight']
  np.savez(tmp_path / 'neg.npz', **neg)
  with pytest.raises(ValueError, match='lin2.model.1.weight has negative'):
    lpips.load_lpips_params(tmp_path / 'neg.npz')
  wrong = dict(sd)
  wrong['lin0.model.1.weight'] = np.ones((1, 5, 1, 1))
  np.savez(tmp_path / 'wrong.npz', **wrong)
  with pytest.raises(ValueError, match=r'lin0.model.1.weight: expected shape \(1, 4, 1, 1\)'):
    lpips.load_lpips_params(tmp_path / 'wrong.npz')
  # Default widths: torchvision VGG16 shapes (OIHW in the file, HWIO in the tree).
  path = lpips.random_lpips_npz(tmp_path / 'full.npz', seed=0)
  with np.load(path) as z:
    assert set(z.files) == set(lpips.lpips_npz_keys()) and len(z.files) == 31
    assert z['features.0.weight'].shape == (64, 3, 3, 3)
    assert z['features.28.weight'].shape == (512, 512, 3, 3)
    assert z['lin4.model.1.weight'].shape == (1, 512, 1, 1)
  full = lpips.load_lpips_params(path)
  assert full['vgg']['conv10']['kernel'].shape == (3, 3, 128, 256)
  assert lpips.lpips_widths(full) == (64, 128, 256, 512, 512)
  n = sum(x.size for x in jax.tree_util.tree_leaves(full['vgg']))
  assert n == 14714688                  # torchvision vgg16().features parameter count
