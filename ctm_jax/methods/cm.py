"""Consistency models: distillation (CD), training (CT) and improved training (iCT).

f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(c_in(t) x, t) with the CM boundary scalings
(c_skip = sd^2 / ((t - eps)^2 + sd^2), c_out = sd (t - eps) / sqrt(sd^2 + t^2), eps = sigma_min),
a network without an s input.  One step (Song et al. 2023, Alg. 2 and 3; Song & Dhariwal 2023):

  i ~ p(i) on {0..N-2} of the Karras grid t_0 = sigma_max > ... > t_{N-1} = sigma_min
  t = t_i, u = t_{i+1}, z ~ N(0, I), x_t = x_0 + t z
  CD:  x_u = one teacher ODE step t -> u from x_t (Heun by default)
  CT / iCT:  x_u = x_0 + u z (the same z)
  L = mean_b lambda(t, u) d(f_theta(x_t, t), sg f_{theta^-}(x_u, u))

  CD:   N fixed, i uniform, theta^- = EMA(theta) with rate mu (mu = 0: theta^- = sg(theta), the
        official CIFAR-10 LPIPS setting), initialised from the teacher.
  CT:   N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln(mu0) / N(k)),
        i uniform, random initialisation.
  iCT:  N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)),
        p(i) proportional to erf((ln t_i - P_mean) / (sqrt 2 P_std))
                               - erf((ln t_{i+1} - P_mean) / (sqrt 2 P_std)),
        theta^- = sg(theta), pseudo-Huber d, lambda = 1 / (t_i - t_{i+1}).
k is the optimizer step and K the curriculum length (curriculum_steps, 0 = the run's
num_train_steps).  The grid of N(k) points is computed in-graph (diffusion.karras_sigma_at),
so one compilation serves every N.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from ctm_jax import config_lib, diffusion
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency

MU_FORMS = ("paper", "code")


# ----------------------------------------------------------------------------- curricula

def curriculum_length(config, section: str) -> int:
  k = config[section].curriculum_steps
  return int(k) if k > 0 else int(config.training.num_train_steps)


def ct_num_points(k, total: int, s0: int, s1: int):
  """CT's N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, App. C),
  with the official code's floor of 2 points; k may be traced."""
  k = jnp.asarray(k, jnp.float32)
  v = jnp.ceil(jnp.sqrt(k / total * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1)
  return jnp.maximum(v, 1).astype(jnp.int32) + 1


def ct_target_ema(num_points, s0: int, mu0: float, form: str = "paper"):
  """CT's mu(k) = exp(s0 ln(mu0) / N(k)) (the paper, mu(0) = mu0); form 'code' divides by
  N(k) - 1 instead, as openai/consistency_models_cifar10 does (mu(0) = mu0^2 for s0 = 2)."""
  n = jnp.asarray(num_points, jnp.float32)
  denom = n if form == "paper" else n - 1.0
  return jnp.exp(s0 * math.log(mu0) / denom) if mu0 > 0 else jnp.zeros_like(n)


def ict_stage_length(total: int, s0: int, s1: int) -> int:
  """K' = floor(K / (log2 floor(s1 / s0) + 1)) (Song & Dhariwal 2023, eq. 10)."""
  return int(math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))


def ict_num_points(k, total: int, s0: int, s1: int):
  """iCT's doubling curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1; k may be traced."""
  stage = jnp.asarray(k, jnp.int32) // ict_stage_length(total, s0, s1)
  return jnp.minimum(s0 * 2.0 ** jnp.minimum(stage, 30).astype(jnp.float32), s1).astype(jnp.int32) + 1


def ict_index_logits(num_points, max_points: int, p_mean: float, p_std: float,
                     schedule: diffusion.Schedule):
  """log p(i) for the pair (t_i, t_{i+1}), i = 0..max_points-2 (entries i >= N - 1 are -inf):
  p(i) proportional to erf((ln t_i - P_mean)/(sqrt 2 P_std)) - erf((ln t_{i+1} - P_mean)/(sqrt 2 P_std))
  (iCT's discrete log-normal, eq. 11, written for a descending grid)."""
  i = jnp.arange(max_points - 1)
  ok = i < num_points - 1
  ii = jnp.where(ok, i, 0)
  sig = lambda j: diffusion.karras_sigma_at(j, num_points, schedule.sigma_min, schedule.sigma_max,
                                            schedule.rho)
  cdf = lambda t: erf((jnp.log(t) - p_mean) / (math.sqrt(2.0) * p_std))
  w = cdf(sig(ii)) - cdf(sig(ii + 1))
  return jnp.where(ok, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)


# ----------------------------------------------------------------------------- config checks

def _validate_curriculum(config, section: str):
  s0 = config_lib.check_number(config, f"{section}.s0", 1, integer=True)
  config_lib.check_number(config, f"{section}.s1", s0, integer=True)
  config_lib.check_number(config, f"{section}.curriculum_steps", 0, integer=True)


def validate_cd_config(config):
  c = "cd"
  consistency.validate_family_config(config, c, teacher=True)
  config_lib.check_number(config, f"{c}.num_points", 2, integer=True)
  consistency.validate_teacher_solver(config, c)
  consistency.validate_target_ema(config, c)


def validate_ct_config(config):
  c = "ct"
  consistency.validate_family_config(config, c, teacher=False)
  _validate_curriculum(config, c)
  config_lib.check_number(config, f"{c}.mu0", 0, 1, hi_open=True)
  config_lib.check_choice(config, f"{c}.mu_form", MU_FORMS)


def validate_ict_config(config):
  c = "ict"
  consistency.validate_family_config(config, c, teacher=False)
  _validate_curriculum(config, c)
  config_lib.check_number(config, f"{c}.p_mean", -10, 10)
  config_lib.check_number(config, f"{c}.p_std", 0, lo_open=True)
  s0, s1 = config.ict.s0, config.ict.s1
  total = curriculum_length(config, c)
  if ict_stage_length(total, s0, s1) < 1:
    raise config_lib.ConfigError(
        f"config.ict.curriculum_steps: the doubling curriculum needs K >= log2(floor(s1/s0)) + 1 "
        f"= {math.log2(math.floor(s1 / s0)) + 1:g} steps (K' = floor(K / that) >= 1), got K = "
        f"{total}")


# ----------------------------------------------------------------------------- the methods

class _ConsistencyModel(consistency.ConsistencyMethod):
  """The shared CD / CT / iCT step; subclasses give N, p(i) and the pair's second point."""

  def num_points(self, step):
    raise NotImplementedError

  def sample_index(self, key, batch: int, n, step):
    """i in {0..N-2}, uniform (CD, CT)."""
    return jax.random.randint(key, (batch,), 0, n - 1)

  def second_point(self, frozen, x0, z, x_t, t, u, is_last, labels):
    raise NotImplementedError

  def loss(self, params, extra, frozen, batch, rng, step):
    x0, labels = batch["x"], self.labels(batch)
    k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
    sch = self.schedule
    n = self.num_points(step)
    i = self.sample_index(k_idx, x0.shape[0], n, step)
    grid = lambda j: diffusion.karras_sigma_at(j, n, sch.sigma_min, sch.sigma_max, sch.rho)
    t, u = grid(i), grid(i + 1)
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    x_t = x0 + append_dims(t, x0.ndim) * z
    x_u = self.second_point(frozen, x0, z, x_t, t, u, i + 1 == n - 1, labels)
    online = self.f(params, x_t, t, labels, k_drop)
    target = self.f(self.target_params(params, extra), x_u, u, labels, k_drop)
    loss = self.regression_loss(frozen, online, target, t, u)
    return loss, {"loss": loss, "num_points": jnp.asarray(n, jnp.float32)}


class CD(_ConsistencyModel):
  """Consistency distillation: one teacher ODE step between neighbouring grid points."""
  name = "cd"
  section = "cd"
  needs_teacher = True

  @property
  def keeps_target(self):
    return self.c.target_ema > 0

  def target_rate(self, step):
    return jnp.float32(self.c.target_ema)

  def num_points(self, step):
    return self.c.num_points

  def second_point(self, frozen, x0, z, x_t, t, u, is_last, labels):
    return self.teacher_step(frozen, x_t, t, u, is_last, labels)


class CT(_ConsistencyModel):
  """Consistency training: the pair from shared noise, with the N(k) / mu(k) curriculum."""
  name = "ct"
  section = "ct"

  def __init__(self, config, model):
    super().__init__(config, model)
    self.total = curriculum_length(config, self.section)

  @property
  def keeps_target(self):
    return self.c.mu0 > 0

  def num_points(self, step):
    return ct_num_points(step, self.total, self.c.s0, self.c.s1)

  def target_rate(self, step):
    return ct_target_ema(self.num_points(step), self.c.s0, self.c.mu0, self.c.mu_form)

  def second_point(self, frozen, x0, z, x_t, t, u, is_last, labels):
    return x0 + append_dims(u, x0.ndim) * z


class ICT(CT):
  """Improved consistency training: doubling curriculum, discrete log-normal i, no EMA target."""
  name = "ict"
  section = "ict"

  @property
  def keeps_target(self):
    return False

  def num_points(self, step):
    return ict_num_points(step, self.total, self.c.s0, self.c.s1)

  def sample_index(self, key, batch, n, step):
    logits = ict_index_logits(n, self.c.s1 + 1, self.c.p_mean, self.c.p_std, self.schedule)
    return jax.random.categorical(key, logits, shape=(batch,))
