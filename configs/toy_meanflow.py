"""The 2-D Gaussian mixture: MeanFlow (average velocity by the MeanFlow identity, no teacher).

  python -m launch.train --config=configs/toy_meanflow.py --workdir=workdirs/toy_meanflow
"""
from configs import cm_common


def get_config():
  return cm_common.toy_config("meanflow", cm_common.meanflow_block(), distil=False)
