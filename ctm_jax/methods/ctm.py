"""Consistency Trajectory Models (Kim et al., ICLR 2024): CTM + DSM (+ GAN) training.

One generator step (METHODS.md section 3; the reference's ctm_losses):
  k ~ P(k) proportional to k on 1..K, shared by the batch;  i ~ U{0..N-1-k};  j ~ U{i+k..N-1}
  t = t_i, u = t_{i+k}, s = t_j on the Karras grid of N points;  x_t = x_0 + t z
  x_u    = sg(Heun_teacher^k(x_t, t -> u))                     (k steps, one compilation)
  est    = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min)       (gradient through the input)
  target = sg(G_{theta^-}(G_theta(x_u, u, s), s, sigma_min))
  L = d(est, target) + lambda_DSM L_DSM [+ lambda_GAN L_GAN]
with lambda = |grad_W L_CTM| / (|grad_W L_other| + 1e-4) at one last-layer weight W, clamped to
[0, 1e4] (and lambda_GAN clipped to [0.01, 10]), computed per group of ctm.adaptive_group_size
examples of each microbatch from the group's own mean losses, as the reference does per GPU
microbatch (adaptive_groups.py).  theta^- is an EMA of theta, updated on generator steps only.
Discriminator steps alternate with generator steps once GAN is on.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctm_jax import config_lib, diffusion, flow_map, samplers, solvers, train_state
from ctm_jax.diffusion import append_dims
from ctm_jax.methods import adaptive_groups, consistency
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
  gs = config_lib.check_number(config, f"{c}.adaptive_group_size", 0, integer=True)
  part = config.training.batch_size // config.training.microbatches
  if gs and part % gs:
    raise config_lib.ConfigError(
        f"config.ctm.adaptive_group_size = {gs} must divide the microbatch "
        f"config.training.batch_size / config.training.microbatches = {part} (0 = one group)")
  config_lib.check_number(config, f"{c}.dsm_curve_max", 0, 1)
  config_lib.check_number(config, f"{c}.dsm_p_std", 0, lo_open=True)
  config_lib.check_number(config, f"{c}.sample_gamma", 0, 1)
  consistency.validate_nfes(config, c)
  validate_teacher_config(config)
  if config.gan.enabled:
    from ctm_jax.methods import ctm_gan
    ctm_gan.validate_gan_config(config)
  elif config.gan.get("conditional", False):      # runs saved before the field lack it
    raise config_lib.ConfigError(
        "config.gan.conditional = True has no effect while config.gan.enabled = False (there is "
        "no discriminator): set config.gan.enabled = True, or config.gan.conditional = False")


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
    self.group_size = int(c.get("adaptive_group_size", 0))   # absent in runs saved before it
    self.gan = None
    if config.gan.enabled:
      from ctm_jax.methods import ctm_gan
      self.gan = ctm_gan.GAN(config, self.data_shape, info.num_classes)
    self._frozen = None

  # ------------------------------------------------------------------------- state
  @property
  def step_kinds(self):
    return ("ctm", "ctm_gan", "disc") if self.gan is not None else ("ctm",)

  k_step_kinds = ("ctm", "ctm_gan")     # their steps take k (step(..., k)) for benchmarks

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
      w = adaptive_groups.find_param(params, self.adaptive_path)
      if self.group_size:                          # W's layer must be one the tap handles
        x = jnp.zeros((2,) + self.data_shape, jnp.float32)
        t = jnp.ones((2,), jnp.float32)
        labels = jnp.zeros((2,), jnp.int32) if self.config.data.class_conditional else None
        jax.eval_shape(lambda p: self.student(lambda: self.model.jump(p, x, t, t, labels),
                                              jnp.zeros((2,) + w.shape)), params)
    except (KeyError, ValueError) as e:
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
    microbatch uses it), the indices from rng_idx.  rng_k may instead be k itself, an int32
    scalar (a step with k given: launch.bench)."""
    c = self.config.ctm
    if jnp.ndim(rng_k) == 0 and jnp.issubdtype(jnp.result_type(rng_k), jnp.integer):
      k = jnp.asarray(rng_k, jnp.int32)
    else:
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

  def dsm_inputs(self, x0, rng):
    """(x_t, sigma, dropout key) of L_DSM: CTM's time mixture, x_t = x_0 + sigma z."""
    c = self.config.ctm
    k_sig, k_z, k_drop = jax.random.split(rng, 3)
    sigma = diffusion.sample_ctm_dsm_sigma(k_sig, x0.shape[0], self.schedule, c.dsm_p_mean,
                                           c.dsm_p_std, c.dsm_curve_max)
    x_t = x0 + append_dims(sigma, x0.ndim) * jax.random.normal(k_z, x0.shape, x0.dtype)
    return x_t, sigma, k_drop

  def dsm_per_example(self, denoised, x0, sigma):
    """lambda(sigma) * mean |g(x_t, sigma, sigma) - x_0|^2 per example (EDM weighting)."""
    w = diffusion.edm_loss_weight(sigma, self.schedule.sigma_data)
    return w * jnp.mean((denoised - x0).reshape(x0.shape[0], -1) ** 2, axis=1)

  def dsm_loss(self, params, x0, labels, rng):
    """L_DSM with CTM's time mixture on the denoiser head g(x, t, t), EDM weighting."""
    x_t, sigma, k_drop = self.dsm_inputs(x0, rng)
    d = self.model.denoiser(params, x_t, sigma, sigma, labels, train=True, rng=k_drop)
    return jnp.mean(self.dsm_per_example(d, x0, sigma))

  # ------------------------------------------------------------------------- generator step
  def student(self, fn, delta):
    """fn(), with W's layer tapped for per-group gradients when delta is not None."""
    return fn() if delta is None else adaptive_groups.tap_layer(fn, self.adaptive_path, delta)

  def generator_grads(self, params, extra, frozen, batch, rng, k_times, with_gan: bool,
                      disc_state=None):
    """(grads, metrics, disc_state) for one (micro)batch of B examples in G groups of
    ctm.adaptive_group_size (0: one group): the gradient of
      (1/B) sum_i [l_CTM,i + lambda_DSM,k(i) l_DSM,i (+ lambda_GAN,k(i) l_GAN,i)]
    with group k's lambdas from the gradients at W of its own mean losses (adaptive_groups),
    and D's statistics after the GAN term's forward pass (with_gan).  k, the indices and all
    noise are drawn for the whole (micro)batch, whatever G.  (Where the projected D's BatchNorm
    couples the examples, the GAN term is the batch's GAN gradient split by the examples it
    flows through, each part weighted by its group's lambda_GAN.)"""
    c = self.config.ctm
    x0, labels = batch["x"], self.labels(batch)
    b = x0.shape[0]
    groups = adaptive_groups.num_groups(b, self.group_size)
    per_group = b // groups
    keys = jax.random.split(rng, 8)
    k, i, j, t, u, s = self.sample_times(k_times, keys[7], b)
    x_t = x0 + append_dims(t, x0.ndim) * jax.random.normal(keys[0], x0.shape, x0.dtype)
    x_u = self.teacher_solve(frozen, x_t, i, k, labels)
    tgt = self.ctm_target(params, extra["target"], x_u, u, s, labels, (keys[1], keys[2]))
    w_shape = adaptive_groups.find_param(params, self.adaptive_path).shape
    delta = jnp.zeros((groups,) + w_shape, jnp.float32) if groups > 1 else None
    dsm_adaptive = c.dsm_weight_mode == "adaptive"
    gan_adaptive = with_gan and self.config.gan.adaptive

    use_dsm = c.dsm_weight_mode != "off"
    if use_dsm:
      x_dsm, sigma, _ = self.dsm_inputs(x0, keys[5])

    def student_pass(p, d):
      """(G_theta(x_t, t, s), g_theta(x_dsm, sigma, sigma) or None): the estimate's inner map
      and L_DSM's denoiser head in ONE network call on the two batches interleaved (2B examples
      x_t[0], x_dsm[0], x_t[1], ...: each device keeps its own examples, and group k of the tap
      holds both terms of the same examples; one dropout draw from keys[3]): one traced copy of
      the network and one backward pass for both terms.  Per example this is the same function
      with independent dropout masks, as two calls are (no layer couples the examples)."""
      if not use_dsm:
        return self.student(lambda: self.model.jump(p, x_t, t, s, labels, train=True,
                                                    rng=keys[3]), d), None
      both = lambda a, z: jnp.stack([a, z], axis=1).reshape((2 * b,) + a.shape[1:])
      g = self.student(lambda: self.model.denoiser(
          p, both(x_t, x_dsm), both(t, sigma), both(s, sigma),
          None if labels is None else both(labels, labels), train=True, rng=keys[3]), d)
      g = g.reshape((b, 2) + g.shape[1:])
      return flow_map.jump_from_denoised(x_t, g[:, 0], t, s), g[:, 1]

    (inner, den), pull = jax.vjp(student_pass, params, delta)
    # The estimate: the inner jump, then the target's outer map to sigma_min.
    est, pull_outer = jax.vjp(
        lambda y: self.to_sigma_min(extra["target"], y, s, labels, keys[4]), inner)

    def cotangent(ct_inner=None, ct_den=None):
      return (jnp.zeros_like(inner) if ct_inner is None else ct_inner,
              None if den is None else jnp.zeros_like(den) if ct_den is None else ct_den)

    def w_grads(ct_inner=None, ct_den=None):
      """Per-group gradients at W of the group means of one term, whose per-example cotangent
      is ct_inner (at the inner map: CTM, GAN) or ct_den (at the denoiser head: DSM)."""
      sc = lambda ct: None if ct is None else ct / per_group
      gp, gd = pull(cotangent(sc(ct_inner), sc(ct_den)))
      return adaptive_groups.find_param(gp, self.adaptive_path)[None] if delta is None else gd

    l_ctm, d_dist = jax.vjp(lambda e: self.distance(frozen, e, tgt), est)
    (ct_ctm,) = pull_outer(d_dist(jnp.ones_like(l_ctm))[0])
    wg_ctm = w_grads(ct_inner=ct_ctm) if (dsm_adaptive or gan_adaptive) else None
    metrics = {"loss_ctm": jnp.mean(l_ctm), "k": k.astype(jnp.float32)}
    per_ex = l_ctm
    ct_inner = ct_ctm
    ct_den = None
    if use_dsm:
      l_dsm, d_dsm = jax.vjp(lambda y: self.dsm_per_example(y, x0, sigma), den)
      (ct_dsm,) = d_dsm(jnp.ones_like(l_dsm))
      if dsm_adaptive:
        lam = c.dsm_weight * adaptive_groups.group_weights(wg_ctm, w_grads(ct_den=ct_dsm),
                                                           c.adaptive_max)
      else:
        lam = jnp.full((groups,), c.dsm_weight, jnp.float32)
      lam_ex = adaptive_groups.per_example(lam, b)
      ct_den = append_dims(lam_ex, x0.ndim) * ct_dsm
      per_ex = per_ex + lam_ex * l_dsm
      metrics.update(loss_dsm=jnp.mean(l_dsm), lambda_dsm=jnp.mean(lam))
      if groups > 1:
        metrics.update(lambda_dsm_min=jnp.min(lam), lambda_dsm_max=jnp.max(lam))
    if with_gan:
      l_gan, d_gan, disc_state = jax.vjp(
          lambda e: self.gan.generator_loss_per_example(extra["disc"], disc_state, frozen, e,
                                                        labels, keys[6]), est, has_aux=True)
      (ct_gan,) = pull_outer(d_gan(jnp.ones_like(l_gan))[0])
      lam_g = self.gan.weight(wg_ctm, w_grads(ct_inner=ct_gan) if gan_adaptive else None, groups)
      lam_g_ex = adaptive_groups.per_example(lam_g, b)
      ct_inner = ct_inner + append_dims(lam_g_ex, x0.ndim) * ct_gan
      per_ex = per_ex + lam_g_ex * l_gan
      metrics.update(loss_gan_g=jnp.mean(l_gan), lambda_gan=jnp.mean(lam_g))
    # One backward pass through the student for every term: (1/B) sum_i [...].
    grads = pull(cotangent(ct_inner / b, None if ct_den is None else ct_den / b))[0]
    metrics["loss"] = jnp.mean(per_ex)
    return grads, metrics, disc_state

  def make_step(self, kind, tx):
    mb = self.config.training.microbatches
    if kind == "disc":
      return self.gan.make_disc_step(self)

    with_gan = kind == "ctm_gan"

    def step(state, batch, frozen, k=None):
      """k: None in training (k ~ P(k)); an int32 scalar forces it (launch.bench)."""
      rng = self.step_rng(state)
      k_times, k_rest = jax.random.split(rng)
      if k is not None:
        k_times = k
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
