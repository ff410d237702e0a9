"""EDM on the 2-D Gaussian mixture (ctm_jax.oracle.toy_mixture_2d): a few minutes on a CPU.

  python -m launch.train --config=configs/toy_edm.py --workdir=workdirs/toy_edm
"""
import ml_collections

from configs import base


def edm_block() -> ml_collections.ConfigDict:
  """EDM's DSM training distribution: ln t ~ N(p_mean, p_std^2) (EDM Table 1)."""
  return ml_collections.ConfigDict(dict(p_mean=-1.2, p_std=1.2))


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
  c.lock()
  return c
