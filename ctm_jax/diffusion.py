"""VE / EDM diffusion math: sigma grids, preconditioning and time samplers.

Notation follows EDM (Karras et al. 2022): time is the noise level sigma, written
t, s or u; x_t = x_0 + t z.  Every function here is pure and jit-able.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0

C_NOISE_KINDS = ("log4", "250log")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The noise range and data scale shared by every method (EDM Table 1)."""
  sigma_min: float = SIGMA_MIN
  sigma_max: float = SIGMA_MAX
  sigma_data: float = SIGMA_DATA
  rho: float = RHO

  def __post_init__(self):
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(
          f"Schedule needs 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
          f"sigma_max={self.sigma_max}")
    if self.sigma_data <= 0:
      raise ValueError(f"Schedule.sigma_data must be > 0, got {self.sigma_data}")
    if self.rho <= 0:
      raise ValueError(f"Schedule.rho must be > 0, got {self.rho}")


def karras_curve(u, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """sigma(u) = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, u in [0, 1].

  u = 0 gives sigma_max and u = 1 gives sigma_min (EDM eq. 5 with u = i / (N - 1)).
  """
  hi = sigma_max ** (1.0 / rho)
  lo = sigma_min ** (1.0 / rho)
  return (hi + u * (lo - hi)) ** rho


def karras_sigmas(n: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO,
                  append_zero: bool = False, dtype=jnp.float32):
  """The Karras grid t_0 = sigma_max > ... > t_{n-1} = sigma_min (EDM eq. 5).

  With append_zero the grid gets a final t_n = 0, as in EDM's sampler.
  The end points are set exactly (no round-off from the power).
  """
  if n < 2:
    raise ValueError(f"karras_sigmas needs n >= 2 points, got n={n}")
  u = jnp.arange(n, dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32) / (n - 1)
  sig = karras_curve(u, sigma_min, sigma_max, rho)
  sig = sig.at[0].set(sigma_max).at[-1].set(sigma_min).astype(dtype)
  if append_zero:
    sig = jnp.concatenate([sig, jnp.zeros((1,), dtype)])
  return sig


def karras_sigma_at(i, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
  """t_i of the Karras grid of n points (EDM eq. 5), for integer i and n that may be traced.

  The same values as karras_sigmas(n)[i] (end points exact), so a consistency-training
  curriculum that changes n every step needs one compilation for every n.
  """
  i = jnp.asarray(i)
  n = jnp.asarray(n)
  u = i.astype(jnp.float32) / (n - 1).astype(jnp.float32)
  sig = karras_curve(u, sigma_min, sigma_max, rho)
  return jnp.where(i == 0, sigma_max, jnp.where(i == n - 1, sigma_min, sig)).astype(jnp.float32)


def edm_scalings(t, sigma_data=SIGMA_DATA) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """EDM preconditioning (Karras et al. 2022, Table 1): (c_skip, c_out, c_in) at noise t.

  c_skip = sd^2 / (t^2 + sd^2),  c_out = t sd / sqrt(t^2 + sd^2),  c_in = 1 / sqrt(t^2 + sd^2).
  """
  t = jnp.asarray(t)
  denom = t ** 2 + sigma_data ** 2
  c_skip = sigma_data ** 2 / denom
  c_out = t * sigma_data * jax.lax.rsqrt(denom)
  c_in = jax.lax.rsqrt(denom)
  return c_skip, c_out, c_in


def cm_scalings(t, sigma_data=SIGMA_DATA, sigma_min=SIGMA_MIN) -> Tuple[jax.Array, jax.Array]:
  """Consistency-model boundary scalings (Song et al. 2023, App. C): (c_skip, c_out).

  c_skip = sd^2 / ((t - eps)^2 + sd^2),  c_out = sd (t - eps) / sqrt(sd^2 + t^2), eps = sigma_min,
  so that f(x, sigma_min) = x exactly.
  """
  t = jnp.asarray(t)
  c_skip = sigma_data ** 2 / ((t - sigma_min) ** 2 + sigma_data ** 2)
  c_out = (t - sigma_min) * sigma_data * jax.lax.rsqrt(sigma_data ** 2 + t ** 2)
  return c_skip, c_out


def c_noise(t, kind: str = "log4"):
  """The time value fed to the network: ln(t)/4 (DDPM++/NCSN++) or 250 ln(t) (ADM nets)."""
  if kind == "log4":
    return jnp.log(t) / 4.0
  if kind == "250log":
    return 250.0 * jnp.log(t)
  raise ValueError(f"c_noise kind must be one of {C_NOISE_KINDS}, got {kind!r}")


def edm_loss_weight(t, sigma_data=SIGMA_DATA):
  """EDM's DSM weight lambda(t) = (t^2 + sd^2) / (t sd)^2 (EDM eq. 8 / Table 1)."""
  return (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2


def append_dims(v, ndim: int):
  """Reshape a per-example vector (B,) to (B, 1, ..., 1) with ndim dimensions in all."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# ----------------------------------------------------------------------------- time samplers

def sample_lognormal_sigma(key, shape, p_mean=-1.2, p_std=1.2):
  """EDM training noise levels: ln t ~ N(p_mean, p_std^2)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def sample_ctm_dsm_sigma(key, batch: int, schedule: Schedule = Schedule(), p_mean=-1.2,
                         p_std=1.2, curve_max=0.7):
  """CTM's DSM noise levels: the first floor(B/2) log-normal, the rest on the Karras curve.

  The second half is sigma(u) with u ~ U[0, curve_max] (CTM reference: diffusion_mult = 0.7),
  i.e. biased towards large noise, where the log-normal rarely goes.
  Both draws are made for the whole batch and example i takes its own element of one of them
  (elementwise: a batch split over devices needs no communication, where concatenating two
  halves made the SPMD partitioner all-gather them).
  """
  k1, k2 = jax.random.split(key)
  n_log = batch // 2
  log_all = sample_lognormal_sigma(k1, (batch,), p_mean, p_std)
  u = jax.random.uniform(k2, (batch,)) * curve_max
  curve_all = karras_curve(u, schedule.sigma_min, schedule.sigma_max, schedule.rho)
  return jnp.where(jnp.arange(batch) < n_log, log_all, curve_all)


def sample_k_proportional(key, k_max: int):
  """A number of teacher steps k in {1..k_max} with P(k) proportional to k (one per batch)."""
  ks = jnp.arange(1, k_max + 1)
  logits = jnp.log(ks.astype(jnp.float32))
  return jax.random.categorical(key, logits) + 1


def sample_ctm_indices(key, batch: int, num_points: int, k):
  """Grid indices for CTM (Kim et al. 2024, Alg. 1 with the reference's discrete sampler).

  Given k (shared by the batch), i ~ U{0..N-1-k} per example and j ~ U{i+k..N-1}; the times
  are t = t_i, u = t_{i+k}, s = t_j.  k may be a traced value.
  """
  k1, k2 = jax.random.split(key)
  i = jax.random.randint(k1, (batch,), 0, num_points - k)
  j = jax.random.randint(k2, (batch,), i + k, num_points)
  return i, j



# ----------------------------------------------------------------------------- VP timesteps

VP_SCHEDULES = ("ddpm_linear", "sd_scaled_linear")


def vp_alphas_cumprod(kind: str = "ddpm_linear", num_timesteps: int = 1000):
  """abar_k = prod_{i <= k} (1 - beta_i), k = 0..num_timesteps-1, of a discrete VP schedule.

  ddpm_linear: beta_i = linspace(1e-4, 0.02) (DDPM; the discretisation of EDM's VP-SDE,
  beta_min 0.1, beta_d 19.9); sd_scaled_linear: beta_i = linspace(sqrt(8.5e-4), sqrt(0.012))^2
  (Stable Diffusion; diffusers' TCDScheduler default).  float64 numpy.
  """
  if kind == "ddpm_linear":
    betas = np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64)
  elif kind == "sd_scaled_linear":
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_timesteps, dtype=np.float64) ** 2
  else:
    raise ValueError(f"VP schedule must be one of {VP_SCHEDULES}, got {kind!r}")
  return np.cumprod(1.0 - betas)


def vp_sigmas(kind: str = "ddpm_linear", num_timesteps: int = 1000):
  """The VE noise level of each discrete VP timestep: sigma_k = sqrt((1 - abar_k) / abar_k)
  (x_VE = x_VP / sqrt(abar_k)); increasing in k."""
  a = vp_alphas_cumprod(kind, num_timesteps)
  return np.sqrt((1.0 - a) / a)


def vp_timestep(sigma: float, kind: str = "ddpm_linear", num_timesteps: int = 1000) -> int:
  """The discrete VP timestep whose sigma_k is nearest `sigma` in log sigma (clamped to the
  schedule's range)."""
  sig = vp_sigmas(kind, num_timesteps)
  return int(np.argmin(np.abs(np.log(sig) - np.log(float(sigma)))))
