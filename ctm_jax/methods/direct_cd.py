"""Direct consistency distillation (Vouitsis et al. 2024, "Inconsistencies in Consistency Models").

The consistency function regresses directly onto the teacher's solution of the whole rest of
the trajectory, with no target network:

  i ~ U{0..N-2}, t = t_i, x_t = x_0 + t z
  x_end = sg Solver_teacher(x_t, t_i -> t_{N-1} = sigma_min)      (N - 1 - i steps)
  L = mean_b lambda d(f_theta(x_t, t), x_end)

Each example needs a different number of steps.  As layer6ai-labs/direct-cms does, one loop
runs from the batch's largest t to sigma_min and each example joins when the loop reaches its
own t (solvers.solve_to_end): one compilation for every batch, 2 (N - 1 - min_b i_b) teacher
calls for Heun.  (Sharing one i per batch, as CTM shares k, would make the cost follow i
exactly but puts every example of a step at the same noise level; with per-example i and
batches of tens of examples min_b i_b is almost always 0, so the cost is about a full solve.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ctm_jax import config_lib, diffusion, solvers
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency


def validate_direct_cd_config(config):
  c = "direct_cd"
  consistency.validate_family_config(config, c, teacher=True)
  config_lib.check_number(config, f"{c}.num_points", 2, integer=True)
  solver = config[c].teacher_solver
  if solver not in consistency.TEACHER_SOLVERS:
    raise config_lib.ConfigError(
        f"config.{c}.teacher_solver = {solver!r}: Direct CD regresses onto the teacher's "
        f"probability-flow ODE solution, so the solver must be a deterministic ODE solver, one of "
        f"{consistency.TEACHER_SOLVERS} (not a stochastic or ancestral sampler)")
  consistency.validate_teacher_solver(config, c)


class DirectCD(consistency.ConsistencyMethod):
  name = "direct_cd"
  section = "direct_cd"
  needs_teacher = True

  def __init__(self, config, model):
    super().__init__(config, model)
    sch = self.schedule
    self.grid = diffusion.karras_sigmas(self.c.num_points, sch.sigma_min, sch.sigma_max, sch.rho)

  def teacher_solve(self, frozen, x_t, i, labels):
    """sg Solver(x_t, t_i -> sigma_min) per example (masked loop, solvers.solve_to_end)."""
    fn = lambda xx, tt: self.teacher.denoise(frozen["teacher"], xx, tt, labels)
    x_end = solvers.solve_to_end(fn, x_t, self.grid, i, self.c.teacher_solver,
                                 self.c.teacher_last_step)
    return jax.lax.stop_gradient(x_end)

  def loss(self, params, extra, frozen, batch, rng, step):
    x0, labels = batch["x"], self.labels(batch)
    k_idx, k_z, k_drop, _ = jax.random.split(rng, 4)
    n = self.c.num_points
    i = jax.random.randint(k_idx, (x0.shape[0],), 0, n - 1)
    t, u = self.grid[i], self.grid[i + 1]
    x_t = x0 + append_dims(t, x0.ndim) * jax.random.normal(k_z, x0.shape, x0.dtype)
    x_end = self.teacher_solve(frozen, x_t, i, labels)
    loss = self.regression_loss(frozen, self.f(params, x_t, t, labels, k_drop), x_end, t, u)
    return loss, {"loss": loss, "teacher_steps": (n - 1 - jnp.min(i)).astype(jnp.float32)}
