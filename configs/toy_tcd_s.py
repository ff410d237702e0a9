"""The 2-D Gaussian mixture: TCD with CTM's s-input network (tcd.s_input = True), the variant
beside TCD's own network (configs/toy_tcd.py) in the comparison.

  python -m launch.train --config=configs/toy_tcd_s.py --workdir=workdirs/toy_tcd_s
"""
from configs import cm_common


def get_config():
  block = cm_common.tcd_block(num_points=18)
  block.s_input = True
  return cm_common.toy_config("tcd", block, distil=True)
