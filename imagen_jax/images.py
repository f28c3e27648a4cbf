"""Image helpers: [−1, 1] floats ↔ uint8, grids and PNG files."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[−1, 1] floats → uint8 [0, 255] (rounded, clipped)."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a square HWC image (shows low-res inputs as blocks)."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one image with `pad` white pixels between tiles."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y : y + h, x : x + w] = image
  return grid


def save_png(image: np.ndarray, path: str) -> str:
  """Writes a uint8 HWC image as PNG (local or gs:// via tf.io.gfile)."""
  directory = os.path.dirname(path)
  if path.startswith("gs://"):
    import io

    import tensorflow as tf

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue())
    return path
  if directory:
    os.makedirs(directory, exist_ok=True)
  Image.fromarray(np.asarray(image)).save(path)
  return path
