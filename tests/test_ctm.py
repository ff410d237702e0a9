"""CTM training: the loss against a direct re-implementation, adaptive weights, the k-step
teacher (one compilation, cost proportional to k), target EMA and teacher initialisation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import toy_ctm
from ctm_jax import config_lib, data, diffusion, parallel, solvers, train, train_state
from ctm_jax.methods import ctm as ctm_lib
from launch_utils import set_fields, tiny_toy_student


def tiny_ctm_config(**overrides):
  return tiny_toy_student(toy_ctm, **{"ctm.num_points": 10, "ctm.max_k": 9, **overrides})


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


def per_example_losses(exp, params, extra, frozen, batch, rng, k_times, with_gan=False):
  """The per-example loss terms as functions of the student's parameters, with the draws that
  generator_grads makes from (rng, k_times) for the whole (micro)batch."""
  m = exp.method
  x0, labels = batch["x"], m.labels(batch)
  keys = jax.random.split(rng, 8)
  k, i, j, t, u, s = m.sample_times(k_times, keys[7], x0.shape[0])
  x_t = x0 + diffusion.append_dims(t, x0.ndim) * jax.random.normal(keys[0], x0.shape)
  x_u = m.teacher_solve(frozen, x_t, i, k, labels)
  tgt = m.ctm_target(params, extra["target"], x_u, u, s, labels, (keys[1], keys[2]))
  est = lambda p: m.estimate_fn(extra["target"], x_t, t, s, labels, (keys[3], keys[4]))(p)
  x_dsm, sigma, k_drop = m.dsm_inputs(x0, keys[5])
  fns = {"ctm": lambda p: m.distance(frozen, est(p), tgt),
         "dsm": lambda p: m.dsm_per_example(exp.model.denoiser(p, x_dsm, sigma, sigma, labels,
                                                               train=True, rng=k_drop), x0, sigma)}
  if with_gan:
    fns["gan"] = lambda p: m.gan.generator_loss_per_example(
        extra["disc"], extra["disc_state"], frozen, est(p), labels, keys[6])[0]
  return fns


def loop_over_groups(fns, params, groups, w_path):
  """The reference's per-GPU-microbatch computation as a Python loop: for each group, jax.grad
  of its mean losses, lambda = |grad_W L_CTM| / (|grad_W L_other| + 1e-4) clamped to [0, 1e4]
  (lambda_GAN then clipped to [0.01, 10]); returns the lambdas and the mean weighted gradient."""
  b = fns["ctm"](params).shape[0]
  n = b // groups
  w_norm = lambda g: np.linalg.norm(np.asarray(ctm_lib.adaptive_groups.find_param(g, w_path)))
  lams, lams_gan, total = [], [], None
  group_grads = jax.jit(lambda p, g: {
      name: jax.grad(lambda q, f=f: jnp.mean(jax.lax.dynamic_slice_in_dim(f(q), g * n, n)))(p)
      for name, f in fns.items()})
  for g in range(groups):
    grads = group_grads(params, g)
    lam = min(w_norm(grads["ctm"]) / (w_norm(grads["dsm"]) + 1e-4), 1e4)
    weights = {"ctm": 1.0, "dsm": lam}
    lams.append(lam)
    if "gan" in grads:
      weights["gan"] = float(np.clip(min(w_norm(grads["ctm"]) / (w_norm(grads["gan"]) + 1e-4),
                                         1e4), 0.01, 10.0))
      lams_gan.append(weights["gan"])
    part = jax.tree_util.tree_map(lambda *gs: sum(weights[k] * v for k, v in zip(grads, gs)) / groups,
                                  *grads.values())
    total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
  return np.array(lams), np.array(lams_gan), total


def assert_trees_close(a, b, rtol, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("group_size", [0, 4])
def test_adaptive_groups_match_a_loop_over_groups(setup, group_size):
  """Each group of ctm.adaptive_group_size examples gets its own lambda_DSM from its own
  W-gradients and the gradient is the mean of the weighted group gradients; k, the indices and
  the noise stay drawn for the whole batch (0 = one group = the whole batch)."""
  cfg, _, state, batch = setup
  exp = train.Experiment(tiny_ctm_config(**{"ctm.adaptive_group_size": group_size}))
  rng, k_times = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  grads, met, _ = exp.method.generator_grads(state.params, state.extra, {"teacher": {}}, batch,
                                             rng, k_times, with_gan=False)
  fns = per_example_losses(exp, state.params, state.extra, {"teacher": {}}, batch, rng, k_times)
  groups = 16 // group_size if group_size else 1
  lams, _, ref = loop_over_groups(fns, state.params, groups, "out/kernel")
  np.testing.assert_allclose(met["loss_ctm"], np.mean(fns["ctm"](state.params)), rtol=1e-5)
  np.testing.assert_allclose(met["loss_dsm"], np.mean(fns["dsm"](state.params)), rtol=1e-5)
  np.testing.assert_allclose(met["lambda_dsm"], lams.mean(), rtol=1e-4)
  if groups > 1:
    assert lams.max() > 1.2 * lams.min(), lams         # the groups' lambdas do differ here
    np.testing.assert_allclose([met["lambda_dsm_min"], met["lambda_dsm_max"]],
                               [lams.min(), lams.max()], rtol=1e-4)
  assert_trees_close(grads, ref, rtol=2e-4, atol=1e-7)


def test_adaptive_groups_stay_data_parallel(setup):
  """Groups of 2 on 8 devices (one group per device): the sharded step compiles without
  gathering the batch and matches the single-device result."""
  cfg, _, state, batch = setup
  exp = train.Experiment(tiny_ctm_config(**{"ctm.adaptive_group_size": 2}))
  rng, k_times = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
  fn = jax.jit(lambda p, ex, b: exp.method.generator_grads(p, ex, {"teacher": {}}, b, rng,
                                                           k_times, with_gan=False)[:2])
  sharded = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, exp.mesh)
  assert len(sharded["x"].sharding.device_set) == 8
  hlo = fn.lower(state.params, state.extra, sharded).compile().as_text()
  # Nothing is gathered: no activation, cotangent, per-group W-gradient ((8, 32, 2) here), nor
  # per-example index or lambda (adaptive_groups.per_example and the DSM sigmas are elementwise
  # per device); parameter gradients are all-reduced.
  moved = re.findall(r"= (\w+)\[([\d,]*)\]\S* (?:all-gather|all-to-all)(?:-start)?\(", hlo)
  assert not moved, moved
  g8, m8 = fn(state.params, state.extra, sharded)
  g1, m1 = fn(state.params, state.extra,
              {k: jax.device_put(np.asarray(v), jax.devices()[0]) for k, v in batch.items()})
  for key in ("lambda_dsm", "lambda_dsm_min", "lambda_dsm_max", "loss"):
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5)
  assert_trees_close(g8, g1, rtol=1e-4, atol=1e-7)


def test_adaptive_groups_within_each_microbatch(setup):
  """With training.microbatches = 2 the groups lie inside each part: the step's gradient is the
  mean over parts of each part's mean weighted group gradient."""
  cfg, _, _, batch = setup
  cfg2 = tiny_ctm_config(**{"ctm.adaptive_group_size": 4, "training.microbatches": 2})
  train.validate_config(cfg2, num_devices=8, process_count=1)
  exp = train.Experiment(cfg2)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  gbatch = parallel.global_batch({k: np.asarray(v) for k, v in batch.items()}, exp.mesh)
  host = jax.device_get(state)
  _, met = fns["ctm"](state, gbatch, frozen)
  k_times, k_rest = jax.random.split(jax.random.fold_in(host.rng, host.step))
  lams, ref = [], None
  for m in range(2):
    part = {k: v[m * 8:(m + 1) * 8] for k, v in batch.items()}
    losses = per_example_losses(exp, host.params, host.extra, {"teacher": {}}, part,
                                jax.random.fold_in(k_rest, m), k_times)
    lam, _, g = loop_over_groups(losses, host.params, 2, "out/kernel")
    lams.append(lam)
    ref = g if ref is None else jax.tree_util.tree_map(lambda a, b: (a + b) / 2, ref, g)
  np.testing.assert_allclose(met["lambda_dsm"], np.mean(lams), rtol=1e-4)
  np.testing.assert_allclose(met["lambda_dsm_min"], np.mean([l.min() for l in lams]), rtol=1e-4)
  np.testing.assert_allclose(met["grad_norm"], optax.tree.norm(ref), rtol=1e-4)
  bad = tiny_ctm_config(**{"ctm.adaptive_group_size": 16, "training.microbatches": 2})
  with pytest.raises(config_lib.ConfigError, match=r"ctm\.adaptive_group_size.*microbatch"):
    train.validate_config(bad, num_devices=8, process_count=1)


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
                             ("teacher.step", -5, "teacher.step"),
                             ("ctm.adaptive_group_size", 3, "ctm.adaptive_group_size"),
                             ("ctm.adaptive_group_size", -1, "ctm.adaptive_group_size")]:
    cfg = tiny_ctm_config(**{path: value})
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
      train.validate_config(cfg, num_devices=8, process_count=1)
  cfg = tiny_ctm_config(**{"ctm.distance": "lpips"})
  with pytest.raises(config_lib.ConfigError, match="lpips_weights"):
    train.validate_config(cfg, num_devices=8, process_count=1)


def test_conditional_discriminator_without_gan_is_refused():
  """gan.conditional only shapes the discriminator, so without gan.enabled it would be ignored."""
  cfg = tiny_ctm_config(**{"gan.conditional": True})
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.gan\.conditional = True .* config\.gan\.enabled = False"):
    train.validate_config(cfg, num_devices=8, process_count=1)
  train.validate_config(tiny_ctm_config(), num_devices=8, process_count=1)   # the default: fine


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_ctm_sample_fns_are_finite_for_every_gamma(setup, gamma):
  """config.ctm.sample_gamma in [0, 1] (accepted by the config check) samples finite values."""
  _, _, state, _ = setup
  cfg = tiny_ctm_config(**{"ctm.sample_gamma": gamma, "ctm.sample_nfes": (1, 3)})
  train.validate_config(cfg, num_devices=8, process_count=1)
  exp = train.Experiment(cfg)
  x_T = 80.0 * jax.random.normal(jax.random.PRNGKey(9), (8, 2))
  fns = exp.method.sample_fns()
  assert f"nfe3_gamma{gamma:g}" in fns
  for name, fn in fns.items():
    assert np.isfinite(np.asarray(fn(state.params, x_T, jax.random.PRNGKey(10), None))).all(), name


def test_checkpoint_teacher_takes_its_eval_ema(tmp_path, caplog):
  """A teacher run with two EMAs and sampling.eval_ema = the second: the student distils that
  one (not the first), teacher.ema overrides it, and the choice is logged."""
  from configs import toy_edm
  from ctm_jax import teacher as teacher_lib
  tcfg = set_fields(toy_edm.get_config(), {
      "model.hidden": 16, "model.num_blocks": 1, "model.emb_dim": 8, "training.batch_size": 16,
      "training.num_train_steps": 2, "training.checkpoint_every": 2, "training.sample_every": 0,
      "optim.warmup_steps": 0, "ema.rates": (0.5, 0.9), "sampling.eval_ema": "rate_0p9"})
  train.train_and_evaluate(tcfg, str(tmp_path))
  _, t_state, _ = train.load_state(tcfg, str(tmp_path))
  ema = jax.device_get(t_state.ema)
  assert not np.allclose(ema["rate_0p5"]["out"]["kernel"], ema["rate_0p9"]["out"]["kernel"])
  cfg = tiny_ctm_config(**{"teacher.source": "checkpoint", "teacher.workdir": str(tmp_path),
                           "teacher.config": tcfg})
  train.validate_config(cfg, num_devices=8, process_count=1)
  for choice, expect in (("", "rate_0p9"), ("rate_0p5", "rate_0p5")):
    cfg.teacher.ema = choice
    caplog.clear()
    with caplog.at_level("INFO"):
      got = teacher_lib.Teacher(cfg).params()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ema[expect])):
      np.testing.assert_array_equal(a, b)
    assert f"workdir={tmp_path} step=2 ema={expect}" in caplog.text
  cfg.teacher.ema = "rate_0p7"
  with pytest.raises(ValueError, match=r"config\.teacher\.ema = 'rate_0p7'"):
    teacher_lib.Teacher(cfg).params()


def test_pseudo_huber_distance_formula():
  cfg = tiny_ctm_config(**{"ctm.distance": "pseudo_huber"})
  d = ctm_lib.distance_fn(cfg, 2)
  a, b = jnp.array([[0.0, 0.0], [1.0, 2.0]]), jnp.array([[3.0, 4.0], [1.0, 2.0]])
  c = 0.00054 * np.sqrt(2)
  np.testing.assert_allclose(d({}, a, b), [np.sqrt(25 + c * c) - c, 0.0], rtol=1e-6, atol=1e-9)
