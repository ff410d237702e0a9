"""Config blocks of the consistency family (config.cd / ct / ict / direct_cd / tcd).

Every block has the distance, the loss weighting and the samplers drawn at sample_every;
defaults are the papers' CIFAR-10 settings where one exists (CM: openai/consistency_models_cifar10,
iCT: Song & Dhariwal 2023, Direct CD: layer6ai-labs/direct-cms, TCD: jabir-zheng/TCD and
diffusers' TCDScheduler); the experiment files override what differs.
"""
import ml_collections
import numpy as np


def _family(distance: str = "l2", weighting: str = "uniform", **fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      distance=distance,            # l2 | pseudo_huber | lpips
      huber_c=0.0,                  # pseudo-Huber c; 0 = 0.00054 * sqrt(dim) (iCT)
      lpips_weights="",             # local .npz of VGG16 + LPIPS heads (required for lpips)
      lpips_pooling="avg",
      weighting=weighting,          # uniform | ict (1/(t_i - t_{i+1})) | snr | snrp1 | truncated_snr
      sample_nfes=(1, 2),           # multistep samplers (Karras grid of NFE + 1 times) at sample_every
      sample_times=(),              # optional hand-picked intermediate times of one more sampler
      **fields))


def _teacher_fields(num_points: int):
  return dict(
      num_points=num_points,        # N: Karras grid points
      teacher_solver="heun",        # heun | euler (DDIM is euler in this VE frame)
      teacher_last_step="heun",     # a step into sigma_min: full Heun (CM code) or Euler
      init_from_teacher=True,       # copy the teacher's weights where names and shapes match
  )


def cd_block(num_points: int = 18) -> ml_collections.ConfigDict:
  """CD: one teacher Heun step between neighbours of an N-point grid; theta^- = EMA(mu).
  CIFAR-10 (LPIPS): N = 18, mu = 0 (no target network in the official code)."""
  return _family(target_ema=0.0, **_teacher_fields(num_points))


def ct_block() -> ml_collections.ConfigDict:
  """CT: s0 = 2, s1 = 150, mu0 = 0.9 (CIFAR-10); mu(k) with N(k) - 1 as the reference codes."""
  return _family(
      s0=2, s1=150, mu0=0.9,
      curriculum_steps=0,           # K of N(k) (0 = training.num_train_steps)
      mu_form="code")               # code: exp(s0 ln mu0 / (N - 1)) (both reference codes, whose
                                    # numbers are reported) | paper: ... / N (the paper's text)


def ict_block() -> ml_collections.ConfigDict:
  """iCT: s0 = 10, s1 = 1280, P_mean -1.1, P_std 2.0, pseudo-Huber, lambda = 1/(t_i - t_{i+1})."""
  return _family(distance="pseudo_huber", weighting="ict", s0=10, s1=1280, curriculum_steps=0,
                 p_mean=-1.1, p_std=2.0)


def direct_cd_block(num_points: int = 18) -> ml_collections.ConfigDict:
  """Direct CD: regress f(x_t, t) onto the teacher's solve to sigma_min; no target network."""
  return _family(**_teacher_fields(num_points))


def tcd_block(num_points: int = 18, sigma_min: float = 0.002) -> ml_collections.ConfigDict:
  """TCD: skip k, s on the grid in [s_min, t_{i+k}], theta^- = EMA(0.95) (TCD / LCM default),
  SSS sampling with gamma 0.3 (diffusers' default eta).  s_input False: TCD's network (no s
  input; s enters only through a_s x0_hat + sigma_s eps_hat); True: CTM's (x, t, s) network."""
  return _family(skip=1, s_min=sigma_min, s_input=False, target_ema=0.95, sample_gamma=0.3,
                 **_teacher_fields(num_points))


def meanflow_block() -> ml_collections.ConfigDict:
  """MeanFlow (Gsunshine/py-meanflow's CIFAR-10 script): t ~ logit-normal(-0.6, 1.6),
  r ~ logit-normal(-4.0, 1.6), r != t for 75% of the batch, adaptive weight power 0.75
  (norm_eps 1e-3, the paper's c); samplers: chains of jumps, two steps through t = 0.5."""
  return ml_collections.ConfigDict(dict(
      p_mean_t=-0.6, p_std_t=1.6, p_mean_r=-4.0, p_std_r=1.6,
      ratio=0.75,                   # fraction of the batch with r != t
      norm_p=0.75, norm_eps=1e-3,   # w = 1 / (||u - u_tgt||^2 + norm_eps)^norm_p
      sample_nfes=(1, 2),
      sample_times=(1.0,)))         # sigma = 1 is the rectified-flow t = 0.5


def scm_block(distil: bool, sigma_data: float = 0.5,
              init_from_teacher: bool = False) -> ml_collections.ConfigDict:
  """sCT / sCD (Lu & Song 2024, CIFAR-10): tau ~ N(-1.0, 1.4^2) (sCT; sCD -0.8, 1.6), tangent
  normalisation c = 0.1, warm-up H = 10k steps, adaptive weighting, TrigFlow t as the time
  input (c_noise(sigma) when starting from an EDM teacher); two-step sampling through TrigFlow
  t = 1.1 (sigma = sd tan 1.1)."""
  return ml_collections.ConfigDict(dict(
      p_mean=-0.8 if distil else -1.0, p_std=1.6 if distil else 1.4,
      tangent_c=0.1,
      warmup_steps=10_000,          # H: r = min(1, k / H) on the tangent's sin(t) terms
      adaptive_weighting=True,      # learned w_phi(t)
      weight_lr=1e-4,               # Adam lr of w_phi
      prior_weighting=False,        # x 1 / (sd tan t) (off: see ctm_jax/methods/scm.py)
      time_input="c_noise" if init_from_teacher else "trigflow",   # trigflow | c_noise
      init_from_teacher=init_from_teacher,   # sCD from an EDM teacher's weights
      sample_nfes=(1, 2),
      sample_times=scm_mid_time(sigma_data)))


def scm_mid_time(sigma_data: float):
  """sCM's two-step intermediate time, TrigFlow t = 1.1, as an EDM sigma = sd tan(1.1)."""
  return (round(sigma_data * float(np.tan(1.1)), 6),)


def _flow_map_fields(c, method: str, steps: int):
  """The toy / digits adjustments of MeanFlow and sCM: the warm-up scaled to the run's length
  (the paper's H = 10k of 400k steps), w_phi at the run's lr, sCM's mid time at its sigma_data."""
  if method in ("sct", "scd"):
    c[method].warmup_steps = steps // 10
    c[method].weight_lr = c.optim.lr
    c[method].sample_times = scm_mid_time(c.diffusion.sigma_data)


def family_config(base, method: str, block, teacher=None):
  """`base` (an EDM config: data, model, training) turned into a `method` run with `block`;
  `teacher` (a teacher block) for the distillation methods."""
  c = base
  c.unlock()
  c.method = method
  del c["edm"]
  c[method] = block
  if teacher is not None:
    c.teacher = teacher
  c.optim.name = "radam"
  c.optim.warmup_steps = 0
  return c


def cifar10_schedule(c, *, lr: float, ema_rate: float, batch_size: int, num_train_steps: int):
  """The CIFAR-10 CM papers' optimisation: RAdam(0.9, 0.999, 1e-8) at lr with no warm-up and no
  gradient clipping (the CM code's RAdam path: scale_by_radam then scale(-lr)), one evaluation
  EMA, random x-flips, checkpoints every 5k steps (kept every 50k), samples every 10k."""
  c.data.random_flip = True
  c.optim.lr = lr
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.ema.rates = (ema_rate,)
  c.ema.halflife_kimg = 0.0
  c.sampling.eval_ema = "rate_" + repr(float(ema_rate)).replace(".", "p")
  c.training.batch_size = batch_size
  c.training.num_train_steps = num_train_steps
  c.training.checkpoint_every = 5_000
  c.training.keep_every = 50_000
  c.training.sample_every = 10_000
  return c


def toy_config(method: str, block, *, distil: bool):
  """The 2-D mixture with the exact oracle teacher (distil); the toy_ctm budget and samplers."""
  from configs import ctm_common, toy_edm
  teacher = ctm_common.teacher_block(toy_edm.get_config(), source="oracle") if distil else None
  c = family_config(toy_edm.get_config(), method, block, teacher)
  if "distance" in c[method]:
    c[method].distance = "l2" if method != "ict" else c[method].distance
  c[method].sample_nfes = (1, 2, 4, 8)
  if method == "cd":
    c.cd.target_ema = 0.95       # mu = 0 (the CIFAR-10 LPIPS setting) converges far slower here
  if method == "ct":
    c.ct.s1 = 50                 # s1 = 150 is sized for 800k steps: at 3k steps mu(k) -> 0.9986
  c.optim.lr = 1e-3
  _flow_map_fields(c, method, 3000)
  # At 3k steps the 0.999 EMA still averages early iterates (the raw weights sampled 2-3x
  # better in MMD for CD, Direct CD and TCD): sample the 0.99 EMA, as the digits runs do.
  c.ema.rates = (0.99, 0.999)
  c.sampling.eval_ema = "rate_0p99"
  c.training.batch_size = 256
  c.training.num_train_steps = 3000
  c.training.log_every = 200
  c.training.checkpoint_every = 1000
  c.training.sample_every = 1500
  c.sampling.num_samples = 1000
  c.lock()
  return c


def digits_config(method: str, block, *, distil: bool, steps: int):
  """The 8x8 digits; distillation from a digits_edm run (--config.teacher.workdir)."""
  from configs import ctm_common, digits_edm
  teacher = None
  if distil:
    teacher = ctm_common.teacher_block(digits_edm.get_config(), source="checkpoint")
    teacher.workdir = "workdirs/digits_edm"
  c = family_config(digits_edm.get_config(), method, block, teacher)
  if "distance" in c[method]:
    c[method].distance = "pseudo_huber"    # LPIPS needs 224-pixel VGG inputs: too slow here
  if method == "cd":
    c.cd.target_ema = 0.95
  if method == "ct":
    c.ct.s1 = 50
  c.optim.lr = 4e-4
  _flow_map_fields(c, method, steps)
  c.ema.rates = (0.99, 0.999)              # a short run: sample the faster EMA
  c.sampling.eval_ema = "rate_0p99"
  c.training.batch_size = 32
  c.training.num_train_steps = steps
  c.training.log_every = 100
  c.training.checkpoint_every = 500
  c.training.sample_every = 500
  c.lock()
  return c
