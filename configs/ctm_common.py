"""The CTM blocks shared by every CTM config: config.ctm, config.gan and config.teacher.

Defaults are the reference's (Kim-Dongjun/ctm-cifar10 cm/script_util.py, sony/ctm); the
experiment files override what differs per dataset.
"""
import ml_collections


def ctm_block(num_points: int = 18) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_points=num_points,        # N: Karras grid points (CIFAR-10 18, ImageNet-64 40)
      max_k=num_points - 1,         # K: largest number of teacher Heun steps, P(k) ~ k
      teacher_last_step="heun",     # the reference takes a full Heun step into sigma_min
      distance="lpips",             # lpips | pseudo_huber | l2
      lpips_weights="",             # local .npz of VGG16 + LPIPS heads (required for lpips)
      lpips_pooling="avg",          # piq 0.7.0 LPIPS(replace_pooling=True) = 2x2 average pooling
      huber_c=0.0,                  # 0: 0.00054 * sqrt(dim) (iCT)
      target_ema=0.999,             # theta^- = EMA(theta) at this rate, generator steps only
      target_train_mode=True,       # reference quirk: target network evaluated with dropout on
      dsm_weight_mode="adaptive",   # adaptive | fixed | off
      dsm_weight=1.0,               # multiplier (adaptive) or the weight (fixed)
      adaptive_max=1e4,             # clamp of the adaptive weights
      adaptive_layer="",            # '' = the reference's choice for the architecture
      adaptive_group_size=0,        # lambdas per group of this many examples of each microbatch
                                    # (the reference's per-GPU --microbatch); 0 = one group
      dsm_p_mean=-1.2, dsm_p_std=1.2,
      dsm_curve_max=0.7,            # half the DSM batch on the Karras curve, u ~ U[0, 0.7]
      sample_nfes=(1, 2),           # gamma-sampler NFEs drawn at sample_every
      sample_gamma=0.0,
  ))


def gan_block() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      enabled=False,
      start_step=0,                 # first step with GAN terms (D/G steps alternate from here)
      g_every=2,                    # reference g_learning_period: G step, then D step
      discriminator="conv",         # conv (from scratch) | projected (frozen VGG16 features)
      feature_weights="",           # .npz of VGG16 weights for the projected discriminator
      channels=64,                  # conv discriminator width
      conditional=False,            # class projection heads in D (reference: MultiScaleD cond=0,
                                    # unconditional D in the class-conditional runs too)
      lr=2e-3, b1=0.5, b2=0.9,      # RAdam for D (reference)
      weight_min=0.01, weight_max=10.0,   # clip of the adaptive lambda_GAN
      adaptive=True,
      fixed_weight=1.0,             # lambda_GAN when adaptive is False
      augment="color,translation,cutout",   # DiffAugment policy ('' = none)
      translation_ratio=0.125, cutout_ratio=0.2,
  ))


def teacher_block(teacher_config=None, source: str = "checkpoint") -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict(dict(
      source=source,                # oracle | checkpoint | torch_npz
      workdir="",                   # checkpoint: the teacher run's workdir
      step=-1,                      # checkpoint step (-1 = newest)
      ema="",                       # which EMA of the teacher ('' = its sampling.eval_ema,
                                    # or its first EMA when that is '' too)
      npz_path="",                  # torch_npz: official weights exported to .npz
  ))
  if teacher_config is not None:
    t.config = teacher_config
  return t


def student_of(teacher_module, *, num_points: int, distance: str = "",
               teacher_source: str = "checkpoint", teacher_workdir: str = "", arg=None):
  """An unlocked CTM config on an EDM config's data, network and schedule (teacher_module's
  get_config(), or get_config(arg)): cm_common.family_config's method switch (its `edm` block
  dropped, the reference's RAdam without warm-up, lr left to the caller) with config.ctm
  (N = num_points; distance, if given, replaces ctm_block's), config.gan (off) and
  config.teacher (the same EDM config nested)."""
  from configs import cm_common
  get = teacher_module.get_config if arg is None else lambda: teacher_module.get_config(arg)
  c = cm_common.family_config(get(), "ctm", ctm_block(num_points=num_points))
  if distance:
    c.ctm.distance = distance
  c.gan = gan_block()
  c.teacher = teacher_block(get(), source=teacher_source)
  c.teacher.workdir = teacher_workdir
  return c


# The one-step sampler and CTM's gamma-sampler at gamma = 0, 0.5, 1 with 2 and 4 steps.
GAMMA_SAMPLERS = "onestep,gamma:0:2,gamma:0:4,gamma:0.5:2,gamma:0.5:4,gamma:1:2,gamma:1:4"


def cpu_student_of(teacher_module, *, num_points: int, teacher_workdir: str):
  """student_of for the CPU-sized image runs: the pseudo-Huber distance (iCT) instead of LPIPS
  (ImageNet VGG weights and 224-pixel inputs would dominate the step), CTM's RAdam lr 4e-4
  (Kim-Dongjun/ctm-cifar10) and no GAN term."""
  c = student_of(teacher_module, num_points=num_points, distance="pseudo_huber",
                 teacher_workdir=teacher_workdir)
  c.optim.lr = 4e-4
  return c
