"""Network sizes, read from their gin files, and one place that builds networks by name or gin.

`configs/models/<size>.gin` spells each size out field by field, with the arithmetic behind the
paper's parameter counts, and is the only place a size's values are written: `NETWORK_SIZES`
reads those files (gin's parser only: nothing is bound in gin's global config), so code, tests
and `--gin_file=configs/models/<size>.gin` cannot disagree.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from flax import linen as nn

from imagen_jax.nn import efficient_unet, unet

MODELS_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models"
)
# The network classes a size file may configure, by the name its gin block uses.
NETWORK_CLASSES: dict[str, type[nn.Module]] = {
  "unet.UNet": unet.UNet,
  "efficient_unet.EfficientUNet": efficient_unet.EfficientUNet,
}
# The U-Net size files (configs/models/ also holds the T5 encoder sizes, t5_*.gin).
SIZE_NAMES = ("base64", "sr256", "sr1024", "tiny_base", "tiny_sr", "tiny_sr_crossonly")


def read_size_file(path: str) -> tuple[type[nn.Module], dict[str, Any]]:
  """The network class and fields a size file binds (`factory.network.module = @Cls()` and a
  `Cls:` block of literal values)."""
  from gin import config_parser

  class _Literals(config_parser.ParserDelegate):
    def configurable_reference(self, scoped_name: str, evaluate: bool) -> str:
      del evaluate
      return scoped_name

    def macro(self, name: str) -> str:
      raise ValueError(f"{path}: macro %{name} in a network size file; write the value")

  with open(path) as f:
    statements = list(config_parser.ConfigParser(f.read(), _Literals()))
  bindings = [s for s in statements if isinstance(s, config_parser.BindingStatement)]
  module = [s.value for s in bindings if (s.selector, s.arg_name) == ("factory.network", "module")]
  if len(module) != 1 or module[0] not in NETWORK_CLASSES:
    raise ValueError(
      f"{path} must bind factory.network.module to one of "
      f"{sorted('@' + c + '()' for c in NETWORK_CLASSES)}"
    )
  fields = {s.arg_name: s.value for s in bindings if s.selector == module[0]}
  return NETWORK_CLASSES[module[0]], fields


class _SizeTable(Mapping):
  """size -> (network class, fields), each file read once, when first asked for."""

  def __init__(self) -> None:
    self._read: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}

  def __getitem__(self, size: str) -> tuple[type[nn.Module], dict[str, Any]]:
    if size not in SIZE_NAMES:
      raise KeyError(size)
    if size not in self._read:
      self._read[size] = read_size_file(os.path.join(MODELS_DIR, f"{size}.gin"))
    cls, fields = self._read[size]
    return cls, dict(fields)

  def __iter__(self) -> Iterator[str]:
    return iter(SIZE_NAMES)

  def __len__(self) -> int:
    return len(SIZE_NAMES)


# Paper sizes reproduce Imagen Appendix F; the widths the paper leaves unstated (embedding
# widths, SR-1024's last block depth) are chosen in the files to land on the published counts.
NETWORK_SIZES: Mapping[str, tuple[type[nn.Module], dict[str, Any]]] = _SizeTable()


def build_network(size: str, **overrides: Any) -> nn.Module:
  """Builds the network of a named size, with field overrides.

  Args:
    size: a key of NETWORK_SIZES ('base64', 'sr256', 'sr1024', 'tiny_base', 'tiny_sr',
      'tiny_sr_crossonly').
    **overrides: network fields to change (e.g. dtype='bfloat16', remat=True).

  Returns:
    The (unbound) flax module.
  """
  if size not in NETWORK_SIZES:
    raise ValueError(f"network size {size!r} unknown; choose one of {sorted(NETWORK_SIZES)}")
  cls, fields = NETWORK_SIZES[size]
  unknown = set(overrides) - set(cls.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ValueError(
      f"overrides {sorted(unknown)} are not fields of {cls.__name__} (size {size!r})"
    )
  return cls(**{**fields, **overrides})


def network(
  module: nn.Module | None = None,
  size: str | None = None,
  overrides: dict[str, Any] | None = None,
) -> nn.Module:
  """The gin entry point: the network a `configs/models/*.gin` file defines.

  Bind exactly one of `module` (a fully configured `@unet.UNet()` /
  `@efficient_unet.EfficientUNet()`, as the size files do) or `size`.

  Args:
    module: a configured network module.
    size: a NETWORK_SIZES name, used when `module` is None.
    overrides: fields replaced on top of either (e.g. {'remat': True}).

  Returns:
    The (unbound) flax module.
  """
  overrides = dict(overrides or {})
  if (module is None) == (size is None):
    raise ValueError(
      "factory.network needs exactly one of module=@unet.UNet()/@efficient_unet.EfficientUNet() "
      f"or size=<one of {sorted(NETWORK_SIZES)}>; include a configs/models/*.gin file"
    )
  if module is None:
    return build_network(size, **overrides)
  return module.clone(**overrides) if overrides else module


def network_fields(module: nn.Module) -> dict[str, Any]:
  """The configuration fields of a network (everything but flax's parent/name)."""
  return {
    k: getattr(module, k) for k in type(module).__dataclass_fields__ if k not in ("parent", "name")
  }
