"""The 8x8 digits: consistency training (no teacher).

  python -m launch.train --config=configs/digits_ct.py --workdir=workdirs/digits_ct
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("ct", cm_common.ct_block(),
                                  distil=False, steps=2000)
