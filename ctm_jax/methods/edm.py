"""EDM denoising score matching (Karras et al. 2022, eq. 2 and Table 1), with EDM's
non-leaking augmentation (Appendix F.2) when `config.edm.augment.p > 0`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ctm_jax import augment, config_lib, diffusion, train_state
from ctm_jax.diffusion import append_dims
from ctm_jax.methods.base import Method


# Folded into the step key for the augmentation draws (the other keys stay as without it).
_AUGMENT_STREAM = 0x617567


def dsm_loss(model, params, x0, sigma, noise, labels, rng, *, train=True, augment_labels=None):
  """Per-example lambda(t) * mean |D(x0 + t z, t; a) - x0|^2 with lambda = (t^2 + sd^2) / (t sd)^2
  and a the augment labels of x0 (None without augmentation).

  (The mean over dimensions only rescales EDM's sum, which Adam does not see.)
  """
  x_t = x0 + append_dims(sigma, x0.ndim) * noise
  d = model.denoiser(params, x_t, sigma, None, labels, train=train, rng=rng,
                     augment_labels=augment_labels)
  w = diffusion.edm_loss_weight(sigma, model.schedule.sigma_data)
  return w * jnp.mean((d - x0).reshape(x0.shape[0], -1) ** 2, axis=1)


def validate_edm_config(config):
  """config.edm: the log-normal t distribution and the augmentation."""
  config_lib.check_number(config, "edm.p_std", 0, lo_open=True)
  config_lib.check_number(config, "edm.p_mean", -10, 10)
  validate_augment_config(config)


def validate_augment_config(config):
  """config.edm.augment: ranges, an image data set, and model.augment_dim equal to the
  number of augment labels the enabled transforms make."""
  from ctm_jax import data
  if "augment" not in config.edm:       # a run saved before augmentation existed
    return
  a = "edm.augment"
  config_lib.check_number(config, f"{a}.p", 0, 1)
  for name, _ in augment.TRANSFORMS:
    config_lib.check_number(config, f"{a}.{name}", 0)
  for name in ("scale_std", "aniso_std", "translate_frac_std"):
    config_lib.check_number(config, f"{a}.{name}", 0)
  config_lib.check_number(config, f"{a}.rotate_frac_max", 0, 1)
  config_lib.check_number(config, f"{a}.aniso_rotate_prob", 0, 1)
  spec = augment.AugmentSpec.from_config(config.edm.augment)
  if not spec.enabled:
    return
  info = data.dataset_info(config.data.dataset)
  if info.kind != "image":
    raise config_lib.ConfigError(
        f"config.edm.augment.p = {spec.p} needs an image data set; config.data.dataset "
        f"{config.data.dataset!r} holds {info.kind} (set config.edm.augment.p=0)")
  have = config.model.get("augment_dim", 0)
  if have != spec.label_dim:
    raise config_lib.ConfigError(
        f"config.model.augment_dim = {have} must equal the {spec.label_dim} augment labels "
        f"that config.edm.augment makes (1 per flip and scale, 2 per rotation, anisotropy "
        f"and translation)")


class EDM(Method):
  name = "edm"

  def __init__(self, config, model):
    super().__init__(config, model)
    aug = config.edm.get("augment")      # absent in runs saved before augmentation existed
    self.augment_spec = augment.AugmentSpec() if aug is None else augment.AugmentSpec.from_config(aug)

  def loss(self, params, batch, rng):
    x0 = batch["x"]
    k_sig, k_noise, k_drop = jax.random.split(rng, 3)
    aug_labels = None
    if self.augment_spec.enabled:
      x0, aug_labels = augment.augment(jax.random.fold_in(rng, _AUGMENT_STREAM), x0,
                                       self.augment_spec)
    cfg = self.config.edm
    sigma = diffusion.sample_lognormal_sigma(k_sig, x0.shape[:1], cfg.p_mean, cfg.p_std)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    per_ex = dsm_loss(self.model, params, x0, sigma, noise, self.labels(batch), k_drop,
                      augment_labels=aug_labels)
    loss = jnp.mean(per_ex)
    return loss, {"loss": loss, "loss_dsm": loss}

  def make_step(self, kind, tx):
    mb = self.config.training.microbatches

    def grad_fn(params, batch, rng):
      (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(params, batch, rng)
      return grads, metrics

    def step(state, batch, frozen):
      del frozen
      grads, metrics = train_state.accumulate_gradients(grad_fn, state.params, batch,
                                                        self.step_rng(state), mb)
      return self.finish_step(state, grads, tx, metrics)
    return step
