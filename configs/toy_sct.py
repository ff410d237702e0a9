"""The 2-D Gaussian mixture: sCT (continuous-time consistency training in TrigFlow).

  python -m launch.train --config=configs/toy_sct.py --workdir=workdirs/toy_sct
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("sct", cm_common.scm_block(distil=False), distil=False)
