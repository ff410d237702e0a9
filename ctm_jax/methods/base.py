"""What every training method provides to the training loop."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ctm_jax import flow_map, samplers, train_state

StepFn = Callable[[train_state.TrainState, Dict[str, jax.Array], Any],
                  Tuple[train_state.TrainState, Dict[str, jax.Array]]]


class Method:
  """A training method: pure step functions over TrainState, plus its samplers.

  Subclasses set `name`, implement `make_step(kind, tx)` for each name in `step_kinds`,
  and may override `init_extra` (method state in TrainState.extra), `frozen` (arrays
  passed to every step but never trained or checkpointed, e.g. a teacher), `step_kind`
  (which step to run at a given step number) and `sample_fns`.
  """
  name = "base"
  step_kinds: Tuple[str, ...] = ("train",)
  # Step kinds whose step(state, batch, frozen, k) also takes a forced number of teacher steps
  # (an int32 scalar; launch.bench), with k drawn as in training when it is None.
  k_step_kinds: Tuple[str, ...] = ()
  # What the trained network is, for samplers and the evaluation binary:
  #   'jump': G(x, t, s) (CTM, TCD; EDM's "jump" is a DDIM step of its denoiser);
  #   'cm_f': a consistency function f(x, t), the jump to sigma_min only (CD, CT, iCT, Direct CD).
  generator_kind = "jump"
  # Whether G(x, t, s) itself was trained (CTM, TCD): the gamma / SSS samplers apply.  EDM's
  # jump from sigma_max is the data mean, not a sample.
  trains_jump = False
  # Whether the trained network's g(x, t, t) is a denoiser (a score model): the NLL by the
  # PF-ODE and the Heun samplers need it.  EDM and CTM (trained with DSM) have one; the
  # consistency family (no DSM term) does not.
  has_score_head: bool = True
  # The network's parameterisation in the EDM frame (flow_map.PRECONDS) is
  # runs.precond_of(config): 'edm', MeanFlow's 'rf', sCM's 'trig' / 'trig_edm'.

  def __init__(self, config, model: flow_map.FlowModel):
    self.config = config
    self.model = model
    self.schedule = model.schedule

  # -- state
  def init_extra(self, key, params, frozen) -> Dict[str, Any]:
    return {}

  def frozen(self) -> Any:
    return {}

  def init_params(self, key, params, frozen):
    """Adjust freshly initialised parameters (e.g. copy a teacher's); default: unchanged."""
    return params

  def step_kind(self, step: int) -> str:
    return self.step_kinds[0]

  def make_step(self, kind: str, tx) -> StepFn:
    raise NotImplementedError

  # -- helpers for subclasses
  def labels(self, batch):
    return batch.get("label") if self.config.data.class_conditional else None

  def step_rng(self, state):
    return jax.random.fold_in(state.rng, state.step)

  def finish_step(self, state, grads, tx, metrics):
    """Optimizer + EMA update and the metrics every method logs."""
    tcfg = self.config.training
    new_state, upd = train_state.apply_gradients(state, grads, tx, self.config.ema, tcfg.batch_size)
    lr = train_state.learning_rate_schedule(self.config.optim)(state.step)
    return new_state, {**metrics, **upd, "lr": jnp.asarray(lr, jnp.float32)}

  # -- sampling
  def jump_fn(self, params, labels=None):
    """jump_fn(x, t, s) for the samplers (eval mode).  For generator_kind 'cm_f' it is valid
    only for s = sigma_min (onestep, cm:<nfe>); check_sampler refuses the rest."""
    return self.model.jump_fn(params, labels)

  @classmethod
  def check_sampler(cls, spec):
    """Raise ValueError if this method's model cannot run the sampler `spec` (an
    evaluate.SamplerSpec: kind 'gamma' | 'sss' | 'heun' | 'teacher_heun', steps, gamma, shift)."""
    name = getattr(spec, "name", spec.kind)
    if spec.kind == "heun" and not cls.has_score_head:
      raise ValueError(f"sampler {name!r} integrates the score head g(x, t, t), but method "
                       f"{cls.name!r} trains no denoiser; use onestep or cm:<nfe>"
                       + ("" if cls.generator_kind == "cm_f" else " or gamma:<g>:<nfe> / sss:<g>:<nfe>"))
    if (spec.kind in ("gamma", "sss") and cls.generator_kind == "cm_f" and spec.steps > 1
        and not (spec.kind == "gamma" and spec.gamma == 1.0 and spec.shift)):
      raise ValueError(f"sampler {name!r} jumps to intermediate times s > sigma_min, but method "
                       f"{cls.name!r} learns only the map f(x, t) to sigma_min; use onestep or "
                       f"cm:<nfe> (gamma 1 with the sigma_min shift)")

  def sample_fns(self) -> Dict[str, Callable]:
    """name -> fn(params, x_init, key, labels) -> samples.  Default: EDM Heun on g(x, t, t)."""
    steps = self.config.sampling.heun_steps

    def heun(params, x_init, key, labels):
      del key
      return samplers.edm_heun_sampler(self.model.denoise_fn(params, labels), x_init, steps,
                                       self.schedule)
    return {f"heun{steps}": heun}
