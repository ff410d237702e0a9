"""A residual MLP for low-dimensional (toy) data with t and optional s conditioning."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


def sinusoidal_embedding(v, dim: int, max_period: float = 10000.0):
  """[sin(v w_i), cos(v w_i)] with w_i = (1/max_period)^(i/(dim/2 - 1)) (EDM's PositionalEmbedding)."""
  half = dim // 2
  freqs = (1.0 / max_period) ** (jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  arg = v.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class ToyMLP(nn.Module):
  """F(x_in, c_noise(t)[, c_noise(s)]) for vectors x of shape (B, D).

  Each time input has its own embedding MLP (like the U-Nets); the s path, when present, is
  added to the t conditioning of every residual block, as in CTM's s-conditioning.
  """
  out_dim: int = 2
  hidden: int = 256
  num_blocks: int = 4
  emb_dim: int = 128
  use_s: bool = False
  label_dim: int = 0
  dropout: float = 0.0
  time_scale: float = 10.0
  dtype: jnp.dtype = jnp.float32

  def _embed(self, c, name):
    e = sinusoidal_embedding(c * self.time_scale, self.emb_dim, max_period=1000.0)
    e = nn.silu(nn.Dense(self.emb_dim, name=f"{name}_0", dtype=self.dtype)(e))
    return nn.Dense(self.emb_dim, name=f"{name}_1", dtype=self.dtype)(e)

  @nn.compact
  def __call__(self, x, noise_labels, noise_labels_s=None, class_labels=None,
               augment_labels=None, train: bool = False):
    del augment_labels
    emb = self._embed(noise_labels, "map_t")
    if self.label_dim:
      emb = emb + nn.Embed(self.label_dim, self.emb_dim, name="map_label")(class_labels)
    if self.use_s:
      if noise_labels_s is None:
        raise ValueError("ToyMLP(use_s=True) needs noise_labels_s")
      emb_s = self._embed(noise_labels_s, "map_s")
    emb = nn.silu(emb)
    h = nn.Dense(self.hidden, name="inp", dtype=self.dtype)(x.astype(self.dtype))
    for i in range(self.num_blocks):
      cond = nn.Dense(self.hidden, name=f"block{i}_emb", dtype=self.dtype)(emb)
      if self.use_s:
        cond = cond + nn.Dense(self.hidden, name=f"block{i}_emb_s", dtype=self.dtype)(nn.silu(emb_s))
      y = nn.LayerNorm(name=f"block{i}_norm", dtype=self.dtype)(h)
      y = nn.silu(nn.Dense(self.hidden, name=f"block{i}_fc0", dtype=self.dtype)(y) + cond)
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
      y = nn.Dense(self.hidden, name=f"block{i}_fc1", dtype=self.dtype)(y)
      h = h + y
    h = nn.silu(nn.LayerNorm(name="out_norm", dtype=self.dtype)(h))
    out = nn.Dense(self.out_dim, name="out", dtype=self.dtype)(h)
    return out.astype(jnp.float32)
