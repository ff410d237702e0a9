"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The transforms and their random parameters follow CTM's copy (Kim-Dongjun/ctm-cifar10
`pg_modules/diffaug.py`, parameters drawn in `cm/enc_dec_lib.py:get_xl_feature`), written for
NHWC x in [-1, 1] with per-example parameters:
  color        brightness  x + b,                      b ~ U[-0.5, 0.5)
               saturation  (x - mean_c x) * s + mean_c x,  s ~ U[0, 2)   (channel mean per pixel)
               contrast    (x - mean_chw x) * k + mean_chw x, k ~ U[0.5, 1.5)  (image mean)
  translation  out[i, j] = x[i + t_h, j + t_w], zero outside; t_h ~ U{-S_h..S_h},
               S_h = int(H * ratio + 0.5) (same for W); the content moves by (-t_h, -t_w)
  cutout       zero the rows [o_h - c_h // 2, o_h - c_h // 2 + c_h) x the same for columns,
               c_h = int(H * ratio + 0.5), o_h ~ U{0 .. H - (c_h % 2)} (clipped to the image)
Transforms run in the order of `policy` (CTM: always color, translation, cutout). All are
differentiable in x (translation and cutout are linear 0/1 maps).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

POLICY_NAMES = ('color', 'translation', 'cutout')


def _parse_policy(policy: str):
  names = [p.strip() for p in policy.split(',') if p.strip()]
  bad = [p for p in names if p not in POLICY_NAMES]
  if bad:
    raise ValueError(f'unknown DiffAugment policy entries {bad}; allowed: {POLICY_NAMES}')
  return names


def translation_shift(size: int, ratio: float) -> int:
  """Largest translation S = int(size * ratio + 0.5)."""
  return int(size * ratio + 0.5)


def cutout_size(size: int, ratio: float) -> int:
  """Cutout side c = int(size * ratio + 0.5)."""
  return int(size * ratio + 0.5)


def sample_diffaug_params(key, batch: int, height: int, width: int, *,
                          translation_ratio: float = 0.125,
                          cutout_ratio: float = 0.2) -> Dict[str, jax.Array]:
  """Per-example random parameters of all transforms (the reference's draws, with JAX keys).

  Returns brightness, saturation, contrast (B,) float32; translation (B, 2) int32 (t_h, t_w);
  cutout_offset (B, 2) int32 (o_h, o_w). Share one draw between real and fake batches to give
  both the same augmentation (CTM's runs draw them independently: --gan_different_augment).
  """
  kb, ks, kc, kth, ktw, koh, kow = jax.random.split(key, 7)
  sh, sw = translation_shift(height, translation_ratio), translation_shift(width, translation_ratio)
  ch, cw = cutout_size(height, cutout_ratio), cutout_size(width, cutout_ratio)
  return dict(
      brightness=jax.random.uniform(kb, (batch,)) - 0.5,
      saturation=jax.random.uniform(ks, (batch,)) * 2.0,
      contrast=jax.random.uniform(kc, (batch,)) + 0.5,
      translation=jnp.stack([jax.random.randint(kth, (batch,), -sh, sh + 1),
                             jax.random.randint(ktw, (batch,), -sw, sw + 1)], axis=-1),
      cutout_offset=jnp.stack([jax.random.randint(koh, (batch,), 0, height + 1 - ch % 2),
                               jax.random.randint(kow, (batch,), 0, width + 1 - cw % 2)], axis=-1),
  )


def brightness(x, b):
  return x + b[:, None, None, None].astype(x.dtype)


def saturation(x, s):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * s[:, None, None, None].astype(x.dtype) + mean


def contrast(x, k):
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - mean) * k[:, None, None, None].astype(x.dtype) + mean


def _shift_axis(x, t, axis):
  """out[..., i, ...] = x[..., i + t, ...] along `axis` (per example t), zero where out of range."""
  n = x.shape[axis]
  idx = jnp.arange(n)[None, :] + t[:, None]                       # (B, n)
  valid = (idx >= 0) & (idx < n)
  idx = jnp.clip(idx, 0, n - 1)
  shape = [x.shape[0], 1, 1, 1]
  shape[axis] = n
  gathered = jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
  return gathered * valid.reshape(shape).astype(x.dtype)


def translation(x, t):
  """Integer translation with zero fill; t (B, 2) = (t_h, t_w), the reference's grid_x / grid_y."""
  x = _shift_axis(x, t[:, 0], 1)
  return _shift_axis(x, t[:, 1], 2)


def cutout_mask(offset, height: int, width: int, ratio: float = 0.2):
  """(B, H, W) mask: 0 on the c_h x c_w square starting at offset - c // 2, 1 elsewhere."""
  ch, cw = cutout_size(height, ratio), cutout_size(width, ratio)
  start_h = offset[:, 0] - ch // 2
  start_w = offset[:, 1] - cw // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_h = (rows >= start_h[:, None]) & (rows < start_h[:, None] + ch)
  in_w = (cols >= start_w[:, None]) & (cols < start_w[:, None] + cw)
  return 1.0 - (in_h[:, :, None] & in_w[:, None, :]).astype(jnp.float32)


def cutout(x, offset, ratio: float = 0.2):
  mask = cutout_mask(offset, x.shape[1], x.shape[2], ratio)
  return x * mask[..., None].astype(x.dtype)


def apply_diffaug(x, params: Dict[str, jax.Array], policy: str = 'color,translation,cutout',
                  cutout_ratio: float = 0.2):
  """Apply the transforms of `policy` to NHWC x with parameters from `sample_diffaug_params`."""
  for name in _parse_policy(policy):
    if name == 'color':
      x = brightness(x, params['brightness'])
      x = saturation(x, params['saturation'])
      x = contrast(x, params['contrast'])
    elif name == 'translation':
      x = translation(x, params['translation'])
    else:
      x = cutout(x, params['cutout_offset'], cutout_ratio)
  return x


def diff_augment(key, x, policy: str = 'color,translation,cutout',
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.2):
  """DiffAugment of NHWC x in [-1, 1] with fresh per-example parameters drawn from `key`."""
  if not _parse_policy(policy):
    return x
  params = sample_diffaug_params(key, x.shape[0], x.shape[1], x.shape[2],
                                 translation_ratio=translation_ratio, cutout_ratio=cutout_ratio)
  return apply_diffaug(x, params, policy, cutout_ratio=cutout_ratio)
