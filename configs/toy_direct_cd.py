"""The 2-D Gaussian mixture: Direct CD (regression onto the oracle's whole ODE solve).

  python -m launch.train --config=configs/toy_direct_cd.py --workdir=workdirs/toy_direct_cd
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("direct_cd", cm_common.direct_cd_block(num_points=18), distil=True)
