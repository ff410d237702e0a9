"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), in the EDM frame.

The network is the average velocity u(z_t, r, t) = (1 / (t - r)) int_r^t v(z_tau, tau) dtau of
the rectified flow z_t = (1 - t) x_0 + t e (e ~ N(0, I), t in [0, 1]); the EDM frame's
x_sigma = x_0 + sigma e is z_t / (1 - t) with sigma = t / (1 - t).  FlowModel(precond='rf')
turns it into the jump G(x, sigma, s) = z_r / (1 - r), z_r = z_t - (t - r) u, so the project's
samplers, ODE error and evaluation use it as they use CTM's G.  One step (the paper's Alg. 1):

  t', r' ~ logit-normal (p_mean_t, p_std_t), (p_mean_r, p_std_r); t = max, r = min;
  with probability 1 - ratio, r = t (the flow-matching part: u(z, t, t) = v)
  z = (1 - t) x_0 + t e,  v = e - x_0
  (u, du/dt) = jvp(u_theta, (z, r, t), (v, 0, 1))            (the total derivative d/dt u)
  u_tgt = v - (t - r) du/dt                                  (the MeanFlow identity, eq. 6)
  L = mean_b sg(w_b) ||u_b - sg(u_tgt_b)||^2,  w = 1 / (||u - u_tgt||^2 + norm_eps)^norm_p

(the adaptive weighting of the paper's sec. 4.3 with the squared L2 summed over dimensions, as
the released code).  The network sees (t, t - r), the paper's best conditioning.  Sampling:
one step G(x_T, sigma_max, sigma_min), and deterministic chains of jumps (gamma 0) through the
Karras grid or meanflow.sample_times (the paper's two steps pass t = 0.5, sigma = 1).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ctm_jax import config_lib, samplers
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency


def validate_meanflow_config(config):
  c = "meanflow"
  for f in ("p_mean_t", "p_mean_r"):
    config_lib.check_number(config, f"{c}.{f}", -10, 10)
  for f in ("p_std_t", "p_std_r"):
    config_lib.check_number(config, f"{c}.{f}", 0, 10, lo_open=True)
  config_lib.check_number(config, f"{c}.ratio", 0, 1)
  config_lib.check_number(config, f"{c}.norm_p", 0, 2)
  config_lib.check_number(config, f"{c}.norm_eps", 0, lo_open=True)
  consistency.validate_nfes(config, c)
  consistency.validate_sample_times(config, c)
  if "teacher" in config:
    raise config_lib.ConfigError(
        f"config.teacher is set (source {config.teacher.source!r}) but config.method = "
        f"'meanflow' trains from data alone (its target is v = e - x_0); remove config.teacher")


def sample_rf_times(key, batch: int, p_mean_t, p_std_t, p_mean_r, p_std_r, ratio):
  """(r, t), r <= t in (0, 1): two logit-normal draws sorted, then r = t with prob 1 - ratio."""
  k_t, k_r, k_eq = jax.random.split(key, 3)
  a = jax.nn.sigmoid(p_mean_t + p_std_t * jax.random.normal(k_t, (batch,)))
  b = jax.nn.sigmoid(p_mean_r + p_std_r * jax.random.normal(k_r, (batch,)))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  r = jnp.where(jax.random.uniform(k_eq, (batch,)) < ratio, r, t)
  return r, t


def meanflow_target(u_fn, z, r, t, v):
  """(u, u_tgt) with u = u_fn(z, r, t) and u_tgt = v - (t - r) du/dt, where
  du/dt = v . d_z u + d_t u is the JVP of u_fn along the tangent (v, 0, 1) (MeanFlow eq. 8)."""
  u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  return u, v - append_dims(t - r, z.ndim) * dudt


def adaptive_l2(err, norm_p: float, norm_eps: float):
  """Per example sg(w) ||err||^2 with w = 1 / (||err||^2 + norm_eps)^norm_p (MeanFlow sec. 4.3)."""
  sq = jnp.sum((err ** 2).reshape(err.shape[0], -1), axis=1)
  return jax.lax.stop_gradient(1.0 / (sq + norm_eps) ** norm_p) * sq, sq


class MeanFlow(consistency.ConsistencyMethod):
  """MeanFlow: average velocity by the MeanFlow identity, one JVP per step, no teacher."""
  name = "meanflow"
  section = "meanflow"
  generator_kind = "jump"
  trains_jump = True
  has_score_head = True       # g(x, sigma, sigma) = z - t v(z, t): a flow-matching denoiser

  def loss(self, params, extra, frozen, batch, rng, step):
    x0, labels = batch["x"], self.labels(batch)
    k_time, k_e, k_drop, _ = jax.random.split(rng, 4)
    c = self.c
    r, t = sample_rf_times(k_time, x0.shape[0], c.p_mean_t, c.p_std_t, c.p_mean_r, c.p_std_r,
                           c.ratio)
    e = jax.random.normal(k_e, x0.shape, x0.dtype)
    tb = append_dims(t, x0.ndim)
    z, v = (1.0 - tb) * x0 + tb * e, e - x0
    u_fn = lambda zz, rr, tt: self.model.average_velocity(params, zz, rr, tt, labels, train=True,
                                                          rng=k_drop)
    u, u_tgt = meanflow_target(u_fn, z, r, t, v)
    per, sq = adaptive_l2(u - jax.lax.stop_gradient(u_tgt), c.norm_p, c.norm_eps)
    loss = jnp.mean(per)
    return loss, {"loss": loss, "mse": jnp.mean(sq) / (x0.size // x0.shape[0])}

  def sample_fns(self):
    """Deterministic chains of jumps G (gamma 0) through each multistep grid; NFE 1 is
    G(x_T, sigma_max, sigma_min), the paper's z_0 = z_1 - u(z_1, 0, 1)."""
    sch, fns = self.schedule, {}
    for name, taus in self.multistep_times().items():
      times = (sch.sigma_max,) + taus + (sch.sigma_min,)
      def fn(params, x_init, key, labels, times=times):
        return samplers.gamma_sampler(self.model.jump_fn(params, labels), x_init, key,
                                      len(times) - 1, 0.0, sch, times)
      fns[f"{name}_jump"] = fn
    return fns
