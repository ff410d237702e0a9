"""The (x, t, s) -> x_s jump family on top of a network under EDM preconditioning.

With F the raw network output,
  g(x, t, s) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s))   (EDM precond. at t)
  G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)                               (CTM eq. 7 / TCD)
so G(x, t, t) = x exactly and g(x, t, t) is a denoiser (the score head).  The consistency-
model endpoint form is f(x, t) = c_skip_cm(t) x + c_out_cm(t) F with f(x, sigma_min) = x.
A network without an s input (an EDM teacher) gives the denoiser D(x, t) = g(x, t, .).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ctm_jax import diffusion
from ctm_jax.diffusion import append_dims


@dataclasses.dataclass(frozen=True)
class FlowModel:
  """A flax network (signature net(x_in, c_noise_t, c_noise_s, class_labels, train=...))
  with the preconditioning that turns it into a denoiser, a jump G or a CM map f."""
  net: Any
  schedule: diffusion.Schedule = diffusion.Schedule()
  c_noise_kind: str = "log4"

  @property
  def uses_s(self) -> bool:
    return bool(getattr(self.net, "use_s", False))

  def init(self, key, x, labels=None):
    """Initial parameters for inputs shaped like x (B, ...)."""
    b = x.shape[0]
    t = jnp.ones((b,), jnp.float32)
    cn_s = t if self.uses_s else None
    variables = self.net.init({"params": key, "dropout": key}, x, t, cn_s, labels, train=False)
    return variables["params"]

  def raw(self, params, x_in, t, s=None, labels=None, *, train=False, rng=None,
          augment_labels=None):
    """The raw network output F(x_in, c_noise(t), c_noise(s)); augment_labels: EDM's
    augmentation conditioning (None = zeros, the un-augmented model)."""
    cn_t = diffusion.c_noise(t, self.c_noise_kind)
    cn_s = diffusion.c_noise(s, self.c_noise_kind) if (self.uses_s and s is not None) else None
    if self.uses_s and cn_s is None:
      cn_s = cn_t
    rngs = {"dropout": rng} if rng is not None else None
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    out = self.net.apply({"params": params}, x_in, cn_t, cn_s, labels, train=train, rngs=rngs,
                         **extra)
    return out.astype(x_in.dtype)

  def _times(self, x, t, s):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = t if s is None else jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1])
    return t, s

  def denoiser(self, params, x, t, s=None, labels=None, *, train=False, rng=None,
               augment_labels=None):
    """g(x, t, s) = c_skip(t) x + c_out(t) F; with s = None (or s = t) the denoiser head."""
    t, s = self._times(x, t, s)
    c_skip, c_out, c_in = diffusion.edm_scalings(t, self.schedule.sigma_data)
    f = self.raw(params, append_dims(c_in, x.ndim) * x, t, s, labels, train=train, rng=rng,
                 augment_labels=augment_labels)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f

  def jump(self, params, x, t, s, labels=None, *, train=False, rng=None):
    """G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s); exactly x when s == t."""
    t, s = self._times(x, t, s)
    g = self.denoiser(params, x, t, s, labels, train=train, rng=rng)
    return jump_from_denoised(x, g, t, s)

  def cm_f(self, params, x, t, labels=None, *, train=False, rng=None):
    """f(x, t) = c_skip_cm(t) x + c_out_cm(t) F (Song et al. 2023); f(x, sigma_min) == x."""
    t, _ = self._times(x, t, None)
    sch = self.schedule
    c_skip, c_out = diffusion.cm_scalings(t, sch.sigma_data, sch.sigma_min)
    _, _, c_in = diffusion.edm_scalings(t, sch.sigma_data)
    f = self.raw(params, append_dims(c_in, x.ndim) * x, t, t if self.uses_s else None, labels,
                 train=train, rng=rng)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f

  def denoise_fn(self, params, labels=None):
    """A `denoise_fn(x, t)` for the solvers and samplers (eval mode)."""
    return lambda x, t: self.denoiser(params, x, t, None, labels)

  def jump_fn(self, params, labels=None):
    """A `jump_fn(x, t, s)` for the gamma sampler (eval mode)."""
    return lambda x, t, s: self.jump(params, x, t, s, labels)

  def cm_jump_fn(self, params, labels=None):
    """jump_fn(x, t, s) -> f(x, t) of a consistency model (eval mode): the jump to
    s = sigma_min whatever s is asked (onestep and CM multistep only ask that)."""
    return lambda x, t, s: self.cm_f(params, x, t, labels)


def jump_from_denoised(x, denoised, t, s):
  """The DDIM / CTM jump (s/t) x + (1 - s/t) x0_hat, per-example t and s of shape (B,).

  Where s == t the result is x itself (selected exactly, not by round-off).
  """
  r = append_dims(s / t, x.ndim)
  out = r * x + (1.0 - r) * denoised
  return jnp.where(append_dims(s == t, x.ndim), x, out)


def oracle_jump_fn(denoise_fn):
  """The exact-denoiser jump G*(x, t, s) = (s/t) x + (1 - s/t) D(x, t) (one DDIM step)."""
  def fn(x, t, s):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1])
    return jump_from_denoised(x, denoise_fn(x, t), t, s)
  return fn
