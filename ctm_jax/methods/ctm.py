"""Consistency Trajectory Models (Kim et al., ICLR 2024): CTM + DSM (+ GAN) training.

One generator step (METHODS.md section 3; the reference's ctm_losses):
  k ~ P(k) proportional to k on 1..K, shared by the batch;  i ~ U{0..N-1-k};  j ~ U{i+k..N-1}
  t = t_i, u = t_{i+k}, s = t_j on the Karras grid of N points;  x_t = x_0 + t z
  x_u    = sg(Heun_teacher^k(x_t, t -> u))                     (k steps, one compilation)
  est    = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min)       (gradient through the input)
  target = sg(G_{theta^-}(G_theta(x_u, u, s), s, sigma_min))
  L = d(est, target) + lambda_DSM L_DSM [+ lambda_GAN L_GAN]
with lambda = |grad_W L_CTM| / (|grad_W L_other| + 1e-4) at one last-layer weight W, clamped to
[0, 1e4] (and lambda_GAN clipped to [0.01, 10]).  theta^- is an EMA of theta, updated on
generator steps only.  Discriminator steps alternate with generator steps once GAN is on.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctm_jax import config_lib, diffusion, samplers, solvers, train_state
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import consistency
from ctm_jax.methods.base import Method
from ctm_jax.nets.torch_port import copy_matching_params
from ctm_jax.teacher import Teacher, validate_teacher_config

DISTANCES = consistency.DISTANCES


def validate_ctm_config(config):
  c = "ctm"
  n = config_lib.check_number(config, f"{c}.num_points", 2, integer=True)
  config_lib.check_number(config, f"{c}.max_k", 1, n - 1, integer=True)
  consistency.validate_distance(config, c)
  config_lib.check_choice(config, f"{c}.teacher_last_step", solvers.LAST_STEP)
  config_lib.check_number(config, f"{c}.target_ema", 0, 1, hi_open=True)
  config_lib.check_choice(config, f"{c}.dsm_weight_mode", ("adaptive", "fixed", "off"))
  config_lib.check_number(config, f"{c}.dsm_weight", 0)
  config_lib.check_number(config, f"{c}.adaptive_max", 0, lo_open=True)
  config_lib.check_number(config, f"{c}.dsm_curve_max", 0, 1)
  config_lib.check_number(config, f"{c}.dsm_p_std", 0, lo_open=True)
  config_lib.check_number(config, f"{c}.sample_gamma", 0, 1)
  consistency.validate_nfes(config, c)
  validate_teacher_config(config)
  if config.gan.enabled:
    from ctm_jax.methods import ctm_gan
    ctm_gan.validate_gan_config(config)


def distance_fn(config, dim: int):
  """Per-example distance d(a, b) -> (B,) of config.ctm (consistency.distance_fn)."""
  c = config.ctm
  return consistency.distance_fn(c.distance, dim, c.huber_c, c.lpips_pooling)


def default_adaptive_layer(model_cfg, data_shape) -> str:
  """The weight W of the adaptive weights, as in the reference: the final output convolution
  on CIFAR-10 (dec['32x32_aux_conv']), the last decoder block's second convolution for the ADM
  net on ImageNet-64 (output_blocks[15][0].out_layers[3]), the output layer of the MLP."""
  if model_cfg.arch == "mlp":
    return "out/kernel"
  r = int(data_shape[0])
  if model_cfg.arch == "songunet":
    return f"dec_{r}x{r}_aux_conv/kernel"
  return f"dec_{r}x{r}_block{int(model_cfg.num_blocks)}/conv1/kernel"


def find_param(params, path: str):
  """Look up a '/'-separated parameter path, with an error listing what is there."""
  node = params
  for p in path.split("/"):
    if not hasattr(node, "keys") or p not in node:
      have = sorted(node.keys())[:12] if hasattr(node, "keys") else type(node).__name__
      raise KeyError(f"parameter path {path!r}: {p!r} not found (have {have})")
    node = node[p]
  return node


def adaptive_weight(g_main, g_other, path: str, max_value: float):
  """|grad_W L_main| / (|grad_W L_other| + 1e-4), clamped to [0, max_value], no gradient."""
  a = jnp.linalg.norm(find_param(g_main, path).ravel())
  b = jnp.linalg.norm(find_param(g_other, path).ravel())
  return jax.lax.stop_gradient(jnp.clip(a / (b + 1e-4), 0.0, max_value))


def tree_axpy(a, x, y):
  """y + a * x over pytrees."""
  return jax.tree_util.tree_map(lambda xi, yi: yi + a * xi, x, y)


class CTM(Method):
  name = "ctm"

  trains_jump = True

  def __init__(self, config, model):
    super().__init__(config, model)
    c = config.ctm
    sch = self.schedule
    self.grid_np = np.asarray(diffusion.karras_sigmas(c.num_points, sch.sigma_min, sch.sigma_max,
                                                      sch.rho))
    self.teacher = Teacher(config)
    from ctm_jax import data
    info = data.dataset_info(config.data.dataset)
    self.data_shape = tuple(info.shape)
    self.distance = distance_fn(config, int(np.prod(self.data_shape)))
    self.adaptive_path = c.adaptive_layer or default_adaptive_layer(config.model,
                                                                      self.data_shape)
    self.gan = None
    if config.gan.enabled:
      from ctm_jax.methods import ctm_gan
      self.gan = ctm_gan.GAN(config, self.data_shape, info.num_classes)
    self._frozen = None

  # ------------------------------------------------------------------------- state
  @property
  def step_kinds(self):
    return ("ctm", "ctm_gan", "disc") if self.gan is not None else ("ctm",)

  def step_kind(self, step: int) -> str:
    if self.gan is None:
      return "ctm"
    return self.gan.step_kind(step)

  def frozen(self):
    if self._frozen is None:
      fr = {"teacher": self.teacher.params()}
      if self.config.ctm.distance == "lpips":
        from ctm_jax.nets import lpips
        fr["lpips"] = lpips.load_lpips_params(self.config.ctm.lpips_weights)
      if self.gan is not None:
        fr.update(self.gan.frozen())
      self._frozen = fr
    return self._frozen

  def init_params(self, key, params, frozen):
    """Copy every teacher weight whose name and shape match (the s-path stays as initialised)."""
    if not frozen.get("teacher"):
      return params
    params, _ = copy_matching_params(params, frozen["teacher"])
    return params

  def init_extra(self, key, params, frozen):
    try:
      find_param(params, self.adaptive_path)
    except KeyError as e:
      raise config_lib.ConfigError(f"config.ctm.adaptive_layer: {e}") from None
    extra = {"target": params}
    if self.gan is not None:
      extra.update(self.gan.init(key, frozen))
    return extra

  # ------------------------------------------------------------------------- pieces
  def teacher_solve(self, frozen, x_t, i, k, labels):
    """k Heun steps of the teacher along the grid from index i (per example): sg(x_u)."""
    grid = jnp.asarray(self.grid_np, x_t.dtype)
    fn = lambda x, t: self.teacher.denoise(frozen["teacher"], x, t, labels)
    x_u = solvers.solve(fn, x_t, grid, i, k, "heun", self.config.ctm.teacher_last_step)
    return jax.lax.stop_gradient(x_u)

  def sample_times(self, rng_k, rng_idx, batch):
    """(k, i, j, t, u, s): k from rng_k (one traced scalar shared by the whole step, so every
    microbatch uses it), the indices from rng_idx."""
    c = self.config.ctm
    k = diffusion.sample_k_proportional(rng_k, c.max_k)
    k_idx = rng_idx
    i, j = diffusion.sample_ctm_indices(k_idx, batch, c.num_points, k)
    grid = jnp.asarray(self.grid_np)
    return k, i, j, grid[i], grid[i + k], grid[j]

  def to_sigma_min(self, target_params, x, s, labels, rng):
    """The outer map G_{theta^-}(x, s, sigma_min) (identity where s = sigma_min)."""
    smin = jnp.full_like(s, self.schedule.sigma_min)
    return self.model.jump(target_params, x, s, smin, labels,
                           train=self.config.ctm.target_train_mode, rng=rng)

  def estimate_fn(self, target_params, x_t, t, s, labels, rngs):
    def est(params):
      inner = self.model.jump(params, x_t, t, s, labels, train=True, rng=rngs[0])
      return self.to_sigma_min(target_params, inner, s, labels, rngs[1])
    return est

  def ctm_target(self, params, target_params, x_u, u, s, labels, rngs):
    inner = self.model.jump(params, x_u, u, s, labels, train=self.config.ctm.target_train_mode,
                            rng=rngs[0])
    return jax.lax.stop_gradient(self.to_sigma_min(target_params, inner, s, labels, rngs[1]))

  def dsm_loss(self, params, x0, labels, rng):
    """L_DSM with CTM's time mixture on the denoiser head g(x, t, t), EDM weighting."""
    c = self.config.ctm
    k_sig, k_z, k_drop = jax.random.split(rng, 3)
    sigma = diffusion.sample_ctm_dsm_sigma(k_sig, x0.shape[0], self.schedule, c.dsm_p_mean,
                                           c.dsm_p_std, c.dsm_curve_max)
    x_t = x0 + append_dims(sigma, x0.ndim) * jax.random.normal(k_z, x0.shape, x0.dtype)
    d = self.model.denoiser(params, x_t, sigma, sigma, labels, train=True, rng=k_drop)
    w = diffusion.edm_loss_weight(sigma, self.schedule.sigma_data)
    return jnp.mean(w * jnp.mean((d - x0).reshape(x0.shape[0], -1) ** 2, axis=1))

  # ------------------------------------------------------------------------- generator step
  def generator_grads(self, params, extra, frozen, batch, rng, k_times, with_gan: bool,
                      disc_state=None):
    """(grads, metrics, disc_state): gradients of L_CTM + lambda_DSM L_DSM (+ lambda_GAN L_G)
    for one (micro)batch, and D's statistics after the GAN term's forward pass (with_gan)."""
    c = self.config.ctm
    x0, labels = batch["x"], self.labels(batch)
    b = x0.shape[0]
    keys = jax.random.split(rng, 8)
    k, i, j, t, u, s = self.sample_times(k_times, keys[7], b)
    x_t = x0 + append_dims(t, x0.ndim) * jax.random.normal(keys[0], x0.shape, x0.dtype)
    x_u = self.teacher_solve(frozen, x_t, i, k, labels)
    tgt = self.ctm_target(params, extra["target"], x_u, u, s, labels, (keys[1], keys[2]))
    est, pull = jax.vjp(self.estimate_fn(extra["target"], x_t, t, s, labels, (keys[3], keys[4])),
                        params)
    l_ctm, d_est = jax.value_and_grad(lambda e: jnp.mean(self.distance(frozen, e, tgt)))(est)
    (g_ctm,) = pull(d_est)
    grads = g_ctm
    metrics = {"loss_ctm": l_ctm, "k": k.astype(jnp.float32)}
    total = l_ctm
    if c.dsm_weight_mode != "off":
      l_dsm, g_dsm = jax.value_and_grad(self.dsm_loss)(params, x0, labels, keys[5])
      if c.dsm_weight_mode == "adaptive":
        lam = c.dsm_weight * adaptive_weight(g_ctm, g_dsm, self.adaptive_path, c.adaptive_max)
      else:
        lam = jnp.float32(c.dsm_weight)
      grads = tree_axpy(lam, g_dsm, grads)
      metrics.update(loss_dsm=l_dsm, lambda_dsm=lam)
      total = total + lam * l_dsm
    if with_gan:
      (l_g, disc_state), d_est_g = jax.value_and_grad(
          lambda e: self.gan.generator_loss(extra["disc"], disc_state, frozen, e, labels, keys[6]),
          has_aux=True)(est)
      (g_gan,) = pull(d_est_g)
      lam_g = self.gan.weight(g_ctm, g_gan, self.adaptive_path)
      grads = tree_axpy(lam_g, g_gan, grads)
      metrics.update(loss_gan_g=l_g, lambda_gan=lam_g)
      total = total + lam_g * l_g
    metrics["loss"] = total
    return grads, metrics, disc_state

  def make_step(self, kind, tx):
    mb = self.config.training.microbatches
    if kind == "disc":
      return self.gan.make_disc_step(self)

    with_gan = kind == "ctm_gan"

    def step(state, batch, frozen):
      rng = self.step_rng(state)
      k_times, k_rest = jax.random.split(rng)
      grad_fn = lambda p, dst, b, r: self.generator_grads(p, state.extra, frozen, b, r, k_times,
                                                          with_gan, dst)
      grads, metrics, dstate = train_state.accumulate_gradients_with_state(
          grad_fn, state.params, state.extra["disc_state"] if with_gan else None, batch, k_rest,
          mb)
      new_state, metrics = self.finish_step(state, grads, tx, metrics)
      target = train_state.ema_update(state.extra["target"], new_state.params,
                                      jnp.float32(self.config.ctm.target_ema))
      extra = {**new_state.extra, "target": target}
      if with_gan:
        extra["disc_state"] = dstate
      return new_state.replace(extra=extra), metrics
    return step

  # ------------------------------------------------------------------------- sampling
  def sample_fns(self):
    c = self.config.ctm
    sch = self.schedule
    fns = {}
    for nfe in c.sample_nfes:
      def gamma_fn(params, x_init, key, labels, nfe=nfe):
        return samplers.gamma_sampler(self.model.jump_fn(params, labels), x_init, key, nfe,
                                      c.sample_gamma, sch)
      fns[f"nfe{nfe}_gamma{c.sample_gamma:g}"] = gamma_fn
    fns.update(super().sample_fns())     # EDM Heun on the score head g(x, t, t)
    return fns
