"""The 2-D Gaussian mixture: sCD (continuous-time consistency distillation of the exact oracle).

  python -m launch.train --config=configs/toy_scd.py --workdir=workdirs/toy_scd
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("scd", cm_common.scm_block(distil=True), distil=True)
