"""CTM's GAN term (Kim et al. 2024, section 5; reference cm/karras_diffusion.py get_GAN_loss).

Generator steps add lambda_GAN * L_G with L_G = -mean D(aug(est)) on the CTM estimate
est = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min); lambda_GAN is the adaptive weight at the
same last-layer W, clipped to [0.01, 10].  Discriminator steps minimise the hinge loss
mean relu(1 - D(aug(x_0))) + mean relu(1 + D(aug(sg(est)))) with RAdam (lr 2e-3, betas 0.5,
0.9); real and fake get independent DiffAugment draws (the reference's gan_different_augment).
Steps alternate G, D, G, ... from config.gan.start_step (g_every = 2); the EMA and the target
are updated on generator steps only.  D's parameters, optimizer state and spectral-norm /
BatchNorm statistics live in TrainState.extra, so they are checkpointed with everything else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ctm_jax import config_lib, diffaug, train_state
from ctm_jax.diffusion import append_dims
from ctm_jax.nets import discriminator as disc_lib


def validate_gan_config(config):
  from ctm_jax import data
  g = "gan"
  if data.dataset_info(config.data.dataset).kind != "image":
    raise config_lib.ConfigError("config.gan.enabled needs an image dataset (the discriminators "
                                 f"are convolutional), not {config.data.dataset!r}")
  config_lib.check_number(config, f"{g}.start_step", 0, integer=True)
  config_lib.check_number(config, f"{g}.g_every", 2, integer=True)
  config_lib.check_choice(config, f"{g}.discriminator", disc_lib.KINDS)
  if config.gan.discriminator == "projected" and not config.gan.feature_weights:
    raise config_lib.ConfigError("config.gan.discriminator = 'projected' needs "
                                 "config.gan.feature_weights (a VGG16 .npz, see README)")
  config_lib.check_number(config, f"{g}.channels", 1, integer=True)
  if not isinstance(config.gan.conditional, bool):
    raise config_lib.ConfigError(f"config.gan.conditional must be True or False, got "
                                 f"{config.gan.conditional!r}")
  if config.gan.conditional and not config.data.class_conditional:
    raise config_lib.ConfigError("config.gan.conditional = True needs labels: set "
                                 "config.data.class_conditional = True (or gan.conditional False)")
  config_lib.check_number(config, f"{g}.lr", 0, lo_open=True)
  config_lib.check_number(config, f"{g}.b1", 0, 1, hi_open=True)
  config_lib.check_number(config, f"{g}.b2", 0, 1, hi_open=True)
  lo = config_lib.check_number(config, f"{g}.weight_min", 0)
  hi = config_lib.check_number(config, f"{g}.weight_max", 0, lo_open=True)
  if lo > hi:
    raise config_lib.ConfigError(f"config.gan.weight_min ({lo}) must be <= config.gan.weight_max ({hi})")
  config_lib.check_number(config, f"{g}.fixed_weight", 0)
  config_lib.check_number(config, f"{g}.translation_ratio", 0, 0.5)
  config_lib.check_number(config, f"{g}.cutout_ratio", 0, 1)
  bad = [p for p in config.gan.augment.split(",") if p.strip() and
         p.strip() not in ("color", "translation", "cutout")]
  if bad:
    raise config_lib.ConfigError(f"config.gan.augment: unknown DiffAugment parts {bad}; use a "
                                 f"comma list of color, translation, cutout (or '')")


class GAN:
  """The discriminator, its optimizer and the two GAN losses for a CTM run.  D gets class
  projection heads only with gan.conditional (the reference's D is unconditional, MultiScaleD
  with cond=0, in its class-conditional runs too)."""

  def __init__(self, config, data_shape, num_classes: int):
    self.config = config
    g = config.gan
    # Runs saved before gan.conditional existed had label heads whenever the data had labels.
    conditional = g.get("conditional", config.data.class_conditional)
    self.num_classes = num_classes if (config.data.class_conditional and conditional) else 0
    if g.discriminator == "conv":
      self.disc = disc_lib.build_discriminator("conv", base_channels=g.channels,
                                               num_classes=self.num_classes)
    else:
      self.disc = disc_lib.build_discriminator("projected", num_classes=self.num_classes)
    self.tx = optax.radam(g.lr, b1=g.b1, b2=g.b2)
    self.example = jnp.zeros((2,) + tuple(data_shape), jnp.float32)

  # -- state
  def frozen(self):
    if self.config.gan.discriminator != "projected":
      return {}
    from ctm_jax.nets import lpips
    return {"disc_backbone": lpips.load_lpips_params(self.config.gan.feature_weights)["vgg"]}

  def init(self, key, frozen):
    labels = jnp.zeros((2,), jnp.int32) if self.num_classes else None
    params, state = disc_lib.init_discriminator(self.disc, key, self.example, labels,
                                                backbone_params=frozen.get("disc_backbone"))
    return {"disc": params, "disc_state": state, "disc_opt": self.tx.init(params)}

  def step_kind(self, step: int) -> str:
    g = self.config.gan
    if step < g.start_step:
      return "ctm"
    return "ctm_gan" if (step - g.start_step) % g.g_every == 0 else "disc"

  # -- losses
  def augment(self, key, x):
    g = self.config.gan
    return diffaug.diff_augment(key, x, g.augment, g.translation_ratio, g.cutout_ratio)

  def logits(self, params, state, frozen, x, labels, key, update_stats):
    return disc_lib.apply_discriminator(
        self.disc, params, state, self.augment(key, x), labels if self.num_classes else None,
        train=True, update_stats=update_stats, backbone_params=frozen.get("disc_backbone"))

  def generator_loss_per_example(self, dparams, dstate, frozen, est, labels, key):
    """((B,) l_G, D's new statistics): l_G,i = mean over heads h of -mean_j D_h(aug(est))_i,j,
    whose batch mean is the reference's g_loss (get_GAN_loss).  As in the reference, whose D
    stays in train mode, this forward pass also advances D's spectral-norm vectors and
    BatchNorm running averages (D's parameters get no update on G steps); BatchNorm's batch
    statistics are over the whole (micro)batch."""
    logits, dstate = self.logits(dparams, dstate, frozen, est, labels, key, True)
    per_head = [-jnp.mean(l.astype(jnp.float32).reshape(l.shape[0], -1), axis=1) for l in logits]
    return sum(per_head) / len(per_head), dstate

  def weight(self, wg_ctm, wg_gan, groups: int):
    """(G,) lambda_GAN per group: the adaptive weight from the per-group W-gradients, clipped
    to [weight_min, weight_max] (reference: th.clip(d_weight, 0.01, 10.)), or fixed_weight."""
    g = self.config.gan
    if not g.adaptive:
      return jnp.full((groups,), g.fixed_weight, jnp.float32)
    from ctm_jax.methods.adaptive_groups import group_weights
    lam = group_weights(wg_ctm, wg_gan, self.config.ctm.adaptive_max)
    return jnp.clip(lam, g.weight_min, g.weight_max)

  # -- discriminator step
  def make_disc_step(self, ctm):
    """(state, batch, frozen) -> (state, metrics): one D update on real x_0 vs sg(CTM estimate),
    gradients averaged over `training.microbatches` parts with D's statistics carried along."""
    mb = self.config.training.microbatches

    def part_grads(dparams, dstate, batch, rng, params, target, frozen):
      keys = jax.random.split(rng, 8)
      x0, labels = batch["x"], ctm.labels(batch)
      _, _, _, t, _, s = ctm.sample_times(keys[0], keys[1], x0.shape[0])
      x_t = x0 + append_dims(t, x0.ndim) * jax.random.normal(keys[2], x0.shape, x0.dtype)
      fake = jax.lax.stop_gradient(
          ctm.estimate_fn(target, x_t, t, s, labels, (keys[3], keys[4]))(params))

      def d_loss(dp):
        real_logits, st = self.logits(dp, dstate, frozen, x0, labels, keys[5], True)
        fake_logits, st = self.logits(dp, st, frozen, fake, labels, keys[6], True)
        loss = disc_lib.hinge_d_loss(real_logits, fake_logits)
        aux = (st, jnp.mean(jnp.stack([jnp.mean(l) for l in real_logits])),
               jnp.mean(jnp.stack([jnp.mean(l) for l in fake_logits])))
        return loss, aux

      (loss, (st, lr_mean, lf_mean)), grads = jax.value_and_grad(d_loss, has_aux=True)(dparams)
      return grads, {"loss_d": loss, "d_logits_real": lr_mean, "d_logits_fake": lf_mean}, st

    def step(state, batch, frozen):
      extra = state.extra
      grad_fn = lambda dp, dst, b, r: part_grads(dp, dst, b, r, state.params, extra["target"],
                                                 frozen)
      grads, metrics, dstate = train_state.accumulate_gradients_with_state(
          grad_fn, extra["disc"], extra["disc_state"], batch, ctm.step_rng(state), mb)
      updates, dopt = self.tx.update(grads, extra["disc_opt"], extra["disc"])
      dparams = optax.apply_updates(extra["disc"], updates)
      new_extra = {**extra, "disc": dparams, "disc_state": dstate, "disc_opt": dopt}
      metrics = {**metrics, "d_grad_norm": optax.tree.norm(grads)}
      return state.replace(step=state.step + 1, extra=new_extra), metrics
    return step
