"""Learning checks that no re-implementation of the method can fake: training must move the
model towards the exact answer, which comes from the mixture oracle, not from the code.

- toy CTM with the exact oracle teacher: the one-step ODE error E = |G(x_T, T, sigma_min) -
  x_ODE(x_T)|^2 / dim against scipy's DOP853 solution of the exact PF-ODE must fall by a stated
  factor from its value at initialisation;
- toy EDM: the MMD of its 18-step Heun samples must approach the exact denoiser's MMD with the
  same sampler and the same x_T.
"""
import jax
import numpy as np

from configs import toy_ctm, toy_edm
from ctm_jax import data, diffusion, evaluate, parallel, samplers, train
from ctm_jax.metrics import sample_quality
from ctm_jax.oracle import toy_mixture_2d


def _train(cfg, kind, steps, evaluate_fn):
  exp = train.Experiment(cfg)
  pipe = data.InputPipeline(cfg.data, cfg.training.batch_size, cfg.seed, 0, 1)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  before = evaluate_fn(exp, state.params)
  for step in range(steps):
    state, _ = fns[kind](state, parallel.global_batch(pipe.batch_at(step), exp.mesh), frozen)
  return before, evaluate_fn(exp, state.params)


def test_toy_ctm_with_exact_teacher_cuts_the_ode_error():
  gm = toy_mixture_2d()
  x_T = samplers.initial_noise(jax.random.PRNGKey(99), (128, 2), 80.0)
  exact = evaluate.exact_ode_solution(jax.jit(gm.denoise), x_T, 80.0, 0.002, rtol=1e-7)
  c = toy_ctm.get_config()
  c.model.hidden, c.model.num_blocks, c.model.emb_dim = 64, 2, 32
  c.training.batch_size = 64
  c.training.sample_every = 0
  c.ctm.num_points, c.ctm.max_k = 10, 9
  e0, e1 = _train(c, "ctm", 300, lambda exp, p: evaluate.ode_error(exp.model, p, x_T, exact))
  # Measured over seeds 0, 1, 2 (256 x_T): E from 0.94 / 0.67 / 0.70 at initialisation to
  # 0.027 / 0.021 / 0.023 after 300 steps (factors 26-35; 0.020 / 0.021 / 0.017 after 400).
  # Asked: a factor 10 and E < 0.06, so a 2.5x margin on both.
  assert e1 < e0 / 10 and e1 < 0.06, (e0, e1)


def test_toy_edm_sample_mmd_approaches_the_exact_denoisers():
  gm = toy_mixture_2d()
  cfg = toy_edm.get_config()
  cfg.model.hidden, cfg.model.num_blocks, cfg.model.emb_dim = 64, 2, 32
  cfg.training.batch_size = 128
  cfg.training.sample_every = 0
  cfg.optim.lr, cfg.optim.warmup_steps = 2e-3, 0
  sch = diffusion.Schedule(0.002, 80.0, cfg.diffusion.sigma_data, 7.0)
  n = 1000
  x_T = samplers.initial_noise(jax.random.PRNGKey(99), (n, 2), sch.sigma_max)
  ref = np.asarray(gm.sample(jax.random.PRNGKey(7), n))
  heun = lambda d: samplers.edm_heun_sampler(d, x_T, 18, sch)
  mmd_exact = sample_quality.mmd_rbf(np.asarray(jax.jit(lambda: heun(gm.denoise))()), ref)

  def mmd(exp, params):
    return sample_quality.mmd_rbf(np.asarray(jax.jit(lambda p: heun(exp.model.denoise_fn(p)))(params)),
                                  ref)
  m0, m1 = _train(cfg, "train", 400, mmd)
  # Measured over seeds 0, 1, 2: exact denoiser 0.0021; the model 0.60 / 0.77 / 0.62 at
  # initialisation, 0.055 / 0.060 / 0.065 after 400 steps (the excess over the exact denoiser's
  # falls by 9.6-13x; the full 6000-step toy_edm run reaches the floor, docs/results.md).
  # Asked: the excess falls by 4x and MMD^2 < 0.15 (2.5x margins).
  assert mmd_exact < 0.01
  assert m1 - mmd_exact < (m0 - mmd_exact) / 4 and m1 < 0.15, (m0, m1, mmd_exact)
