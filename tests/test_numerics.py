"""EDM's half-life EMA against a hand-rolled EMA in EDM's order, and bfloat16 compute that
changes the loss (so compute_dtype is really used) by less than its tolerance, with float32
master weights."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ctm_jax import data, parallel, train, train_state
from launch_utils import tiny_toy_edm


def test_halflife_ema_follows_edm_training_loop():
  """NVlabs/edm training/training_loop.py, per optimizer step with cur_nimg examples seen so
  far (incremented after the EMA):
    ema_halflife_nimg = min(ema_halflife_kimg * 1000, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    ema = lerp(net, ema, beta) = beta ema + (1 - beta) net
  so at step 0 beta = 0 and the EMA copies the new parameters."""
  batch, halflife_kimg, ratio = 64, 0.1, 0.5        # ramp-up h = 32 n images, capped at 100
  ema_cfg = ml_collections.ConfigDict(dict(rates=(0.9,), halflife_kimg=halflife_kimg,
                                           rampup_ratio=ratio))
  rng = np.random.default_rng(0)
  params = {"w": rng.standard_normal((3, 4)).astype(np.float32)}
  tx = optax.sgd(0.1)
  state = train_state.create_state(params, tx, ema_cfg, jax.random.PRNGKey(0))
  ema_h = {"w": params["w"].astype(np.float64)}
  ema_r = dict(ema_h)
  cur_nimg, p = 0, params["w"].astype(np.float64)
  betas = []
  for _ in range(7):
    g = rng.standard_normal((3, 4)).astype(np.float32)
    state, _ = train_state.apply_gradients(state, {"w": g}, tx, ema_cfg, batch)
    p = p - 0.1 * g
    h = min(halflife_kimg * 1000, cur_nimg * ratio)
    beta = 0.5 ** (batch / max(h, 1e-8))
    betas.append(beta)
    ema_h["w"] = beta * ema_h["w"] + (1 - beta) * p
    ema_r["w"] = 0.9 * ema_r["w"] + 0.1 * p
    cur_nimg += batch
    np.testing.assert_allclose(state.params["w"], p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema["halflife"]["w"], ema_h["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.ema["rate_0p9"]["w"], ema_r["w"], rtol=1e-5, atol=1e-6)
  assert betas[0] == 0.0 and 0.2 < betas[1] < betas[3] < 0.7   # ramp-up, then the cap (h = 100)
  np.testing.assert_allclose(betas[4:], 0.5 ** (64 / 100), rtol=1e-12)
  d0 = train_state.ema_decays(ema_cfg, jnp.int32(0), batch)
  assert float(d0["halflife"]) == 0.0


def _tiny_edm(**overrides):
  return tiny_toy_edm(**{"model.hidden": 64, "model.emb_dim": 32, **overrides})


def _first_step(cfg):
  exp = train.Experiment(cfg)
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  state, met = fns["train"](state, parallel.global_batch(pipe.batch_at(0), exp.mesh), frozen)
  return jax.device_get(state), float(met["loss"])


def test_bf16_compute_changes_the_loss_within_tolerance_and_keeps_fp32_weights():
  s32, l32 = _first_step(_tiny_edm())
  s16, l16 = _first_step(_tiny_edm(**{"training.compute_dtype": "bfloat16"}))
  rel = abs(l16 - l32) / abs(l32)
  # Same parameters, batch and keys: only the compute precision differs. bfloat16 keeps 8 bits
  # of mantissa (rounding 2^-9 = 2e-3 relative per operation; averaged over the batch the loss
  # moved by 1.1e-4 relative here); with compute_dtype ignored both runs are the same program
  # and rel = 0. The upper bound is bfloat16's own per-operation rounding, 1e-2 with margin.
  assert 1e-5 < rel < 1e-2, (l16, l32, rel)
  for tree in (s16.params, s16.ema, s16.opt_state):
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if np.issubdtype(np.asarray(x).dtype,
                                                                            np.floating)]
    assert leaves and all(np.asarray(x).dtype == np.float32 for x in leaves)
