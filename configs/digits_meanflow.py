"""The 8x8 digits: MeanFlow (no teacher).

  python -m launch.train --config=configs/digits_meanflow.py --workdir=workdirs/digits_meanflow
"""
from configs import cm_common


def get_config():
  return cm_common.digits_config("meanflow", cm_common.meanflow_block(), distil=False, steps=2000)
