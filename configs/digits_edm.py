"""EDM on scikit-learn's 8x8 digits (built locally, no download): under 15 minutes on a CPU.

  python -m launch.train --config=configs/digits_edm.py --workdir=workdirs/digits_edm
"""
import ml_collections

from configs import base, toy_edm


def digits_model() -> ml_collections.ConfigDict:
  """A small DDPM++ for 8x8x1: resolutions 8 and 4 (a 3x3 conv at 2x2 is very slow on XLA:CPU)."""
  return ml_collections.ConfigDict(dict(
      arch="songunet", model_channels=32, channel_mult=(1, 2), channel_mult_emb=4,
      num_blocks=1, attn_resolutions=(4,), dropout=0.0, embedding_type="positional",
      channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
      resample_filter=(1, 1), augment_dim=0, label_dropout=0.0,
      remat="none"))          # none | blocks | blocks_save_dots (README "Performance")


def get_config():
  c = base.get_base_config()
  c.method = "edm"
  c.edm = toy_edm.edm_block()
  c.data.dataset = "digits"
  c.diffusion.sigma_data = 0.5
  c.model = digits_model()
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 200
  c.ema.rates = (0.999,)
  c.training.batch_size = 64
  c.training.num_train_steps = 4000
  c.training.log_every = 200
  c.training.checkpoint_every = 1000
  c.training.sample_every = 1000
  c.sampling.num_samples = 64
  # Evaluation here: 2000 samples against the 1497 training digits (FID is strongly biased at
  # this size, KID is not: both are reported); NLL of the 300 test digits.
  c.eval.num_samples = 2000
  c.eval.batch_size = 500
  c.eval.shard_size = 1000
  c.eval.nll_batch_size = 100
  c.eval.kid_subset_size = 1000
  c.lock()
  return c
