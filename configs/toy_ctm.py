"""CTM on the 2-D Gaussian mixture with the EXACT mixture denoiser as the teacher.

  python -m launch.train --config=configs/toy_ctm.py --workdir=workdirs/toy_ctm
"""
from configs import ctm_common, toy_edm


def get_config():
  c = ctm_common.student_of(toy_edm, num_points=18, distance="l2", teacher_source="oracle")
  c.ctm.sample_nfes = (1, 2, 4, 8)
  c.optim.lr = 1e-3              # RAdam as the reference; a larger lr than its 4e-4 suits the MLP
  c.ema.rates = (0.999, 0.9999)
  c.training.batch_size = 256
  # ODE error of the one-step map (EMA 0.999) against the exact PF-ODE, summed over the 2 dims,
  # two seeds (README "toy_ctm: how close distillation gets"): 2.8e-3 at 6k steps, 6-8e-4 at 12k,
  # plateau ~4e-4 from 18k (the Heun-18 teacher itself is 2.7e-4 from the exact flow).
  c.training.num_train_steps = 12000
  c.training.sample_every = 2000
  c.sampling.num_samples = 1000
  c.eval.samplers = "onestep,gamma:0:2,gamma:0:4,gamma:0:8,gamma:0.5:4,cm:4,heun:18,teacher_heun:18"
  c.lock()
  return c
