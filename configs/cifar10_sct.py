"""sCT on CIFAR-10 (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models"; no official code).

  python -m launch.train --config=configs/cifar10_sct.py --workdir=$WORKDIR

The method's settings from the paper: TrigFlow, tau ~ N(-1.0, 1.4^2), tangent normalisation
c = 0.1, tangent warm-up over H = 10k iterations, adaptive weighting w_phi(t), the time input
c_noise(t) = t, theta^- = sg(theta) (no EMA target), two-step sampling through t = 1.1.  The
training values (DDPM++ with dropout 0.2, Adam lr 1e-4 with b2 0.99, batch 512, 400k steps,
EMA 0.9999) were read from summaries of the paper's appendix and public reproductions: check
them against it.  Deviation: DDPM++ with the project's positional embedding (the paper's
variant uses scale 0.02 Fourier features); sCM's prior weighting 1 / (sd tan t) is off
(ctm_jax/methods/scm.py).
"""
from configs import cifar10_edm, cm_common


def get_config():
  c = cm_common.family_config(cifar10_edm.get_config(), "sct",
                              cm_common.scm_block(distil=False, sigma_data=0.5))
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.2)
  c.model.augment_dim = 0
  c.data.random_flip = True
  c.optim.name = "adam"
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.99, 1e-8
  c.optim.grad_clip = 0.0
  c.sct.weight_lr = 1e-4
  c.ema.rates = (0.9999,)
  c.ema.halflife_kimg = 0.0
  c.sampling.eval_ema = "rate_0p9999"
  c.training.batch_size = 512
  c.training.num_train_steps = 400_000
  c.training.checkpoint_every = 5_000
  c.training.keep_every = 50_000
  c.training.sample_every = 10_000
  c.lock()
  return c
