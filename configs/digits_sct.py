"""The 8x8 digits: sCT (no teacher).

  python -m launch.train --config=configs/digits_sct.py --workdir=workdirs/digits_sct
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("sct", cm_common.scm_block(distil=False), distil=False,
                                  steps=2000)
