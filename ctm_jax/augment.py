"""EDM's non-leaking geometric augmentation (Karras et al. 2022, Appendix F.2; NVlabs/edm
`training/augment.py`, after StyleGAN2-ADA).

Each example is, with probability `multiplier * p` per transform, x-flipped, y-flipped,
isotropically scaled by 2^(0.2 w), rotated by an angle uniform in [-pi, pi], anisotropically
scaled by (2^(0.2 w), 2^(-0.2 w)) in a frame rotated by r (with probability 1/2, else the image
frame), and translated by (w_x W, w_y H) * 0.125 with w ~ N(0, 1).  The geometric part is
applied as one inverse map G^-1 with the reference's resampling: reflect padding, 2x upsampling
with the sym6 wavelet low-pass, bilinear sampling (zeros outside), sym6 downsampling.  The
network sees the draws as its augment labels (xflip, yflip, w_scale, cos(rot) - 1, sin(rot),
w_aniso cos r, w_aniso sin r, w_tx, w_ty: 9 values with every transform on) and learns
D(x; sigma, labels); sampling uses zero labels, the un-augmented distribution.

Shapes are static: the reference pads by a data-dependent margin (the batch's largest
corner excursion plus the filter support, clamped to W - 1); here the image is always padded
by W - 1 and everything outside the reference's margin is masked to zero, which gives the
reference's numbers with one compilation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

# Daubechies' least-asymmetric (symlet) order-6 decomposition low-pass filter (sum = sqrt 2).
SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
])

# Transforms in label order, with the number of label values each contributes.
TRANSFORMS = (("xflip", 1), ("yflip", 1), ("scale", 1), ("rotate_frac", 2), ("aniso", 2),
              ("translate_frac", 2))


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """Probability multipliers (0 = transform off) and ranges, as NVlabs/edm's AugmentPipe."""
  p: float = 0.0
  xflip: float = 0.0
  yflip: float = 0.0
  scale: float = 0.0
  rotate_frac: float = 0.0
  aniso: float = 0.0
  translate_frac: float = 0.0
  scale_std: float = 0.2
  rotate_frac_max: float = 1.0
  aniso_std: float = 0.2
  aniso_rotate_prob: float = 0.5
  translate_frac_std: float = 0.125

  @classmethod
  def from_config(cls, cfg) -> "AugmentSpec":
    return cls(**{f.name: float(cfg[f.name]) for f in dataclasses.fields(cls)})

  @property
  def enabled(self) -> bool:
    return self.p > 0 and any(getattr(self, n) > 0 for n, _ in TRANSFORMS)

  @property
  def label_dim(self) -> int:
    """Length of the augment-label vector (EDM's `augment_dim`); 9 with every transform on."""
    return sum(d for n, d in TRANSFORMS if getattr(self, n) > 0) if self.enabled else 0

  @property
  def geometric(self) -> bool:
    return any(getattr(self, n) > 0 for n in ("scale", "rotate_frac", "aniso", "translate_frac"))


def draw(key, n: int, spec: AugmentSpec) -> Dict[str, jax.Array]:
  """The per-example random parameters (zero where a transform is not applied)."""
  ks = jax.random.split(key, 16)
  gate = lambda k, mult: jax.random.uniform(k, (n,)) < mult * spec.p
  out = {}
  for i, name in enumerate(("xflip", "yflip")):
    w = jax.random.bernoulli(ks[2 * i], 0.5, (n,)).astype(jnp.float32)
    out[name] = jnp.where(gate(ks[2 * i + 1], getattr(spec, name)), w, 0.0)
  w = jax.random.normal(ks[4], (n,))
  out["scale"] = jnp.where(gate(ks[5], spec.scale), w, 0.0)
  w = (jax.random.uniform(ks[6], (n,)) * 2 - 1) * (math.pi * spec.rotate_frac_max)
  out["rotate"] = jnp.where(gate(ks[7], spec.rotate_frac), w, 0.0)
  w = jax.random.normal(ks[8], (n,))
  r = (jax.random.uniform(ks[9], (n,)) * 2 - 1) * math.pi
  out["aniso_w"] = jnp.where(gate(ks[10], spec.aniso), w, 0.0)
  out["aniso_r"] = jnp.where(jax.random.uniform(ks[11], (n,)) < spec.aniso_rotate_prob, r, 0.0)
  w = jax.random.normal(ks[12], (n, 2))
  out["translate"] = jnp.where(gate(ks[13], spec.translate_frac)[:, None], w, 0.0)
  return out


def _mat(rows):
  """Stack per-example entries (scalars or (N,) arrays) into (N, 3, 3) matrices."""
  n = max(jnp.shape(v)[0] for row in rows for v in row if jnp.ndim(v))
  rows = [[jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) for v in row] for row in rows]
  return jnp.stack([jnp.stack(row, -1) for row in rows], -2)


def _scale(sx, sy):
  return _mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])


def _rotate(a):
  c, s = jnp.cos(a), jnp.sin(a)
  return _mat([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _translate(tx, ty):
  return _mat([[1, 0, tx], [0, 1, ty], [0, 0, 1]])


def inverse_transform(params, spec: AugmentSpec, height: int, width: int):
  """G^-1 (N, 3, 3), mapping output pixel coordinates (origin at the image centre) to input.

  G^-1 = S(s)^-1 R(theta) R(r)^-1 S(s_a, 1/s_a)^-1 R(r) T(t)^-1, the reference's composition.
  """
  n = params["scale"].shape[0]
  g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), (n, 3, 3))
  if spec.scale > 0:
    s = jnp.exp2(params["scale"] * spec.scale_std)
    g = g @ _scale(1 / s, 1 / s)
  if spec.rotate_frac > 0:
    g = g @ _rotate(params["rotate"])
  if spec.aniso > 0:
    s = jnp.exp2(params["aniso_w"] * spec.aniso_std)
    r = params["aniso_r"]
    g = g @ _rotate(-r) @ _scale(1 / s, s) @ _rotate(r)
  if spec.translate_frac > 0:
    t = params["translate"]
    g = g @ _translate(-t[:, 0] * width * spec.translate_frac_std,
                       -t[:, 1] * height * spec.translate_frac_std)
  return g


def labels(params, spec: AugmentSpec) -> jax.Array:
  """The (N, label_dim) augment labels, in the reference's order."""
  cols = []
  if spec.xflip > 0:
    cols.append(params["xflip"][:, None])
  if spec.yflip > 0:
    cols.append(params["yflip"][:, None])
  if spec.scale > 0:
    cols.append(params["scale"][:, None])
  if spec.rotate_frac > 0:
    a = params["rotate"]
    cols.append(jnp.stack([jnp.cos(a) - 1, jnp.sin(a)], -1))
  if spec.aniso > 0:
    w, r = params["aniso_w"], params["aniso_r"]
    cols.append(jnp.stack([w * jnp.cos(r), w * jnp.sin(r)], -1))
  if spec.translate_frac > 0:
    cols.append(params["translate"])
  return jnp.concatenate(cols, axis=1).astype(jnp.float32)


def _filter(x, taps, axis: int, pad_lo: int, pad_hi: int, stride: int = 1):
  """Cross-correlation of x with `taps` along `axis` (zero padding), then every stride-th value."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (pad_lo, pad_hi)
  xp = jnp.pad(x, pad)
  n_out = xp.shape[axis] - len(taps) + 1
  acc = 0.0
  for k, h in enumerate(taps):
    acc = acc + float(h) * jax.lax.slice_in_dim(xp, k, k + n_out, axis=axis)
  return jax.lax.slice_in_dim(acc, 0, n_out, stride=stride, axis=axis)


def _zero_insert(x, axis: int):
  """x[j] -> y[2j] = x[j], y[2j + 1] = 0 (length doubles)."""
  y = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
  shape = list(x.shape)
  shape[axis] *= 2
  return y.reshape(shape)


def _range_mask(n: int, lo, hi):
  i = jnp.arange(n)
  return ((i >= lo) & (i < hi)).astype(jnp.float32)


def warp(images, g_inv):
  """Apply the inverse maps g_inv (N, 3, 3) to images (N, H, W, C) with the reference resampling."""
  n, h, w, c = images.shape
  taps = SYM6
  hz_pad = len(taps) // 4
  cx, cy = (w - 1) / 2, (h - 1) / 2
  # The reference's margin: the batch's largest corner excursion plus the filter support.
  corners = jnp.array([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], jnp.float32)
  cp = jnp.einsum("nij,kj->nik", g_inv, corners)[:, :2, :]          # (N, xy, 4)
  lo = jnp.max(-cp, axis=(0, 2)) + jnp.array([hz_pad * 2 - cx, hz_pad * 2 - cy])
  hi = jnp.max(cp, axis=(0, 2)) + jnp.array([hz_pad * 2 - cx, hz_pad * 2 - cy])
  lim = jnp.array([w - 1, h - 1], jnp.float32)
  mx0, my0 = jnp.ceil(jnp.clip(lo, 0, lim)).astype(jnp.int32)
  mx1, my1 = jnp.ceil(jnp.clip(hi, 0, lim)).astype(jnp.int32)
  # Static padding by the largest possible margin; zero what lies outside the reference's.
  px, py = w - 1, h - 1
  x = jnp.pad(images.astype(jnp.float32), ((0, 0), (py, py), (px, px), (0, 0)), mode="reflect")
  hp, wp = h + 2 * py, w + 2 * px
  x = x * (_range_mask(hp, py - my0, py + h + my1)[None, :, None, None]
           * _range_mask(wp, px - mx0, px + w + mx1)[None, None, :, None])
  # 2x upsampling: zero insertion, then convolution with the low-pass (true convolution).
  up = len(taps) // 2
  x = _filter(_zero_insert(x, 2), taps[::-1], 2, up, up - 1)
  x = _filter(_zero_insert(x, 1), taps[::-1], 1, up, up - 1)
  x = x * (_range_mask(2 * hp, 2 * (py - my0), 2 * (py + h + my1))[None, :, None, None]
           * _range_mask(2 * wp, 2 * (px - mx0), 2 * (px + w + mx1))[None, None, :, None])
  # Bilinear sampling (zeros outside) on the 2x grid, in pixel units about the centre:
  # the upsampled G^-1 is T(-1/2) S(2) G^-1 S(1/2) T(1/2).
  ho, wo = 2 * (h + 2 * hz_pad), 2 * (w + 2 * hz_pad)
  jj, ii = jnp.meshgrid(jnp.arange(wo) + 0.5 - wo / 2, jnp.arange(ho) + 0.5 - ho / 2)
  half = jnp.stack([(jj + 0.5) / 2, (ii + 0.5) / 2, jnp.ones_like(jj)], 0).reshape(3, -1)
  src = jnp.einsum("nij,jk->nik", g_inv, half)                      # (N, 3, ho * wo)
  sx = 2 * src[:, 0] - 0.5 + (2 * wp) / 2 - 0.5
  sy = 2 * src[:, 1] - 0.5 + (2 * hp) / 2 - 0.5

  def sample(img, yy, xx):                                           # img (H', W', C)
    coords = [yy.reshape(ho, wo), xx.reshape(ho, wo)]
    return jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(
        ch, coords, order=1, mode="constant", cval=0.0), in_axes=2, out_axes=2)(img)

  x = jax.vmap(sample)(x, sy, sx)
  # Downsampling with the low-pass, then the crop back to H x W.
  dn = (len(taps) - 1) // 2
  x = _filter(x, taps, 2, dn, dn, stride=2)[:, :, hz_pad:hz_pad + w]
  x = _filter(x, taps, 1, dn, dn, stride=2)[:, hz_pad:hz_pad + h]
  return x.astype(images.dtype)


def apply(images, params, spec: AugmentSpec):
  """Augment images (N, H, W, C) with the given draws: (augmented images, labels)."""
  if not spec.enabled:
    raise ValueError("apply() needs an AugmentSpec with p > 0 and a transform on")
  x = images
  if spec.xflip > 0:
    x = jnp.where(params["xflip"][:, None, None, None] == 1, x[:, :, ::-1], x)
  if spec.yflip > 0:
    x = jnp.where(params["yflip"][:, None, None, None] == 1, x[:, ::-1], x)
  if spec.geometric:
    x = warp(x, inverse_transform(params, spec, x.shape[1], x.shape[2]))
  return x, labels(params, spec)


def augment(key, images, spec: AugmentSpec):
  """EDM's AugmentPipe: fresh draws from `key`, then `apply`."""
  return apply(images, draw(key, images.shape[0], spec), spec)
