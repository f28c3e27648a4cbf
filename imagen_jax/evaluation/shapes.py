"""The `shapes` metric: read attributes back from images and score them against their prompts.

`detect(image)` recovers background, colour, shape, size and position of one image drawn from
the `imagen_jax.data.shapes` grammar:
  background  the median colour of a thin border ring (no shape reaches the border), snapped to
              the nearest background colour;
  colour      the median of the pixels farthest from the background, snapped to the nearest
              palette colour;
  coverage    each pixel's fraction of shape colour: its projection on background -> colour;
  shape       the grammar's three shapes are rendered at the centre and extent implied by the
              coverage's mass and centroid; the one closest to the coverage (L2) wins;
  size        the fitted extent, split half-way between the small and large ranges;
  position    the fitted centre, snapped to the nearest of the five nominal positions.

`imagen-jax eval shapes --images=DIR` reads DIR/index.json (written by `imagen-jax sample`),
parses each prompt with the grammar and prints accuracy per attribute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from imagen_jax import images
from imagen_jax.data import shapes

ATTRIBUTES = ("background", "colour", "shape", "size", "position")
# Area of each shape relative to extent², and how far its centroid lies below its box centre
# (in extents): the triangle's centroid is 2/3 of the way down from its apex.
_AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 6.0}
# Extents: small 0.25..0.31, large 0.50..0.60 of the width; split half-way.
_SIZE_THRESHOLD = 0.5 * (
  shapes.SIZES["small"][0]
  + shapes.SIZES["small"][1]
  + shapes.SIZES["large"][0]
  - shapes.SIZES["large"][1]
)

_LARGE_RE = re.compile(r"^a large (\w+) (\w+) on a (\w+) background$")
_SMALL_RE = re.compile(r"^a small (\w+) (\w+) in the ([\w ]+?) on a (\w+) background$")


def parse_caption(caption: str) -> dict[str, str]:
  """The attributes a shapes-grammar caption asks for.

  Args:
    caption: e.g. "a small red circle in the top left on a white background".

  Returns:
    {background, colour, shape, size, position}; large shapes are at "center".

  Raises:
    ValueError: the caption is not from the shapes grammar.
  """
  text = " ".join(caption.strip().lower().split())
  m = _LARGE_RE.match(text)
  if m:
    colour, shape, background = m.groups()
    out = dict(background=background, colour=colour, shape=shape, size="large", position="center")
  else:
    m = _SMALL_RE.match(text)
    if not m:
      raise ValueError(f"caption {caption!r} is not from the shapes grammar")
    colour, shape, position, background = m.groups()
    out = dict(background=background, colour=colour, shape=shape, size="small", position=position)
  shapes.ShapeSpec(**out).validate()  # unknown words -> ValueError naming the field
  return out


@dataclasses.dataclass(frozen=True)
class Detection:
  """What `detect` read from one image; cx, cy, extent are fractions of the width."""

  background: str
  colour: str
  shape: str
  size: str
  position: str
  cx: float
  cy: float
  extent: float

  def attributes(self) -> dict[str, str]:
    return {k: getattr(self, k) for k in ATTRIBUTES}


def _nearest(value: np.ndarray, table: dict[str, tuple]) -> str:
  names = list(table)
  dist = [float(np.sum((np.asarray(table[n], np.float64) - value) ** 2)) for n in names]
  return names[int(np.argmin(dist))]


def detect(image: np.ndarray) -> Detection:
  """Reads the grammar attributes back from one image.

  Args:
    image: uint8 [H, W, 3] (square, H >= 8), e.g. a rendered or generated shapes image.

  Returns:
    The Detection.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"image must be a square [H, W, 3] array, got shape {image.shape}")
  if image.shape[0] < 8:
    raise ValueError(f"image must be at least 8 pixels wide, got {image.shape[0]}")
  res = image.shape[0]
  pixels = image.astype(np.float64)
  ring = max(1, res // 32)
  border = np.concatenate(
    [
      pixels[:ring].reshape(-1, 3),
      pixels[-ring:].reshape(-1, 3),
      pixels[:, :ring].reshape(-1, 3),
      pixels[:, -ring:].reshape(-1, 3),
    ]
  )
  background = _nearest(np.median(border, axis=0), shapes.BACKGROUNDS)
  bg = np.asarray(shapes.BACKGROUNDS[background], np.float64)

  # The shape's colour: pixels far from the background (the most distant half of them).
  dist = np.linalg.norm(pixels - bg, axis=-1)
  far = dist >= 0.5 * dist.max()
  colour = _nearest(np.median(pixels[far], axis=0), shapes.COLOURS)
  direction = np.asarray(shapes.COLOURS[colour], np.float64) - bg
  # A colour equal to the background has no direction; guard the division.
  cover = np.clip((pixels - bg) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)
  # Generated images carry faint noise everywhere: ignore coverage below 1/4.
  cover = np.where(cover >= 0.25, cover, 0.0)
  mass = float(cover.sum())
  coords = (np.arange(res, dtype=np.float64) + 0.5) / res
  if mass <= 0:
    return Detection(background, colour, "circle", "small", "center", 0.5, 0.5, 0.0)
  my = float((cover.sum(axis=1) * coords).sum() / mass)
  mx = float((cover.sum(axis=0) * coords).sum() / mass)
  area = mass / res**2

  best, best_err, best_fit = "circle", np.inf, (mx, my, 0.0)
  for shape in shapes.SHAPES:
    extent = float(np.sqrt(area / _AREA_FACTOR[shape]))
    cy = my - _CENTROID_DROP[shape] * extent
    spec = shapes.ShapeSpec(background, colour, shape, "small", "center", mx, cy, extent)
    err = float(np.sum((shapes.shape_mask(spec, res, supersample=2) - cover) ** 2))
    if err < best_err:
      best, best_err, best_fit = shape, err, (mx, cy, extent)
  cx, cy, extent = best_fit
  size = "large" if extent >= _SIZE_THRESHOLD else "small"
  position = min(
    shapes.POSITIONS,
    key=lambda p: (shapes.POSITIONS[p][0] - cx) ** 2 + (shapes.POSITIONS[p][1] - cy) ** 2,
  )
  return Detection(background, colour, best, size, position, cx, cy, extent)


def score(
  images: Iterable[np.ndarray], captions: Sequence[str]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Per-attribute accuracy of images against the captions they were made from.

  Args:
    images: uint8 [H, W, 3] images, one per caption.
    captions: shapes-grammar captions.

  Returns:
    ({attribute: accuracy in [0, 1], 'all': fraction with every attribute right}, per-image
    records {caption, expected, detected, correct}).
  """
  expected = [parse_caption(c) for c in captions]  # bad captions fail before any detection
  records = []
  for image, caption, want in zip(images, captions, expected, strict=True):
    got = detect(image).attributes()
    correct = {k: got[k] == want[k] for k in ATTRIBUTES}
    records.append(dict(caption=caption, expected=want, detected=got, correct=correct))
  if not records:
    raise ValueError("no images to score")
  acc = {k: float(np.mean([r["correct"][k] for r in records])) for k in ATTRIBUTES}
  acc["all"] = float(np.mean([all(r["correct"].values()) for r in records]))
  return acc, records


def format_table(accuracy: dict[str, float], n: int, bars: dict[str, float] | None = None) -> str:
  """A plain-text table of accuracies (and pass/fail against optional bars)."""
  lines = [f"shapes metric on {n} images", f"{'attribute':<12}{'accuracy':>10}"]
  if bars:
    lines[-1] += f"{'bar':>8}  status"
  for k in (*ATTRIBUTES, "all"):
    line = f"{k:<12}{100 * accuracy[k]:>9.1f}%"
    if bars and k in bars:
      ok = accuracy[k] >= bars[k]
      line += f"{100 * bars[k]:>7.0f}%  {'ok' if ok else 'MISSED by %.1f pts' % (100 * (bars[k] - accuracy[k]))}"
    lines.append(line)
  return "\n".join(lines)


# The quality bar for the demo.
QUALITY_BAR = {"background": 0.95, "colour": 0.90, "shape": 0.75, "size": 0.80, "position": 0.70}


def evaluate_dir(images_dir: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Scores the images listed in DIR/index.json against their prompts."""
  pairs = images.indexed_prompts(images_dir)
  prompts = [p for _, p in pairs]
  for p in prompts:
    parse_caption(p)
  return score((images.load_png(path) for path, _ in pairs), prompts)


# ----------------------------------------------------------------------------------------------
# `imagen-jax eval`
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of `imagen-jax eval` when this module is the subcommand: `benchmark` + `add_flags`."""
  parser.add_argument(
    "benchmark", choices=("shapes",), help="what to evaluate: 'shapes' (the synthetic grammar)"
  )
  add_flags(parser)


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Flags of `imagen-jax eval shapes` (`imagen_jax.cli.eval` mounts them as a benchmark)."""
  parser.add_argument(
    "--images", required=True, help="directory with index.json and PNGs (from imagen-jax sample)"
  )
  parser.add_argument(
    "--json_out", default=None, help="also write accuracies and per-image records to this file"
  )
  parser.add_argument(
    "--bars", action="store_true", help="show the demo's quality bar next to each accuracy"
  )


def run(args: argparse.Namespace) -> int:
  """Runs `imagen-jax eval shapes`; prints the accuracy table."""
  accuracy, records = evaluate_dir(args.images)
  print(format_table(accuracy, len(records), QUALITY_BAR if args.bars else None))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"accuracy": accuracy, "records": records}, f, indent=1)
  return 0
