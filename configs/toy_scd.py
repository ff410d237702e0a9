"""The 2-D Gaussian mixture: sCD (continuous-time consistency distillation of the exact oracle).

  python -m launch.train --config=configs/toy_scd.py --workdir=workdirs/toy_scd

Deviation from the paper: the learned adaptive weighting w_phi is off.  With the exact
teacher's tangent, ||F - F^- + g||^2 is small where the chain is already consistent and large
between sigma 0.05 and 0.3, so w_phi = -log E[...] moves the weight away from where the errors
are; at the comparison's 1500 steps it cost 5-7x in E (docs/flow_maps.md).
"""
from configs import cm_common


def get_config():
  c = cm_common.toy_config("scd", cm_common.scm_block(distil=True), distil=True)
  c.scd.adaptive_weighting = False
  return c
