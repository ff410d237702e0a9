"""CTM on ImageNet 64x64, class-conditional (Kim et al. 2024; reference sony/ctm).

  python -m launch.train --config=configs/imagenet64_ctm.py --workdir=$W1 \
      --config.teacher.path=edm_imagenet64_ema.pt --config.ctm.lpips_weights=lpips_vgg.npz
  python -m launch.train --config=configs/imagenet64_ctm.py:gan --workdir=$W2 --config.init_from=$W1 ...

The teacher is openai's EDM ImageNet-64 ADM (consistency_models' edm_imagenet64_ema.pt, a torch.save
state dict read without torch: teacher.source = 'torch_pt'), which takes c_noise = 250 ln(t); the
student uses the same.
"""
from configs import ctm_common, imagenet64_edm


def get_config(arg: str = ""):
  if arg not in ("", "gan"):
    raise ValueError(f"configs/imagenet64_ctm.py takes '' or 'gan', got {arg!r}")
  c = ctm_common.student_of(imagenet64_edm, num_points=40,          # N = 40, K = 39
                            teacher_source="torch_pt")
  c.teacher.label_order = "standard"     # the official weights' class order
  c.teacher.config.diffusion.c_noise = "250log"
  c.teacher.config.model.dropout = 0.1   # teacher_dropout (evaluated without dropout)
  c.diffusion.c_noise = "250log"
  c.model = imagenet64_edm.adm_imagenet64(dropout=0.0)
  # 64-device dry run (docs/performance.md): at 18 examples per device the step needs 57 GiB
  # per device on a 16 x 4 mesh without remat, 13.4 GiB with block remat and FSDP over 4.
  c.model.remat = "blocks"
  c.mesh.fsdp = 4                        # must divide the device count (1 on fewer devices)
  c.ctm.target_ema = 0.999
  c.optim.lr = 4e-4
  c.ema.rates = (0.999, 0.9999, 0.9999432189950708)
  c.ema.halflife_kimg = 0.0
  c.sampling.eval_ema = "rate_0p999"
  c.sampling.heun_steps = 40
  c.training.batch_size = 1440
  c.training.num_train_steps = 600_000
  c.training.compute_dtype = "bfloat16"
  c.training.checkpoint_every = 1_000
  c.training.keep_every = 10_000
  c.training.sample_every = 1_000
  # sony/ctm code/cm/image_datasets.py: load_data(random_flip=True) (line 23, flip at line 181).
  c.data.random_flip = True
  # Per-GPU --microbatch of commands/CTM+DSM_command.sh (18) and CTM+DSM+GAN_command.sh (11):
  # the reference's lambdas come from each of these microbatches.
  c.ctm.adaptive_group_size = 18
  if arg == "gan":
    c.gan.enabled = True
    c.gan.discriminator = "projected"
    c.ctm.max_k = 20                     # --num_heun_step 20 in the fine-tuning runs (10 -> 20)
    c.optim.lr = 8e-6
    c.training.batch_size = 2112
    c.ctm.adaptive_group_size = 11
  c.lock()
  return c
