"""The 8x8 digits: Direct CD of a digits_edm run.

  python -m launch.train --config=configs/digits_direct_cd.py --workdir=workdirs/digits_direct_cd \
      --config.teacher.workdir=workdirs/digits_edm
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("direct_cd", cm_common.direct_cd_block(num_points=10),
                                  distil=True, steps=500)
