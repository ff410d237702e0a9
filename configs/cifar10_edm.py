"""EDM on CIFAR-10 32x32, unconditional VP / DDPM++ (Karras et al. 2022; NVlabs/edm
`train.py --cond=0 --arch=ddpmpp`): the teacher of the CTM CIFAR-10 runs.

  python -m launch.train --config=configs/cifar10_edm.py --workdir=$WORKDIR
  python -m launch.train --config=configs/cifar10_edm.py:cond ...   (class-conditional)

Needs CIFAR-10 prepared as TFDS array_record (see README, "Data").  EDM's non-leaking
augmentation (`--augment=0.12`: x/y flips, scaling, rotation, anisotropy, translation; the
network is conditioned on the 9 augment labels, zeros when sampling); no dataset x-flips.
"""
import ml_collections

from configs import base, toy_edm


def ddpmpp_cifar10(dropout: float = 0.13) -> ml_collections.ConfigDict:
  """DDPM++ as in EDM: 128 channels, mult 2,2,2, 4 blocks per resolution, attention at 16."""
  return ml_collections.ConfigDict(dict(
      arch="songunet", model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
      num_blocks=4, attn_resolutions=(16,), dropout=dropout, embedding_type="positional",
      channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
      resample_filter=(1, 1), augment_dim=9, label_dropout=0.0,
      remat="none"))          # none | blocks | blocks_save_dots (README "Performance")


def get_config(arg: str = ""):
  c = base.get_base_config()
  c.method = "edm"
  c.edm = toy_edm.edm_block(augment_p=0.12)
  c.data.dataset = "cifar10"
  c.data.class_conditional = arg == "cond"
  # NVlabs/edm train.py: --xflip defaults to False (line 60) and the CIFAR-10 runs do not set
  # it; their x-flips come from the augment pipe (xflip=1e8, line 145), i.e. config.edm.augment.
  c.data.random_flip = False
  c.diffusion.sigma_data = 0.5
  c.model = ddpmpp_cifar10()
  c.optim.name = "adam"
  c.optim.lr = 1e-3                      # --lr 10e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.warmup_steps = 19_531          # lr_rampup_kimg = 10000 at batch 512
  c.ema.rates = (0.9999,)
  c.ema.halflife_kimg = 500.0            # --ema 0.5 (Mimg), ramp-up ratio 0.05
  c.ema.rampup_ratio = 0.05
  c.sampling.eval_ema = "halflife"
  c.training.batch_size = 512
  c.training.num_train_steps = 390_625   # --duration 200 Mimg
  c.training.log_every = 100
  c.training.checkpoint_every = 5_000
  c.training.keep_every = 50_000
  c.training.sample_every = 10_000
  c.sampling.num_samples = 64
  c.eval.num_samples = 50_000            # the papers' FID sample count
  c.eval.batch_size = 512
  c.eval.shard_size = 5_120
  c.eval.nll_batch_size = 512
  c.lock()
  return c
