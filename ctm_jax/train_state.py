"""Training state as a pytree, optimizers, EMAs and gradient accumulation."""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "radam")


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit for bit: a plain pytree saved whole by Orbax."""
  step: jax.Array                 # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  ema: Dict[str, Any]             # name -> EMA params (see ema_names)
  rng: jax.Array                  # base key (uint32[2]); step keys are fold_in(rng, step)
  extra: Dict[str, Any]           # method state (CTM: target params, discriminator, ...)


def learning_rate_schedule(optim_cfg) -> optax.Schedule:
  """lr * min(step / warmup_steps, 1) (EDM's linear ramp-up); constant without warm-up."""
  lr, warm = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if warm <= 0:
    return optax.constant_schedule(lr)
  return lambda step: lr * jnp.minimum(step / warm, 1.0)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
  """Adam or RAdam (Liu et al. 2020) with optional global-norm clipping and decoupled decay."""
  sched = learning_rate_schedule(optim_cfg)
  kw = dict(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  if optim_cfg.name == "adam":
    core = optax.scale_by_adam(**kw)
  elif optim_cfg.name == "radam":
    core = optax.scale_by_radam(**kw)
  else:
    raise ValueError(f"config.optim.name must be one of {OPTIMIZERS}, got {optim_cfg.name!r}")
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts.append(core)
  if optim_cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts)


# ----------------------------------------------------------------------------- EMA

def ema_name(rate: float) -> str:
  return "rate_" + repr(float(rate)).replace(".", "p")


def ema_names(ema_cfg):
  names = [ema_name(r) for r in ema_cfg.rates]
  if ema_cfg.halflife_kimg > 0:
    names.append("halflife")
  return names


def ema_decays(ema_cfg, step, batch_size: int) -> Dict[str, jax.Array]:
  """Decay per EMA at the update of optimizer step `step` (0-based): fixed rates, and EDM's
  half-life EMA beta = 0.5^(B / max(h, 1e-8)), h = min(halflife_kimg * 1000, rampup_ratio *
  cur_nimg) with cur_nimg = step * B the examples seen BEFORE this step (NVlabs/edm
  training_loop.py increments cur_nimg after the EMA update), so at step 0 beta = 0 and the
  EMA takes the new parameters."""
  out = {ema_name(r): jnp.asarray(r, jnp.float32) for r in ema_cfg.rates}
  if ema_cfg.halflife_kimg > 0:
    h = jnp.asarray(ema_cfg.halflife_kimg * 1000.0, jnp.float32)
    if ema_cfg.rampup_ratio > 0:
      seen = step.astype(jnp.float32) * batch_size
      h = jnp.minimum(h, seen * ema_cfg.rampup_ratio)
    out["halflife"] = 0.5 ** (batch_size / jnp.maximum(h, 1e-8))
  return out


def ema_update(ema_params, params, decay):
  """theta_ema <- decay * theta_ema + (1 - decay) * theta."""
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


# ----------------------------------------------------------------------------- gradients

GradFn = Callable[[Any, Dict[str, jax.Array], jax.Array], Tuple[Any, Dict[str, jax.Array]]]


def split_microbatches(batch: Dict[str, jax.Array], n: int):
  """(B, ...) -> (n, B/n, ...) for every entry."""
  return jax.tree_util.tree_map(lambda v: v.reshape((n, v.shape[0] // n) + v.shape[1:]), batch)


def accumulate_gradients(grad_fn: GradFn, params, batch, rng, microbatches: int):
  """Mean of grad_fn over `microbatches` equal parts of the batch (lax.scan; one graph).

  grad_fn(params, batch, rng) -> (grads, metrics); part m uses fold_in(rng, m).  With one
  microbatch it is grad_fn itself.  Metrics are averaged over the parts.
  """
  stateless = lambda p, st, b, r: grad_fn(p, b, r) + (st,)
  grads, metrics, _ = accumulate_gradients_with_state(stateless, params, (), batch, rng,
                                                      microbatches)
  return grads, metrics


def accumulate_gradients_with_state(grad_fn, params, state, batch, rng, microbatches: int):
  """As accumulate_gradients for grad_fn(params, state, batch, rng) -> (grads, metrics, state),
  with `state` (e.g. spectral-norm vectors, BatchNorm statistics) passed from one part to the
  next, as a sequence of forward passes would update it.  Returns (grads, metrics, state)."""
  if microbatches == 1:
    return grad_fn(params, state, batch, rng)
  parts = split_microbatches(batch, microbatches)

  def body(carry, inp):
    m, part = inp
    acc_g, acc_m, st = carry
    g, met, st = grad_fn(params, st, part, jax.random.fold_in(rng, m))
    return (jax.tree_util.tree_map(jnp.add, acc_g, g),
            jax.tree_util.tree_map(jnp.add, acc_m, met), st), None

  g0, m0, _ = jax.eval_shape(grad_fn, params, state,
                             jax.tree_util.tree_map(lambda v: v[0], parts), rng)
  zeros = lambda t: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  (g, met, state), _ = jax.lax.scan(body, (zeros(g0), zeros(m0), state),
                                    (jnp.arange(microbatches), parts))
  scale = 1.0 / microbatches
  return (jax.tree_util.tree_map(lambda v: v * scale, g),
          jax.tree_util.tree_map(lambda v: v * scale, met), state)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation, ema_cfg,
                    batch_size: int) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One optimizer update, then every EMA; returns the new state and update metrics."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decays = ema_decays(ema_cfg, state.step, batch_size)
  ema = {k: ema_update(v, params, decays[k]) for k, v in state.ema.items()}
  metrics = {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def create_state(params, tx: optax.GradientTransformation, ema_cfg, rng, extra=None) -> TrainState:
  ema = {name: params for name in ema_names(ema_cfg)}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=ema, rng=rng, extra=extra or {})
