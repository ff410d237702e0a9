"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"), sCT and sCD, in the EDM frame.

TrigFlow: x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2]; it is the EDM point
x = x_t / cos(t) at sigma = sd tan(t), i.e. t = arctan(sigma / sd).  The consistency function
f(x_t, t) = cos(t) x_t - sin(t) sd F_trig(x_t / sd, t) is, in the EDM frame, EDM's
preconditioned output c_skip x + c_out F with F = -F_trig (FlowModel(precond='trig')), so the CM
samplers and the evaluation use it as they use any consistency model's f.  One step (Alg. 1):

  tau ~ N(p_mean, p_std^2), t = arctan(e^tau / sd), x_t = cos(t) x_0 + sin(t) z
  dx_t/dt = cos(t) z - sin(t) x_0                              (sCT)
          = (x - D(x, sigma)) / sin(t) - sin(t) x, x = x_t / cos(t)   (sCD: the EDM teacher D's
                                                                PF-ODE dx/dsigma = (x - D)/sigma)
  (F, dF/dt) = jvp(F_{theta^-}(x_t / sd, t), (x_t, t), (dx_t/dt, 1)),  theta^- = sg(theta)
  g = cos(t) df/dt = cos(t) [cos(t) (dx_t/dt + sd F) - r sin(t) (x_t - sd dF/dt)]
      (r = min(1, k / H): tangent warm-up; r = 1 is the exact total derivative, times cos t)
  g <- g / (||g|| + c)                                          (tangent normalisation)
  L = mean_b [ prior(t) e^{w_phi(t)} / D ||F_theta - F_{theta^-} + g||^2 - w_phi(t) ]

(the sign of g is the paper's with F = -F_trig); prior(t) = 1 / (sd tan t) when
prior_weighting (off in every config: on the toy it starves the large sigma where the one-step
map starts, docs/flow_maps.md), else 1; w_phi(t) a linear layer on fixed Fourier features of
the network's time input, trained with its own Adam in TrainState.extra (the adaptive
weighting, as EDM2's uncertainty).  The network's time input (time_input) is TrigFlow's t
(the paper's) or the run's c_noise(sigma) (an EDM teacher's: sCD can then start from it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import config_lib, diffusion, train_state
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency

NUM_FOURIER = 64


TIME_INPUTS = ("trigflow", "c_noise")


def validate_scm_config(config, section: str, *, teacher: bool):
  ti = config_lib.check_choice(config, f"{section}.time_input", TIME_INPUTS)
  if config[section].init_from_teacher and ti != "c_noise":
    raise config_lib.ConfigError(
        f"config.{section}.init_from_teacher = True needs config.{section}.time_input = "
        f"'c_noise' (the EDM teacher's time input), got {ti!r}")
  config_lib.check_number(config, f"{section}.p_mean", -10, 10)
  config_lib.check_number(config, f"{section}.p_std", 0, 10, lo_open=True)
  config_lib.check_number(config, f"{section}.tangent_c", 0, lo_open=True)
  config_lib.check_number(config, f"{section}.warmup_steps", 0, integer=True)
  config_lib.check_number(config, f"{section}.weight_lr", 0)
  for f in ("adaptive_weighting", "prior_weighting", "init_from_teacher"):
    if not isinstance(config[section][f], bool):
      raise config_lib.ConfigError(f"config.{section}.{f} must be True or False, "
                                   f"got {config[section][f]!r}")
  consistency.validate_nfes(config, section)
  consistency.validate_sample_times(config, section)
  if teacher:
    if "teacher" not in config:
      raise config_lib.ConfigError("config.method = 'scd' distils a teacher: config.teacher is "
                                   "missing")
    from ctm_jax.teacher import validate_teacher_config
    validate_teacher_config(config)
  elif "teacher" in config:
    raise config_lib.ConfigError(
        f"config.teacher is set (source {config.teacher.source!r}) but config.method = 'sct' is "
        f"consistency TRAINING (dx_t/dt = cos(t) z - sin(t) x_0); remove config.teacher, or "
        f"distil with method 'scd'")


def validate_sct_config(config):
  validate_scm_config(config, "sct", teacher=False)


def validate_scd_config(config):
  validate_scm_config(config, "scd", teacher=True)


def trig_velocity_from_denoiser(x_t, t, denoised):
  """dx_t/dt of the PF-ODE in TrigFlow from an EDM denoiser D(x, sigma), x = x_t / cos(t):
  dx_t/dt = (x - D) / sin(t) - sin(t) x  (x_t = cos(t) x, sigma = sd tan(t),
  dx/dsigma = (x - D) / sigma)."""
  tb = append_dims(t, x_t.ndim)
  x = x_t / jnp.cos(tb)
  return (x - denoised) / jnp.sin(tb) - jnp.sin(tb) * x


def scm_tangent(F_fn, x_t, t, dxdt, sigma_data: float, warmup):
  """(F, g): F = F_fn(x_t, t) (EDM-sign network output) and g = cos(t) df/dt with the tangent
  warm-up factor on the sin(t) terms (module docstring), dF/dt by one JVP along (dx_t/dt, 1)."""
  F, dFdt = jax.jvp(F_fn, (x_t, t), (dxdt, jnp.ones_like(t)))
  tb = append_dims(t, x_t.ndim)
  cos, sin = jnp.cos(tb), jnp.sin(tb)
  g = cos * (cos * (dxdt + sigma_data * F) - warmup * sin * (x_t - sigma_data * dFdt))
  return F, g


def normalize_tangent(g, c: float):
  """g / (||g|| + c), the norm over each example's dimensions (sCM sec. 4.2)."""
  norm = jnp.sqrt(jnp.sum((g ** 2).reshape(g.shape[0], -1), axis=1))
  return g / append_dims(norm + c, g.ndim)


class _SCM(consistency.ConsistencyMethod):
  """The shared sCT / sCD step; subclasses give dx_t/dt."""
  generator_kind = "cm_f"
  has_score_head = False

  def __init__(self, config, model):
    super().__init__(config, model)
    rng = np.random.RandomState(0)
    self.fourier_freqs = jnp.asarray(rng.randn(NUM_FOURIER), jnp.float32)
    self.fourier_phases = jnp.asarray(rng.rand(NUM_FOURIER), jnp.float32)

  # ------------------------------------------------------------------------- weighting w_phi
  def init_extra(self, key, params, frozen):
    zeros = {"w": jnp.zeros((NUM_FOURIER,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return {"weight": zeros, "weight_m": zeros, "weight_v": zeros}

  def log_weight(self, phi, sigma):
    """w_phi(t): a linear layer on cos(2 pi (f c + p)) of fixed random f, p (0 at init), c the
    network's time input (TrigFlow t or c_noise(sigma))."""
    cn = (jnp.arctan(sigma / self.schedule.sigma_data) if self.model.precond == "trig"
          else diffusion.c_noise(sigma, self.model.c_noise_kind))
    feats = math.sqrt(2.0) * jnp.cos(2 * math.pi * (cn[:, None] * self.fourier_freqs
                                                    + self.fourier_phases))
    return feats @ phi["w"] / math.sqrt(NUM_FOURIER) + phi["b"]

  # ------------------------------------------------------------------------- loss
  def velocity(self, frozen, x0, z, x_t, t, labels):
    raise NotImplementedError

  def warmup(self, step):
    h = self.c.warmup_steps
    return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / h) if h > 0 else jnp.float32(1.0)

  def scm_loss(self, params, phi, frozen, batch, rng, step):
    x0, labels = batch["x"], self.labels(batch)
    k_time, k_z, k_drop, _ = jax.random.split(rng, 4)
    sd, c = self.schedule.sigma_data, self.c
    sigma = jnp.exp(c.p_mean + c.p_std * jax.random.normal(k_time, (x0.shape[0],)))
    t = jnp.arctan(sigma / sd)
    tb = append_dims(t, x0.ndim)
    z = sd * jax.random.normal(k_z, x0.shape, x0.dtype)
    x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
    dxdt = jax.lax.stop_gradient(self.velocity(frozen, x0, z, x_t, t, labels))

    def F_fn(p):     # F(x_t / sd, t) in the EDM sign: the network at sigma = sd tan(t)
      return lambda xx, tt: self.model.raw(p, xx / sd, sd * jnp.tan(tt), None, labels,
                                           train=True, rng=k_drop)
    F_minus, g = scm_tangent(F_fn(jax.lax.stop_gradient(params)), x_t, t, dxdt, sd,
                             self.warmup(step))
    g = jax.lax.stop_gradient(normalize_tangent(g, c.tangent_c))
    F_theta = F_fn(params)(x_t, t)
    dim = x0.size // x0.shape[0]
    sq = jnp.sum(((F_theta - jax.lax.stop_gradient(F_minus) + g) ** 2).reshape(x0.shape[0], -1),
                 axis=1) / dim
    prior = 1.0 / (sd * jnp.tan(t)) if c.prior_weighting else jnp.ones_like(t)
    if c.adaptive_weighting:
      w = self.log_weight(phi, sigma)
      per = prior * jnp.exp(w) * sq - w
    else:
      per = prior * sq
    loss = jnp.mean(per)
    return loss, {"loss": loss, "mse": jnp.mean(sq), "tangent_warmup": self.warmup(step)}

  def loss(self, params, extra, frozen, batch, rng, step):
    return self.scm_loss(params, extra["weight"], frozen, batch, rng, step)

  def make_step(self, kind, tx):
    """Gradients for (theta, phi); theta through the run's optimizer and EMAs, phi by Adam
    (weight_lr, betas of config.optim) in extra."""
    mb, o = self.config.training.microbatches, self.config.optim

    def step(state, batch, frozen):
      def grad_fn(both, b, r):
        (_, met), g = jax.value_and_grad(self.scm_loss, argnums=(0, 1), has_aux=True)(
            both[0], both[1], frozen, b, r, state.step)
        return g, met
      (g_theta, g_phi), metrics = train_state.accumulate_gradients(
          grad_fn, (state.params, state.extra["weight"]), batch, self.step_rng(state), mb)
      new_state, metrics = self.finish_step(state, g_theta, tx, metrics)
      k = jnp.asarray(state.step, jnp.float32) + 1.0
      ex = state.extra
      m = jax.tree_util.tree_map(lambda a, g: o.b1 * a + (1 - o.b1) * g, ex["weight_m"], g_phi)
      v = jax.tree_util.tree_map(lambda a, g: o.b2 * a + (1 - o.b2) * g * g, ex["weight_v"], g_phi)
      phi = jax.tree_util.tree_map(
          lambda p, mm, vv: p - self.c.weight_lr * (mm / (1 - o.b1 ** k))
          / (jnp.sqrt(vv / (1 - o.b2 ** k)) + o.eps), ex["weight"], m, v)
      new_state = new_state.replace(extra={"weight": phi, "weight_m": m, "weight_v": v})
      return new_state, metrics
    return step


class SCT(_SCM):
  """sCT: the tangent of the data-noise interpolation."""
  name = "sct"
  section = "sct"

  def velocity(self, frozen, x0, z, x_t, t, labels):
    tb = append_dims(t, x0.ndim)
    return jnp.cos(tb) * z - jnp.sin(tb) * x0


class SCD(_SCM):
  """sCD: the tangent of the EDM teacher's PF-ODE, mapped to TrigFlow."""
  name = "scd"
  section = "scd"
  needs_teacher = True

  def velocity(self, frozen, x0, z, x_t, t, labels):
    sigma = self.schedule.sigma_data * jnp.tan(t)
    x = x_t / jnp.cos(append_dims(t, x_t.ndim))
    d = self.teacher.denoise(frozen["teacher"], x, sigma, labels)
    return trig_velocity_from_denoiser(x_t, t, d)
