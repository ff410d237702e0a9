"""MeanFlow on CIFAR-10 (Geng et al. 2025, "Mean Flows for One-step Generative Modeling";
the released PyTorch code Gsunshine/py-meanflow, its CIFAR-10 script).

  python -m launch.train --config=configs/cifar10_meanflow.py --workdir=$WORKDIR

The released settings: t ~ logit-normal(-0.6, 1.6) and r ~ logit-normal(-4.0, 1.6) sorted,
r != t for 75% of the batch, adaptive weight power 0.75, the network conditioned on (t, t - r),
dropout 0.2, Adam lr 6e-4 with a linear warm-up of 200 epochs (9.8k steps at batch 1024), batch
1024 (8 x 128), 16k epochs (~780k steps); one-step FID 2.92 reported.  Deviations: EDM's
augmentation (their --use_edm_aug) is off (the project feeds augment labels to EDM runs only,
augment_dim 0); the network is the project's DDPM++ with CTM's s path carrying t - r; the
evaluation EMA 0.9999 (the released code keeps several; check its defaults).
"""
from configs import cifar10_edm, cm_common


def get_config():
  c = cm_common.family_config(cifar10_edm.get_config(), "meanflow", cm_common.meanflow_block())
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.2)
  c.model.augment_dim = 0
  c.data.random_flip = True
  c.optim.name = "adam"
  c.optim.lr = 6e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.warmup_steps = 9_766           # 200 epochs of 50k images at batch 1024
  c.optim.grad_clip = 0.0
  c.ema.rates = (0.9999,)
  c.ema.halflife_kimg = 0.0
  c.sampling.eval_ema = "rate_0p9999"
  c.training.batch_size = 1024
  c.training.num_train_steps = 780_000
  c.training.checkpoint_every = 5_000
  c.training.keep_every = 50_000
  c.training.sample_every = 10_000
  c.lock()
  return c
