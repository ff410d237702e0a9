"""What the consistency family shares (CD, CT, iCT, Direct CD, TCD; CTM uses the distances).

Distances d(a, b) (per example), loss weights lambda, config checks, and `ConsistencyMethod`,
the base of the methods that regress an online network onto a stop-gradient target:

  L = mean_b lambda_b d(online_b, sg(target_b))

Random keys of one loss call: (k_idx, k_z, k_drop, k_more) = split(rng, 4): time indices,
the noise z, the dropout key (shared by the online and the target evaluation, as
openai/consistency_models_cifar10 does and the iCT paper recommends), and anything else.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import config_lib, samplers, solvers, train_state
from ctm_jax.methods.base import Method

DISTANCES = ("l2", "pseudo_huber", "lpips")
WEIGHTINGS = ("uniform", "ict", "snr", "snrp1", "truncated_snr")
# Deterministic probability-flow ODE solvers: what counts as an ODE teacher.
TEACHER_SOLVERS = solvers.METHODS


def distance_fn(kind: str, dim: int, huber_c: float = 0.0, lpips_pooling: str = "avg"):
  """Per-example d(frozen, a, b) -> (B,): l2 = mean square (the CM code's 'l2'), pseudo-Huber
  sqrt(|a - b|^2 + c^2) - c with c = huber_c or 0.00054 sqrt(dim) (iCT), or LPIPS."""
  if kind == "l2":
    return lambda frozen, a, b: jnp.mean(((a - b) ** 2).reshape(a.shape[0], -1), axis=1)
  if kind == "pseudo_huber":
    c = huber_c or 0.00054 * math.sqrt(dim)
    return lambda frozen, a, b: jnp.sqrt(
        jnp.sum(((a - b) ** 2).reshape(a.shape[0], -1), axis=1) + c ** 2) - c
  if kind == "lpips":
    from ctm_jax.nets import lpips
    return lambda frozen, a, b: lpips.lpips_distance(frozen["lpips"], a, b, pooling=lpips_pooling)
  raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")


def loss_weight(kind: str, t, u):
  """lambda for the pair t > u: 'uniform' 1 (CM); 'ict' 1 / (t - u) (iCT); the CM code's
  'snr' 1/t^2, 'snrp1' 1/t^2 + 1 and 'truncated_snr' max(1/t^2, 1), at the larger time t."""
  if kind == "uniform":
    return jnp.ones_like(t)
  if kind == "ict":
    return 1.0 / (t - u)
  if kind == "snr":
    return 1.0 / t ** 2
  if kind == "snrp1":
    return 1.0 / t ** 2 + 1.0
  if kind == "truncated_snr":
    return jnp.maximum(1.0 / t ** 2, 1.0)
  raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")


# ----------------------------------------------------------------------------- config checks

def validate_distance(config, section: str):
  config_lib.check_choice(config, f"{section}.distance", DISTANCES)
  config_lib.check_number(config, f"{section}.huber_c", 0)
  config_lib.check_choice(config, f"{section}.lpips_pooling", ("avg", "max", "l2"))
  if config[section].distance == "lpips" and not config[section].lpips_weights:
    raise config_lib.ConfigError(
        f"config.{section}.distance = 'lpips' needs config.{section}.lpips_weights: a local .npz "
        f"of VGG16 + LPIPS heads (see README: launch/export_lpips_weights.py); or use "
        f"'pseudo_huber' / 'l2'")


def validate_nfes(config, section: str):
  nfes = config[section].sample_nfes
  if not isinstance(nfes, (tuple, list)) or not nfes or any(
      not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in nfes):
    raise config_lib.ConfigError(f"config.{section}.sample_nfes must be a non-empty tuple of "
                                 f"integers >= 1, got {nfes!r}")


def validate_family_config(config, section: str, *, teacher: bool):
  """The fields every consistency-family section has, and the teacher rule: distillation
  methods need an ODE teacher (config.teacher), training methods must have none."""
  validate_distance(config, section)
  config_lib.check_choice(config, f"{section}.weighting", WEIGHTINGS)
  validate_nfes(config, section)
  validate_sample_times(config, section)
  if teacher:
    if "teacher" not in config:
      raise config_lib.ConfigError(f"config.method = {config.method!r} distils a teacher: "
                                   f"config.teacher is missing")
    from ctm_jax.teacher import validate_teacher_config
    validate_teacher_config(config)
  elif "teacher" in config:
    raise config_lib.ConfigError(
        f"config.teacher is set (source {config.teacher.source!r}) but config.method = "
        f"{config.method!r} is consistency TRAINING, which uses no teacher (the pair shares its "
        f"noise); remove config.teacher, or distil with method 'cd'")


def validate_sample_times(config, section: str):
  """config.<section>.sample_times: the intermediate times of one more multistep sampler."""
  times = config[section].sample_times
  d = config.diffusion
  if not isinstance(times, (tuple, list)) or any(
      isinstance(v, bool) or not isinstance(v, (int, float)) for v in times) or (
      times and (np.any(np.diff(times) >= 0) or not d.sigma_min < min(times) <= max(times) < d.sigma_max)):
    raise config_lib.ConfigError(
        f"config.{section}.sample_times must be a tuple of strictly decreasing times in "
        f"(sigma_min, sigma_max) = ({d.sigma_min}, {d.sigma_max}) (the intermediate times of a "
        f"multistep sampler), got {times!r}")


def validate_teacher_solver(config, section: str):
  if config[section].teacher_solver == "ddim":
    raise config_lib.ConfigError(f"config.{section}.teacher_solver = {solvers.DDIM_NOTE}")
  config_lib.check_choice(config, f"{section}.teacher_solver", TEACHER_SOLVERS)
  config_lib.check_choice(config, f"{section}.teacher_last_step", solvers.LAST_STEP)


def validate_target_ema(config, section: str):
  config_lib.check_number(config, f"{section}.target_ema", 0, 1, hi_open=True)


# ----------------------------------------------------------------------------- the base class

class ConsistencyMethod(Method):
  """Base of CD, CT, iCT, Direct CD and TCD: frozen teacher / LPIPS, initialisation from the
  teacher, the optional EMA target theta^- in TrainState.extra, the step, and sampling.

  Subclasses set `name`, `section` (their config block), `needs_teacher`, and implement
  loss(params, extra, frozen, batch, rng, step) -> (loss, metrics) and target_rate(step).
  """
  section = ""
  needs_teacher = False
  generator_kind = "cm_f"
  has_score_head = False

  def __init__(self, config, model):
    super().__init__(config, model)
    from ctm_jax import data
    from ctm_jax.teacher import Teacher
    self.c = config[self.section]
    self.teacher = Teacher(config) if self.needs_teacher else None
    self.data_shape = tuple(data.dataset_info(config.data.dataset).shape)
    # Sections without a distance (MeanFlow, sCM: their own squared-error losses) get None.
    self.distance = (distance_fn(self.c.distance, int(np.prod(self.data_shape)), self.c.huber_c,
                                 self.c.lpips_pooling) if "distance" in self.c else None)
    self._frozen = None

  # ------------------------------------------------------------------------- state
  @property
  def keeps_target(self) -> bool:
    """Whether theta^- is an EMA stored in extra['target'] (else theta^- = sg(theta))."""
    return False

  def target_rate(self, step):
    """The EMA rate mu of theta^- at this step (used only when keeps_target)."""
    return jnp.float32(0.0)

  def frozen(self):
    if self._frozen is None:
      fr = {}
      if self.teacher is not None:
        fr["teacher"] = self.teacher.params()
      if self.c.get("distance") == "lpips":
        from ctm_jax.nets import lpips
        fr["lpips"] = lpips.load_lpips_params(self.c.lpips_weights)
      self._frozen = fr
    return self._frozen

  def init_params(self, key, params, frozen):
    """Start from the teacher's weights where names and shapes match (init_from_teacher)."""
    if not self.c.get("init_from_teacher", False) or not frozen.get("teacher"):
      return params
    from ctm_jax.nets.torch_port import copy_matching_params
    params, _ = copy_matching_params(params, frozen["teacher"])
    return params

  def init_extra(self, key, params, frozen):
    return {"target": params} if self.keeps_target else {}

  def target_params(self, params, extra):
    """theta^-: the EMA in extra, or theta itself (regression_loss stops the gradient)."""
    return extra["target"] if self.keeps_target else params

  # ------------------------------------------------------------------------- pieces
  def teacher_step(self, frozen, x, t, u, is_last, labels):
    """One step t -> u of the teacher's ODE solver (config teacher_solver; a step into the
    grid's last point follows teacher_last_step), no gradient."""
    c = self.c
    fn = lambda xx, tt: self.teacher.denoise(frozen["teacher"], xx, tt, labels)
    second = True if c.teacher_last_step == "heun" else jnp.logical_not(is_last)
    return jax.lax.stop_gradient(solvers.step(fn, x, t, u, c.teacher_solver, second))

  def f(self, params, x, t, labels, rng):
    """The consistency function f_theta(x, t) (train mode, dropout key rng)."""
    return self.model.cm_f(params, x, t, labels, train=True, rng=rng)

  def regression_loss(self, frozen, online, target, t, u):
    """mean_b lambda(t_b, u_b) d(online_b, sg(target_b))."""
    per = loss_weight(self.c.weighting, t, u) * self.distance(
        frozen, online, jax.lax.stop_gradient(target))
    return jnp.mean(per)

  # ------------------------------------------------------------------------- step
  def loss(self, params, extra, frozen, batch, rng, step):
    raise NotImplementedError

  def make_step(self, kind, tx):
    mb = self.config.training.microbatches

    def step(state, batch, frozen):
      def grad_fn(params, b, r):
        (_, met), g = jax.value_and_grad(self.loss, has_aux=True)(params, state.extra, frozen, b,
                                                                  r, state.step)
        return g, met
      grads, metrics = train_state.accumulate_gradients(grad_fn, state.params, batch,
                                                        self.step_rng(state), mb)
      new_state, metrics = self.finish_step(state, grads, tx, metrics)
      if self.keeps_target:
        mu = self.target_rate(state.step)
        target = train_state.ema_update(state.extra["target"], new_state.params, mu)
        new_state = new_state.replace(extra={**new_state.extra, "target": target})
        metrics = {**metrics, "target_ema": jnp.asarray(mu, jnp.float32)}
      return new_state, metrics
    return step

  # ------------------------------------------------------------------------- sampling
  def jump_fn(self, params, labels=None):
    """(x, t, s) -> f(x, t): the consistency function, i.e. the jump to s = sigma_min only."""
    return self.model.cm_jump_fn(params, labels)

  def multistep_times(self):
    """name -> the intermediate times tau of each multistep sampler: for every NFE in
    sample_nfes the interior of the Karras grid of NFE + 1 points, plus sample_times."""
    out = {f"nfe{nfe}": samplers.karras_interior(nfe, self.schedule) for nfe in self.c.sample_nfes}
    if self.c.sample_times:
      out[f"nfe{len(self.c.sample_times) + 1}_times"] = tuple(self.c.sample_times)
    return out

  def sample_fns(self) -> Dict[str, Any]:
    """CM multistep sampling (Song et al. 2023, Alg. 1): f(x_T, T), then for each tau
    f(x + sqrt(tau^2 - sigma_min^2) z, tau); NFE 1 is one-step generation.  Image data clip
    each f to [-1, 1] (samplers.clips_x0)."""
    clip = samplers.clips_x0(self.config)
    fns = {}
    for name, taus in self.multistep_times().items():
      def fn(params, x_init, key, labels, taus=taus):
        f = lambda x, t: self.model.cm_f(params, x, t, labels)
        return samplers.cm_multistep(f, x_init, key, taus, self.schedule, clip)
      fns[f"{name}_cm"] = fn
    return fns
