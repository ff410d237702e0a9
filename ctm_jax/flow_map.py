"""The (x, t, s) -> x_s jump family on top of a network under EDM preconditioning.

With F the raw network output,
  g(x, t, s) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s))   (EDM precond. at t)
  G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)                               (CTM eq. 7 / TCD)
so G(x, t, t) = x exactly and g(x, t, t) is a denoiser (the score head).  The consistency-
model endpoint form is f(x, t) = c_skip_cm(t) x + c_out_cm(t) F with f(x, sigma_min) = x.
A network without an s input (an EDM teacher) gives the denoiser D(x, t) = g(x, t, .).

Preconditionings (FlowModel.precond; each a map to and from this EDM frame):
  'edm'  the above (EDM, CTM, the CM family).
  'rf'   MeanFlow's average velocity u(z, r, t) in the rectified-flow frame z = (1 - t) x,
         t = sigma / (1 + sigma) (so t / (1 - t) = sigma): F(z, t, t - r) = u and
         g(x, sigma, s) = z - t u, the x0 estimate, so that G(x, sigma, s) = z_r / (1 - r) with
         z_r = z - (t - r) u (derivation: docs/flow_maps.md); g(x, sigma, sigma) = z - t v.
  'trig' sCM's TrigFlow consistency function (t = arctan(sigma / sigma_d), x_trig = cos(t) x):
         f(x_trig, t) = cos(t) x_trig - sin(t) sd F_trig is EDM's denoiser form with F = -F_trig,
         so cm_f is the EDM-preconditioned output, f(x, 0) = x (no sigma_min boundary); the
         network's time input is TrigFlow's t (sCM's c_noise(t) = t).
  'trig_edm' the same with the run's c_noise(sigma) as the time input (an EDM teacher's, so
         that sCD can start from the teacher's weights).
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
  precond: str = "edm"            # edm | rf | trig | trig_edm (module docstring)

  def __post_init__(self):
    if self.precond not in PRECONDS:
      raise ValueError(f"FlowModel.precond must be one of {PRECONDS}, got {self.precond!r}")

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
    if self.precond == "rf":         # MeanFlow's (t, t - r), t = sigma / (1 + sigma)
      cn_t = rf_time(t)
      cn_s = cn_t - rf_time(t if s is None else s) if self.uses_s else None
    elif self.precond == "trig":     # sCM's time input: TrigFlow t = arctan(sigma / sd)
      cn_t = trig_time(t, self.schedule.sigma_data)
      cn_s = cn_t if self.uses_s else None
    else:
      cn_t = diffusion.c_noise(t, self.c_noise_kind)
      cn_s = diffusion.c_noise(s, self.c_noise_kind) if (self.uses_s and s is not None) else None
      if self.uses_s and cn_s is None:
        cn_s = cn_t
    return self._apply(params, x_in, cn_t, cn_s, labels, train, rng, augment_labels)

  def _apply(self, params, x_in, cn_t, cn_s, labels, train, rng, augment_labels=None):
    rngs = {"dropout": rng} if rng is not None else None
    extra = {} if augment_labels is None else {"augment_labels": augment_labels}
    out = self.net.apply({"params": params}, x_in, cn_t, cn_s, labels, train=train, rngs=rngs,
                         **extra)
    return out.astype(x_in.dtype)

  def average_velocity(self, params, z, r, t, labels=None, *, train=False, rng=None):
    """MeanFlow's u(z, r, t) = F(z, t, t - r) in the rectified-flow frame (precond 'rf';
    r <= t in [0, 1], per example (B,)); u(z, t, t) is the instantaneous velocity v."""
    if self.precond != "rf" or not self.uses_s:
      raise ValueError("average_velocity needs FlowModel(precond='rf') on a network with an "
                       "s input")
    return self._apply(params, z, t, t - r, labels, train, rng)

  def _times(self, x, t, s):
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    s = t if s is None else jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1])
    return t, s

  def denoiser(self, params, x, t, s=None, labels=None, *, train=False, rng=None,
               augment_labels=None):
    """g(x, t, s) = c_skip(t) x + c_out(t) F; with s = None (or s = t) the denoiser head."""
    t, s = self._times(x, t, s)
    if self.precond == "rf":
      c_in = 1.0 / (1.0 + t)
      c_skip, c_out = c_in, -t * c_in
    else:
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
    """f(x, t) = c_skip_cm(t) x + c_out_cm(t) F (Song et al. 2023); f(x, sigma_min) == x.
    precond 'trig' / 'trig_edm' (sCM): the EDM-preconditioned output, f(x, 0) = x."""
    if self.precond in ("trig", "trig_edm"):
      return self.denoiser(params, x, t, None, labels, train=train, rng=rng)
    if self.precond == "rf":
      raise ValueError("FlowModel(precond='rf') is a jump G(x, t, s) (MeanFlow): it has no "
                       "consistency-model f(x, t)")
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


PRECONDS = ("edm", "rf", "trig", "trig_edm")


def rf_time(sigma):
  """The rectified-flow time t = sigma / (1 + sigma) of an EDM noise level (t / (1 - t) = sigma)."""
  return sigma / (1.0 + sigma)


def rf_sigma(t):
  """The EDM noise level sigma = t / (1 - t) of a rectified-flow time t in [0, 1)."""
  return t / (1.0 - t)


def trig_time(sigma, sigma_data):
  """TrigFlow's t = arctan(sigma / sigma_d) (sCM) of an EDM noise level."""
  return jnp.arctan(sigma / sigma_data)


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
