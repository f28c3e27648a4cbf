"""Cloud TPU slice types: the one table of chips, hosts, torus shapes, HBM and peak rates.

`parse_slice('v4-256')` turns a Cloud TPU accelerator type, as users type it for `gcloud`, into
its size (chips, hosts, JAX devices), the topology string libtpu compiles for ('v4:4x4x8') and
the per-chip figures a compile report compares against (HBM bytes, bf16 peak, HBM bandwidth).
Standard library only: the TPU VM launcher imports it on workstations without JAX.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """Per-chip facts of one TPU generation (vendor figures)."""

  name: str  # as in accelerator types and libtpu topology strings: v4 | v5p | v5e | v6e
  device_kind: str  # what `jax.Device.device_kind` says for one of its chips
  counts_cores: bool  # accelerator-type sizes count TensorCores (2 per chip), not chips
  torus_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  chip_config: str  # libtpu chip config: megacore = one JAX device per chip
  chips_per_host: int
  single_host_max_chips: int  # slices up to this many chips are one host
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  runtime: str  # default TPU VM runtime version
  queued_by_default: bool  # capacity handed out through queued resources
  sizes: tuple[int, ...] | None  # allowed chip counts (None: any power of two up to max_chips)
  max_chips: int


GENERATIONS: dict[str, TpuGeneration] = {
  g.name: g
  for g in (
    TpuGeneration(
      "v4", "TPU v4", True, 3, "megacore", 4, 4, 32 * GIB, 275e12, 1.2e12,
      "tpu-ubuntu2204-base", False, None, 4096,
    ),
    TpuGeneration(
      "v5p", "TPU v5", True, 3, "megacore", 4, 4, 95 * GIB, 459e12, 2.765e12,
      "v2-alpha-tpuv5", True, None, 8960,
    ),
    TpuGeneration(
      "v5e", "TPU v5 lite", False, 2, "default", 4, 8, 16 * GIB, 197e12, 0.819e12,
      "v2-alpha-tpuv5-lite", True, (1, 4, 8, 16, 32, 64, 128, 256), 256,
    ),
    TpuGeneration(
      "v6e", "TPU v6 lite", False, 2, "default", 4, 8, 32 * GIB, 918e12, 1.64e12,
      "v2-alpha-tpuv6e", True, (1, 4, 8, 16, 32, 64, 128, 256), 256,
    ),
  )
}  # fmt: skip

SLICE_FORMS = (
  "v4-N, v5p-N (N = TensorCores: 2 per chip, a multiple of 8), v5litepod-N / v5e-N, v6e-N "
  "(N = chips: 1, 4, 8, 16, 32, 64, 128 or 256), or a libtpu topology such as v4:4x4x8"
)


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One slice type: what gcloud calls it, how big it is, and what libtpu compiles for."""

  name: str  # as gcloud spells it, e.g. v5litepod-16
  generation: TpuGeneration
  chips: int
  hosts: int
  # Chips along each torus dimension; None for odd-sized v4/v5p slices (e.g. v4-24 = 12 chips),
  # whose shape is chosen at creation and must then be given as a topology ('v4:2x2x3').
  torus: tuple[int, ...] | None

  @property
  def devices(self) -> int:
    """JAX devices (one per chip: megacore on v4/v5p, one core per chip on v5e/v6e)."""
    return self.chips

  @property
  def topology(self) -> str:
    """libtpu's topology name, e.g. 'v4:4x4x8'."""
    if self.torus is None:
      raise ValueError(
        f"{self.name}: {self.chips} chips is not a power of two, so its torus shape is "
        f"ambiguous; pass the topology explicitly, e.g. {self.generation.name}:2x2x{self.chips // 4}"
      )
    return f"{self.generation.name}:{'x'.join(map(str, self.torus))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips of one host along each torus dimension (libtpu wants three)."""
    if self.hosts == 1 and self.torus is not None:
      return (*self.torus, 1, 1)[:3]
    return (2, 2, 1)


def _torus_for(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's standard shape for a power-of-two chip count: the last smallest dimension
  doubles first (v4: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e: 1x1, 2x2, 2x4, 4x4)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_slice(accelerator_type: str) -> TpuSlice:
  """Validates an accelerator type (or a libtpu topology) and returns the slice.

  Args:
    accelerator_type: e.g. 'v4-256', 'v5p-64', 'v5litepod-16' (alias 'v5e-16'), 'v6e-256', or
      a libtpu topology 'v4:4x4x8' / 'v5e:16x16'.

  Raises:
    ValueError: an unknown generation or a size that generation does not come in.
  """
  raw = accelerator_type or ""
  topo = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)", raw)
  if topo:
    gen = GENERATIONS[topo.group(1)]
    torus = tuple(int(d) for d in topo.group(2).split("x"))
    if len(torus) != gen.torus_dims or min(torus) < 1:
      raise ValueError(
        f"topology {raw!r}: {gen.name} is a {gen.torus_dims}-D torus; write "
        f"{gen.name}:{'x'.join(['2'] * gen.torus_dims)}"
      )
    return _make_slice(gen, math.prod(torus), torus)
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", raw)
  if not m:
    raise ValueError(f"{raw!r} is not a known TPU type; use one of {SLICE_FORMS}")
  gen = GENERATIONS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
  n = int(m.group(2))
  if gen.counts_cores:
    if n < 8 or n % 8 or n // 2 > gen.max_chips:
      raise ValueError(
        f"{raw!r}: {gen.name} sizes count TensorCores and must be a multiple of 8 between 8 and "
        f"{2 * gen.max_chips}"
      )
    chips = n // 2
  else:
    if n not in gen.sizes:
      raise ValueError(f"{raw!r}: {gen.name} sizes count chips and must be one of {gen.sizes}")
    chips = n
  torus = None if chips & (chips - 1) else _torus_for(chips, gen.torus_dims)
  return _make_slice(gen, chips, torus)


def _gcloud_name(gen: TpuGeneration, chips: int) -> str:
  size = 2 * chips if gen.counts_cores else chips
  return f"v5litepod-{size}" if gen.name == "v5e" else f"{gen.name}-{size}"


def _make_slice(gen: TpuGeneration, chips: int, torus: tuple[int, ...] | None) -> TpuSlice:
  hosts = 1 if chips <= gen.single_host_max_chips else max(1, chips // gen.chips_per_host)
  return TpuSlice(_gcloud_name(gen, chips), gen, chips, hosts, torus)


def slice_with_chips(gen: TpuGeneration, chips: int) -> TpuSlice:
  """The standard slice of `gen` with this many chips (e.g. a data=1 sub-slice of a preset)."""
  size = 2 * chips if gen.counts_cores else chips
  return parse_slice(f"{gen.name}-{size}")


def generation_of_device_kind(device_kind: str) -> TpuGeneration | None:
  """The generation whose chips report this `device_kind` (None for CPUs, GPUs, unknown)."""
  for gen in GENERATIONS.values():
    if device_kind == gen.device_kind:
      return gen
  return None
