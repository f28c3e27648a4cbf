"""A line plot of logged metrics as a PNG, drawn with PIL (the venv has no matplotlib)."""

from __future__ import annotations

import numpy as np

HEADLINE = (0, 0, 0)
# The others cycle through Okabe-Ito's colour-blind-safe colours (yellow darkened for white)
# and grey: eight, so a default 8-point t grid never repeats one or the headline's black.
COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (190, 170, 0), (0, 114, 178),
           (213, 94, 0), (204, 121, 167), (128, 128, 128))  # fmt: skip


def plot_series(
  series: dict[str, tuple[list[float], list[float]]],
  title: str,
  size: tuple[int, int] = (640, 400),
) -> np.ndarray:
  """Draws named (x, y) series on shared axes; returns the image as uint8 [H, W, 3].

  The first series is the headline (thick, black); the legend lists every name in its colour, and the
  axes are labelled with their ranges. Non-finite points are skipped.
  """
  from PIL import Image, ImageDraw

  width, height = size
  left, right, top, bottom = 60, 150, 30, 40
  image = Image.new("RGB", size, (255, 255, 255))
  draw = ImageDraw.Draw(image)
  points = [
    (float(x), float(y)) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)
  ]
  x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
  y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

  def to_pixel(x: float, y: float) -> tuple[float, float]:
    px = left + (x - x0) / (x1 - x0) * (width - left - right)
    return px, top + (y1 - y) / (y1 - y0) * (height - top - bottom)

  draw.rectangle((left, top, width - right, height - bottom), outline=(120, 120, 120))
  draw.text((left, 8), title, fill=(0, 0, 0))
  draw.text((4, top), f"{y1:.4g}", fill=(0, 0, 0))
  draw.text((4, height - bottom - 10), f"{y0:.4g}", fill=(0, 0, 0))
  draw.text((left, height - bottom + 6), f"{x0:g}", fill=(0, 0, 0))
  draw.text((width - right - 40, height - bottom + 6), f"{x1:g}", fill=(0, 0, 0))
  draw.text(((width - right) // 2, height - 18), "step", fill=(0, 0, 0))
  # Drawn last to first, so the headline lies on top of the others.
  for i, (name, (xs, ys)) in reversed(list(enumerate(series.items()))):
    colour = HEADLINE if i == 0 else COLOURS[(i - 1) % len(COLOURS)]
    line = [to_pixel(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
    if len(line) > 1:
      draw.line(line, fill=colour, width=3 if i == 0 else 1)
    for px, py in line:
      draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    draw.text((width - right + 8, top + 14 * i), name, fill=colour)
  return np.asarray(image)
