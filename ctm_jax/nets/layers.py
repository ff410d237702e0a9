"""Building blocks shared by the EDM-family U-Nets (flax.linen, NHWC).

The layers follow the semantics of NVlabs/edm `training/networks.py` (Karras et al. 2022,
App. B/F): EDM weight init, convolutions with built-in FIR up/down-sampling, GroupNorm with
`min(32, C // 4)` groups, and the unified `UNetBlock` used by DDPM++, NCSN++ and ADM. The one
addition is the CTM second time input (Kim et al. 2024, Sec. 4 / App. C): `use_s` gives each
block an `affine_s` projection of the s-embedding that is added to its `affine(emb)`.

Parameters are float32; `dtype` is the compute dtype of convolutions and norms. Parameter leaves
use flax names (`kernel` HWIO / [in, out], `scale`, `bias`); `torch_port.py` maps the torch names.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# config.model.remat's values (songunet and adm): what each keeps for the backward pass is
# described in unet_block_class.
REMAT_MODES = ("none", "blocks", "blocks_save_dots")

Dtype = Any

INIT_MODES = ('xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal')


def edm_init(mode: str, fan_in: int, fan_out: int, gain: float = 1.0):
  """EDM `weight_init(shape, mode, fan_in, fan_out) * gain` as a flax initializer.

  The fans are passed explicitly (EDM uses in*k*k / out*k*k for convs), so the same
  initializer serves kernels and biases. gain == 0 gives exact zeros.
  """
  if mode not in INIT_MODES:
    raise ValueError(f'unknown init mode {mode!r}; expected one of {INIT_MODES}')

  def init(key, shape, dtype=jnp.float32):
    if gain == 0:
      return jnp.zeros(shape, dtype)
    if mode == 'xavier_uniform':
      w = math.sqrt(6 / (fan_in + fan_out)) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    elif mode == 'xavier_normal':
      w = math.sqrt(2 / (fan_in + fan_out)) * jax.random.normal(key, shape, dtype)
    elif mode == 'kaiming_uniform':
      w = math.sqrt(3 / fan_in) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    else:
      w = math.sqrt(1 / fan_in) * jax.random.normal(key, shape, dtype)
    return (w * gain).astype(dtype)

  return init


class InitSpec(NamedTuple):
  """Init settings of one layer (EDM's `init_kw=dict(init_mode, init_weight, init_bias)`)."""
  init_mode: str = 'kaiming_normal'
  init_weight: float = 1.0
  init_bias: float = 0.0


# ------------------------------------------------------------------------------------------------
# Resampling with a separable FIR filter (EDM Conv2d: [1,1] = box, [1,3,3,1] = NCSN++ filter).

def resample_filter2d(resample_filter: Sequence[int]) -> np.ndarray:
  f = np.asarray(resample_filter, np.float64)
  return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise(x, f2d, *, stride, padding, lhs_dilation=(1, 1)):
  c = x.shape[-1]
  k = jnp.broadcast_to(jnp.asarray(f2d, x.dtype)[:, :, None, None], f2d.shape + (1, c))
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=padding, lhs_dilation=lhs_dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


def downsample2d(x, resample_filter: Sequence[int] = (1, 1)):
  """torch `conv2d(x, f, groups=C, stride=2, padding=(len(f)-1)//2)`; [1,1] is a 2x2 mean."""
  if tuple(resample_filter) == (1, 1):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)
  f2d = resample_filter2d(resample_filter)
  p = (f2d.shape[0] - 1) // 2
  return _depthwise(x, f2d, stride=2, padding=((p, p), (p, p)))


def upsample2d(x, resample_filter: Sequence[int] = (1, 1)):
  """torch `conv_transpose2d(x, 4f, groups=C, stride=2, padding=(len(f)-1)//2)`.

  [1,1] is nearest-neighbour x2.
  """
  if tuple(resample_filter) == (1, 1):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  f2d = 4 * resample_filter2d(resample_filter)  # symmetric: no flip needed for the transpose
  k = f2d.shape[0]
  q = k - 1 - (k - 1) // 2
  return _depthwise(x, f2d, stride=1, padding=((q, q), (q, q)), lhs_dilation=(2, 2))


def interp_matrix(src: np.ndarray, n_in: int) -> np.ndarray:
  """(len(src), n_in) float32 weights of 1-D linear interpolation at source coordinates src >= 0:
  out[j] = (1 - f) in[i] + f in[min(i + 1, n_in - 1)], i = min(floor(src), n_in - 1), f = src - i
  (coordinates past the last sample take the last sample)."""
  src = np.asarray(src, np.float64)
  n_out = src.shape[0]
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m.astype(np.float32)


def resize_separable(x, mh, mw):
  """NHWC x resized by per-axis interpolation matrices mh (H_out, H) and mw (W_out, W)."""
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,bhwc->bowc', jnp.asarray(mh), x, precision=hi)
  return jnp.einsum('pw,bowc->bopc', jnp.asarray(mw), x, precision=hi)


def _conv(x, w, padding):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# ------------------------------------------------------------------------------------------------
# Layers.

class Linear(nn.Module):
  """Fully connected layer, y = x @ kernel + bias (EDM `Linear`; kernel is [in, out])."""
  features: int
  use_bias: bool = True
  init_kw: InitSpec = InitSpec()
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    mode, gw, gb = self.init_kw
    kernel = self.param('kernel', edm_init(mode, fan_in, self.features, gw),
                        (fan_in, self.features))
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param('bias', edm_init(mode, fan_in, self.features, gb), (self.features,))
      y = y + bias.astype(dtype)
    return y


class Conv2d(nn.Module):
  """EDM `Conv2d`: optional FIR up/down-sampling, then a `kernel`x`kernel` conv (kernel 0 = none).

  Non-fused order: resample, then convolve with 'same' padding. `fused_resample` with `down`
  (used by the NCSN++ residual encoder) convolves with padding w_pad + f_pad first and then
  applies the stride-2 filter, exactly as the reference does.
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  init_kw: InitSpec = InitSpec()
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError('Conv2d cannot both up- and down-sample')
    if self.fused_resample and self.up:
      raise NotImplementedError('fused up-sampling is not used by the EDM networks')
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    cin, k = x.shape[-1], self.kernel
    mode, gw, gb = self.init_kw
    fan_in, fan_out = cin * k * k, self.features * k * k
    w = b = None
    if k:
      w = self.param('kernel', edm_init(mode, fan_in, fan_out, gw), (k, k, cin, self.features))
      w = w.astype(dtype)
      if self.use_bias:
        b = self.param('bias', edm_init(mode, fan_in, fan_out, gb), (self.features,)).astype(dtype)
    if self.fused_resample and self.down and w is not None:
      f_pad = (len(self.resample_filter) - 1) // 2
      x = _conv(x, w, k // 2 + f_pad)
      f2d = resample_filter2d(self.resample_filter)
      x = _depthwise(x, f2d, stride=2, padding=((0, 0), (0, 0)))
    else:
      if self.up:
        x = upsample2d(x, self.resample_filter)
      if self.down:
        x = downsample2d(x, self.resample_filter)
      if w is not None:
        x = _conv(x, w, k // 2)
    if b is not None:
      x = x + b
    return x


def group_norm(channels: int, eps: float, dtype: Optional[Dtype], name: str,
               groups: int = 0) -> nn.GroupNorm:
  """EDM GroupNorm: min(32, C // 4) groups, or `groups` when > 0 (openai's GroupNorm32: 32, which
  differs from EDM's rule only below 128 channels); statistics in float32 (two-pass variance)."""
  return nn.GroupNorm(num_groups=groups or min(32, channels // 4), epsilon=eps, dtype=dtype,
                      param_dtype=jnp.float32, use_fast_variance=False, name=name)


def attention(qkv, num_heads: int):
  """EDM self-attention on a 1x1-conv qkv map [B, H, W, 3C].

  Channel layout per head is interleaved as in the reference (`reshape(N*heads, C/heads, 3, L)`):
  channel h*3*d + 3*c + j holds q (j=0), k (j=1), v (j=2). Logits are q.k / sqrt(d), softmax in
  float32 (EDM `AttentionOp`).
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  d = c // num_heads
  qkv = qkv.reshape(b, h * w, num_heads, d, 3)
  q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)
  return out.reshape(b, h, w, c)


class UNetBlock(nn.Module):
  """EDM `UNetBlock` (DDPM++/NCSN++/ADM residual block with optional attention), NHWC.

  x -> conv0(silu(norm0(x))) [resampled]; p = affine(emb) (+ affine_s(emb_s) when `use_s`, CTM);
  adaptive_scale: silu(shift + norm1(h) * (1 + scale)), else silu(norm1(h + p));
  h = conv1(dropout(h)); x = (h + skip(x)) * skip_scale; then optional multi-head attention
  x = (proj(attn(qkv(norm2(x)))) + x) * skip_scale.
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  norm_groups: int = 0           # GroupNorm groups; 0: EDM's min(32, C // 4)
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  use_s: bool = False
  init_kw: InitSpec = InitSpec()
  init_zero_kw: InitSpec = InitSpec(init_weight=0.0)
  init_attn_kw: Optional[InitSpec] = None
  dtype: Dtype = jnp.float32

  @property
  def heads(self) -> int:
    if not self.attention:
      return 0
    if self.num_heads is not None:
      return self.num_heads
    return self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x, emb, emb_s=None, train: bool = False):
    cin, cout, dt = x.shape[-1], self.out_channels, self.dtype
    orig = x
    h = group_norm(cin, self.eps, dt, 'norm0', self.norm_groups)(x)
    h = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
               init_kw=self.init_kw, dtype=dt, name='conv0')(nn.silu(h))
    width = cout * (2 if self.adaptive_scale else 1)
    params = Linear(width, init_kw=self.init_kw, dtype=jnp.float32, name='affine')(emb)
    if self.use_s:
      if emb_s is None:
        raise ValueError('UNetBlock(use_s=True) needs emb_s')
      params = params + Linear(width, init_kw=self.init_kw, dtype=jnp.float32,
                               name='affine_s')(emb_s)
    params = params[:, None, None, :].astype(dt)
    norm1 = group_norm(cout, self.eps, dt, 'norm1', self.norm_groups)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      h = nn.silu(shift + norm1(h) * (scale + 1))
    else:
      h = nn.silu(norm1(h + params))
    if self.dropout:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv2d(cout, 3, init_kw=self.init_zero_kw, dtype=dt, name='conv1')(h)
    if cout != cin or self.up or self.down:
      kernel = 1 if (self.resample_proj or cout != cin) else 0
      skip = Conv2d(cout, kernel, up=self.up, down=self.down, resample_filter=self.resample_filter,
                    init_kw=self.init_kw, dtype=dt, name='skip')(orig)
    else:
      skip = orig.astype(dt)
    x = (h + skip) * self.skip_scale
    if self.heads:
      qkv = group_norm(cout, self.eps, dt, 'norm2', self.norm_groups)(x)
      attn_init = self.init_attn_kw if self.init_attn_kw is not None else self.init_kw
      qkv = Conv2d(cout * 3, 1, init_kw=attn_init, dtype=dt, name='qkv')(qkv)
      a = attention(qkv, self.heads)
      a = Conv2d(cout, 1, init_kw=self.init_zero_kw, dtype=dt, name='proj')(a)
      x = (a + x) * self.skip_scale
    return x


@functools.lru_cache(maxsize=None)
def unet_block_class(remat: str = 'none'):
  """`UNetBlock`, or `UNetBlock` under `jax.checkpoint` (flax `nn.remat`) for remat != 'none'.

  'blocks': the backward pass keeps only each block's inputs (x, emb, emb_s) and recomputes
  the block's forward (Chen et al. 2016, "Training deep nets with sublinear memory cost");
  'blocks_save_dots': keeps the block's convolution / matmul outputs too
  (`jax.checkpoint_policies.dots_saveable`), recomputing norms, activations and dropout.
  Parameter names and values are those of the plain block; dropout draws the same mask in
  the recomputation (the same rng). `train` (argument 4, counting self) is static.
  Call the block with `call_block`.
  """
  if remat == 'none':
    return UNetBlock
  policies = {'blocks': None, 'blocks_save_dots': jax.checkpoint_policies.dots_saveable}
  if remat not in policies:
    raise ValueError(f'remat must be one of {REMAT_MODES}, got {remat!r}')
  return nn.remat(UNetBlock, static_argnums=(4,), policy=policies[remat])


def _after(tree, ct):
  """tree with its float leaves made to depend on ct (a + 0 * ct[0]; the same values unless
  ct holds inf / nan): whatever reads them cannot be scheduled before ct exists."""
  z = 0 * jax.lax.stop_gradient(jax.tree_util.tree_leaves(ct)[0]).reshape(-1)[0]
  return jax.tree_util.tree_map(
      lambda a: a + z.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def call_block(block: nn.Module, x, emb, emb_s, train: bool, remat: str):
  """block(x, emb, emb_s, train), with `block` from `unet_block_class(remat)`.

  In training with remat != 'none' the checkpointed block's backward is tied to its output
  cotangent: XLA (XLA:CPU at least) drops jax.checkpoint's optimization barrier and schedules
  the recomputation right after the forward pass, which keeps every recomputed activation
  alive and saves nothing; the residuals (the block's inputs, parameters and dropout key)
  read through `_after(ct)` make the recomputation wait for the backward pass to reach the
  block.  A custom VJP has no forward-mode derivative, so eval mode (train=False: samplers,
  jvp-based likelihoods) calls the block directly.
  """
  if remat == 'none' or not train:
    return block(x, emb, emb_s, train)

  def f(mdl, x, emb, emb_s):
    return mdl(x, emb, emb_s, train)

  def fwd(mdl, x, emb, emb_s):
    return nn.vjp(f, mdl, x, emb, emb_s)

  def bwd(vjp_fn, ct):
    return _after(vjp_fn, ct)(ct)

  return nn.custom_vjp(f, forward_fn=fwd, backward_fn=bwd)(block, x, emb, emb_s)


# ------------------------------------------------------------------------------------------------
# Noise-level embeddings (EDM PositionalEmbedding / FourierEmbedding).

def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                         order: str = 'cos_sin'):
  """Transformer-style embedding of a (B,) float array, freqs (1/max_pos)^(i/(n/2 - endpoint)).

  EDM builds [cos, sin]; SongUNet swaps the halves to [sin, cos] (`order='sin_cos'`).
  """
  half = num_channels // 2
  freqs = np.arange(half, dtype=np.float64) / (half - (1 if endpoint else 0))
  freqs = jnp.asarray((1.0 / max_positions) ** freqs, jnp.float32)
  args = x.astype(jnp.float32)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)]
  if order == 'sin_cos':
    parts = parts[::-1]
  return jnp.concatenate(parts, axis=-1)


class FourierEmbedding(nn.Module):
  """NCSN++ random Fourier features: [cos, sin](2 pi x freqs), freqs ~ N(0, scale^2).

  `freqs` is a fixed buffer in EDM; here it is a parameter behind stop_gradient (so optimizers
  without weight decay leave it unchanged and checkpoints carry it).
  """
  num_channels: int
  scale: float = 16.0
  order: str = 'cos_sin'

  @nn.compact
  def __call__(self, x):
    freqs = self.param('freqs', lambda k, s: self.scale * jax.random.normal(k, s, jnp.float32),
                       (self.num_channels // 2,))
    args = x.astype(jnp.float32)[:, None] * (2 * np.pi * jax.lax.stop_gradient(freqs))[None, :]
    parts = [jnp.cos(args), jnp.sin(args)]
    if self.order == 'sin_cos':
      parts = parts[::-1]
    return jnp.concatenate(parts, axis=-1)


def as_label_matrix(class_labels, label_dim: int, batch: int):
  """Class labels as a float [B, label_dim] matrix: int (B,) -> one-hot; None -> zeros (EDM)."""
  if class_labels is None:
    return jnp.zeros((batch, label_dim), jnp.float32)
  class_labels = jnp.asarray(class_labels)
  if class_labels.ndim == 1 and jnp.issubdtype(class_labels.dtype, jnp.integer):
    return jax.nn.one_hot(class_labels, label_dim, dtype=jnp.float32)
  return class_labels.astype(jnp.float32).reshape(batch, label_dim)


def label_dropout_mask(module: nn.Module, rate: float, batch: int, train: bool):
  """Per-sample keep mask for classifier-free-guidance label dropout (EDM `label_dropout`)."""
  if not (train and rate):
    return None
  u = jax.random.uniform(module.make_rng('dropout'), (batch, 1))
  return (u >= rate).astype(jnp.float32)


def count_params(tree) -> int:
  """Number of scalars in a (possibly abstract) pytree of arrays."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
