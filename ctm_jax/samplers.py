"""Samplers: EDM Heun on a denoiser, CTM gamma-sampling, CM multistep and one-step jumps.

jump_fn(x, t, s) -> G(x, t, s) and denoise_fn(x, t) -> D(x, t) take x (B, ...) and
per-example times (B,).  Every sampler starts from x_T = sigma_max * z, z ~ N(0, I)
(pass `x_init` to reuse the same noise across samplers).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import diffusion, solvers

JumpFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def initial_noise(key, shape, sigma_max=diffusion.SIGMA_MAX, dtype=jnp.float32):
  """x_T = sigma_max * z."""
  return sigma_max * jax.random.normal(key, shape, dtype)


def edm_heun_sampler(denoise_fn: solvers.DenoiseFn, x_init, num_steps: int = 18,
                     schedule: diffusion.Schedule = diffusion.Schedule(),
                     end_at_zero: bool = True):
  """EDM's deterministic sampler (Karras et al. 2022, Alg. 1): Heun over the Karras grid.

  With end_at_zero the grid gets t_N = 0 and the last step is Euler (NFE = 2 num_steps - 1,
  35 for 18 steps); otherwise it ends at sigma_min with a full Heun step.
  """
  sig = diffusion.karras_sigmas(num_steps, schedule.sigma_min, schedule.sigma_max, schedule.rho,
                                append_zero=end_at_zero)
  return solvers.solve_grid(denoise_fn, x_init, sig, "heun", "heun")


def gamma_time_grid(num_steps: int, schedule: diffusion.Schedule = diffusion.Schedule(),
                    times: Optional[Sequence[float]] = None):
  """The sampling grid t_0 = sigma_max > ... > t_M = sigma_min for M = num_steps jumps.

  By default the Karras grid of M + 1 points; `times` overrides it (e.g. the hand-tuned
  middle time of CTM's NFE-2 sampler), and must start at sigma_max and end at sigma_min.
  """
  if times is None:
    return diffusion.karras_sigmas(num_steps + 1, schedule.sigma_min, schedule.sigma_max,
                                   schedule.rho)
  times = np.asarray(times, np.float64)
  if len(times) != num_steps + 1 or np.any(np.diff(times) >= 0):
    raise ValueError(f"times must be {num_steps + 1} strictly decreasing values, got {times}")
  return jnp.asarray(times, jnp.float32)


def gamma_sampler(jump_fn: JumpFn, x_init, key, num_steps: int, gamma: float,
                  schedule: diffusion.Schedule = diffusion.Schedule(),
                  times: Optional[Sequence[float]] = None, shift_sigma_min: bool = False):
  """CTM gamma-sampling (Kim et al. 2024, Alg. 2); NFE = num_steps.

  For n = 0..M-1: s = sqrt(1 - gamma^2) t_{n+1} (or, with shift_sigma_min as in the reference
  code, sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min), at least sigma_min (the paper's
  time 0 is the network's sigma_min: s = 0 would put ln 0 into its s-embedding and give NaN);
  x <- G(x, t_n, s); unless it is the last step, x <- x + sqrt(t_{n+1}^2 - s^2) z.  gamma = 0
  is a deterministic chain of jumps, gamma = 1 is CM multistep sampling.
  """
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must be in [0, 1], got {gamma}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  grid = gamma_time_grid(num_steps, schedule, times)
  b = x_init.shape[0]
  x = x_init
  scale = float(np.sqrt(1.0 - gamma ** 2))
  smin = schedule.sigma_min
  for n in range(num_steps):
    t, t_next = grid[n], grid[n + 1]
    if n == num_steps - 1:
      s = t_next                                   # the last jump lands on sigma_min
    elif shift_sigma_min:
      s = scale * (t_next - smin) + smin
    else:
      s = jnp.maximum(scale * t_next, smin)        # gamma = 1 would give s = 0: ln 0 in c_noise(s)
    x = jump_fn(x, jnp.full((b,), t, x.dtype), jnp.full((b,), s, x.dtype))
    if n < num_steps - 1 and gamma > 0:
      z = jax.random.normal(jax.random.fold_in(key, n), x.shape, x.dtype)
      x = x + jnp.sqrt(jnp.maximum(t_next ** 2 - s ** 2, 0.0)) * z
  return x


def onestep(jump_fn: JumpFn, x_init, schedule: diffusion.Schedule = diffusion.Schedule()):
  """One-step generation G(x_T, T, sigma_min)."""
  b = x_init.shape[0]
  return jump_fn(x_init, jnp.full((b,), schedule.sigma_max, x_init.dtype),
                 jnp.full((b,), schedule.sigma_min, x_init.dtype))


def cm_multistep(f_fn, x_init, key, taus: Sequence[float],
                 schedule: diffusion.Schedule = diffusion.Schedule()):
  """Consistency-model multistep sampling (Song et al. 2023, Alg. 1).

  x <- f(x_T, T); for each tau (descending, in (sigma_min, T)):
  x <- f(x + sqrt(tau^2 - sigma_min^2) z, tau).  f_fn(x, t) is the endpoint map.
  """
  b = x_init.shape[0]
  x = f_fn(x_init, jnp.full((b,), schedule.sigma_max, x_init.dtype))
  for n, tau in enumerate(taus):
    z = jax.random.normal(jax.random.fold_in(key, n), x.shape, x.dtype)
    x = x + float(np.sqrt(tau ** 2 - schedule.sigma_min ** 2)) * z
    x = f_fn(x, jnp.full((b,), tau, x.dtype))
  return x


def to_uint8(x):
  """[-1, 1] samples to uint8 images: clip, then truncate (x + 1) * 127.5 as the references do."""
  x = jnp.clip(x, -1.0, 1.0)
  return ((x + 1.0) * 127.5).astype(jnp.uint8)
