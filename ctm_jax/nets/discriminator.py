"""Discriminators and hinge losses for CTM's GAN term (Kim et al. 2024, Sec. 4.3; flax, NHWC).

Two discriminators with one interface, both mapping x in [-1, 1] (B, H, W, C) to a list of logit
arrays (B, n_i):
  * `ConvDiscriminator`: a from-scratch SN-GAN-style network for small images (Miyato et al. 2018):
    spectrally normalised convs, leaky ReLU 0.2, stride-2 4x4 convs down to 4x4 (or the input size
    if smaller), global mean pooling, a linear logit and an optional class projection
    (Miyato & Koyama 2018). One logit array of shape (B, 1).
  * `ProjectedDiscriminator`: Projected GAN (Sauer et al. 2021) as CTM uses it (`pg_modules`): a
    frozen pretrained feature network, fixed random cross-channel (CCM, 1x1 convs) and cross-scale
    (CSM, add + x2 bilinear upsampling + 1x1 convs) projections (F_RandomProj, proj_type=2, cout=64,
    expand=True) and 4 trainable MultiScaleD heads (SN conv4x4/2 + BatchNorm + leaky ReLU blocks
    down to <= 8x8, then an SN conv4x4 to one channel). The reference has two such branches, on
    DeiT-B (deit_base_distilled_patch16_224) and EfficientNet-lite0 features; we ship neither and
    use one branch on the torchvision VGG16 of `lpips.py` instead (ImageNet weights, max pooling),
    at strides 4, 8, 16, 32 like EfficientNet: relu3_3, relu4_3, relu5_3 and pool5. At 224x224
    input these are 56, 28, 14, 7 pixels as in the reference, so the heads (after the CSM's x2
    upsampling: 112, 56, 28, 14 px, 64/64/128/256 channels) are the reference's: 4, 3, 2, 1 down
    blocks and 4x4 logits each.

Variables: 'params' (trainable), 'batch_stats' (spectral-norm power-iteration vectors u and sigma,
BatchNorm running statistics) and, for the projected one, 'projection' (the fixed random
projections; drawn at init, never trained or updated). The frozen backbone weights are not
variables of the module: they are passed to every call (`backbone_params`).

Use: `disc = build_discriminator('conv' | 'projected', **fields)`;
`params, state = init_discriminator(disc, key, x, labels, backbone_params=...)`;
`logits, state = apply_discriminator(disc, params, state, x, labels, train=..., update_stats=...,
backbone_params=...)`. Apply DiffAugment (`ctm_jax.diffaug`) to x before the call, as the
reference does inside its feature function.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctm_jax.nets import lpips as lpips_lib

KINDS = ('conv', 'projected')


def _sn_conv(features, kernel, stride, padding, use_bias, name):
  """A spectrally normalised nn.Conv (flax SpectralNorm: one power iteration per call)."""
  conv = nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias, name=name)
  return nn.SpectralNorm(conv, name=f'{name}_sn')


def _class_index(labels):
  """Integer labels (B,) from integer or one-hot (B, K) labels."""
  labels = jnp.asarray(labels)
  return jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels.astype(jnp.int32)


class ConvDiscriminator(nn.Module):
  """SN conv discriminator for small images -> [logits (B, 1)].

  stem SN conv3x3 (base_channels) + lrelu, then SN conv4x4 stride 2 + lrelu (channels doubled,
  capped at max_channels) while the side is above 4, global mean pool, SN linear -> 1, plus
  <SN-embed(y), h> when num_classes > 0 (projection discriminator). `train` is accepted for the
  common interface (no layer here depends on it); `update_stats` stores the power iterations.
  """
  base_channels: int = 64
  max_channels: int = 512
  num_classes: int = 0
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x, labels=None, *, train: bool, update_stats: bool,
               backbone_params=None) -> List[jax.Array]:
    del train, backbone_params
    h = _sn_conv(self.base_channels, 3, 1, 1, True, 'stem')(x.astype(jnp.float32),
                                                          update_stats=update_stats)
    h = nn.leaky_relu(h, self.negative_slope)
    ch, i = self.base_channels, 0
    while min(h.shape[1], h.shape[2]) > 4:
      ch = min(2 * ch, self.max_channels)
      h = _sn_conv(ch, 4, 2, 1, True, f'down{i}')(h, update_stats=update_stats)
      h = nn.leaky_relu(h, self.negative_slope)
      i += 1
    pooled = jnp.mean(h, axis=(1, 2))
    out = nn.SpectralNorm(nn.Dense(1, name='out'), name='out_sn')(pooled, update_stats=update_stats)
    if self.num_classes:
      if labels is None:
        raise ValueError('ConvDiscriminator(num_classes > 0) needs labels')
      emb = nn.SpectralNorm(nn.Embed(self.num_classes, h.shape[-1], name='embed'),
                            name='embed_sn')(_class_index(labels), update_stats=update_stats)
      out = out + jnp.sum(emb * pooled, axis=-1, keepdims=True)
    return [out]


def _torch_default_uniform(fan_in):
  """torch Conv2d default init (weights and biases): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  return init


class ProjectedDiscriminator(nn.Module):
  """Projected GAN discriminator on frozen VGG16 features -> 4 logit arrays (B, n_i), one per scale.

  x in [-1, 1] (grey repeated to RGB) -> bilinear to resize_to x resize_to when H < 256 (reference
  `interp224`) -> (x + 1) / 2 -> ImageNet standardisation -> VGG16 (`backbone_params`, stop-gradient
  on the weights, gradient flows to x) -> fixed random CCM/CSM -> per-scale heads.
  num_classes > 0 adds the reference's SingleDiscCond projection with a learned (not pretrained)
  class embedding; CTM's runs are unconditional.
  """
  resize_to: Optional[int] = 224
  cout: int = 64
  expand: bool = True
  end_size: int = 8
  num_classes: int = 0
  cmap_dim: int = 64
  embed_dim: int = 256
  head_norm: bool = True
  negative_slope: float = 0.2

  def _proj(self, name, x, c_out):
    """A fixed 1x1 conv whose weights live in the 'projection' collection (torch default init)."""
    c_in = x.shape[-1]
    w = self.variable('projection', f'{name}_kernel',
                      lambda: _torch_default_uniform(c_in)(self.make_rng('params'), (c_in, c_out)))
    b = self.variable('projection', f'{name}_bias',
                      lambda: _torch_default_uniform(c_in)(self.make_rng('params'), (c_out,)))
    return jnp.einsum('bhwc,cd->bhwd', x, w.value) + b.value

  def _head(self, i, f, labels, train, update_stats):
    """MultiScaleD SingleDisc(Cond): DownBlocks to <= end_size, then an SN conv4x4 (no bias)."""
    size = min(f.shape[1], f.shape[2])
    n_down = 0
    while size > self.end_size:
      size //= 2
      n_down += 1
    h = f
    for k in range(n_down):
      remaining = n_down - 1 - k
      # nfc_midas by output size: 8 -> 512, 16 -> 256, 32 -> 128, >= 64 -> 64
      width = 512 // (2 ** remaining) if remaining < 3 else 64
      h = _sn_conv(width, 4, 2, 1, True, f'head{i}_down{k}')(h, update_stats=update_stats)
      if self.head_norm:
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         name=f'head{i}_down{k}_bn')(h)
      h = nn.leaky_relu(h, self.negative_slope)
    k_out = min(4, h.shape[1], h.shape[2])
    c_out = self.cmap_dim if self.num_classes else 1
    out = _sn_conv(c_out, k_out, 1, 0, False, f'head{i}_out')(h, update_stats=update_stats)
    if self.num_classes:
      emb = nn.Embed(self.num_classes, self.embed_dim, name=f'head{i}_embed')(_class_index(labels))
      cmap = nn.leaky_relu(nn.Dense(self.cmap_dim, name=f'head{i}_embed_proj')(emb), 0.2)
      out = jnp.sum(out * cmap[:, None, None, :], axis=-1, keepdims=True) / math.sqrt(self.cmap_dim)
    return out.reshape(out.shape[0], -1)

  @nn.compact
  def __call__(self, x, labels=None, *, train: bool, update_stats: bool,
               backbone_params=None) -> List[jax.Array]:
    if backbone_params is None:
      raise ValueError('ProjectedDiscriminator needs backbone_params (VGG16 weights, e.g. '
                       'load_lpips_params(path)["vgg"])')
    if self.num_classes and labels is None:
      raise ValueError('ProjectedDiscriminator(num_classes > 0) needs labels')
    vgg_params = jax.lax.stop_gradient(backbone_params)
    widths = tuple(int(vgg_params[f'conv{b[-1]}']['kernel'].shape[-1])
                   for b in lpips_lib.VGG16_BLOCKS)
    x = lpips_lib.to_rgb(x.astype(jnp.float32))
    if self.resize_to is not None and x.shape[1] < 256:
      x = lpips_lib.resize_bilinear(x, (self.resize_to, self.resize_to))
    if x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f'ProjectedDiscriminator: the backbone input must have sides divisible '
                       f'by 32 (VGG16 strides up to 32), got {x.shape[1:3]}; set resize_to '
                       f'(e.g. 224)')
    x = lpips_lib.imagenet_standardize((x + 1.0) / 2.0)
    feats = lpips_lib.VGG16Features(widths, pooling='max', include_last_pool=True).apply(
        {'params': vgg_params}, x)[2:]                        # relu3_3, relu4_3, relu5_3, pool5
    # CCM: 1x1 convs to cout * (1, 2, 4, 8) (expand) or cout channels.
    mult = (1, 2, 4, 8) if self.expand else (1, 1, 1, 1)
    ccm = [self._proj(f'layer{i}_ccm', f, self.cout * m)
           for i, (f, m) in enumerate(zip(feats, mult))]
    # CSM (FeatureFusionBlock): from the coarsest level, add the finer CCM output, x2 bilinear
    # (align_corners=True), 1x1 conv halving the channels (expand; not on level 0).
    outs = [None] * 4
    h = None
    for i in (3, 2, 1, 0):
      h = ccm[i] if h is None else h + ccm[i]
      h = lpips_lib.resize_bilinear(h, (2 * h.shape[1], 2 * h.shape[2]), align_corners=True)
      c = h.shape[-1] // 2 if (self.expand and i > 0) else h.shape[-1]
      h = self._proj(f'layer{i}_csm', h, c)
      outs[i] = h
    return [self._head(i, f, labels, train, update_stats) for i, f in enumerate(outs)]


# ------------------------------------------------------------------------------------------------
# Functional API.


def build_discriminator(kind: str, **fields) -> nn.Module:
  """`ConvDiscriminator(**fields)` ('conv') or `ProjectedDiscriminator(**fields)` ('projected')."""
  if kind == 'conv':
    return ConvDiscriminator(**fields)
  if kind == 'projected':
    return ProjectedDiscriminator(**fields)
  raise ValueError(f'discriminator kind must be one of {KINDS}, got {kind!r}')


def init_discriminator(disc: nn.Module, key, example_x, labels=None, *,
                       backbone_params=None) -> Tuple[Dict, Dict]:
  """(params, state): trainable 'params'; state = other collections (batch_stats, projection)."""
  variables = disc.init({'params': key}, example_x, labels, train=False, update_stats=False,
                        backbone_params=backbone_params)
  variables = dict(variables)
  params = variables.pop('params')
  return params, variables


def apply_discriminator(disc: nn.Module, params, state, x, labels=None, *, train: bool,
                        update_stats: bool, backbone_params=None):
  """(list of logits (B, n_i), new_state); state changes only when update_stats is True.

  train: BatchNorm on batch statistics (the reference keeps D in train mode in both G and D
  steps); update_stats: store the spectral-norm power iteration and BatchNorm running averages.
  """
  variables = {'params': params, **state}
  if not (train or update_stats):
    return disc.apply(variables, x, labels, train=False, update_stats=False,
                      backbone_params=backbone_params), state
  logits, updates = disc.apply(variables, x, labels, train=train, update_stats=update_stats,
                               backbone_params=backbone_params, mutable=['batch_stats'])
  if not update_stats:
    return logits, state
  return logits, {**state, **updates}


# ------------------------------------------------------------------------------------------------
# Losses (reference: cm/karras_diffusion.py get_GAN_loss).


def hinge_d_loss(logits_real: Sequence[jax.Array], logits_fake: Sequence[jax.Array]):
  """mean_i mean relu(1 - real_i) + mean_i mean relu(1 + fake_i); i runs over the heads."""
  real = sum(jnp.mean(jax.nn.relu(1.0 - l.astype(jnp.float32))) for l in logits_real)
  fake = sum(jnp.mean(jax.nn.relu(1.0 + l.astype(jnp.float32))) for l in logits_fake)
  return real / len(logits_real) + fake / len(logits_fake)


def generator_loss(logits_fake: Sequence[jax.Array]):
  """mean_i mean(-fake_i) over heads i (the non-saturating hinge generator loss)."""
  return sum(jnp.mean(-l.astype(jnp.float32)) for l in logits_fake) / len(logits_fake)
