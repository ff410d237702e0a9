"""EDM's non-leaking augmentation: the official NVlabs/edm AugmentPipe's outputs (fixture made
by tests/fixtures/make_edm_augment_fixture.py), closed-form properties of the resampling, the
draws' distribution, config checks, and the augment labels reaching the network in the loss."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_edm, digits_edm, toy_edm
from ctm_jax import augment, config_lib, methods, train
from ctm_jax.methods import edm
from launch_utils import set_fields

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "edm_augment.npz")
CASES = ("rgb16_p06", "gray12x20_p1", "rot_translate_p1", "zoom_out", "cifar_edm")
PARAM_KEYS = ("xflip", "yflip", "scale", "rotate", "aniso_w", "aniso_r", "translate")
ALL_ON = dict(p=1.0, xflip=1, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def zero_params(n):
  z = jnp.zeros((n,))
  return dict(xflip=z, yflip=z, scale=z, rotate=z, aniso_w=z, aniso_r=z,
              translate=jnp.zeros((n, 2)))


@pytest.mark.parametrize("case", CASES)
def test_matches_the_official_augment_pipe(case):
  f = np.load(FIXTURE)
  get = lambda k: f[f"{case}/{k}"]
  spec = augment.AugmentSpec(p=float(get("spec/p")), scale_std=float(get("spec/scale_std")),
                             **{n: float(get(f"spec/{n}")) for n, _ in augment.TRANSFORMS})
  params = {k: jnp.asarray(get(f"param/{k}")) for k in PARAM_KEYS}
  out, labels = jax.jit(lambda x, p: augment.apply(x, p, spec))(jnp.asarray(get("images")), params)
  assert labels.shape == get("labels").shape
  np.testing.assert_allclose(labels, get("labels"), atol=1e-6)
  np.testing.assert_allclose(out, get("augmented"), atol=5e-5)


def test_sym6_is_an_orthogonal_wavelet_lowpass():
  h = augment.SYM6
  assert np.sum(h) == pytest.approx(math.sqrt(2), abs=1e-12)
  for shift in range(0, len(h), 2):           # sum_k h[k] h[k + 2n] = delta_n
    assert np.dot(h[:len(h) - shift], h[shift:]) == pytest.approx(float(shift == 0), abs=1e-12)


def test_identity_draws_leave_images_unchanged():
  """No transform drawn: upsample, exact-grid sampling and downsample with an orthogonal
  low-pass give the image back (sum_k h[k] h[k + 2n] = delta_n)."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (3, 10, 14, 2), minval=-1, maxval=1)
  out, labels = augment.apply(x, zero_params(3), augment.AugmentSpec(**ALL_ON))
  np.testing.assert_allclose(out, x, atol=2e-6)
  np.testing.assert_array_equal(labels, np.zeros((3, 9)))


def test_flips_are_exact():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5, 3))
  p = zero_params(2)
  p["xflip"] = jnp.array([1.0, 0.0])
  p["yflip"] = jnp.array([1.0, 1.0])
  out, labels = augment.apply(x, p, augment.AugmentSpec(p=1.0, xflip=1, yflip=1))
  xn = np.asarray(x)
  np.testing.assert_array_equal(out[0], xn[0, ::-1, ::-1])
  np.testing.assert_array_equal(out[1], xn[1, ::-1, :])
  np.testing.assert_array_equal(labels, [[1, 1], [0, 1]])


@pytest.mark.parametrize("tx,ty", [(2, 0), (-3, 1), (0, -4)])
def test_whole_pixel_translation_is_a_reflect_padded_shift(tx, ty):
  """Translating by whole pixels moves the 2x grid by an even count, so the resampling is
  exact: out[i, j] = reflect_pad(x)[i - ty, j - tx]."""
  h, w = 12, 16
  x = jax.random.uniform(jax.random.PRNGKey(2), (1, h, w, 1))
  std = 0.125
  p = zero_params(1)
  p["translate"] = jnp.array([[tx / (w * std), ty / (h * std)]])
  out, _ = augment.apply(x, p, augment.AugmentSpec(p=1.0, translate_frac=1, translate_frac_std=std))
  pad = np.pad(np.asarray(x)[0, :, :, 0], 8, mode="reflect")
  ref = pad[8 - ty:8 - ty + h, 8 - tx:8 - tx + w]
  np.testing.assert_allclose(out[0, :, :, 0], ref, atol=2e-6)


def test_draws_follow_edm_probabilities():
  n = 40_000
  spec = augment.AugmentSpec.from_config(toy_edm.augment_block(0.12))
  d = jax.device_get(augment.draw(jax.random.PRNGKey(3), n, spec))
  tol = lambda q: 5 * math.sqrt(q * (1 - q) / n)
  assert np.mean(d["xflip"]) == pytest.approx(0.5, abs=tol(0.5))        # multiplier 1e8: always drawn
  for key in ("yflip",):                                                 # 0.12 * 1/2
    assert np.mean(d[key]) == pytest.approx(0.06, abs=tol(0.06))
  for key in ("scale", "rotate", "aniso_w"):
    assert np.mean(d[key] != 0) == pytest.approx(0.12, abs=tol(0.12))
  assert np.mean(d["aniso_r"] != 0) == pytest.approx(0.5, abs=tol(0.5))
  gated = d["translate"][:, 0] != 0
  np.testing.assert_array_equal(gated, d["translate"][:, 1] != 0)      # one gate for x and y
  assert np.mean(gated) == pytest.approx(0.12, abs=tol(0.12))
  rot = d["rotate"][d["rotate"] != 0]
  assert rot.min() >= -math.pi and rot.max() <= math.pi
  assert np.std(rot) == pytest.approx(math.pi / math.sqrt(3), rel=0.05)  # uniform on [-pi, pi]
  assert np.std(d["scale"][d["scale"] != 0]) == pytest.approx(1.0, rel=0.05)
  assert spec.label_dim == 9


def validate(c):
  train.validate_config(c, num_devices=1, process_count=1)


def test_config_checks():
  validate(cifar10_edm.get_config())                   # the paper setting is consistent
  assert cifar10_edm.get_config().edm.augment.p == 0.12
  for field, value, match in [("edm.augment.p", 1.5, r"edm\.augment\.p"),
                              ("edm.augment.scale", -1.0, r"edm\.augment\.scale"),
                              ("edm.augment.aniso_rotate_prob", 2.0, "aniso_rotate_prob"),
                              ("model.augment_dim", 0, r"model\.augment_dim = 0 must equal the 9")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      validate(set_fields(cifar10_edm.get_config(), {field: value}))
  with pytest.raises(config_lib.ConfigError, match="needs an image data set"):
    validate(set_fields(toy_edm.get_config(), {"edm.augment.p": 0.1}))
  # Fewer transforms, fewer labels: translation only makes 2.
  c = set_fields(digits_edm.get_config(), {"edm.augment.p": 0.5, "edm.augment.xflip": 0.0,
                                           "edm.augment.yflip": 0.0, "edm.augment.scale": 0.0,
                                           "edm.augment.rotate_frac": 0.0, "edm.augment.aniso": 0.0,
                                           "model.augment_dim": 2})
  validate(c)


def test_edm_loss_trains_on_augmented_images_with_their_labels():
  c = digits_edm.get_config()
  c = set_fields(c, {"model.model_channels": 16, "model.num_blocks": 1,
                     "model.channel_mult_emb": 2, "model.augment_dim": 9,
                     "model.channel_mult": (1,), "model.attn_resolutions": (),
                     "edm.augment.p": 0.5})
  validate(c)
  model = train.build_model(c)
  method = methods.build_method(c, model)
  x0 = jax.random.uniform(jax.random.PRNGKey(4), (6, 8, 8, 1), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(5), x0)
  # EDM's init zeroes the output layers (F = 0): perturb every weight so the inputs matter.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [v + 0.05 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
  rng = jax.random.PRNGKey(6)
  loss, _ = jax.jit(method.loss)(params, {"x": x0}, rng)

  # The same loss by hand: the augmentation's own key stream, then DSM on (y, labels).
  k_sig, k_noise, k_drop = jax.random.split(rng, 3)
  y, labels = augment.augment(jax.random.fold_in(rng, edm._AUGMENT_STREAM), x0,
                              method.augment_spec)
  assert float(jnp.max(jnp.abs(labels))) > 0            # something was drawn
  sigma = jnp.exp(c.edm.p_mean + c.edm.p_std * jax.random.normal(k_sig, (6,)))
  noise = jax.random.normal(k_noise, x0.shape)
  by_hand = jax.jit(lambda lab: jnp.mean(edm.dsm_loss(model, params, y, sigma, noise, None,
                                                      k_drop, augment_labels=lab)))
  np.testing.assert_allclose(loss, by_hand(labels), rtol=1e-5)
  assert abs(float(by_hand(jnp.zeros_like(labels))) - float(loss)) > 1e-4 * float(loss)  # labels matter
