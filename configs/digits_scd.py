"""The 8x8 digits: sCD of a digits_edm run (the student starts from the teacher's weights).

  python -m launch.train --config=configs/digits_scd.py --workdir=workdirs/digits_scd \
      --config.teacher.workdir=workdirs/digits_edm
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("scd", cm_common.scm_block(distil=True, init_from_teacher=True), distil=True,
                                  steps=2000)
