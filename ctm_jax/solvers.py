"""ODE solvers for the probability-flow ODE dx/dt = (x - D(x, t)) / t over a sigma grid.

A `denoise_fn(x, t) -> D(x, t)` takes x of shape (B, ...) and t of shape (B,) (one noise
level per example).  Solves run along a descending grid `sigmas` (a jax array); the
start index may differ per example and the number of steps k may be a traced value, so a
single compilation serves every k and the loop runs exactly k steps (a while loop).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ctm_jax.diffusion import append_dims

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

METHODS = ("euler", "heun")
# DDIM (Song et al. 2021, eq. 12 with eta = 0) in the VE frame x = x_VP / sqrt(abar), sigma =
# sqrt((1 - abar) / abar) is x_u = (u/t) x_t + (1 - u/t) D(x_t, t): the Euler step exactly, so
# it has no name of its own here (a VP-time Euler step would be another solver).
DDIM_NOTE = ("'ddim' is the same update as 'euler' in this (VE / EDM) frame: DDIM's "
             "x_u = (u/t) x_t + (1 - u/t) D(x_t, t) is the Euler step; use 'euler'")
LAST_STEP = ("heun", "euler")


def _per_example(t, x):
  return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])


def pf_ode_drift(denoise_fn: DenoiseFn, x, t):
  """dx/dt = (x - D(x, t)) / t (EDM eq. 3 with s(t) = 1, sigma(t) = t)."""
  t = _per_example(t, x)
  return (x - denoise_fn(x, t)) / append_dims(t, x.ndim)


def euler_step(denoise_fn: DenoiseFn, x, t, u):
  """x_u = x_t + (u - t) (x_t - D(x_t, t)) / t."""
  t, u = _per_example(t, x), _per_example(u, x)
  return x + append_dims(u - t, x.ndim) * pf_ode_drift(denoise_fn, x, t)


def heun_step(denoise_fn: DenoiseFn, x, t, u, second_order=True):
  """EDM Algorithm 1 step t -> u: an Euler predictor, then the average of the two slopes.

  `second_order` (bool or per-example bool array) selects Heun; where it is False, or where
  u == 0 (the slope at 0 is undefined), the Euler predictor is returned.
  """
  t, u = _per_example(t, x), _per_example(u, x)
  d_t = pf_ode_drift(denoise_fn, x, t)
  h = append_dims(u - t, x.ndim)
  x_euler = x + h * d_t
  if second_order is False:
    return x_euler
  use = jnp.logical_and(u > 0, jnp.asarray(second_order))

  def corrector(_):
    u_safe = jnp.where(u > 0, u, jnp.ones_like(u))
    d_u = pf_ode_drift(denoise_fn, x_euler, u_safe)
    x_heun = x + h * 0.5 * (d_t + d_u)
    return jnp.where(append_dims(use, x.ndim), x_heun, x_euler)

  # The second evaluation is skipped at run time when no example needs it (a step to 0).
  return jax.lax.cond(jnp.any(use), corrector, lambda _: x_euler, None)


def step(denoise_fn: DenoiseFn, x, t, u, method: str = "heun", second_order=True):
  """One step t -> u of `method` (euler | heun); `second_order` as in heun_step."""
  if method == "heun":
    return heun_step(denoise_fn, x, t, u, second_order)
  if method == "euler":
    return euler_step(denoise_fn, x, t, u)
  _check(method, LAST_STEP[0])


def _check(method: str, last_step: str):
  if method == "ddim":
    raise ValueError(f"solver method {DDIM_NOTE}")
  if method not in METHODS:
    raise ValueError(f"solver method must be one of {METHODS}, got {method!r}")
  if last_step not in LAST_STEP:
    raise ValueError(f"last_step must be one of {LAST_STEP}, got {last_step!r}")


def _grid_step(denoise_fn, x, sigmas, idx, method, last_step):
  """The step from sigmas[idx] to sigmas[idx + 1] (idx scalar or per example), with the
  last-step rule for a step into the grid's final point."""
  n = sigmas.shape[0]
  t, u = sigmas[idx], sigmas[jnp.minimum(idx + 1, n - 1)]
  second = True if last_step == "heun" else (idx + 1 < n - 1)
  return step(denoise_fn, x, t, u, method, second)


def solve(denoise_fn: DenoiseFn, x, sigmas, start, num_steps, method: str = "heun",
          last_step: str = "heun"):
  """Integrate from sigmas[start] for num_steps grid steps, to sigmas[start + num_steps].

  start: int or per-example int array (B,); num_steps: int or a traced scalar int; the work
  is proportional to num_steps, and one compilation serves every value of it.
  last_step: how a Heun step whose target is the grid's last point is taken: 'heun' (the
  CTM reference, a full second-order step to sigma_min) or 'euler' (EDM, which ends at 0;
  a step to 0 is always Euler).
  """
  _check(method, last_step)
  sigmas = jnp.asarray(sigmas, x.dtype)
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), x.shape[:1])
  body = lambda j, x: _grid_step(denoise_fn, x, sigmas, start + j, method, last_step)
  return jax.lax.fori_loop(0, num_steps, body, x)


def solve_to_end(denoise_fn: DenoiseFn, x, sigmas, start, method: str = "heun",
                 last_step: str = "heun"):
  """Integrate example b from sigmas[start_b] all the way to sigmas[-1] (Direct CD's target).

  One loop over the grid from the batch's largest start time: at loop index idx every
  example with start_b <= idx takes the step sigmas[idx] -> sigmas[idx + 1], the others
  wait (masked), as layer6ai-labs/direct-cms does.  The loop runs n - 1 - min_b start_b
  steps (a while loop with a traced count: one compilation for every batch of starts).
  """
  _check(method, last_step)
  sigmas = jnp.asarray(sigmas, x.dtype)
  n = sigmas.shape[0]
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), x.shape[:1])
  first = jnp.min(start)

  def body(j, x):
    idx = first + j
    x_next = _grid_step(denoise_fn, x, sigmas, idx, method, last_step)
    return jnp.where(append_dims(start <= idx, x.ndim), x_next, x)

  return jax.lax.fori_loop(0, n - 1 - first, body, x)


def solve_grid(denoise_fn: DenoiseFn, x, sigmas, method: str = "heun", last_step: str = "heun"):
  """Integrate along the whole grid, from sigmas[0] to sigmas[-1]."""
  return solve(denoise_fn, x, sigmas, 0, sigmas.shape[0] - 1, method, last_step)


def num_denoiser_calls(num_steps: int, method: str, ends_at_zero: bool = False) -> int:
  """NFE of a solve: Heun costs 2 per step except a last step to 0 (Euler)."""
  if method == "heun":
    return 2 * num_steps - (1 if ends_at_zero else 0)
  return num_steps
