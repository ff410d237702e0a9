"""The 8x8 digits: improved consistency training (no teacher).

  python -m launch.train --config=configs/digits_ict.py --workdir=workdirs/digits_ict
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("ict", cm_common.ict_block(),
                                  distil=False, steps=2000)
