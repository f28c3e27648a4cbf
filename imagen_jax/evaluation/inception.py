"""The FID Inception-v3 in Flax: the network FID scores are reported with.

This is the "2015-12-05" TensorFlow Inception graph as pytorch-fid 0.3.0 ports it
(`fid_inception_v3`), not torchvision's Inception-v3: the same layers with the FID quirks
  * the 3x3 average pools of the A, C and first E blocks divide by the number of real pixels
    (TensorFlow's padding; `count_include_pad=False`);
  * the last E block (Mixed_7c) pools its pool branch with a 3x3 MAX pool;
  * BatchNorm epsilon 1e-3, eval mode (running statistics);
and, in front, a bilinear resize to 299x299 with half-pixel centres and no antialiasing
(PyTorch's `F.interpolate(mode="bilinear", align_corners=False)`), then [0, 1] -> [-1, 1].
The output is the 2048-d "pool3" feature: the spatial mean of Mixed_7c.

Layout is NHWC; submodule names follow the PyTorch attribute names (`Mixed_5b.branch1x1.conv`)
so a state_dict maps onto the variables by name (see `torch_names`, `variables_from_state_dict`).
Block outputs are sown into the "intermediates" collection (block0..block3, pytorch-fid's
output blocks) for parity checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3
# Keys of the weight file's state_dict that the pool3 features do not use.
UNUSED_PREFIXES = ("fc.",)
# pytorch-fid's `InceptionV3` module nests the same layers as blocks.<block>.<index>; its
# state_dict is accepted too.
BLOCK_ALIASES = {
  "blocks.0.0": "Conv2d_1a_3x3",
  "blocks.0.1": "Conv2d_2a_3x3",
  "blocks.0.2": "Conv2d_2b_3x3",
  "blocks.1.0": "Conv2d_3b_1x1",
  "blocks.1.1": "Conv2d_4a_3x3",
  "blocks.2.0": "Mixed_5b",
  "blocks.2.1": "Mixed_5c",
  "blocks.2.2": "Mixed_5d",
  "blocks.2.3": "Mixed_6a",
  "blocks.2.4": "Mixed_6b",
  "blocks.2.5": "Mixed_6c",
  "blocks.2.6": "Mixed_6d",
  "blocks.2.7": "Mixed_6e",
  "blocks.3.0": "Mixed_7a",
  "blocks.3.1": "Mixed_7b",
  "blocks.3.2": "Mixed_7c",
}

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
  return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm (eval, eps 1e-3) -> ReLU: PyTorch's `BasicConv2d`."""

  features: int
  kernel: int | Pair
  strides: int | Pair = 1
  padding: int | Pair = 0
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(
      self.features,
      _pair(self.kernel),
      strides=_pair(self.strides),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TensorFlow's SAME average pool: padded pixels are not counted in the mean.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Base: `conv(name, features, kernel, ...)` makes a named ConvBN with the block's precision."""

  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  def conv(self, name: str, features: int, kernel: int | Pair, **kw) -> Callable:
    return ConvBN(features, kernel, precision=self.precision, name=name, **kw)


class InceptionA(_Block):
  """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and avg-pool branches (FID: pool excludes padding)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_1", 48, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: the 35 -> 17 grid reduction."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..6e: factorised 7x7 branches (FID: pool excludes padding)."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a: the 17 -> 8 grid reduction."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.conv("branch3x3_1", 192, 1)(x)
    b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b/7c: expanded 3x3 branches; `max_pool` is the FID graph's Mixed_7c quirk."""

  max_pool: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate(
      [
        self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
        self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
      ],
      axis=-1,
    )
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate(
      [
        self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
        self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
      ],
      axis=-1,
    )
    pooled = _max_pool_3x3_same(x) if self.max_pool else _avg_pool_3x3(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _source_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Indices (i0, i1) and weight of i1 for a half-pixel bilinear resize without antialiasing."""
  # In float32 like PyTorch's kernel: float64 source positions move the weights by ~1e-6.
  f = np.float32
  scale = f(in_size) / f(out_size)
  src = np.maximum(scale * (np.arange(out_size, dtype=f) + f(0.5)) - f(0.5), f(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0.astype(f)).astype(f)


def resize_bilinear(images: jax.Array, height: int, width: int) -> jax.Array:
  """[B, H, W, C] -> [B, height, width, C] as PyTorch's bilinear, align_corners=False.

  `jax.image.resize` antialiases when downsampling and PyTorch's does not, so a large image
  would give different features; this samples the two nearest source pixels per axis, width
  first then height, like PyTorch's CPU kernel.
  """
  i0, i1, w = _source_taps(images.shape[2], width)
  x = images[:, :, i0] * (1.0 - w)[:, None] + images[:, :, i1] * w[:, None]
  i0, i1, w = _source_taps(images.shape[1], height)
  return x[:, i0] * (1.0 - w)[:, None, None] + x[:, i1] * w[:, None, None]


class FIDInceptionV3(nn.Module):
  """Images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (float32)."""

  resize_input: bool = True
  normalize_input: bool = True
  # HIGHEST: accelerators otherwise run float32 convolutions in bf16/tf32 passes, which moves
  # the features (and FID) away from the reference implementation.
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    p = dict(precision=self.precision)
    x = ConvBN(32, 3, strides=2, name="Conv2d_1a_3x3", **p)(x)
    x = ConvBN(32, 3, name="Conv2d_2a_3x3", **p)(x)
    x = ConvBN(64, 3, padding=1, name="Conv2d_2b_3x3", **p)(x)
    x = _max_pool_3x3_s2(x)
    self.sow("intermediates", "block0", x)
    x = ConvBN(80, 1, name="Conv2d_3b_1x1", **p)(x)
    x = ConvBN(192, 3, name="Conv2d_4a_3x3", **p)(x)
    x = _max_pool_3x3_s2(x)
    self.sow("intermediates", "block1", x)
    x = InceptionA(pool_features=32, name="Mixed_5b", **p)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **p)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **p)(x)
    x = InceptionB(name="Mixed_6a", **p)(x)
    x = InceptionC(channels_7x7=128, name="Mixed_6b", **p)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6c", **p)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6d", **p)(x)
    x = InceptionC(channels_7x7=192, name="Mixed_6e", **p)(x)
    self.sow("intermediates", "block2", x)
    x = InceptionD(name="Mixed_7a", **p)(x)
    x = InceptionE(name="Mixed_7b", **p)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **p)(x)
    self.sow("intermediates", "block3", x)
    return jnp.mean(x, axis=(1, 2))


# Flax leaf (collection, name) -> PyTorch state_dict leaf name.
_LEAF_NAMES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def variable_shapes(model: FIDInceptionV3 | None = None) -> dict:
  """The model's variable tree as ShapeDtypeStructs (no weights are computed)."""
  return _variable_shapes(model or FIDInceptionV3())


@functools.lru_cache(maxsize=4)
def _variable_shapes(model: FIDInceptionV3) -> dict:
  # Tracing the whole network takes seconds; every load needs the same tree.
  dummy = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), dummy)


def torch_names(
  shapes: Mapping | None = None,
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """state_dict name -> (Flax variable path, PyTorch shape), in the network's order.

  Conv kernels are OIHW in PyTorch and HWIO here; every other tensor has the same shape.
  """
  from flax import traverse_util

  shapes = variable_shapes() if shapes is None else shapes
  out = {}
  for path, leaf in traverse_util.flatten_dict(dict(shapes)).items():
    collection, *modules, name = path
    if collection == "intermediates":
      continue
    shape = tuple(leaf.shape)
    if name == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1])
    out[".".join([*modules, _LEAF_NAMES[(collection, name)]])] = (path, shape)
  return out


def canonical_name(name: str) -> str:
  """A state_dict key in the weight file's naming (pytorch-fid's blocks.* prefix resolved)."""
  parts = name.split(".")
  if parts[0] == "blocks" and len(parts) > 3:
    alias = BLOCK_ALIASES.get(".".join(parts[:3]))
    if alias:
      return ".".join([alias, *parts[3:]])
  return name


def is_unused(name: str) -> bool:
  """Keys the pool3 features ignore: the 1008-way classifier and BatchNorm step counters."""
  return name.startswith(UNUSED_PREFIXES) or name.endswith(".num_batches_tracked")


def load(path: str, model: FIDInceptionV3 | None = None) -> tuple[FIDInceptionV3, dict]:
  """The network and its variables from pytorch-fid's `pt_inception-2015-12-05-*.pth`.

  Raises:
    UserError: the file is not a PyTorch checkpoint or its keys/shapes do not match.
  """
  from imagen_jax.evaluation import torch_checkpoint

  model = model or FIDInceptionV3()
  state_dict = torch_checkpoint.load_state_dict(path)
  return model, variables_from_state_dict(state_dict, model, source=path)


def variables_from_state_dict(
  state_dict: Mapping[str, np.ndarray], model: FIDInceptionV3 | None = None, source: str = ""
) -> dict:
  """{"params", "batch_stats"} for `model` from a PyTorch-named state_dict of numpy arrays."""
  from imagen_jax import errors
  from imagen_jax.evaluation import torch_checkpoint

  renamed: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    name = canonical_name(key)
    if name in renamed:
      raise errors.UserError(
        f"{source or 'state_dict'}: key {key!r} duplicates {name!r}: use a state_dict with "
        "one copy of each tensor"
      )
    renamed[name] = value
  return torch_checkpoint.to_flax_variables(
    renamed,
    torch_names(variable_shapes(model)),
    is_unused=is_unused,
    source=source,
  )
