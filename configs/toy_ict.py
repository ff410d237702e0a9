"""The 2-D Gaussian mixture: improved consistency training (no teacher, no EMA target).

  python -m launch.train --config=configs/toy_ict.py --workdir=workdirs/toy_ict
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("ict", cm_common.ict_block(), distil=False)
