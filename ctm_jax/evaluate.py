"""Sampling jobs and sample-level evaluation of a trained run.

Sampler specs (strings, as on the command line of launch/sample.py):
  onestep                      G(x_T, T, sigma_min)                       NFE 1
  gamma:<gamma>:<nfe>          CTM gamma-sampling on the Karras grid       NFE nfe
  gamma:<gamma>:<nfe>:<t,...>  the same through explicit times (T first, sigma_min last)
  gamma_shift:<gamma>:<nfe>    the reference code's s = sqrt(1-g^2)(t' - sigma_min) + sigma_min
  cm:<nfe>                     CM multistep (gamma = 1, sigma_min shift)
  heun:<steps>                 EDM Heun on the denoiser head g(x, t, t)    NFE 2 steps - 1
For a model without an s input (an EDM teacher) the jump is the DDIM step of its denoiser.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import diffusion, flow_map, parallel, samplers, solvers


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  name: str
  kind: str                 # gamma | heun
  gamma: float = 0.0
  steps: int = 1
  times: Optional[tuple] = None
  shift: bool = False

  @property
  def nfe(self) -> int:
    return 2 * self.steps - 1 if self.kind == "heun" else self.steps


def parse_sampler(spec: str) -> SamplerSpec:
  """Parse a sampler string (module docstring); errors name the accepted forms."""
  parts = spec.strip().split(":")
  try:
    if parts == ["onestep"]:
      return SamplerSpec(spec, "gamma", 0.0, 1)
    if parts[0] in ("gamma", "gamma_shift") and len(parts) in (3, 4):
      g, n = float(parts[1]), int(parts[2])
      times = tuple(float(v) for v in parts[3].split(",")) if len(parts) == 4 else None
      if not 0 <= g <= 1 or n < 1:
        raise ValueError
      return SamplerSpec(spec, "gamma", g, n, times, parts[0] == "gamma_shift")
    if parts[0] == "cm" and len(parts) == 2:
      return SamplerSpec(spec, "gamma", 1.0, int(parts[1]), None, True)
    if parts[0] == "heun" and len(parts) == 2 and int(parts[1]) >= 2:
      return SamplerSpec(spec, "heun", 0.0, int(parts[1]))
  except ValueError:
    pass
  raise ValueError(f"bad sampler {spec!r}: use onestep, gamma:<g in [0,1]>:<nfe>[:<t0,..,tM>], "
                   f"gamma_shift:<g>:<nfe>, cm:<nfe> or heun:<steps >= 2>")


def sampler_fn(model: flow_map.FlowModel, spec: SamplerSpec, method=None):
  """fn(params, x_init, key, labels) -> samples for the spec.  With the run's `method` the spec
  is checked against what the model learned (method.check_sampler: a consistency function
  f(x, t) runs only onestep / cm:<nfe>, no score head no heun) and its jump_fn is used."""
  sch = model.schedule
  if method is not None:
    method.check_sampler(spec)
  if spec.kind == "heun":
    return lambda params, x, key, labels: samplers.edm_heun_sampler(
        model.denoise_fn(params, labels), x, spec.steps, sch)
  jump = method.jump_fn if method is not None else model.jump_fn
  return lambda params, x, key, labels: samplers.gamma_sampler(
      jump(params, labels), x, key, spec.steps, spec.gamma, sch, spec.times, spec.shift)


def generate(fn, params, shape, num: int, batch: int, seed: int, mesh,
             num_classes: int = 0, class_label: int = -1, sigma_max: float = 80.0):
  """num samples in batches of `batch` (x_T and sampler keys from fold_in(seed, batch index));
  labels cycle through the classes, or are all `class_label` when >= 0."""
  rep = parallel.replicated(mesh)
  run = jax.jit(lambda p, x, k, y: fn(p, x, k, y), out_shardings=rep)
  out, labels_out = [], []
  for bi, start in enumerate(range(0, num, batch)):
    n = min(batch, num - start)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), bi)
    k_x, k_s = jax.random.split(key)
    x_init = samplers.initial_noise(k_x, (batch,) + tuple(shape), sigma_max)
    labels = None
    if num_classes:
      labels = (jnp.full((batch,), class_label, jnp.int32) if class_label >= 0 else
                (jnp.arange(start, start + batch, dtype=jnp.int32) % num_classes))
      labels_out.append(np.asarray(labels)[:n])
    x = run(params, x_init, k_s, labels)
    out.append(np.asarray(parallel.to_host(x))[:n])
  return np.concatenate(out), (np.concatenate(labels_out) if labels_out else None)


def exact_ode_solution(denoise_fn, x_T, t0: float, t1: float, rtol: float = 1e-9):
  """The PF-ODE solution x(t1) from x(t0) = x_T by scipy's DOP853 (host, float64)."""
  from scipy.integrate import solve_ivp
  x_T = np.asarray(x_T, np.float64)
  shape = x_T.shape

  def rhs(t, y):
    x = jnp.asarray(y.reshape(shape), jnp.float32)
    d = np.asarray(denoise_fn(x, jnp.full((shape[0],), t, jnp.float32)), np.float64)
    return ((y.reshape(shape) - d) / t).ravel()

  sol = solve_ivp(rhs, (t0, t1), x_T.ravel(), method="DOP853", rtol=rtol, atol=rtol)
  if not sol.success:
    raise RuntimeError(f"reference ODE solve failed: {sol.message}")
  return sol.y[:, -1].reshape(shape)


def ode_error(model: flow_map.FlowModel, params, x_T, reference, jump_fn=None) -> float:
  """E = mean over examples of |G(x_T, T, sigma_min) - x_ref|^2 / dim (Vouitsis et al. 2024).

  jump_fn: the run's method.jump_fn(params) (for a consistency model f(x_T, T)); default the
  model's jump G."""
  jump = jump_fn if jump_fn is not None else model.jump_fn(params)
  x0 = samplers.onestep(jump, jnp.asarray(x_T, jnp.float32), model.schedule)
  diff = np.asarray(x0, np.float64) - np.asarray(reference, np.float64)
  return float(np.mean(diff.reshape(len(diff), -1) ** 2))
