"""CTM on CIFAR-10 (Kim et al. 2024; reference Kim-Dongjun/ctm-cifar10), distilling EDM.

Phase 1, CTM + DSM (from the EDM teacher):
  python -m launch.train --config=configs/cifar10_ctm.py --workdir=$W1 \
      --config.teacher.npz_path=edm-cifar10-32x32-uncond-vp.npz \
      --config.ctm.lpips_weights=lpips_vgg.npz
Phase 2, + GAN (a new run started from phase 1's checkpoint, as the reference resumes):
  python -m launch.train --config=configs/cifar10_ctm.py:gan --workdir=$W2 \
      --config.init_from=$W1 --config.teacher.npz_path=... --config.ctm.lpips_weights=... \
      --config.gan.feature_weights=lpips_vgg.npz
`:cond` / `:cond_gan` give the class-conditional runs (teacher edm-cifar10-32x32-cond-vp).
The teacher may instead be a run of configs/cifar10_edm.py:
  --config.teacher.source=checkpoint --config.teacher.workdir=$EDM_WORKDIR
"""
from configs import cifar10_edm, ctm_common


def get_config(arg: str = ""):
  if arg not in ("", "cond", "gan", "cond_gan"):
    raise ValueError(f"configs/cifar10_ctm.py takes '', 'cond', 'gan' or 'cond_gan', got {arg!r}")
  cond = arg.startswith("cond")
  gan = arg.endswith("gan")
  c = ctm_common.student_of(cifar10_edm, num_points=18, teacher_source="torch_npz",
                            arg="cond" if cond else "")      # N = 18, K = 17, LPIPS
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.13)     # the student: DDPM++ + s path
  c.ctm.target_ema = 0.9999 if (gan and not cond) else 0.999
  c.optim.lr = 4e-4
  c.optim.grad_clip = 0.0
  c.ema.rates = (0.999, 0.9999)
  c.ema.halflife_kimg = 0.0
  c.sampling.eval_ema = "rate_0p999"
  c.training.batch_size = 256            # cond CTM+DSM command: --global_batch_size=256
  c.training.num_train_steps = 600_000   # total_training_steps (runs were stopped earlier)
  c.training.checkpoint_every = 2_000
  c.training.keep_every = 10_000
  c.training.sample_every = 2_000
  c.ctm.sample_nfes = (1, 2)
  # Kim-Dongjun/ctm-cifar10 cm/image_datasets.py: load_data(random_flip=True) (line 23, flip at
  # line 181); cm_train.py does not override it.
  c.data.random_flip = True
  # The reference's lambdas come from each GPU's --microbatch (train_util.py forward_backward):
  # 16 in commands/cond_CTM+DSM_command.sh; no uncond CTM+DSM command is released, the same 16 is
  # used (same network and hardware; the script default would be 64).  GAN commands: 11.
  c.ctm.adaptive_group_size = 16
  if gan:
    c.gan.enabled = True
    c.gan.discriminator = "projected"
    c.gan.g_every = 2
    c.training.batch_size = 528          # --global_batch_size=528 (uncond GAN command)
    c.ctm.adaptive_group_size = 11       # --microbatch=11 (both GAN commands)
  c.lock()
  return c
