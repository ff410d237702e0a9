"""Improved consistency training on CIFAR-10 (Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models"; no official code).

  python -m launch.train --config=configs/cifar10_ict.py --workdir=$WORKDIR

The paper's settings: no teacher and no EMA target (theta^- = sg(theta)), pseudo-Huber
c = 0.00054 sqrt(3072) = 0.03, lambda = 1 / (t_{i+1} - t_i), discrete log-normal noise
(P_mean -1.1, P_std 2.0), doubling curriculum s0 = 10 -> s1 = 1280 over K = 400k iterations
(K' = 50k), NCSN++ with Fourier-embedding scale 0.02 instead of 16, dropout 0.3 with the same
dropout mask for the online and target evaluation, RAdam lr 1e-4, batch 1024, evaluation EMA
0.99993, random x-flips; two-step sampling through t = 0.821 (FID 2.83 / 2.46 reported at 1 / 2
steps for this network size).  The values besides the method's own (batch, lr, EMA, 0.821,
Fourier scale) were read from summaries of the paper's appendix: check them against it.
Deviations: EDM's SongUNet NCSN++ (c_noise = ln(t) / 4 as the other configs), not the CM code's.
"""
from configs import cifar10_edm, cm_common


def get_config():
  edm = cifar10_edm.get_config()
  c = cm_common.family_config(edm, "ict", cm_common.ict_block())
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.3)
  c.model.update(dict(embedding_type="fourier", fourier_scale=0.02, channel_mult_noise=2,
                      encoder_type="residual", resample_filter=(1, 3, 3, 1), augment_dim=0))
  c.ict.sample_times = (0.821,)
  cm_common.cifar10_schedule(c, lr=1e-4, ema_rate=0.99993, batch_size=1024, num_train_steps=400_000)
  c.lock()
  return c
