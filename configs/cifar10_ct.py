"""Consistency training on CIFAR-10 (Song et al. 2023; openai/consistency_models_cifar10
configs/cifar10_ve_ct_adaptive.py): no teacher.

  python -m launch.train --config=configs/cifar10_ct.py --workdir=$WORKDIR \
      --config.ct.lpips_weights=lpips_vgg.npz

The official settings: LPIPS (VGG16 with max pooling, as flaxmodels' VGG16 in the JAX code) on
224-pixel bilinear upsamples, uniform lambda, N(k) from s0 = 2 to s1 = 150 over the 800k
iterations, target EMA mu(k) = exp(s0 ln mu0 / (N(k) - 1)) with mu0 = 0.9 (the code's
'adaptive' mode), NCSN++ (Fourier embedding scale 16, channel multipliers (2, 2, 2), 4 blocks,
attention at 16x16, FIR (1, 3, 3, 1), residual input skips), dropout 0, RAdam lr 2e-4 (the RAdam
path applies no warm-up), no gradient clipping, batch 512, evaluation EMA 0.9999, random x-flips.
Multistep times: the reference publishes none for CIFAR-10 CT, so `cm:<n>` uses the Karras grid.
Deviation: EDM's SongUNet NCSN++ (c_noise = ln(t) / 4 as the other configs), not the CM code's.
"""
from configs import cifar10_edm, cm_common


def get_config():
  c = cm_common.family_config(cifar10_edm.get_config(), "ct", cm_common.ct_block())
  c.ct.distance = "lpips"
  c.ct.lpips_pooling = "max"
  c.ct.mu_form = "code"
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.0)
  c.model.update(dict(embedding_type="fourier", fourier_scale=16.0, channel_mult_noise=2,
                      encoder_type="residual", resample_filter=(1, 3, 3, 1), augment_dim=0))
  cm_common.cifar10_schedule(c, lr=2e-4, ema_rate=0.9999, batch_size=512, num_train_steps=800_000)
  c.lock()
  return c
