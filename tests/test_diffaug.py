"""Tests of ctm_jax.diffaug against NumPy transcriptions of the reference's index formulas.

The NumPy translation and cutout follow the torch code of Kim-Dongjun/ctm-cifar10
`pg_modules/diffaug.py` literally (NCHW there, NHWC here): translation gathers from the 1-pixel
zero-padded image at clamp(i + t + 1, 0, H + 1); cutout writes zeros at
clamp(k + offset - c // 2, 0, H - 1) for k < c.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax import diffaug


def np_color(x, p):
  x = x + p['brightness'][:, None, None, None]
  m = x.mean(axis=-1, keepdims=True)
  x = (x - m) * p['saturation'][:, None, None, None] + m
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - m) * p['contrast'][:, None, None, None] + m


def np_translation(x, t):
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.empty_like(x)
  for n in range(b):
    gi = np.clip(np.arange(h) + t[n, 0] + 1, 0, h + 1)
    gj = np.clip(np.arange(w) + t[n, 1] + 1, 0, w + 1)
    out[n] = xp[n][gi][:, gj]
  return out


def np_cutout(x, offset, ratio=0.2):
  b, h, w, _ = x.shape
  ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  mask = np.ones((b, h, w))
  for n in range(b):
    for k in range(ch):
      for l in range(cw):
        i = np.clip(k + offset[n, 0] - ch // 2, 0, h - 1)
        j = np.clip(l + offset[n, 1] - cw // 2, 0, w - 1)
        mask[n, i, j] = 0
  return x * mask[..., None]


def _x(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _np_params(p):
  return {k: np.asarray(v) for k, v in p.items()}


def test_parameter_ranges():
  p = _np_params(diffaug.sample_diffaug_params(jax.random.PRNGKey(0), 4000, 32, 24))
  assert p['brightness'].min() >= -0.5 and p['brightness'].max() < 0.5
  assert p['saturation'].min() >= 0 and p['saturation'].max() < 2
  assert p['contrast'].min() >= 0.5 and p['contrast'].max() < 1.5
  # 32 * 0.125 -> S_h = 4; 24 * 0.125 + 0.5 -> S_w = 3; both ends reached.
  assert set(p['translation'][:, 0]) == set(range(-4, 5))
  assert set(p['translation'][:, 1]) == set(range(-3, 4))
  # cutout sides int(6.9) = 6 (even: offsets 0..32), int(5.3) = 5 (odd: offsets 0..23).
  assert set(p['cutout_offset'][:, 0]) == set(range(0, 33))
  assert set(p['cutout_offset'][:, 1]) == set(range(0, 24))


def test_each_transform_matches_numpy():
  x = _x((6, 32, 24, 3))
  key = jax.random.PRNGKey(7)
  p = diffaug.sample_diffaug_params(key, 6, 32, 24)
  pn = _np_params(p)
  xj = jnp.asarray(x)
  aug = jax.jit(diffaug.apply_diffaug, static_argnames=('policy',))
  np.testing.assert_allclose(np.asarray(aug(xj, p, 'color')), np_color(x, pn),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aug(xj, p, 'translation')),
                                np_translation(x, pn['translation']))
  np.testing.assert_array_equal(np.asarray(aug(xj, p, 'cutout')),
                                np_cutout(x, pn['cutout_offset']))
  full = jax.jit(diffaug.diff_augment)(key, xj)   # same key -> same parameters
  ref = np_cutout(np_translation(np_color(x, pn), pn['translation']), pn['cutout_offset'])
  np.testing.assert_allclose(np.asarray(full), ref, rtol=1e-5, atol=1e-6)
  assert full.shape == x.shape and full.dtype == jnp.float32


def test_translation_shifts_content_with_zero_fill():
  x = _x((2, 8, 8, 1)) + 2.0                      # nonzero everywhere
  t = jnp.array([[2, -1], [-3, 0]])
  out = np.asarray(diffaug.translation(jnp.asarray(x), t))
  # t = (2, -1): out[i, j] = x[i + 2, j - 1]
  np.testing.assert_array_equal(out[0, :6, 1:], x[0, 2:, :7])
  assert np.all(out[0, 6:] == 0) and np.all(out[0, :, 0] == 0)
  # t = (-3, 0): out[i, j] = x[i - 3, j]
  np.testing.assert_array_equal(out[1, 3:], x[1, :5])
  assert np.all(out[1, :3] == 0)


def test_cutout_zeroes_expected_square():
  x = np.ones((3, 32, 32, 2), np.float32)
  off = jnp.array([[5, 7], [0, 0], [32, 31]])
  out = np.asarray(diffaug.cutout(jnp.asarray(x), off))
  assert out.shape == x.shape                    # side int(32 * 0.2 + 0.5) = 6
  zero = out[..., 0] == 0
  expect = np.zeros((3, 32, 32), bool)
  expect[0, 2:8, 4:10] = True                     # rows 5-3 .. 5+2, cols 7-3 .. 7+2
  expect[1, 0:3, 0:3] = True                      # clipped at the top-left corner
  expect[2, 29:32, 28:32] = True                  # clipped at the bottom-right corner
  np.testing.assert_array_equal(zero, expect)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_gradient_is_the_transform_jacobian():
  x = jnp.asarray(_x((2, 4, 5, 3)))
  p = diffaug.sample_diffaug_params(jax.random.PRNGKey(3), 2, 4, 5, translation_ratio=0.25,
                                    cutout_ratio=0.4)
  # brightness has slope 1: the vector-Jacobian product returns the cotangent itself.
  v = jnp.asarray(_x(x.shape, 1))
  _, vjp = jax.vjp(lambda y: diffaug.brightness(y, p['brightness']), x)
  np.testing.assert_allclose(np.asarray(vjp(v)[0]), np.asarray(v), rtol=1e-6)
  # The full pipeline is affine in x for fixed parameters: J e_k = f(e_k) - f(0), in NumPy.
  f = lambda y: diffaug.apply_diffaug(y, p, cutout_ratio=0.4)
  jac = np.asarray(jax.jit(jax.jacrev(f))(x)).reshape(x.size, x.size)
  pn = _np_params(p)
  fn = lambda y: np_cutout(np_translation(np_color(y, pn), pn['translation']),
                           pn['cutout_offset'], 0.4)
  zero = np.zeros(x.shape)
  cols = []
  for k in range(x.size):
    e = np.zeros(x.size)
    e[k] = 1
    cols.append((fn(e.reshape(x.shape)) - fn(zero)).reshape(-1))
  np.testing.assert_allclose(jac, np.stack(cols, axis=1), rtol=1e-5, atol=1e-6)


def test_policy_handling():
  x = jnp.asarray(_x((2, 8, 8, 3)))
  np.testing.assert_array_equal(np.asarray(diffaug.diff_augment(jax.random.PRNGKey(0), x, '')),
                                np.asarray(x))
  with pytest.raises(ValueError, match='blur'):
    diffaug.diff_augment(jax.random.PRNGKey(0), x, 'color,blur')
  jitted = jax.jit(diffaug.diff_augment, static_argnames=('policy',))
  out = jitted(jax.random.PRNGKey(1), x, policy='translation,cutout')
  assert out.shape == x.shape
