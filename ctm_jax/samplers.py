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


def _jump_chain(jump_fn: JumpFn, x, key, grid, s_values, stochastic: bool):
  """x <- G(x, t_n, s_n) for n = 0..M-1; unless last (or deterministic), diffuse forward
  from s_n to t_{n+1}: x <- x + sqrt(t_{n+1}^2 - s_n^2) z (VE)."""
  b = x.shape[0]
  num_steps = len(s_values)
  for n, s in enumerate(s_values):
    t, t_next = grid[n], grid[n + 1]
    x = jump_fn(x, jnp.full((b,), t, x.dtype), jnp.full((b,), s, x.dtype))
    if n < num_steps - 1 and stochastic:
      z = jax.random.normal(jax.random.fold_in(key, n), x.shape, x.dtype)
      x = x + jnp.sqrt(jnp.maximum(t_next ** 2 - s ** 2, 0.0)) * z
  return x


def _check_steps(gamma: float, num_steps: int):
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must be in [0, 1], got {gamma}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def gamma_sampler(jump_fn: JumpFn, x_init, key, num_steps: int, gamma: float,
                  schedule: diffusion.Schedule = diffusion.Schedule(),
                  times: Optional[Sequence[float]] = None, shift_sigma_min: bool = False):
  """CTM gamma-sampling (Kim et al. 2024, Alg. 2) on t_0 = sigma_max > ... > t_M = sigma_min;
  NFE = num_steps = M.

  For n = 0..M-1: x <- G(x, t_n, s_n), then, unless n = M-1, x <- x + sqrt(t_{n+1}^2 - s_n^2) z_n
  (z_n from fold_in(key, n)), with s_{M-1} = t_M = sigma_min and, for n < M-1,
    s_n = max(sqrt(1 - gamma^2) t_{n+1}, sigma_min)                 (default), or
    s_n = sqrt(1 - gamma^2) (t_{n+1} - sigma_min) + sigma_min        (shift_sigma_min: the
          reference's sample_gamma_multistep, Kim-Dongjun/ctm-cifar10 cm/sample_util.py:404).
  The clamp to sigma_min is the consistency-model convention (never jump below sigma_min, where
  c_noise = log s would be -inf at s = 0); for gamma < 1 it acts only where
  sqrt(1 - gamma^2) t_{n+1} < sigma_min.  gamma = 0: the deterministic chain of jumps
  t_n -> t_{n+1} (both forms).  gamma = 1: s_n = sigma_min in both forms, i.e. CM multistep
  sampling (Song et al. 2023, Alg. 1) through t_1 .. t_{M-1} with noise sqrt(t^2 - sigma_min^2).
  """
  _check_steps(gamma, num_steps)
  grid = gamma_time_grid(num_steps, schedule, times)
  scale = float(np.sqrt(1.0 - gamma ** 2))
  smin = schedule.sigma_min
  s_values = []
  for n in range(num_steps):
    t_next = grid[n + 1]
    if n == num_steps - 1:
      s_values.append(t_next)                        # the last jump lands on sigma_min
    elif shift_sigma_min:
      s_values.append(scale * (t_next - smin) + smin)
    else:
      s_values.append(jnp.maximum(scale * t_next, smin))
  return _jump_chain(jump_fn, x_init, key, grid, s_values, gamma > 0)


def sss_s_values(grid, gamma: float, schedule: diffusion.Schedule = diffusion.Schedule(),
                 vp_schedule: str = "ddpm_linear"):
  """TCD's end points s_n of strategic stochastic sampling on the grid t_0 > ... > t_M.

  TCD (Zheng et al. 2024, Alg. 4; diffusers' TCDScheduler.step) applies gamma to the discrete
  VP timestep, not to the noise level: with k' the timestep of t_{n+1},
    s_n = sigma_VP(floor((1 - gamma) k'))                    for n < M - 1,
  clamped to [sigma_min, t_{n+1}], and timestep 0 (the least noisy) read as sigma_min;
  s_{M-1} = t_M (the last jump lands on sigma_min).
  k' is the discrete timestep of `vp_schedule` nearest t_{n+1} (diffusion.vp_timestep) and
  sigma_VP(k) = sqrt((1 - abar_k) / abar_k).  gamma = 0: s_n = t_{n+1} exactly.
  Returns numpy float64 values.
  """
  grid = np.asarray(grid, np.float64)
  sig = diffusion.vp_sigmas(vp_schedule)
  out = []
  for n in range(len(grid) - 2):
    t_next = grid[n + 1]
    if gamma == 0:
      out.append(t_next)
      continue
    k = diffusion.vp_timestep(t_next, vp_schedule)
    k_s = int(np.floor((1.0 - gamma) * k))
    s = schedule.sigma_min if k_s == 0 else sig[k_s]
    out.append(float(np.clip(s, schedule.sigma_min, t_next)))
  return out + [grid[-1]]


def sss_sampler(jump_fn: JumpFn, x_init, key, num_steps: int, gamma: float,
                schedule: diffusion.Schedule = diffusion.Schedule(),
                times: Optional[Sequence[float]] = None, vp_schedule: str = "ddpm_linear"):
  """TCD's strategic stochastic sampling (Zheng et al. 2024, Alg. 4) in VE form; NFE = num_steps.

  For n = 0..M-1: x_hat = G(x, t_n, s_n) with s_n from sss_s_values (gamma on the discrete VP
  timestep); unless last, x <- x_hat + sqrt(t_{n+1}^2 - s_n^2) z_n (z_n from fold_in(key, n)).
  In VP terms (x_VP = sqrt(abar) x_VE) this is TCDScheduler.step exactly: x_s = sqrt(abar_s)
  x0_hat + sqrt(1 - abar_s) eps_hat, x' = sqrt(abar'/abar_s) x_s + sqrt(1 - abar'/abar_s) z.
  gamma = 0 is the deterministic chain of jumps; gamma = 1 is CM multistep (s = sigma_min).
  """
  _check_steps(gamma, num_steps)
  with jax.ensure_compile_time_eval():          # the grid is static: s_n are host numbers
    grid = gamma_time_grid(num_steps, schedule, times)
    s_values = [jnp.float32(v) for v in sss_s_values(grid, gamma, schedule, vp_schedule)]
  return _jump_chain(jump_fn, x_init, key, grid, s_values, gamma > 0)


def onestep(jump_fn: JumpFn, x_init, schedule: diffusion.Schedule = diffusion.Schedule()):
  """One-step generation G(x_T, T, sigma_min)."""
  b = x_init.shape[0]
  return jump_fn(x_init, jnp.full((b,), schedule.sigma_max, x_init.dtype),
                 jnp.full((b,), schedule.sigma_min, x_init.dtype))


def clips_x0(config) -> bool:
  """Whether CM multistep clips each x0 estimate to the data range [-1, 1]: image data and
  config.sampling.cm_clip_x0 (both reference samplers clamp the denoised image)."""
  from ctm_jax import data
  return bool(config.sampling.get("cm_clip_x0", True)) and data.dataset_info(
      config.data.dataset).kind == "image"


def karras_interior(nfe: int, schedule: diffusion.Schedule = diffusion.Schedule()):
  """The nfe - 1 interior points of the Karras grid of nfe + 1 points (host floats)."""
  if nfe < 2:
    return ()
  grid = np.asarray(diffusion.karras_sigmas(nfe + 1, schedule.sigma_min, schedule.sigma_max,
                                            schedule.rho))
  return tuple(float(v) for v in grid[1:-1])


def cm_multistep(f_fn, x_init, key, taus: Sequence[float],
                 schedule: diffusion.Schedule = diffusion.Schedule(), clip_x0: bool = False):
  """Consistency-model multistep sampling (Song et al. 2023, Alg. 1).

  x <- f(x_T, T); for each tau (descending, in (sigma_min, T)):
  x <- f(x + sqrt(tau^2 - sigma_min^2) z, tau).  f_fn(x, t) is the endpoint map.  clip_x0:
  every f output is clipped to [-1, 1] (image data; both reference samplers clamp the
  denoised image: openai/consistency_models' stochastic_iterative_sampler and the JAX code).
  """
  clip = (lambda v: jnp.clip(v, -1.0, 1.0)) if clip_x0 else (lambda v: v)
  b = x_init.shape[0]
  x = clip(f_fn(x_init, jnp.full((b,), schedule.sigma_max, x_init.dtype)))
  for n, tau in enumerate(taus):
    z = jax.random.normal(jax.random.fold_in(key, n), x.shape, x.dtype)
    x = x + float(np.sqrt(tau ** 2 - schedule.sigma_min ** 2)) * z
    x = clip(f_fn(x, jnp.full((b,), tau, x.dtype)))
  return x


UINT8_RULES = ("truncate", "round")


def to_uint8(x, rule: str = "truncate"):
  """[-1, 1] samples to uint8 images.  'truncate': floor((clip(x, -1, 1) + 1) 127.5), as CTM's,
  CM's and score_sde's sampling scripts do; 'round': floor(clip(x 127.5 + 128, 0, 255)), i.e.
  (x + 1) 127.5 rounded half up, as EDM's generate.py and StyleGAN do."""
  if rule == "truncate":
    return ((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)
  if rule == "round":
    return jnp.clip(x * 127.5 + 128.0, 0.0, 255.0).astype(jnp.uint8)
  raise ValueError(f"rule must be one of {UINT8_RULES}, got {rule!r}")
