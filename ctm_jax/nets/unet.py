"""EDM `SongUNet` (DDPM++ / NCSN++) in flax.linen, NHWC, with the optional CTM s-input.

Architecture: Song et al. 2021 (score SDE) as re-implemented by Karras et al. 2022 (EDM,
NVlabs/edm `training/networks.py`, `SongUNet`). The CTM student (Kim et al. 2024,
Kim-Dongjun/ctm-cifar10 `cm/networks.py`) adds a second time input s: s gets the same noise
embedding and its own mapping MLP (`map_layer0_s`, `map_layer1_s`), and every `UNetBlock` adds
`affine_s(emb_s)` to `affine(emb)` before `norm1`.

The module computes the raw network output F(c_in x, c_noise(t)[, c_noise(s)]); the caller applies
the preconditioning (EDM Eq. 7: D = c_skip x + c_out F). Submodules are named after the torch
modules (`enc.16x16_block0` -> `enc_16x16_block0`), so torch weights map mechanically
(`torch_port.py`) and a CTM student can take an EDM teacher's parameters by name.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ctm_jax.nets.layers import (Conv2d, FourierEmbedding, InitSpec, Linear, as_label_matrix,
                                 call_block, group_norm, label_dropout_mask, positional_embedding,
                                 unet_block_class, upsample2d, downsample2d)

Dtype = Any

_INIT = InitSpec('xavier_uniform')
_INIT_ZERO = InitSpec('xavier_uniform', init_weight=1e-5)
_INIT_ATTN = InitSpec('xavier_uniform', init_weight=float(np.sqrt(0.2)))


def song_unet_layout(m: 'SongUNet') -> Tuple[List[tuple], List[tuple]]:
  """The encoder / decoder entries of `m` in the torch ModuleDict order.

  Each entry is (name, kind, channels, attention) with kind one of
  conv | down | block | aux_down | aux_skip | aux_residual (encoder) and
  in | up | block | aux_up | aux_norm | aux_conv (decoder; decoder `block`s take a skip concat).
  """
  enc, dec = [], []
  cout = m.in_channels
  caux = m.in_channels
  skips = []
  for level, mult in enumerate(m.channel_mult):
    res = m.img_resolution >> level
    if level == 0:
      cout = m.model_channels
      enc.append((f'{res}x{res}_conv', 'conv', cout, False))
      skips.append(cout)
    else:
      enc.append((f'{res}x{res}_down', 'down', cout, False))
      skips.append(cout)
      if m.encoder_type == 'skip':
        enc.append((f'{res}x{res}_aux_down', 'aux_down', caux, False))
        enc.append((f'{res}x{res}_aux_skip', 'aux_skip', cout, False))
      if m.encoder_type == 'residual':
        enc.append((f'{res}x{res}_aux_residual', 'aux_residual', cout, False))
        caux = cout
    for idx in range(m.num_blocks):
      cout = m.model_channels * mult
      enc.append((f'{res}x{res}_block{idx}', 'block', cout, res in m.attn_resolutions))
      skips.append(cout)
  last = len(m.channel_mult) - 1
  for level, mult in reversed(list(enumerate(m.channel_mult))):
    res = m.img_resolution >> level
    if level == last:
      dec.append((f'{res}x{res}_in0', 'in', cout, True))
      dec.append((f'{res}x{res}_in1', 'in', cout, False))
    else:
      dec.append((f'{res}x{res}_up', 'up', cout, False))
    for idx in range(m.num_blocks + 1):
      skips.pop()
      cout = m.model_channels * mult
      dec.append((f'{res}x{res}_block{idx}', 'block', cout,
                  idx == m.num_blocks and res in m.attn_resolutions))
    if m.decoder_type == 'skip' or level == 0:
      if m.decoder_type == 'skip' and level < last:
        dec.append((f'{res}x{res}_aux_up', 'aux_up', m.out_ch, False))
      dec.append((f'{res}x{res}_aux_norm', 'aux_norm', cout, False))
      dec.append((f'{res}x{res}_aux_conv', 'aux_conv', m.out_ch, False))
  return enc, dec


class SongUNet(nn.Module):
  """DDPM++ / NCSN++ U-Net (EDM `SongUNet`), NHWC, optional CTM s-conditioning.

  Call: `F = net.apply(variables, x, noise_labels, noise_labels_s=None, class_labels=None,
  augment_labels=None, train=False, rngs={'dropout': key})`, with x = c_in * x_t of shape
  [B, R, R, C] and noise labels c_noise of shape (B,) (ln(t)/4 for DDPM++). Returns float32 F.

  class_labels: int (B,) or one-hot/float (B, label_dim); None -> zeros (EDM default).
  augment_labels: (B, augment_dim) or None (-> zeros; the `map_augment` weights always exist).
  label_on_s: add the class embedding to the s path too. The CTM CIFAR-10 reference
  (Kim-Dongjun/ctm-cifar10 `SongUNet.forward`) does this with the shared `map_label`; set False
  for a t-only class embedding. Augment labels only enter the t path.
  """
  img_resolution: int
  in_channels: int = 3
  out_channels: Optional[int] = None
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = 'positional'
  fourier_scale: float = 16.0       # std of the Fourier frequencies (NCSN++: 16; iCT: 0.02)
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  decoder_type: str = 'standard'
  resample_filter: Sequence[int] = (1, 1)
  use_s: bool = False
  label_on_s: bool = True
  remat: str = 'none'            # none | blocks | blocks_save_dots (layers.unet_block_class)
  dtype: Dtype = jnp.float32

  @property
  def out_ch(self) -> int:
    return self.out_channels if self.out_channels is not None else self.in_channels

  def _block(self, name, cout, **kw):
    return unet_block_class(self.remat)(
        out_channels=cout, num_heads=1, dropout=self.dropout, skip_scale=float(np.sqrt(0.5)),
        eps=1e-6, resample_filter=tuple(self.resample_filter), resample_proj=True,
        adaptive_scale=False, use_s=self.use_s, init_kw=_INIT, init_zero_kw=_INIT_ZERO,
        init_attn_kw=_INIT_ATTN, dtype=self.dtype, name=name, **kw)

  @nn.compact
  def __call__(self, x, noise_labels, noise_labels_s=None, class_labels=None,
               augment_labels=None, train: bool = False):
    if self.embedding_type not in ('positional', 'fourier'):
      raise ValueError(f'embedding_type {self.embedding_type!r}')
    if self.encoder_type not in ('standard', 'skip', 'residual'):
      raise ValueError(f'encoder_type {self.encoder_type!r}')
    if self.decoder_type not in ('standard', 'skip'):
      raise ValueError(f'decoder_type {self.decoder_type!r}')
    if self.use_s and noise_labels_s is None:
      raise ValueError('SongUNet(use_s=True) needs noise_labels_s (pass c_noise(t) for s = t)')
    if not self.use_s and noise_labels_s is not None:
      raise ValueError('noise_labels_s given but the module was built with use_s=False')
    b = x.shape[0]
    if x.shape[1:] != (self.img_resolution, self.img_resolution, self.in_channels):
      raise ValueError(f'expected NHWC input [B,{self.img_resolution},{self.img_resolution},'
                       f'{self.in_channels}], got {x.shape}')
    emb_ch = self.model_channels * self.channel_mult_emb
    noise_ch = self.model_channels * self.channel_mult_noise
    rf = tuple(self.resample_filter)

    # Mapping (float32). SongUNet feeds [sin, cos] (EDM swaps the halves of [cos, sin]).
    if self.embedding_type == 'positional':
      embed = lambda n: positional_embedding(n, noise_ch, endpoint=True, order='sin_cos')
    else:
      embed = FourierEmbedding(noise_ch, scale=self.fourier_scale, order='sin_cos',
                               name='map_noise')
    emb = embed(noise_labels)
    map_label = None
    if self.label_dim:
      map_label = Linear(noise_ch, init_kw=_INIT, dtype=jnp.float32, name='map_label')
      labels = as_label_matrix(class_labels, self.label_dim, b)
      keep = label_dropout_mask(self, self.label_dropout, b, train)
      if keep is not None:
        labels = labels * keep
      labels = labels * np.sqrt(self.label_dim)
      emb = emb + map_label(labels)
    if self.augment_dim:
      aug = (jnp.zeros((b, self.augment_dim), jnp.float32) if augment_labels is None
             else augment_labels.astype(jnp.float32))
      emb = emb + Linear(noise_ch, use_bias=False, init_kw=_INIT, dtype=jnp.float32,
                         name='map_augment')(aug)
    emb = nn.silu(Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name='map_layer0')(emb))
    emb = nn.silu(Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name='map_layer1')(emb))
    emb_s = None
    if self.use_s:
      emb_s = embed(noise_labels_s)
      if map_label is not None and self.label_on_s:
        emb_s = emb_s + map_label(labels)
      for name in ('map_layer0_s', 'map_layer1_s'):
        emb_s = nn.silu(Linear(emb_ch, init_kw=_INIT, dtype=jnp.float32, name=name)(emb_s))

    enc, dec = song_unet_layout(self)
    # Encoder.
    x = x.astype(self.dtype)
    aux = x
    skips = []
    for name, kind, ch, attn in enc:
      mod = f'enc_{name}'
      if kind == 'conv':
        x = Conv2d(ch, 3, init_kw=_INIT, dtype=self.dtype, name=mod)(x)
        skips.append(x)
      elif kind == 'aux_down':
        aux = downsample2d(aux, rf)
      elif kind == 'aux_skip':
        x = skips[-1] = x + Conv2d(ch, 1, init_kw=_INIT, dtype=self.dtype, name=mod)(aux)
      elif kind == 'aux_residual':
        r = Conv2d(ch, 3, down=True, resample_filter=rf, fused_resample=True, init_kw=_INIT,
                   dtype=self.dtype, name=mod)(aux)
        x = skips[-1] = aux = (x + r) * float(np.sqrt(0.5))
      else:
        x = call_block(self._block(mod, ch, down=(kind == 'down'), attention=attn),
                       x, emb, emb_s, train, self.remat)
        skips.append(x)

    # Decoder.
    aux = tmp = None
    for name, kind, ch, attn in dec:
      mod = f'dec_{name}'
      if kind == 'aux_up':
        aux = upsample2d(aux, rf)
      elif kind == 'aux_norm':
        tmp = group_norm(x.shape[-1], 1e-6, self.dtype, mod)(x)
      elif kind == 'aux_conv':
        tmp = Conv2d(ch, 3, init_kw=_INIT_ZERO, dtype=self.dtype, name=mod)(nn.silu(tmp))
        aux = tmp if aux is None else tmp + aux
      else:
        if kind == 'block':
          x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = call_block(self._block(mod, ch, up=(kind == 'up'), attention=attn),
                       x, emb, emb_s, train, self.remat)
    return aux.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Presets.

def cifar10_ddpmpp(use_s: bool, label_dim: int = 0, **overrides) -> SongUNet:
  """EDM CIFAR-10 DDPM++ ("VP" arch): 128 ch, mult 2,2,2, 4 blocks, attention at 16, dropout 0.13.

  The EDM teacher has augment_dim=9 (its pickles carry `map_augment`); the CTM student
  (use_s=True, Kim-Dongjun/ctm-cifar10) is built without augmentation conditioning.
  55,733,891 params (teacher, uncond) / 60,395,267 (student, uncond); +1,408 when label_dim=10.
  """
  kw = dict(img_resolution=32, in_channels=3, label_dim=label_dim, augment_dim=0 if use_s else 9,
            model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
            dropout=0.13, embedding_type='positional', channel_mult_noise=1,
            encoder_type='standard', decoder_type='standard', resample_filter=(1, 1), use_s=use_s)
  kw.update(overrides)
  return SongUNet(**kw)


def cifar10_ncsnpp(use_s: bool, label_dim: int = 0, **overrides) -> SongUNet:
  """EDM CIFAR-10 NCSN++ ("VE" arch): Fourier embedding, residual encoder, [1,3,3,1] filter."""
  kw = dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
            resample_filter=(1, 3, 3, 1))
  kw.update(overrides)
  return cifar10_ddpmpp(use_s, label_dim, **kw)


def tiny(use_s: bool = True, label_dim: int = 0, **overrides) -> SongUNet:
  """Test-sized DDPM++ for 8x8x3 inputs: resolutions 8 and 4, 16/32 channels, attention at 4."""
  kw = dict(img_resolution=8, in_channels=3, label_dim=label_dim, augment_dim=0,
            model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
            attn_resolutions=(4,), dropout=0.0, use_s=use_s)
  kw.update(overrides)
  return SongUNet(**kw)


def digits(use_s: bool = True, label_dim: int = 0, **overrides) -> SongUNet:
  """DDPM++ for 8x8x1 digits: resolutions 8 and 4, 16/32 channels, 1 block, attention at 4.

  Sized for CPU: about 13 train steps/s at batch 64 on a (busy) 2-core machine; doubling the
  channels or blocks costs 2-6x.
  """
  kw = dict(img_resolution=8, in_channels=1, label_dim=label_dim, augment_dim=0,
            model_channels=16, channel_mult=(1, 2), channel_mult_emb=4, num_blocks=1,
            attn_resolutions=(4,), dropout=0.0, use_s=use_s)
  kw.update(overrides)
  return SongUNet(**kw)


PRESETS = {
    'cifar10_ddpmpp': cifar10_ddpmpp,
    'cifar10_ncsnpp': cifar10_ncsnpp,
    'tiny': tiny,
    'digits': digits,
}
