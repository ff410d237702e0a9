"""Consistency distillation on CIFAR-10 (Song et al. 2023; openai/consistency_models_cifar10
configs/cifar10_ve_cd.py), distilling the EDM DDPM++ teacher.

  python -m launch.train --config=configs/cifar10_cd.py --workdir=$WORKDIR \
      --config.teacher.path=edm-cifar10-32x32-uncond-vp.pkl \
      --config.cd.lpips_weights=lpips_vgg.npz

(NVlabs/edm's network pickle, read without torch and without running its code; an .npz export
is taken with --config.teacher.source=torch_npz --config.teacher.npz_path=...)

The official settings: N = 18, one Heun step of the teacher per pair (a full Heun step into
sigma_min), LPIPS on 224-pixel bilinear upsamples, uniform lambda, no target network (the
'consistency' loss of the official code evaluates theta^- = sg(theta), i.e. mu = 0), student
initialised from the teacher, RAdam lr 4e-4 (the JAX code's RAdam path chains scale_by_radam and
scale(-lr): its config's 10M-image warm-up is never applied), no gradient clipping, batch 512,
800k iterations, evaluation EMA 0.9999, dropout 0, random x-flips; LPIPS with VGG16's max
pooling (the JAX code's flaxmodels VGG16; CTM's piq LPIPS averages).
Deviation: the official teacher and student are their own NCSN++ (VE) network; here both are
EDM's DDPM++ (the project's CIFAR-10 teacher, configs/cifar10_edm.py), so the student can start
from it.  The teacher may instead be a cifar10_edm run:
  --config.teacher.source=checkpoint --config.teacher.workdir=$EDM_WORKDIR
"""
from configs import cifar10_edm, cm_common, ctm_common
from ctm_jax.diffusion import karras_curve


def get_config():
  teacher = cifar10_edm.get_config()
  c = cm_common.family_config(cifar10_edm.get_config(), "cd", cm_common.cd_block(num_points=18),
                              ctm_common.teacher_block(teacher, source="edm_pkl"))
  c.cd.distance = "lpips"
  c.cd.lpips_pooling = "max"             # jcm/models/lpips.py: flaxmodels VGG16 (max pools)
  c.cd.target_ema = 0.0
  # Two-step sampling through the openai notebook's (editing_multistep_sampling.ipynb) grid
  # indices 0, 11, 17 of the 18-point Karras grid: tau = t_11 = 0.5853.
  c.cd.sample_times = (float(karras_curve(11 / 17)),)
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.0)   # the teacher's network (augment_dim 9 kept)
  cm_common.cifar10_schedule(c, lr=4e-4, ema_rate=0.9999, batch_size=512, num_train_steps=800_000)
  c.lock()
  return c
