"""sCD on CIFAR-10 (Lu & Song 2024), distilling the EDM DDPM++ teacher through TrigFlow.

  python -m launch.train --config=configs/cifar10_scd.py --workdir=$WORKDIR \
      --config.teacher.path=edm-cifar10-32x32-uncond-vp.pkl

As configs/cifar10_sct.py, with dx_t/dt from the teacher's PF-ODE mapped to TrigFlow
(dx_t/dt = (x - D(x, sigma)) / sin t - sin t x, x = x_t / cos t), tau ~ N(-0.8, 1.6^2), and the
student initialised from the teacher (its network, augment_dim 9 kept, and its time input
c_noise = ln(sigma) / 4, so f = D at step 0).
The teacher may instead be a cifar10_edm run:
  --config.teacher.source=checkpoint --config.teacher.workdir=$EDM_WORKDIR
"""
from configs import cifar10_edm, cifar10_sct, cm_common, ctm_common


def get_config():
  c = cifar10_sct.get_config()
  c.unlock()
  c.method = "scd"
  c.scd = cm_common.scm_block(distil=True, sigma_data=0.5, init_from_teacher=True)
  c.scd.weight_lr = c.sct.weight_lr
  del c["sct"]
  c.teacher = ctm_common.teacher_block(cifar10_edm.get_config(), source="edm_pkl")
  c.model = cifar10_edm.ddpmpp_cifar10(dropout=0.2)   # the teacher's network (augment_dim 9)
  c.lock()
  return c
