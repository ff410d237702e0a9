"""Tests of ctm_jax.nets.discriminator: shapes, spectral norm, state handling, hinge losses.

Spectral norm is checked against numpy.linalg.svd of each kernel reshaped as flax SpectralNorm
(and torch's spectral_norm, up to a transpose) does: (kh * kw * C_in, C_out). The losses are
checked against hand-written sums in the reference's order (cm/karras_diffusion.py get_GAN_loss).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax.nets import discriminator as D
from ctm_jax.nets import lpips

TINY = (4, 8, 8, 16, 16)
# Flax init draws every parameter with its own RNG call; with the default (partitionable threefry)
# keys each one costs seconds of XLA:CPU compile time, so the tests init with 'rbg' keys, once per
# configuration (module fixtures), and use jax.eval_shape where only shapes matter.
KEY = jax.random.key(0, impl='rbg')


@pytest.fixture(scope='module')
def vgg(tmp_path_factory):
  path = lpips.random_lpips_npz(tmp_path_factory.mktemp('vgg') / 'tiny.npz', seed=1, widths=TINY)
  return lpips.load_lpips_params(path)['vgg']


@pytest.fixture(scope='module')
def conv_setup():
  disc = D.build_discriminator('conv', base_channels=8, max_channels=16, num_classes=5)
  init, apply = _fns(disc)
  x, y = _x((3, 16, 16, 3)), jnp.array([0, 3, 4])
  params, state = init(KEY, x, y)
  return disc, apply, params, state, x, y


@pytest.fixture(scope='module')
def proj_setup(vgg):
  disc = D.build_discriminator('projected', resize_to=32, cout=8)
  init, apply = _fns(disc, vgg)
  x = _x((2, 16, 16, 3))
  params, state = init(KEY, x, None)
  return disc, apply, params, state, x


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def _fns(disc, backbone=None):
  init = jax.jit(lambda k, x, y: D.init_discriminator(disc, k, x, y, backbone_params=backbone))
  apply = jax.jit(functools.partial(D.apply_discriminator, disc, backbone_params=backbone),
                  static_argnames=('train', 'update_stats'))
  return init, apply


def _sn_pairs(params, state):
  """(kernel, sigma) for every spectrally normalised kernel, matched by the SpectralNorm names."""
  out = []
  for sn_name, entries in state['batch_stats'].items():
    for var, value in entries.items():
      if var.endswith('/sigma'):
        layer, leaf = var.split('/')[:2]
        out.append((np.asarray(params[layer][leaf]), float(value), var))
  return out


def _same(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_conv_discriminator_shapes_and_labels(conv_setup):
  disc, apply, params, state, x, y = conv_setup
  assert sorted(params) == ['down0', 'down1', 'embed', 'out', 'stem']   # 16 -> 8 -> 4
  assert params['down1']['kernel'].shape == (4, 4, 16, 16)            # capped at max_channels
  logits, _ = apply(params, state, x, y, train=False, update_stats=False)
  assert isinstance(logits, list) and len(logits) == 1 and logits[0].shape == (3, 1)
  onehot, _ = apply(params, state, x, jax.nn.one_hot(y, 5), train=False, update_stats=False)
  np.testing.assert_allclose(np.asarray(onehot[0]), np.asarray(logits[0]), rtol=1e-6)
  other, _ = apply(params, state, x, (y + 1) % 5, train=False, update_stats=False)
  assert not np.allclose(np.asarray(other[0]), np.asarray(logits[0]))
  # An input already at or below 4x4 gets no down-sampling block.
  small = D.build_discriminator('conv', base_channels=8)
  p_small, _ = jax.eval_shape(
      lambda k: D.init_discriminator(small, k, jnp.zeros((2, 4, 4, 1))), KEY)
  assert sorted(p_small) == ['out', 'stem']


def test_spectral_norm_converges_to_top_singular_value(conv_setup):
  disc, apply, params, state, x, y = conv_setup
  assert len(_sn_pairs(params, state)) == 5        # stem, down0, down1, out, embed
  for _ in range(100):
    _, state = apply(params, state, x, y, train=True, update_stats=True)
  for kernel, sigma, name in _sn_pairs(params, state):
    mat = kernel.reshape(-1, kernel.shape[-1])
    top = np.linalg.svd(mat, compute_uv=False)[0]
    np.testing.assert_allclose(sigma, top, rtol=1e-3, err_msg=name)
    # The kernel the layer uses, W / sigma, has largest singular value ~ 1.
    np.testing.assert_allclose(np.linalg.svd(mat / sigma, compute_uv=False)[0], 1.0, rtol=1e-3)


def test_state_changes_only_with_update_stats(conv_setup):
  disc, apply, params, state, x, y = conv_setup
  for train in (False, True):
    _, same = apply(params, state, x, y, train=train, update_stats=False)
    assert _same(same, state)
  _, new = apply(params, state, x, y, train=True, update_stats=True)
  assert not _same(new, state)


def test_projected_discriminator(proj_setup, vgg):
  disc, apply, params, state, x = proj_setup
  assert sorted(state) == ['batch_stats', 'projection']
  assert 'projection' not in params and not any('ccm' in k or 'csm' in k for k in params)
  # 32 px -> VGG levels 8, 4, 2, 1 px -> CSM x2: 16, 8, 4, 2 -> heads with 1, 0, 0, 0 down blocks
  # and final convs 4x4, 4x4, 4x4, 2x2 (kernel clipped to the map).
  # train=True uses batch statistics; the state moves only with update_stats=True.
  logits, same = apply(params, state, x, None, train=True, update_stats=False)
  assert [l.shape for l in logits] == [(2, 25), (2, 25), (2, 1), (2, 1)]
  assert _same(same, state)
  _, new = apply(params, state, x, None, train=True, update_stats=True)
  assert not _same(new['batch_stats'], state['batch_stats'])
  assert _same(new['projection'], state['projection'])
  # Generator step: gradient flows to x through the frozen backbone, never to its weights.
  def g_loss(x, backbone):
    out, _ = D.apply_discriminator(disc, params, state, x, None, train=True, update_stats=False,
                                   backbone_params=backbone)
    return D.generator_loss(out)
  gx, gb = jax.jit(jax.grad(g_loss, argnums=(0, 1)))(x, vgg)
  assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).max()) > 0
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree_util.tree_leaves(gb))


def test_projected_reference_geometry_at_224(vgg):
  """At 224 px (the default resize of 32 px images) the heads match MultiScaleD: 4x4 logits each."""
  disc = D.build_discriminator('projected', num_classes=10)
  x, y = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jnp.zeros((2,), jnp.int32)
  params, state = jax.eval_shape(
      lambda k, x: D.init_discriminator(disc, k, x, y, backbone_params=vgg), KEY, x)
  logits, _ = jax.eval_shape(
      lambda p, s, x: D.apply_discriminator(disc, p, s, x, y, train=True, update_stats=True,
                                            backbone_params=vgg), params, state, x)
  assert [l.shape for l in logits] == [(2, 16)] * 4
  n_down = [sum(1 for k in params if k.startswith(f'head{i}_down') and not k.endswith('_bn'))
            for i in range(4)]
  assert n_down == [4, 3, 2, 1]
  assert params['head0_down0']['kernel'].shape == (4, 4, 64, 64)     # nfc: 128 -> 64 ch
  assert params['head3_down0']['kernel'].shape == (4, 4, 256, 512)
  assert params['head0_out']['kernel'].shape == (4, 4, 512, 64)      # cmap_dim with classes
  proj = state['projection']
  assert proj['layer0_ccm_kernel'].shape == (TINY[2], 64)           # relu3_3 -> cout
  assert proj['layer3_ccm_kernel'].shape == (TINY[4], 512)          # pool5 -> 8 cout
  assert proj['layer3_csm_kernel'].shape == (512, 256)
  assert proj['layer0_csm_kernel'].shape == (64, 64)
  with pytest.raises(ValueError, match='divisible by 32'):
    bad = D.build_discriminator('projected', resize_to=None)
    jax.eval_shape(lambda k: D.init_discriminator(bad, k, jnp.zeros((1, 48, 48, 3)),
                                                  backbone_params=vgg), KEY)


def test_hinge_and_generator_losses():
  real = [jnp.array([[-2.0, 0.5], [1.5, 0.0]]), jnp.array([[0.25], [3.0]])]
  fake = [jnp.array([[-0.5, 2.0, -3.0]]), jnp.array([[1.0, -1.0, 0.0]])]
  # real head 0: relu(1 - [-2, .5, 1.5, 0]) = [3, .5, 0, 1] -> 1.125; head 1: [.75, 0] -> .375
  # fake head 0: relu(1 + [-.5, 2, -3]) = [.5, 3, 0] -> 7/6; head 1: [2, 0, 1] -> 1
  expect_d = (1.125 + 0.375) / 2 + (7 / 6 + 1.0) / 2
  np.testing.assert_allclose(float(D.hinge_d_loss(real, fake)), expect_d, rtol=1e-6)
  # generator: -mean per head: head 0 -> 0.5, head 1 -> 0
  np.testing.assert_allclose(float(D.generator_loss(fake)), (0.5 + 0.0) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match='kind'):
    D.build_discriminator('stylegan')
