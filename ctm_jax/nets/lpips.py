"""VGG16 features and the LPIPS distance used as CTM's d(., .) (flax.linen, NHWC).

LPIPS (Zhang et al. 2018, Eq. 1):
  d(a, b) = sum_l mean_{h,w} sum_c w_{l,c} (f^l_{hwc}(a) / (|f^l_{hw}(a)| + eps)
                                            - f^l_{hwc}(b) / (|f^l_{hw}(b)| + eps))^2
with f^l the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, |.| the L2 norm over
channels, eps = 1e-10 and w_l >= 0 the 1x1 'lin' heads of LPIPS v0.1.

CTM (Kim-Dongjun/ctm-cifar10 and sony/ctm, `cm/karras_diffusion.py:get_CTM_loss`) computes it
with piq 0.7.0's `LPIPS(replace_pooling=True, reduction="none")`:
  * images in [-1, 1] are bilinearly resized to 224x224 (torch `F.interpolate`, align_corners=False,
    no antialias) when their height is below 256, then mapped to [0, 1] by (x + 1) / 2;
  * piq standardises with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
    This equals LPIPS's own ScalingLayer on [-1, 1] inputs (shift 2*mean - 1, scale 2*std);
  * `replace_pooling=True` swaps torchvision's 2x2 max pools for **2x2 average pools**
    (`ContentLoss.replace_pooling`); piq's Hann-window L2 pooling (`L2Pool2d`, 3x3, stride 2,
    padding 1) is used only by piq's DISTS. So pooling='avg' reproduces CTM; 'max' is the original
    LPIPS network and 'l2' is piq's L2 pooling.

Parameters are float32 and frozen: `lpips_distance` stops their gradient. `load_lpips_params`
reads an .npz with torchvision / lpips names (see `launch/export_lpips_weights.py`);
`random_lpips_npz` writes a file of that format with random weights (for tests only).
"""
from __future__ import annotations

import functools
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.nets.layers import interp_matrix, resize_separable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_EPS = 1e-10          # LPIPS normalize_tensor / piq EPS
L2_POOL_EPS = 1e-12       # piq L2Pool2d.EPS
POOLINGS = ('max', 'avg', 'l2')

# torchvision vgg16().features: 13 convs in 5 blocks, a 2x2 pool after each block.
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CONV_INDICES = tuple(i for block in VGG16_BLOCKS for i in block)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
LPIPS_LAYERS = ('relu1_2', 'relu2_2', 'relu3_3', 'relu4_3', 'relu5_3')


# ------------------------------------------------------------------------------------------------
# Resizing and pooling.


def _interp_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights of torch's 1-D bilinear resize (no antialias)."""
  out = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = out * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros_like(out)
  else:
    src = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
  return interp_matrix(src, n_in)


def resize_bilinear(x, size: Tuple[int, int], align_corners: bool = False):
  """torch `F.interpolate(x, size, mode='bilinear', align_corners=...)`, NHWC, no antialias."""
  return resize_separable(x, _interp_matrix(x.shape[1], size[0], align_corners),
                          _interp_matrix(x.shape[2], size[1], align_corners))


def hann_kernel(kernel_size: int = 3) -> np.ndarray:
  """piq `hann_filter`: outer product of the symmetric Hann window of size k+2 without its ends."""
  n = kernel_size + 2
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / (n - 1))
  window = window[1:-1]
  k = np.outer(window, window)
  return k / k.sum()


def l2_pool(x, kernel_size: int = 3, stride: int = 2, padding: int = 1):
  """piq L2Pool2d: sqrt(depthwise_conv(x^2, Hann kernel, stride 2, zero padding 1) + 1e-12)."""
  c = x.shape[-1]
  k = jnp.asarray(np.tile(hann_kernel(kernel_size)[:, :, None, None], (1, 1, 1, c)), x.dtype)
  y = jax.lax.conv_general_dilated(
      jnp.square(x), k, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(y + L2_POOL_EPS)


def pool2d(x, pooling: str):
  """The pool between VGG blocks: 'max' (torchvision), 'avg' (piq replace_pooling), 'l2' (piq)."""
  if pooling == 'max':
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  if pooling == 'avg':
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  if pooling == 'l2':
    return l2_pool(x)
  raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')


def to_rgb(x):
  """Repeat a grey (C=1) NHWC batch to 3 channels; 3-channel input passes through."""
  if x.shape[-1] == 1:
    return jnp.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f'expected 1 or 3 channels (NHWC), got shape {x.shape}')
  return x


def imagenet_standardize(x01):
  """(x - mean) / std with the ImageNet statistics, for x in [0, 1] (piq / torchvision)."""
  mean = jnp.asarray(IMAGENET_MEAN, x01.dtype)
  std = jnp.asarray(IMAGENET_STD, x01.dtype)
  return (x01 - mean) / std


# ------------------------------------------------------------------------------------------------
# Networks.


class VGG16Features(nn.Module):
  """torchvision `vgg16().features` (Simonyan & Zisserman 2015): 13 3x3 convs + ReLU in 5 blocks.

  Returns the 5 block outputs relu1_2 ... relu5_3 (before each block's pool); with
  `include_last_pool` a 6th entry, the pooled relu5_3 (torchvision's pool5), is appended.
  Conv modules are named `conv<i>` after torchvision's `features.<i>` index. Input: a batch
  already standardised with the ImageNet statistics. `widths` are the blocks' channel counts
  (smaller values only for tests).
  """
  widths: Sequence[int] = VGG16_WIDTHS
  pooling: str = 'max'
  include_last_pool: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    feats = []
    h = x.astype(self.dtype)
    for b, (block, width) in enumerate(zip(VGG16_BLOCKS, self.widths)):
      if b > 0:
        h = pool2d(h, self.pooling)
      for idx in block:
        h = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    name=f'conv{idx}')(h)
        h = nn.relu(h)
      feats.append(h)
    if self.include_last_pool:
      feats.append(pool2d(h, self.pooling))
    return feats


def _unit_normalize(f):
  """f / (|f|_channels + 1e-10), with a zero (not NaN) gradient where a feature vector is 0."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  safe = jnp.where(sq > 0, sq, 1.0)
  norm = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
  return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS distance (Zhang et al. 2018, Eq. 1) between NHWC batches a, b in [-1, 1] -> (B,).

  Grey inputs are repeated to RGB; if `resize_to` is set and the height is below 256 both are
  resized bilinearly to resize_to x resize_to (CTM: 224); then x -> ((x + 1) / 2 - mean) / std
  (piq's ImageNet standardisation). Params: `vgg` (the `VGG16Features` tree) and `lin0..lin4`
  (the per-channel weights w_l >= 0 of the 1x1 'lin' heads, shape (C_l,)).
  """
  pooling: str = 'avg'
  widths: Sequence[int] = VGG16_WIDTHS

  @nn.compact
  def __call__(self, a, b, resize_to: Optional[int] = 224):
    if a.shape != b.shape:
      raise ValueError(f'LPIPS inputs differ in shape: {a.shape} vs {b.shape}')
    vgg = VGG16Features(self.widths, self.pooling, name='vgg')

    def features(x):
      x = to_rgb(x.astype(jnp.float32))
      if resize_to is not None and x.shape[1] < 256:
        x = resize_bilinear(x, (resize_to, resize_to))
      return vgg(imagenet_standardize((x + 1.0) / 2.0))

    total = 0.0
    # Two passes rather than one on concat([a, b]): a gradient w.r.t. a alone skips b's backward.
    for l, (fa, fb) in enumerate(zip(features(a), features(b))):
      w = self.param(f'lin{l}', lambda key, shape: jnp.full(shape, 1.0 / shape[0]), (fa.shape[-1],))
      d = jnp.square(_unit_normalize(fa) - _unit_normalize(fb))
      total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
    return total


def lpips_widths(params) -> Tuple[int, ...]:
  """Block widths of an LPIPS params tree (from the last conv of each block)."""
  return tuple(int(params['vgg'][f'conv{block[-1]}']['kernel'].shape[-1]) for block in VGG16_BLOCKS)


@functools.partial(jax.jit, static_argnames=('pooling', 'resize_to'))
def lpips_distance(params, a, b, *, pooling: str = 'avg', resize_to: Optional[int] = 224):
  """LPIPS(a, b) per example, (B,), for NHWC a, b in [-1, 1] (C = 1 or 3); see `LPIPS`.

  pooling='avg' with resize_to=224 is CTM's piq `LPIPS(replace_pooling=True)`. Differentiable in
  a and b; `params` (from `load_lpips_params`) is treated as a constant.
  """
  if pooling not in POOLINGS:
    raise ValueError(f'pooling must be one of {POOLINGS}, got {pooling!r}')
  params = jax.lax.stop_gradient(params)
  return LPIPS(pooling=pooling, widths=lpips_widths(params)).apply(
      {'params': params}, a, b, resize_to=resize_to)


# ------------------------------------------------------------------------------------------------
# Weight files.


def lpips_npz_keys() -> Tuple[str, ...]:
  """The names an LPIPS .npz must hold: torchvision VGG16 convs + LPIPS v0.1 lin heads."""
  keys = []
  for i in VGG16_CONV_INDICES:
    keys += [f'features.{i}.weight', f'features.{i}.bias']
  keys += [f'lin{l}.model.1.weight' for l in range(len(VGG16_BLOCKS))]
  return tuple(keys)


def lpips_params_from_state_dict(sd: Mapping[str, np.ndarray]) -> Dict:
  """Convert torch-named arrays (conv OIHW, lin [1, C, 1, 1]) into the `LPIPS` params tree."""
  expected = set(lpips_npz_keys())
  missing = sorted(expected - set(sd), key=lpips_npz_keys().index)
  unexpected = sorted(set(sd) - expected)
  if missing or unexpected:
    raise ValueError(f'LPIPS weights do not match the expected names; missing: {missing}; '
                     f'unexpected: {unexpected}')
  vgg = {}
  c_in = 3
  for block in VGG16_BLOCKS:
    for i in block:
      w = np.asarray(sd[f'features.{i}.weight'], np.float32)
      bias = np.asarray(sd[f'features.{i}.bias'], np.float32)
      if w.ndim != 4 or w.shape[1:] != (c_in, 3, 3) or bias.shape != (w.shape[0],):
        raise ValueError(f'features.{i}: expected weight [O, {c_in}, 3, 3] and bias [O], got '
                         f'{w.shape} and {bias.shape}')
      vgg[f'conv{i}'] = {'kernel': np.transpose(w, (2, 3, 1, 0)), 'bias': bias}
      c_in = w.shape[0]
  params = {'vgg': vgg}
  for l, block in enumerate(VGG16_BLOCKS):
    c = vgg[f'conv{block[-1]}']['kernel'].shape[-1]
    w = np.asarray(sd[f'lin{l}.model.1.weight'], np.float32)
    if w.shape != (1, c, 1, 1):
      raise ValueError(f'lin{l}.model.1.weight: expected shape (1, {c}, 1, 1), got {w.shape}')
    if np.any(w < 0):
      raise ValueError(f'lin{l}.model.1.weight has negative entries; LPIPS heads are >= 0')
    params[f'lin{l}'] = w.reshape(c)
  return jax.tree_util.tree_map(jnp.asarray, params)


def load_lpips_params(path) -> Dict:
  """LPIPS params from an .npz with keys `features.<i>.weight|bias` and `lin<l>.model.1.weight`."""
  from ctm_jax import fileio
  sd = fileio.load_npz(path)
  try:
    return lpips_params_from_state_dict(sd)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None


def lpips_state_dict_from_torch_files(vgg_path, heads_path) -> Dict[str, np.ndarray]:
  """The LPIPS .npz arrays from the original files, read torch-free (`torch_archive`):
  torchvision's VGG16 state dict (`vgg16-397923af.pth`; `features.*` kept, `classifier.*` unused)
  and the heads, either the lpips package's `weights/v0.1/vgg.pth` (`lin<l>.model.1.weight`) or
  piq's `lpips_weights.pt` (a list of five [C] tensors)."""
  from ctm_jax.official_weights import load_state_dict_file
  sd = {k: v for k, v in load_state_dict_file(vgg_path).items() if k.startswith('features.')}
  heads = load_state_dict_file(heads_path)
  if all(k.isdigit() for k in heads):         # piq: a list of per-layer weights
    heads = {f'lin{int(k)}.model.1.weight': np.asarray(v).reshape(1, -1, 1, 1)
             for k, v in heads.items()}
  sd.update(heads)
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  try:
    lpips_params_from_state_dict(sd)          # names, shapes and non-negative heads
  except ValueError as e:
    raise ValueError(f'{vgg_path} + {heads_path}: {e}') from None
  return sd


def random_lpips_npz(path, seed: int = 0, widths: Sequence[int] = VGG16_WIDTHS):
  """Write an LPIPS .npz with random weights (He-normal convs, U[0, 2/C) heads) and return path.

  For tests and smoke runs only: the result is NOT a perceptual metric. `widths` other than
  VGG16's (64, 128, 256, 512, 512) give a smaller network with the same layer names.
  """
  rng = np.random.default_rng(seed)
  sd = {}
  c_in = 3
  for block, width in zip(VGG16_BLOCKS, widths):
    for i in block:
      sd[f'features.{i}.weight'] = (rng.standard_normal((width, c_in, 3, 3))
                                    * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
      sd[f'features.{i}.bias'] = (0.1 * rng.standard_normal(width)).astype(np.float32)
      c_in = width
  for l, width in enumerate(widths):
    w = rng.uniform(0.0, 2.0 / width, (1, width, 1, 1))
    sd[f'lin{l}.model.1.weight'] = w.astype(np.float32)
  from ctm_jax import fileio
  fileio.save_npz(path, **sd)
  return path
