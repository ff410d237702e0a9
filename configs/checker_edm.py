"""EDM on the 2-D checkerboard (uniform on the 8 dark cells of a 4x4 board over [-1, 1]^2).

  python -m launch.train --config=configs/checker_edm.py --workdir=workdirs/checker_edm
"""
from configs import toy_edm


def get_config():
  c = toy_edm.get_config()
  c.data.dataset = "checkerboard"
  c.diffusion.sigma_data = 0.58     # std of U[-1, 1] per coordinate: 1/sqrt(3)
  return c
