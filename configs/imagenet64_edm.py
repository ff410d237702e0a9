"""EDM on ImageNet 64x64, class-conditional ADM (NVlabs/edm `--cond=1 --arch=adm --duration=2500
--batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 --fp16=1`).

  python -m launch.train --config=configs/imagenet64_edm.py --workdir=$WORKDIR

fp16 with loss scaling becomes bf16 compute with float32 parameters.  Data: imagenet64_adm,
ADM's / EDM's 64x64 centre crop of TFDS imagenet2012 (ctm_jax.data.builders.build_imagenet64_adm;
docs/data.md); --config.data.dataset=imagenet64 reads TFDS imagenet_resized/64x64 instead (box
resize of whole images: aspect ratios distorted, so FID against ADM's reference batch is worse).
"""
import ml_collections

from configs import base, toy_edm


def adm_imagenet64(dropout: float = 0.10) -> ml_collections.ConfigDict:
  """ADM U-Net: 192 channels, mult 1,2,3,4, 3 blocks, attention at 32/16/8, 64 channels/head."""
  return ml_collections.ConfigDict(dict(
      arch="adm", model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
      num_blocks=3, attn_resolutions=(32, 16, 8), channels_per_head=64, dropout=dropout,
      augment_dim=0, label_dropout=0.0,
      remat="none"))          # none | blocks | blocks_save_dots (README "Performance")


def get_config():
  c = base.get_base_config()
  c.method = "edm"
  c.edm = toy_edm.edm_block()
  c.data.dataset = "imagenet64_adm"
  c.data.class_conditional = True
  c.data.random_flip = False             # NVlabs/edm: --xflip False (default) and --augment=0
  c.diffusion.c_noise = "log4"           # EDMPrecond feeds ln(sigma)/4 to every architecture
  c.model = adm_imagenet64()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 2_441           # 10 Mimg at batch 4096
  c.ema.rates = (0.9999,)
  c.ema.halflife_kimg = 50_000.0         # --ema 50 (Mimg)
  c.sampling.eval_ema = "halflife"
  c.training.batch_size = 4096
  c.training.num_train_steps = 610_352   # 2500 Mimg
  c.training.compute_dtype = "bfloat16"
  # 64-device dry run (docs/performance.md): 64 examples per device need 71 GiB per device on
  # a 16 x 4 mesh without remat, 18.4 GiB with block remat and FSDP over 4 (fits 32 GiB).
  c.model.remat = "blocks"
  c.mesh.fsdp = 4                        # must divide the device count (1 on fewer devices)
  c.training.log_every = 100
  c.training.checkpoint_every = 2_000
  c.training.keep_every = 50_000
  c.training.sample_every = 10_000
  c.sampling.heun_steps = 40
  c.eval.num_samples = 50_000            # the papers' FID sample count
  c.eval.batch_size = 512
  c.eval.shard_size = 5_120
  c.eval.nll_batch_size = 512
  c.lock()
  return c
