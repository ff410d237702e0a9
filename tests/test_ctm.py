"""CTM training: the loss against a direct re-implementation, adaptive weights, the k-step
teacher (one compilation, cost proportional to k), target EMA and teacher initialisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_ctm
from ctm_jax import config_lib, data, diffusion, parallel, solvers, train, train_state
from ctm_jax.methods import ctm as ctm_lib
from launch_utils import set_fields


def tiny_ctm_config(**overrides):
  c = toy_ctm.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_dim = 32, 2, 16
  c.training.batch_size = 16
  c.training.sample_every = 0
  c.ctm.num_points = 10
  c.ctm.max_k = 9
  return set_fields(c, overrides)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_ctm_config()
  exp = train.Experiment(cfg)
  state = exp.init_state()
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  batch = {k: jnp.asarray(v) for k, v in pipe.batch_at(0).items()}
  return cfg, exp, jax.device_get(state), batch


def _direct_losses(exp, state, batch, rng, k_times):
  """The CTM and DSM losses written out step by step (Python loop over Heun steps)."""
  m, model, cfg = exp.method, exp.model, exp.config
  x0 = batch["x"]
  keys = jax.random.split(rng, 8)
  k = int(diffusion.sample_k_proportional(k_times, cfg.ctm.max_k))
  i, j = diffusion.sample_ctm_indices(keys[7], x0.shape[0], cfg.ctm.num_points, k)
  grid = diffusion.karras_sigmas(cfg.ctm.num_points, 0.002, 80.0, 7.0)
  t, u, s = grid[i], grid[i + k], grid[j]
  x_t = x0 + t[:, None] * jax.random.normal(keys[0], x0.shape)
  from ctm_jax.oracle import toy_mixture_2d
  gm = toy_mixture_2d()
  x_u = x_t
  for step in range(k):
    x_u = solvers.heun_step(gm.denoise, x_u, grid[i + step], grid[i + step + 1])
  smin = jnp.full_like(s, 0.002)
  tp = state.extra["target"]
  target = model.jump(tp, model.jump(state.params, x_u, u, s, train=True, rng=keys[1]), s, smin,
                      train=True, rng=keys[2])

  def l_ctm(p):
    est = model.jump(tp, model.jump(p, x_t, t, s, train=True, rng=keys[3]), s, smin, train=True,
                     rng=keys[4])
    return jnp.mean(jnp.mean((est - jax.lax.stop_gradient(target)) ** 2, axis=1))

  l_dsm = lambda p: m.dsm_loss(p, x0, None, keys[5])
  return k, l_ctm, l_dsm


def test_generator_gradients_match_direct_computation(setup):
  cfg, exp, state, batch = setup
  rng, k_times = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  grads, met, _ = exp.method.generator_grads(state.params, state.extra, {"teacher": {}}, batch, rng,
                                          k_times, with_gan=False)
  k, l_ctm, l_dsm = _direct_losses(exp, state, batch, rng, k_times)
  assert int(met["k"]) == k
  np.testing.assert_allclose(met["loss_ctm"], l_ctm(state.params), rtol=1e-5)
  np.testing.assert_allclose(met["loss_dsm"], l_dsm(state.params), rtol=1e-5)
  g_ctm, g_dsm = jax.grad(l_ctm)(state.params), jax.grad(l_dsm)(state.params)
  w = lambda g: np.linalg.norm(np.asarray(g["out"]["kernel"]))
  lam = min(w(g_ctm) / (w(g_dsm) + 1e-4), 1e4)            # reference calculate_adaptive_weight
  np.testing.assert_allclose(met["lambda_dsm"], lam, rtol=1e-4)
  ref = jax.tree_util.tree_map(lambda a, b: a + lam * b, g_ctm, g_dsm)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_step_compiles_once_for_all_k_and_teacher_cost_is_2k(setup):
  cfg, _, _, batch = setup
  exp = train.Experiment(cfg)
  calls = []
  teacher = exp.method.teacher
  inner = teacher._denoise

  def counting(params, x, t, labels):
    jax.debug.callback(lambda: calls.append(1))
    return inner(params, x, t, labels)
  teacher._denoise = counting
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  gbatch = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, exp.mesh)
  seen = {}
  for _ in range(12):
    calls.clear()
    state, met = fns["ctm"](state, gbatch, frozen)
    jax.block_until_ready(met)
    k = int(met["k"])
    seen[k] = len(calls)
  assert fns["ctm"]._cache_size() == 1
  assert len(seen) >= 3, seen
  for k, n in seen.items():
    assert n == 2 * k, seen     # two teacher evaluations per Heun step, k steps


def test_target_is_an_ema_updated_on_generator_steps(setup):
  cfg, _, _, batch = setup
  exp = train.Experiment(cfg)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  gbatch = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, exp.mesh)
  prev_target = jax.device_get(state.extra["target"])
  new, _ = fns["ctm"](state, gbatch, frozen)
  new = jax.device_get(new)
  mu = cfg.ctm.target_ema
  expect = jax.tree_util.tree_map(lambda a, b: mu * a + (1 - mu) * b, prev_target, new.params)
  for a, b in zip(jax.tree_util.tree_leaves(new.extra["target"]), jax.tree_util.tree_leaves(expect)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_ctm_config_errors_name_fields():
  for path, value, field in [("ctm.max_k", 30, "ctm.max_k"), ("ctm.distance", "l1", "ctm.distance"),
                             ("ctm.target_ema", 1.0, "ctm.target_ema"),
                             ("teacher.source", "magic", "teacher.source"),
                             ("ctm.sample_nfes", (0,), "ctm.sample_nfes"),
                             ("ctm.lpips_pooling", "mean", "ctm.lpips_pooling"),
                             ("teacher.step", -5, "teacher.step")]:
    cfg = tiny_ctm_config(**{path: value})
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
      train.validate_config(cfg, num_devices=8, process_count=1)
  cfg = tiny_ctm_config(**{"ctm.distance": "lpips"})
  with pytest.raises(config_lib.ConfigError, match="lpips_weights"):
    train.validate_config(cfg, num_devices=8, process_count=1)


def test_pseudo_huber_distance_formula():
  cfg = tiny_ctm_config(**{"ctm.distance": "pseudo_huber"})
  d = ctm_lib.distance_fn(cfg, 2)
  a, b = jnp.array([[0.0, 0.0], [1.0, 2.0]]), jnp.array([[3.0, 4.0], [1.0, 2.0]])
  c = 0.00054 * np.sqrt(2)
  np.testing.assert_allclose(d({}, a, b), [np.sqrt(25 + c * c) - c, 0.0], rtol=1e-6, atol=1e-9)
