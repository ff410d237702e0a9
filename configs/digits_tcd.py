"""The 8x8 digits: trajectory consistency distillation of a digits_edm run.

  python -m launch.train --config=configs/digits_tcd.py --workdir=workdirs/digits_tcd \
      --config.teacher.workdir=workdirs/digits_edm
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("tcd", cm_common.tcd_block(num_points=10),
                                  distil=True, steps=1500)
