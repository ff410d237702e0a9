"""CTM on the 8x8 digits, distilling a digits_edm run (under 30 minutes on a CPU).

  python -m launch.train --config=configs/digits_edm.py --workdir=workdirs/digits_edm
  python -m launch.train --config=configs/digits_ctm.py --workdir=workdirs/digits_ctm \
      --config.teacher.workdir=workdirs/digits_edm

The student is the teacher's network plus the s path, initialised from the teacher.  LPIPS
needs ImageNet VGG weights and 224-pixel inputs, which would dominate an 8x8 CPU run, so
this config uses the pseudo-Huber distance (iCT); the CIFAR-10 / ImageNet configs use LPIPS.
"""
from configs import ctm_common, digits_edm


def get_config():
  # A CPU-sized grid: the teacher's k Heun steps dominate the cost (E[k] = (2K + 1) / 3 under
  # P(k) ~ k), so N = 10 here; the paper configs keep N = 18 / 40.
  c = ctm_common.cpu_student_of(digits_edm, num_points=10, teacher_workdir="workdirs/digits_edm")
  c.ema.rates = (0.99, 0.999)           # a short run: sample the faster EMA
  c.sampling.eval_ema = "rate_0p99"
  c.training.batch_size = 32
  c.training.num_train_steps = 2000
  c.training.log_every = 100
  c.training.checkpoint_every = 500
  c.training.sample_every = 500
  c.eval.samplers = ctm_common.GAMMA_SAMPLERS + ",heun:18,teacher_heun:18"
  c.lock()
  return c
