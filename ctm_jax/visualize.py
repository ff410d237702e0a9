"""Pictures of samples: image grids and 2-D point densities, as uint8 arrays and PNG files."""
from __future__ import annotations

import io
import math

import numpy as np

from ctm_jax import fileio


def image_grid(images: np.ndarray, cols: int = 0, pad: int = 1) -> np.ndarray:
  """uint8 (N, H, W, C) -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) grid."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"image_grid needs uint8 (N, H, W, C), got {images.dtype} {images.shape}")
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
  return grid


def points_image(points: np.ndarray, lim: float = 2.0, size: int = 200) -> np.ndarray:
  """2-D points -> a uint8 (size, size, 1) picture on [-lim, lim]^2, darker where denser, y up."""
  p = np.asarray(points, np.float64)[:, :2]
  hist, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
  ink = np.sqrt(np.minimum(hist[::-1] / 4.0, 1.0))
  return (255 * (1.0 - ink)).astype(np.uint8)[..., None]


def samples_picture(x: np.ndarray, kind: str) -> np.ndarray:
  """Samples in [-1, 1] (images, NHWC) or raw points -> one uint8 picture (H, W, C)."""
  if kind == "image":
    u8 = (np.clip(np.asarray(x, np.float32), -1, 1) + 1) * 127.5
    return image_grid(u8.astype(np.uint8))
  return points_image(x)


def save_png(path: str, picture: np.ndarray, scale: int = 1):
  """Write a uint8 (H, W, 1|3) picture as PNG, optionally enlarged by pixel repetition."""
  from PIL import Image
  pic = np.asarray(picture)
  if scale > 1:
    pic = pic.repeat(scale, 0).repeat(scale, 1)
  if pic.shape[-1] == 1:
    pic = pic[..., 0]
  buf = io.BytesIO()
  Image.fromarray(pic).save(buf, format="png")
  fileio.write_bytes(path, buf.getvalue())
