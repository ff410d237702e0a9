"""ADM U-Net (EDM `DhariwalUNet`) in flax.linen, NHWC, with the optional CTM s-input.

Architecture: Dhariwal & Nichol 2021 (openai/guided-diffusion `UNetModel` with scale-shift norm,
resblock up/down, 64 channels per head), as re-implemented in NVlabs/edm `DhariwalUNet`
(Karras et al. 2022, App. F.3). The CTM ImageNet-64 student (Kim et al. 2024; sony/ctm
`cm/unet.py`) adds `time_embed_s`, an MLP on the positional embedding of s, and an `emb_layers_s`
projection in every residual block that is added to the block's `emb_layers` output. Here these are
`map_layer0_s` / `map_layer1_s` and `affine_s`; the class embedding enters the t path only.

c_noise for this net is 250 ln(t) (CM/CTM ImageNet-64). The module returns the raw F; the caller
applies c_skip / c_out. Names follow EDM (`enc_64x64_block0.affine`); `torch_port.py` also reads
openai-style names (`input_blocks.1.0.emb_layers.1`).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ctm_jax.nets.layers import (Conv2d, InitSpec, Linear, as_label_matrix, call_block,
                                 group_norm, label_dropout_mask, positional_embedding,
                                 unet_block_class)

Dtype = Any

_INIT = InitSpec('kaiming_uniform', init_weight=float(np.sqrt(1 / 3)),
                 init_bias=float(np.sqrt(1 / 3)))
_INIT_ZERO = InitSpec('kaiming_uniform', init_weight=0.0, init_bias=0.0)


def dhariwal_unet_layout(m: 'DhariwalUNet') -> Tuple[List[tuple], List[tuple]]:
  """Encoder / decoder entries (name, kind, channels, attention) in the torch ModuleDict order.

  kinds: conv | down | block (encoder); in | up | block (decoder; `block` takes a skip concat).
  """
  enc, dec = [], []
  cout = m.in_channels
  for level, mult in enumerate(m.channel_mult):
    res = m.img_resolution >> level
    if level == 0:
      cout = m.model_channels * mult
      enc.append((f'{res}x{res}_conv', 'conv', cout, False))
    else:
      enc.append((f'{res}x{res}_down', 'down', cout, False))
    for idx in range(m.num_blocks):
      cout = m.model_channels * mult
      enc.append((f'{res}x{res}_block{idx}', 'block', cout, res in m.attn_resolutions))
  last = len(m.channel_mult) - 1
  for level, mult in reversed(list(enumerate(m.channel_mult))):
    res = m.img_resolution >> level
    if level == last:
      dec.append((f'{res}x{res}_in0', 'in', cout, True))
      dec.append((f'{res}x{res}_in1', 'in', cout, False))
    else:
      dec.append((f'{res}x{res}_up', 'up', cout, False))
    for idx in range(m.num_blocks + 1):
      cout = m.model_channels * mult
      dec.append((f'{res}x{res}_block{idx}', 'block', cout, res in m.attn_resolutions))
  return enc, dec


class DhariwalUNet(nn.Module):
  """ADM U-Net (EDM `DhariwalUNet`), NHWC, optional CTM s-conditioning.

  Call: `F = net.apply(variables, x, noise_labels, noise_labels_s=None, class_labels=None,
  augment_labels=None, train=False, rngs={'dropout': key})`; x = c_in * x_t [B, R, R, C],
  noise labels (B,) = 250 ln(t) (and 250 ln(s)). Returns float32 F with `out_channels` channels.
  Embedding (EDM): emb = silu(map_layer1(silu(map_layer0(pe(t)))) + map_label(y)), pe = [cos, sin];
  emb_s = silu(map_layer1_s(silu(map_layer0_s(pe(s))))) (sony/ctm `time_embed_s`).
  """
  img_resolution: int
  in_channels: int = 3
  out_channels: Optional[int] = None
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  channels_per_head: int = 64
  norm_groups: int = 0           # GroupNorm groups; 0: EDM's min(32, C // 4); openai: 32
  use_s: bool = False
  remat: str = 'none'            # none | blocks | blocks_save_dots (layers.unet_block_class)
  dtype: Dtype = jnp.float32

  @property
  def out_ch(self) -> int:
    return self.out_channels if self.out_channels is not None else self.in_channels

  def _block(self, name, cout, **kw):
    return unet_block_class(self.remat)(
        out_channels=cout, channels_per_head=self.channels_per_head, dropout=self.dropout,
        skip_scale=1.0, eps=1e-5, norm_groups=self.norm_groups, resample_filter=(1, 1),
        resample_proj=False,
        adaptive_scale=True, use_s=self.use_s, init_kw=_INIT, init_zero_kw=_INIT_ZERO,
        dtype=self.dtype, name=name, **kw)

  @nn.compact
  def __call__(self, x, noise_labels, noise_labels_s=None, class_labels=None,
               augment_labels=None, train: bool = False):
    if self.use_s and noise_labels_s is None:
      raise ValueError('DhariwalUNet(use_s=True) needs noise_labels_s (pass c_noise(t) for s = t)')
    if not self.use_s and noise_labels_s is not None:
      raise ValueError('noise_labels_s given but the module was built with use_s=False')
    b = x.shape[0]
    if x.shape[1:] != (self.img_resolution, self.img_resolution, self.in_channels):
      raise ValueError(f'expected NHWC input [B,{self.img_resolution},{self.img_resolution},'
                       f'{self.in_channels}], got {x.shape}')
    mc = self.model_channels
    emb_ch = mc * self.channel_mult_emb

    # Mapping (float32).
    emb = positional_embedding(noise_labels, mc, endpoint=False, order='cos_sin')
    if self.augment_dim:
      aug = (jnp.zeros((b, self.augment_dim), jnp.float32) if augment_labels is None
             else augment_labels.astype(jnp.float32))
      emb = emb + Linear(mc, use_bias=False, init_kw=_INIT_ZERO, dtype=jnp.float32,
                         name='map_augment')(aug)
    emb = nn.silu(Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name='map_layer0')(emb))
    emb = Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name='map_layer1')(emb)
    if self.label_dim:
      labels = as_label_matrix(class_labels, self.label_dim, b)
      keep = label_dropout_mask(self, self.label_dropout, b, train)
      if keep is not None:
        labels = labels * keep
      label_init = InitSpec('kaiming_normal', init_weight=float(np.sqrt(self.label_dim)))
      emb = emb + Linear(emb_ch, use_bias=False, init_kw=label_init, dtype=jnp.float32,
                         name='map_label')(labels)
    emb = nn.silu(emb)
    emb_s = None
    if self.use_s:
      emb_s = positional_embedding(noise_labels_s, mc, endpoint=False, order='cos_sin')
      for name in ('map_layer0_s', 'map_layer1_s'):
        emb_s = nn.silu(Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name=name)(emb_s))

    enc, dec = dhariwal_unet_layout(self)
    x = x.astype(self.dtype)
    skips = []
    for name, kind, ch, attn in enc:
      if kind == 'conv':
        x = Conv2d(ch, 3, init_kw=_INIT, dtype=self.dtype, name=f'enc_{name}')(x)
      else:
        x = call_block(self._block(f'enc_{name}', ch, down=(kind == 'down'), attention=attn),
                       x, emb, emb_s, train, self.remat)
      skips.append(x)
    for name, kind, ch, attn in dec:
      if kind == 'block':
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = call_block(self._block(f'dec_{name}', ch, up=(kind == 'up'), attention=attn),
                     x, emb, emb_s, train, self.remat)
    x = nn.silu(group_norm(x.shape[-1], 1e-5, self.dtype, 'out_norm', self.norm_groups)(x))
    x = Conv2d(self.out_ch, 3, init_kw=_INIT_ZERO, dtype=self.dtype, name='out_conv')(x)
    return x.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Presets.

def imagenet64_adm(use_s: bool, label_dim: int = 1000, **overrides) -> DhariwalUNet:
  """EDM / CM ImageNet-64 ADM: 192 ch, mult 1,2,3,4, 3 blocks, attention at 32,16,8, 64 ch/head.

  Dropout 0.1 as in the EDM teacher (`--dropout=0.10`); the CTM student runs with dropout 0
  (pass dropout=0.0). 295,899,267 params (teacher) / 324,100,611 (student).
  """
  kw = dict(img_resolution=64, in_channels=3, label_dim=label_dim, augment_dim=0,
            model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
            attn_resolutions=(32, 16, 8), dropout=0.10, channels_per_head=64, use_s=use_s)
  kw.update(overrides)
  return DhariwalUNet(**kw)


def tiny_adm(use_s: bool = True, label_dim: int = 0, **overrides) -> DhariwalUNet:
  """Test-sized ADM for 8x8x3 inputs: resolutions 8 and 4, 128 channels, 2 heads of 64 at 4x4.

  128 channels keep EDM's min(32, C // 4) GroupNorm rule equal to openai's 32 groups, so this
  net is also an exact openai UNetModel (as for the full ImageNet-64 config).
  """
  kw = dict(img_resolution=8, in_channels=3, label_dim=label_dim, augment_dim=0,
            model_channels=128, channel_mult=(1, 1), num_blocks=1,
            attn_resolutions=(4,), dropout=0.0, channels_per_head=64, use_s=use_s)
  kw.update(overrides)
  return DhariwalUNet(**kw)


PRESETS = {'imagenet64_adm': imagenet64_adm, 'tiny_adm': tiny_adm}
