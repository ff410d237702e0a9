"""The 2-D Gaussian mixture: MeanFlow (average velocity by the MeanFlow identity, no teacher).

  python -m launch.train --config=configs/toy_meanflow.py --workdir=workdirs/toy_meanflow

Deviation from the CIFAR-10 script: r is drawn from the same logit-normal as t (-0.6, 1.6), as
the MeanFlow paper's ImageNet setting draws both from one distribution, instead of
logit-normal(-4.0, 1.6), which puts almost no pairs at an intermediate r.  At the comparison's
1500 steps that lowered E from 13.8e-3 to 10.3e-3 (mean of seeds 0 and 1; docs/flow_maps.md).
"""
from configs import cm_common


def get_config():
  c = cm_common.toy_config("meanflow", cm_common.meanflow_block(), distil=False)
  c.meanflow.p_mean_r = c.meanflow.p_mean_t
  return c
