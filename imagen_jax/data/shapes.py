"""Synthetic captioned shapes: the grammar, an anti-aliased renderer and a TFDS builder.

Every image holds one shape on a plain background, and its caption says exactly what is drawn:
  large: "a large {colour} {shape} on a {background} background"
  small: "a small {colour} {shape} in the {position} on a {background} background"
The constants below are the contract with evaluation code (a detector reads colours and positions
back from generated images), so they are fixed; change them only with the evaluation code.

Geometry, in fractions of the image width (origin top-left, y down):
  circle   diameter = extent, centred on (cx, cy)
  square   side = extent, axis-aligned, centred on (cx, cy)
  triangle upright isosceles, base = height = extent, base at the bottom, bounding box centred on
           (cx, cy)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
  "white": (255, 255, 255),
  "black": (0, 0, 0),
  "gray": (128, 128, 128),
}
COLOURS: dict[str, tuple[int, int, int]] = {
  "red": (220, 30, 30),
  "green": (30, 170, 60),
  "blue": (30, 70, 220),
  "yellow": (240, 200, 20),
  "purple": (140, 50, 180),
  "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Nominal centre (cx, cy) of a small shape, in fractions of the width.
POSITIONS: dict[str, tuple[float, float]] = {
  "center": (0.50, 0.50),
  "top left": (0.25, 0.25),
  "top right": (0.75, 0.25),
  "bottom left": (0.25, 0.75),
  "bottom right": (0.75, 0.75),
}
# size -> (nominal extent, half-width of its uniform jitter), fractions of the width.
SIZES: dict[str, tuple[float, float]] = {"large": (0.55, 0.05), "small": (0.28, 0.03)}
# Half-width of the uniform jitter of the centre, fraction of the width (both sizes).
CENTRE_JITTER = 0.04
# Shapes are drawn at this many times the resolution, then box-downsampled (anti-aliasing).
SUPERSAMPLE = 4
SPLITS: tuple[str, ...] = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """What one image shows. `cx`, `cy`, `extent` are fractions of the width; None = nominal."""

  background: str
  colour: str
  shape: str
  size: str
  position: str  # always "center" for large shapes
  cx: float | None = None
  cy: float | None = None
  extent: float | None = None

  def validate(self) -> None:
    """Raises ValueError if a field is outside the grammar."""
    for field, value, allowed in (
      ("background", self.background, BACKGROUNDS),
      ("colour", self.colour, COLOURS),
      ("shape", self.shape, SHAPES),
      ("size", self.size, SIZES),
      ("position", self.position, POSITIONS),
    ):
      if value not in allowed:
        raise ValueError(f"ShapeSpec.{field}={value!r}; must be one of {sorted(allowed)}")
    if self.size == "large" and self.position != "center":
      raise ValueError(f"a large shape is always centred; got position={self.position!r}")


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
  """Draws a random spec (all fields, jitter included) from the grammar.

  Args:
    rng: numpy generator; the same generator state gives the same spec.

  Returns:
    A fully resolved ShapeSpec.
  """
  background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
  colour = list(COLOURS)[rng.integers(len(COLOURS))]
  shape = SHAPES[rng.integers(len(SHAPES))]
  size = "large" if rng.integers(2) == 0 else "small"
  position = "center" if size == "large" else list(POSITIONS)[rng.integers(len(POSITIONS))]
  return resolve_spec(ShapeSpec(background, colour, shape, size, position), rng)


def resolve_spec(spec: ShapeSpec, rng: np.random.Generator | None = None) -> ShapeSpec:
  """Fills unset geometry: jittered from `rng`, or the nominal values when `rng` is None."""
  spec.validate()
  nominal_extent, extent_jitter = SIZES[spec.size]
  px, py = POSITIONS[spec.position]

  def jitter(value: float | None, nominal: float, half_width: float) -> float:
    if value is not None:
      return float(value)
    if rng is None:
      return nominal
    return float(nominal + rng.uniform(-half_width, half_width))

  return dataclasses.replace(
    spec,
    extent=jitter(spec.extent, nominal_extent, extent_jitter),
    cx=jitter(spec.cx, px, CENTRE_JITTER),
    cy=jitter(spec.cy, py, CENTRE_JITTER),
  )


def caption(spec: ShapeSpec) -> str:
  """The exact caption of `spec` (see the module docstring)."""
  spec.validate()
  if spec.size == "large":
    return f"a large {spec.colour} {spec.shape} on a {spec.background} background"
  return (
    f"a small {spec.colour} {spec.shape} in the {spec.position} on a {spec.background} background"
  )


def shape_mask(spec: ShapeSpec, resolution: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
  """Coverage of the shape per pixel, float32 [resolution, resolution] in [0, 1]."""
  spec = resolve_spec(spec)
  n = resolution * supersample
  # Sub-pixel centres in fractions of the width.
  coords = (np.arange(n, dtype=np.float64) + 0.5) / n
  y, x = coords[:, None], coords[None, :]
  half = spec.extent / 2
  if spec.shape == "circle":
    inside = (x - spec.cx) ** 2 + (y - spec.cy) ** 2 <= half**2
  elif spec.shape == "square":
    inside = (np.abs(x - spec.cx) <= half) & (np.abs(y - spec.cy) <= half)
  else:  # triangle: apex at the top centre, base at the bottom of the bounding box
    top, bottom = spec.cy - half, spec.cy + half
    rel = (y - top) / spec.extent  # 0 at the apex, 1 at the base
    inside = (y >= top) & (y <= bottom) & (np.abs(x - spec.cx) <= rel * half)
  inside = np.broadcast_to(inside, (n, n)).astype(np.float32)
  return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def render(
  spec: ShapeSpec, resolution: int = 64, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Draws `spec` anti-aliased.

  Args:
    spec: what to draw; unset geometry (cx, cy, extent = None) is jittered from `rng`, or
      nominal if `rng` is None.
    resolution: output height = width in pixels.
    rng: optional generator for unset geometry.

  Returns:
    uint8 [resolution, resolution, 3].
  """
  if resolution < 8:
    raise ValueError(f"resolution={resolution}; must be >= 8 pixels")
  spec = resolve_spec(spec, rng)
  cover = shape_mask(spec, resolution)[..., None]
  background = np.asarray(BACKGROUNDS[spec.background], np.float32)
  colour = np.asarray(COLOURS[spec.colour], np.float32)
  image = background * (1.0 - cover) + colour * cover
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def example_spec(seed: int, split: str, index: int) -> ShapeSpec:
  """The spec of example `index` of `split`: a pure function of (seed, split, index)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; must be one of {SPLITS}")
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  return sample_spec(rng)


def generate_examples(
  split: str, num_examples: int, resolution: int, seed: int
) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for the TFDS builder; keys are stable: '{split}_{index:08d}'."""
  for index in range(num_examples):
    spec = example_spec(seed, split, index)
    key = f"{split}_{index:08d}"
    yield (
      key,
      {
        "image": render(spec, resolution),
        "caption": caption(spec),
        "key": key,
        "background": spec.background,
        "colour": spec.colour,
        "shape": spec.shape,
        "size": spec.size,
        "position": spec.position,
        "cx": np.float32(spec.cx),
        "cy": np.float32(spec.cy),
        "extent": np.float32(spec.extent),
      },
    )


# --------------------------------------------------------------------------------------------
# TFDS builder. TF / TFDS are imported lazily so the grammar is importable without them.
# --------------------------------------------------------------------------------------------


def _make_builder_classes():
  import tensorflow_datasets as tfds

  @dataclasses.dataclass
  class ShapesConfig(tfds.core.BuilderConfig):
    """Resolution, examples per split and seed of a generated shapes dataset."""

    resolution: int = 64
    num_train: int = 10_000
    num_validation: int = 1_000
    seed: int = 0

  class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic captioned shapes (no download): one coloured shape on a plain background."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
      ShapesConfig(name="r64", description="64x64, 10k/1k examples, seed 0"),
      ShapesConfig(name="r256", resolution=256, description="256x256, 10k/1k examples, seed 0"),
    ]
    DEFAULT_CONFIG_NAME = "r64"

    def _info(self) -> tfds.core.DatasetInfo:
      r = self.builder_config.resolution
      return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),
            "background": tfds.features.Text(),
            "colour": tfds.features.Text(),
            "shape": tfds.features.Text(),
            "size": tfds.features.Text(),
            "position": tfds.features.Text(),
            "cx": tfds.features.Scalar(np.float32),
            "cy": tfds.features.Scalar(np.float32),
            "extent": tfds.features.Scalar(np.float32),
          }
        ),
        supervised_keys=None,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      c = self.builder_config
      sizes = {"train": c.num_train, "validation": c.num_validation}
      # TFDS refuses a split with no examples: num_validation=0 means no validation split.
      return {
        split: generate_examples(split, n, c.resolution, c.seed) for split, n in sizes.items() if n
      }

    def _generate_examples(self, **kwargs):  # pragma: no cover - _split_generators yields
      raise NotImplementedError

  return ShapesConfig, Shapes


_CLASSES: tuple[Any, Any] | None = None


def builder_classes():
  """(ShapesConfig, Shapes) — the TFDS config and builder classes (registered as 'shapes')."""
  global _CLASSES
  if _CLASSES is None:
    _CLASSES = _make_builder_classes()
  return _CLASSES


def shapes_config(
  resolution: int = 64, num_train: int = 10_000, num_validation: int = 1_000, seed: int = 0
):
  """A ShapesConfig whose name encodes its parameters, so different configs never collide."""
  if resolution < 8:
    raise ValueError(f"resolution={resolution}; must be >= 8 pixels")
  if num_train < 1 or num_validation < 0:
    raise ValueError(
      f"num_train={num_train}, num_validation={num_validation}; must be >= 1 and >= 0"
    )
  config_cls, _ = builder_classes()
  return config_cls(
    name=f"r{resolution}_n{num_train}_{num_validation}_s{seed}",
    description=f"{resolution}x{resolution}, {num_train}/{num_validation} examples, seed {seed}",
    resolution=resolution,
    num_train=num_train,
    num_validation=num_validation,
    seed=seed,
  )


def build(
  data_dir: str,
  resolution: int = 64,
  num_train: int = 10_000,
  num_validation: int = 1_000,
  seed: int = 0,
):
  """Generates (or reuses) the shapes dataset under `data_dir` as TFRecord.

  Returns:
    The prepared TFDS builder.
  """
  import tensorflow_datasets as tfds

  _, shapes_cls = builder_classes()
  builder = shapes_cls(
    data_dir=data_dir, config=shapes_config(resolution, num_train, num_validation, seed)
  )
  builder.download_and_prepare(
    file_format="tfrecord",
    download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )
  return builder
