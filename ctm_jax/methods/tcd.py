"""Trajectory Consistency Distillation (Zheng et al. 2024) and its strategic stochastic sampler.

The trajectory consistency function is the jump of CTM's network (flow_map.FlowModel.jump):
  G_theta(x, t, s) = (s/t) x + (1 - s/t) g_theta(x, t, s)
which in VP terms is TCD's first-order form a_s x0_hat + sigma_s eps_hat (exactly DDIM from t to
s given x0_hat; G(x, t, t) = x).  With tcd.s_input = False the network does not see s (as TCD's
U-Net, where s enters only through the DDIM formula); with True it is CTM's (x, t, s) network.
One step, on the Karras grid of N points with skip k:

  i ~ U{0..N-1-k}, t = t_i, u = t_{i+k};  j ~ U{i+k..J}, s = t_j
  (J: the last grid index with t_J >= s_min, so s in [s_min, u] on the grid, s_min >= sigma_min;
   TCD samples the end timestep uniformly over the grid points at or below the target's)
  x_t = x_0 + t z;  x_u = sg one teacher ODE step t -> u across the skip
  L = mean_b lambda d(G_theta(x_t, t, s), sg G_{theta^-}(x_u, u, s)),  theta^- = EMA(theta).

g(x, t, t) is never trained (G(x, t, t) = x whatever g is) and g(x, t, s) is the endpoint of the
trajectory through x seen from s, not E[x_0 | x_t]: TCD has no score head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import config_lib, diffusion, samplers
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency


def validate_tcd_config(config):
  c = "tcd"
  consistency.validate_family_config(config, c, teacher=True)
  n = config_lib.check_number(config, f"{c}.num_points", 2, integer=True)
  config_lib.check_number(config, f"{c}.skip", 1, n - 1, integer=True)
  consistency.validate_teacher_solver(config, c)
  consistency.validate_target_ema(config, c)
  config_lib.check_number(config, f"{c}.sample_gamma", 0, 1)
  d = config.diffusion
  s_min = config_lib.check_number(config, f"{c}.s_min", 0)
  if not d.sigma_min <= s_min < d.sigma_max:
    raise config_lib.ConfigError(
        f"config.tcd.s_min = {s_min} puts s outside [sigma_min, t] = [{d.sigma_min}, t]: it must "
        f"be in [config.diffusion.sigma_min, sigma_max) = [{d.sigma_min}, {d.sigma_max})")


class TCD(consistency.ConsistencyMethod):
  name = "tcd"
  section = "tcd"
  needs_teacher = True
  generator_kind = "jump"
  has_score_head = False

  trains_jump = True

  def __init__(self, config, model):
    super().__init__(config, model)
    sch = self.schedule
    self.grid = diffusion.karras_sigmas(self.c.num_points, sch.sigma_min, sch.sigma_max, sch.rho)
    # J: the last grid index with t_J >= s_min.
    self.last_s_index = int(np.nonzero(np.asarray(self.grid) >= self.c.s_min)[0].max())

  @property
  def keeps_target(self):
    return self.c.target_ema > 0

  def target_rate(self, step):
    return jnp.float32(self.c.target_ema)

  def sample_times(self, key, batch: int):
    """(i, j): i ~ U{0..N-1-k}, j ~ U{i+k..max(J, i+k)}."""
    k = self.c.skip
    k_i, k_j = jax.random.split(key)
    i = jax.random.randint(k_i, (batch,), 0, self.c.num_points - k)
    j = jax.random.randint(k_j, (batch,), i + k, jnp.maximum(self.last_s_index, i + k) + 1)
    return i, j

  def loss(self, params, extra, frozen, batch, rng, step):
    x0, labels = batch["x"], self.labels(batch)
    k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
    i, j = self.sample_times(k_idx, x0.shape[0])
    t, u, s = self.grid[i], self.grid[i + self.c.skip], self.grid[j]
    x_t = x0 + append_dims(t, x0.ndim) * jax.random.normal(k_z, x0.shape, x0.dtype)
    x_u = self.teacher_step(frozen, x_t, t, u, i + self.c.skip == self.c.num_points - 1, labels)
    online = self.model.jump(params, x_t, t, s, labels, train=True, rng=k_drop)
    target = self.model.jump(self.target_params(params, extra), x_u, u, s, labels, train=True,
                             rng=k_drop)
    loss = self.regression_loss(frozen, online, target, t, u)
    return loss, {"loss": loss}

  # ------------------------------------------------------------------------- sampling
  def jump_fn(self, params, labels=None):
    return self.model.jump_fn(params, labels)

  def sample_fns(self):
    """SSS with gamma = tcd.sample_gamma at every NFE (NFE 1 is G(x_T, T, sigma_min))."""
    gamma, sch = self.c.sample_gamma, self.schedule
    fns = {}
    for name, taus in self.multistep_times().items():
      times = (sch.sigma_max,) + taus + (sch.sigma_min,)
      def fn(params, x_init, key, labels, times=times):
        return samplers.sss_sampler(self.model.jump_fn(params, labels), x_init, key,
                                    len(times) - 1, gamma, sch, times)
      fns[f"{name}_sss{gamma:g}"] = fn
    return fns
