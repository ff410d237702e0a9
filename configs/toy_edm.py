"""EDM on the 2-D Gaussian mixture (ctm_jax.oracle.toy_mixture_2d): a few minutes on a CPU.

  python -m launch.train --config=configs/toy_edm.py --workdir=workdirs/toy_edm
"""
import ml_collections

from configs import base


def augment_block(p: float = 0.0) -> ml_collections.ConfigDict:
  """EDM's non-leaking augmentation (ctm_jax.augment, NVlabs/edm AugmentPipe): p is the
  overall probability (0 = off); the other fields are per-transform multipliers and ranges.
  The multipliers here are EDM's `--augment` set; the network needs model.augment_dim = 9."""
  return ml_collections.ConfigDict(dict(
      p=p, xflip=1e8, yflip=1.0, scale=1.0, rotate_frac=1.0, aniso=1.0, translate_frac=1.0,
      scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5,
      translate_frac_std=0.125))


def edm_block(augment_p: float = 0.0) -> ml_collections.ConfigDict:
  """EDM's DSM training distribution: ln t ~ N(p_mean, p_std^2) (EDM Table 1), and the
  augmentation (off unless augment_p > 0)."""
  return ml_collections.ConfigDict(dict(p_mean=-1.2, p_std=1.2, augment=augment_block(augment_p)))


def get_config():
  c = base.get_base_config()
  c.method = "edm"
  c.edm = edm_block()
  c.data.dataset = "toy_gmm"
  # The mixture's overall std is about 0.74 (oracle.toy_mixture_2d().data_std()).
  c.diffusion.sigma_data = 0.75
  c.model = ml_collections.ConfigDict(dict(
      arch="mlp", hidden=256, num_blocks=4, emb_dim=128, dropout=0.0))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.ema.rates = (0.999,)
  c.training.batch_size = 512
  c.training.num_train_steps = 6000
  c.training.log_every = 200
  c.training.checkpoint_every = 1000
  c.training.sample_every = 2000
  c.sampling.num_samples = 2000
  c.sampling.num_eval_samples = 4096
  # 2-D metrics at 4096 points: the MMD^2 noise (std over seeds 0.0008) is below the
  # differences the results compare (docs/evaluation.md).
  c.eval.num_samples = 4096
  c.eval.batch_size = 1024
  c.eval.shard_size = 4096
  c.eval.nll_num_examples = 2048       # NLL in nats of test points, exact divergence in 2-D
  c.eval.nll_batch_size = 1024
  c.eval.nll_divergence = "exact"
  c.lock()
  return c
