"""The 2-D Gaussian mixture: trajectory consistency distillation (oracle teacher, SSS sampling).

  python -m launch.train --config=configs/toy_tcd.py --workdir=workdirs/toy_tcd
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("tcd", cm_common.tcd_block(num_points=18), distil=True)
