"""The 2-D Gaussian mixture: consistency distillation (one oracle Heun step per pair).

  python -m launch.train --config=configs/toy_cd.py --workdir=workdirs/toy_cd
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("cd", cm_common.cd_block(num_points=18), distil=True)
