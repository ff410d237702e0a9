"""Samplers of a trained run by name, and sample-level evaluation of 2-D data.

Sampler specs (strings, as in config.eval.samplers of python -m launch.eval):
  onestep                      G(x_T, T, sigma_min)                       NFE 1
  gamma:<gamma>:<nfe>          CTM gamma-sampling on the Karras grid       NFE nfe
  gamma:<gamma>:<nfe>:<t,...>  the same through explicit times (T first, sigma_min last)
  gamma_shift:<gamma>:<nfe>    the reference code's s = sqrt(1-g^2)(t' - sigma_min) + sigma_min
  cm:<nfe>                     CM multistep (Song et al. 2023, Alg. 1) through the interior of
                               the Karras grid of nfe + 1 points
  cm:<nfe>:<tau_1,...>         the same through explicit intermediate times (nfe - 1 of them,
                               decreasing, in (sigma_min, sigma_max)), e.g. cm:2:0.821 (iCT)
  sss:<gamma>:<nfe>            TCD's strategic stochastic sampling: s_n at the DDPM timestep
                               floor((1 - gamma) k(t_{n+1})) (samplers.sss_s_values)
  heun:<steps>                 EDM Heun on the denoiser head g(x, t, t)    NFE 2 steps - 1
  teacher_heun:<steps>         distilled runs: EDM Heun on the run's teacher     NFE 2 steps - 1
The jump samplers (onestep, gamma, gamma_shift, cm, sss) need a trained one-step map: CTM's or
TCD's G(x, t, s), or a consistency model's f(x, t) (which runs only onestep and cm:<nfe>).  Asked
of an EDM run they are refused (its "jump" would be a DDIM step of the denoiser, and one step
from sigma_max is the data mean, not a sample).

2-D data: MMD / sliced W1 against fresh data, beside two references that carry the same
sampling noise (never a floor a model cannot pass): the exact mixture denoiser with the same
Heun sampler and sample size, and two independent sets of exact data of that size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import data, diffusion, flow_map, samplers

MAX_NFE = 1000
SAMPLER_FORMS = ("onestep, gamma:<g in [0,1]>:<nfe>[:<t0,..,tM>], gamma_shift:<g>:<nfe>, "
                 "cm:<nfe>[:<tau_1,..>], sss:<g>:<nfe>, heun:<steps >= 2>, teacher_heun:<steps >= 2> "
                 f"(nfe <= {MAX_NFE})")


class SamplerSpecError(ValueError):
  """A sampler string that does not parse or does not fit the run."""


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  name: str
  kind: str                 # gamma | sss | heun | teacher_heun
  gamma: float = 0.0
  steps: int = 1
  times: Optional[tuple] = None
  shift: bool = False
  cm: bool = False          # CM multistep (gamma 1, sigma_min shift); times = its taus or None

  @property
  def nfe(self) -> int:
    return 2 * self.steps - 1 if self.kind in ("heun", "teacher_heun") else self.steps

  @property
  def needs_s(self) -> bool:
    """Whether the sampler jumps with G(x, t, s) (a CTM network)."""
    return self.kind in ("gamma", "sss")

  @property
  def safe_name(self) -> str:
    """The spec as a file-name component."""
    return self.name.replace(":", "_").replace(",", "-")


def parse_sampler(spec: str) -> SamplerSpec:
  """Parse a sampler string (module docstring); errors name the accepted forms."""
  spec = spec.strip()
  parts = spec.split(":")
  out = None
  try:
    if parts == ["onestep"]:
      out = SamplerSpec(spec, "gamma", 0.0, 1)
    elif parts[0] in ("gamma", "gamma_shift") and len(parts) in (3, 4):
      g, n = float(parts[1]), int(parts[2])
      times = tuple(float(v) for v in parts[3].split(",")) if len(parts) == 4 else None
      if not 0 <= g <= 1:
        raise SamplerSpecError(f"sampler {spec!r}: gamma = {g} is outside [0, 1]")
      if times is not None and (len(times) != n + 1 or np.any(np.diff(times) >= 0)):
        raise SamplerSpecError(f"sampler {spec!r}: the times must be nfe + 1 = {n + 1} "
                               f"strictly decreasing values, sigma_max first, sigma_min last")
      out = SamplerSpec(spec, "gamma", g, n, times, parts[0] == "gamma_shift")
    elif parts[0] == "sss" and len(parts) == 3:
      g, n = float(parts[1]), int(parts[2])
      if not 0 <= g <= 1:
        raise SamplerSpecError(f"sampler {spec!r}: gamma = {g} is outside [0, 1]")
      out = SamplerSpec(spec, "sss", g, n)
    elif parts[0] == "cm" and len(parts) in (2, 3):
      n = int(parts[1])
      taus = tuple(float(v) for v in parts[2].split(",")) if len(parts) == 3 else None
      if taus is not None and (len(taus) != n - 1 or np.any(np.diff(taus) >= 0)):
        raise SamplerSpecError(f"sampler {spec!r}: give nfe - 1 = {n - 1} strictly decreasing "
                               f"intermediate times (sigma_max and sigma_min are implied)")
      out = SamplerSpec(spec, "gamma", 1.0, n, taus, True, cm=True)
    elif parts[0] in ("heun", "teacher_heun") and len(parts) == 2 and int(parts[1]) >= 2:
      out = SamplerSpec(spec, parts[0], 0.0, int(parts[1]))
  except SamplerSpecError:
    raise
  except ValueError:
    out = None
  if out is None:
    raise SamplerSpecError(f"bad sampler {spec!r}: use {SAMPLER_FORMS}")
  if not 1 <= out.nfe <= MAX_NFE:
    raise SamplerSpecError(f"sampler {spec!r}: NFE {out.nfe} is outside [1, {MAX_NFE}]")
  return out


def check_sampler_for_run(spec: SamplerSpec, config) -> None:
  """Refuse a sampler the run cannot do: jumps G(x, t, s) of a network that never trained
  them (EDM), intermediate jumps or Heun of a consistency model (Method.check_sampler), a
  teacher of a run that has none, explicit times outside [sigma_min, sigma_max]."""
  from ctm_jax import methods
  cls = methods.method_class(config.method)
  try:
    cls.check_sampler(spec)
  except ValueError as e:
    raise SamplerSpecError(str(e)) from None
  if spec.needs_s and not one_step_generator(config):
    raise SamplerSpecError(
        f"sampler {spec.name!r} jumps with CTM's G(x, t, s), but this {config.method} run's "
        f"network has no s input (one jump from sigma_max would give the data mean); use "
        f"heun:<steps> on its denoiser")
  if spec.kind == "teacher_heun" and not (config.method == "ctm" or getattr(cls, "needs_teacher",
                                                                             False)):
    raise SamplerSpecError(f"sampler {spec.name!r} samples a distilled run's teacher; this run's "
                           f"method ({config.method!r}) has none")
  if spec.cm and spec.times is not None:
    lo, hi = config.diffusion.sigma_min, config.diffusion.sigma_max
    if not lo < min(spec.times) <= max(spec.times) < hi:
      raise SamplerSpecError(f"sampler {spec.name!r}: the intermediate times must lie in "
                             f"(sigma_min, sigma_max) = ({lo}, {hi})")
  elif spec.times is not None:
    lo, hi = config.diffusion.sigma_min, config.diffusion.sigma_max
    t = spec.times
    if not (np.isclose(t[0], hi, rtol=1e-6) and np.isclose(t[-1], lo, rtol=1e-6)):
      raise SamplerSpecError(f"sampler {spec.name!r}: the times must start at sigma_max = {hi} "
                             f"and end at sigma_min = {lo}")


def generator_kind(config) -> str:
  """'cm_f' for a consistency model f(x, t) (CD, CT, iCT, Direct CD), else 'jump'."""
  from ctm_jax import methods
  return methods.method_class(config.method).generator_kind


def one_step_generator(config) -> bool:
  """Whether the run trains a one-step map from sigma_max (CTM, TCD, the consistency models):
  its onestep samples and the ODE error E mean something."""
  from ctm_jax import methods
  cls = methods.method_class(config.method)
  return cls.trains_jump or cls.generator_kind == "cm_f"


def run_jump_fn(model: flow_map.FlowModel, params, labels=None, kind: str = "jump"):
  """The run's jump_fn(x, t, s): G of the network, or f(x, t) for kind 'cm_f'."""
  return model.cm_jump_fn(params, labels) if kind == "cm_f" else model.jump_fn(params, labels)


def sampler_fn(model: flow_map.FlowModel, spec: SamplerSpec, kind: str = "jump",
               clip_x0: bool = False):
  """fn(params, x_init, key, labels) -> samples for a spec of the run's own model; `kind` is
  the run's generator_kind (a consistency model's jump is f(x, t)); clip_x0: CM multistep
  clips its x0 estimates to [-1, 1] (samplers.clips_x0)."""
  sch = model.schedule
  if spec.cm:
    taus = spec.times if spec.times is not None else samplers.karras_interior(spec.steps, sch)

    def cm_fn(params, x, key, labels):
      jump = run_jump_fn(model, params, labels, kind)
      f = lambda xx, tt: jump(xx, tt, jnp.full_like(tt, sch.sigma_min))
      return samplers.cm_multistep(f, x, key, taus, sch, clip_x0)
    return cm_fn
  if spec.kind == "heun":
    return lambda params, x, key, labels: samplers.edm_heun_sampler(
        model.denoise_fn(params, labels), x, spec.steps, sch)
  if spec.kind == "gamma":
    return lambda params, x, key, labels: samplers.gamma_sampler(
        run_jump_fn(model, params, labels, kind), x, key, spec.steps, spec.gamma, sch,
        spec.times, spec.shift)
  if spec.kind == "sss":
    return lambda params, x, key, labels: samplers.sss_sampler(
        run_jump_fn(model, params, labels, kind), x, key, spec.steps, spec.gamma, sch)
  raise SamplerSpecError(f"sampler {spec.name!r} does not sample the run's own model")


def teacher_sampler_fn(teacher, spec: SamplerSpec, schedule: diffusion.Schedule):
  """fn(teacher_params, x_init, key, labels): EDM Heun on a ctm_jax.teacher.Teacher."""
  return lambda params, x, key, labels: samplers.edm_heun_sampler(
      lambda xx, tt: teacher.denoise(params, xx, tt, labels), x, spec.steps, schedule)


# ----------------------------------------------------------------------------- 2-D data

def reference_points(config, num: int, seed: int = 1234) -> np.ndarray:
  """Fresh data for the 2-D metrics: exact draws for toy_gmm and checkerboard (seeded),
  else the first rows of the test split."""
  if config.data.dataset == "toy_gmm":
    from ctm_jax.oracle import toy_mixture_2d
    return np.asarray(toy_mixture_2d().sample(jax.random.PRNGKey(seed), num))
  if config.data.dataset == "checkerboard":
    from ctm_jax.data.builders import checkerboard_points
    return checkerboard_points(num, seed).astype(np.float32)
  return data.load_split(config.data.dataset, "test", config.data.data_dir or None,
                         max_examples=num)["x"]


def toy_metrics(x: np.ndarray, reference: np.ndarray, seed: int = 0) -> Dict[str, float]:
  """Unbiased MMD^2 and sliced W1 between samples and reference points (equal counts)."""
  from ctm_jax.metrics import sample_quality
  n = min(len(x), len(reference))
  return {"mmd": sample_quality.mmd_rbf(x[:n], reference[:n]),
          "sliced_w1": sample_quality.sliced_wasserstein(x[:n], reference[:n],
                                                         jax.random.PRNGKey(seed))}


def _spread(rows) -> Dict[str, float]:
  out = {}
  for k in rows[0]:
    v = np.asarray([r[k] for r in rows], np.float64)
    out[k] = float(v.mean())
    out[k + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
  return out


def exact_denoiser_reference(config, num: int, heun_steps: int, seeds: int,
                             base_seed: int = 0) -> Dict[str, float]:
  """toy_gmm: the metrics of EDM Heun with the EXACT mixture denoiser, `num` samples, mean and
  standard deviation over `seeds` draws of x_T and of the fresh data.  It carries the same
  sampling noise (and Heun's discretisation error) as a model's number: a reference, not a
  floor (a trained model can come out below it)."""
  from ctm_jax.oracle import toy_mixture_2d
  gm = toy_mixture_2d()
  sch = diffusion.Schedule(config.diffusion.sigma_min, config.diffusion.sigma_max,
                           config.diffusion.sigma_data, config.diffusion.rho)
  run = jax.jit(lambda x: samplers.edm_heun_sampler(gm.denoise, x, heun_steps, sch))
  rows = []
  for i in range(seeds):
    key = jax.random.fold_in(jax.random.PRNGKey(base_seed), 0x0E5A + i)
    x = run(samplers.initial_noise(key, (num, 2), sch.sigma_max))
    rows.append(toy_metrics(np.asarray(x), reference_points(config, num, 7919 + i), i))
  return _spread(rows)


def two_sample_reference(config, num: int, seeds: int) -> Dict[str, float]:
  """The metrics between two independent sets of `num` data points (mean and standard
  deviation over `seeds` pairs): what exact samples score at this sample size."""
  rows = []
  for i in range(seeds):
    if config.data.dataset in ("toy_gmm", "checkerboard"):
      a, b = reference_points(config, num, 104729 + i), reference_points(config, num, 7919 + i)
    else:
      pts = reference_points(config, 2 * num)
      if len(pts) < 2 * num:
        return {}
      perm = np.random.default_rng(i).permutation(len(pts))
      a, b = pts[perm[:num]], pts[perm[num:2 * num]]
    rows.append(toy_metrics(a, b, i))
  return _spread(rows)


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


def ode_error(model: flow_map.FlowModel, params, x_T, reference, kind: str = "jump") -> float:
  """E = mean over examples of |G(x_T, T, sigma_min) - x_ref|^2 / dim (Vouitsis et al. 2024);
  for kind 'cm_f' the map is f(x_T, T)."""
  x0 = samplers.onestep(run_jump_fn(model, params, None, kind), jnp.asarray(x_T, jnp.float32),
                        model.schedule)
  diff = np.asarray(x0, np.float64) - np.asarray(reference, np.float64)
  return float(np.mean(diff.reshape(len(diff), -1) ** 2))


@functools.lru_cache(maxsize=8)
def toy_exact_solution(num: int, seed: int, sigma_max: float, sigma_min: float):
  """(x_T, x_exact) of the mixture's PF-ODE from x_T = initial_noise(PRNGKey(seed + 1)), by
  scipy with the jitted exact denoiser; cached, as every method of a seed shares it."""
  from ctm_jax.oracle import toy_mixture_2d
  gm = toy_mixture_2d()
  x_T = np.asarray(samplers.initial_noise(jax.random.PRNGKey(seed + 1), (num, 2), sigma_max))
  ref = exact_ode_solution(jax.jit(gm.denoise), x_T, sigma_max, sigma_min)
  x_T.setflags(write=False)
  ref.setflags(write=False)
  return x_T, ref


def toy_ode_error(config, model: flow_map.FlowModel, params, num: int, seed: int) -> Dict[str, float]:
  """toy_gmm, a one-step generator (CTM, TCD, a consistency model): the ODE error of the
  one-step map against scipy's exact PF-ODE solution of the mixture, and the data variance
  per dimension for scale."""
  sch = model.schedule
  x_T, ref = toy_exact_solution(int(num), int(seed), float(sch.sigma_max), float(sch.sigma_min))
  return {"ode_error": ode_error(model, params, x_T, ref, generator_kind(config)),
          "data_variance_per_dim": float(np.var(ref))}
