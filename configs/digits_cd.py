"""The 8x8 digits: consistency distillation of a digits_edm run.

  python -m launch.train --config=configs/digits_cd.py --workdir=workdirs/digits_cd \
      --config.teacher.workdir=workdirs/digits_edm
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("cd", cm_common.cd_block(num_points=10),
                                  distil=True, steps=2000)
