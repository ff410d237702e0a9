"""CTM on MNIST, distilling an mnist_edm run.

  python -m launch.train --config=configs/mnist_ctm.py --workdir=workdirs/mnist_ctm \
      --config.teacher.workdir=workdirs/mnist_edm
  python -m launch.eval --workdir=workdirs/mnist_ctm --mode=fid \
      --config.eval.inception_weights=inception_fid.npz \
      --config.eval.ref_stats=<mnist_edm's reference statistics, made with --mode=fid_stats>

The student is the teacher's network plus the s path (1,922,337 parameters), initialised from
the teacher.  Not trained here: docs/evaluation.md "MNIST" says what it would take.
"""
from configs import ctm_common, mnist_edm


def get_config():
  # N = 18 as CTM's CIFAR-10 runs (the teacher's k Heun steps, E[k] = (2K + 1) / 3 = 11.7
  # under P(k) ~ k, dominate the step; digits_ctm cuts N to 10 for that reason).
  # Pseudo-Huber, no GAN term (ctm_common.cpu_student_of): LPIPS's 224-pixel inputs are 64x the
  # pixels of a 28x28 image.
  c = ctm_common.cpu_student_of(mnist_edm, num_points=18, teacher_workdir="workdirs/mnist_edm")
  c.ema.rates = (0.999,)                  # CTM's evaluation EMA
  c.sampling.eval_ema = "rate_0p999"
  c.training.batch_size = 64              # CTM's 256 (CIFAR-10) scaled to the CPU step time
  c.training.num_train_steps = 10000      # 640k images, 11 epochs: the student starts from the
                                          # teacher's denoiser, so it needs far fewer steps
  c.training.log_every = 200
  c.training.checkpoint_every = 2000
  c.training.sample_every = 2000
  c.eval.samplers = ctm_common.GAMMA_SAMPLERS + ",teacher_heun:18"
  c.lock()
  return c
