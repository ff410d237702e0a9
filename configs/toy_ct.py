"""The 2-D Gaussian mixture: consistency training (no teacher; N(k), mu(k) curriculum).

  python -m launch.train --config=configs/toy_ct.py --workdir=workdirs/toy_ct
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("ct", cm_common.ct_block(), distil=False)
