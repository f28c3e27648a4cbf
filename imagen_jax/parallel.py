"""Mesh, logical-axis rules and shardings: the one place that maps model axes to devices.

Mesh axes are ('data', 'fsdp', 'model'). The batch is split over ('data', 'fsdp'); parameters
and optimizer state are split over 'fsdp' on one large dimension (ZeRO-3); 'model' splits
channels / heads when FSDP alone does not fit. Networks name their axes logically
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` turns
those names into mesh axes. Rules are (logical name, mesh axes) pairs, first match wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import tpu_slices

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. Activations and parameters share one table.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  # activations
  ("batch", BATCH_AXES),
  ("height", None),
  ("width", None),
  ("length", None),  # text tokens / flattened pixels in attention
  ("channels", "model"),  # activation feature maps
  ("act_heads", "model"),
  ("act_kv", None),
  # parameters: the big dimension goes to 'fsdp', the other big one to 'model'
  ("conv_height", None),
  ("conv_width", None),
  ("conv_in", "fsdp"),
  ("conv_out", "model"),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("joined_kv", "model"),  # T5X attention kernels store heads*head_dim as one axis
  ("norm", None),
  ("image_channels", None),  # 3 RGB channels never split
  ("vocab", "model"),
  ("relpos_buckets", None),
  ("abspos_buckets", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """A mesh preset: axis sizes and, for TPU pods, the slice they are laid out on.

  Attributes:
    data: data-parallel replicas (-1 = fill). With `num_slices` > 1 it spans the slices.
    fsdp: parameter-sharding (ZeRO-3) axis size (-1 = fill); stays inside one slice.
    model: tensor-parallel axis size; stays inside one slice.
    topology: the slice type this preset is sized for (e.g. 'v4-256'), or None for "whatever
      devices are there". A job on a different slice fails before compiling, and
      `imagen-jax compile` compiles for this topology when no `--topology` is given.
    num_slices: slices joined over the data-center network (multi-slice); the data axis is
      split across them, fsdp and model stay on each slice's ICI.
    allow_split_physical_axes: let one mesh axis take part of a torus dimension. Off by default:
      a logical axis that is a product of whole torus dimensions keeps its collectives on rings.
    max_devices: use only the first N devices (None = all), e.g. a one-device reference run.
  """

  data: int = -1
  fsdp: int = 1
  model: int = 1
  topology: str | None = None
  num_slices: int = 1
  allow_split_physical_axes: bool = False
  max_devices: int | None = None

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if size == 0 or size < -1:
        raise ValueError(f"mesh axis {name!r} has size {size}; use a positive size or -1 (fill)")
    if self.sizes.count(-1) > 1:
      raise ValueError(f"mesh sizes {self.describe()}: at most one axis may be -1")
    if self.num_slices < 1:
      raise ValueError(f"num_slices={self.num_slices} must be >= 1")
    if self.topology is not None:
      tpu_slices.parse_slice(self.topology)  # a bad name fails when the config is read

  @property
  def sizes(self) -> list[int]:
    return [self.data, self.fsdp, self.model]

  def describe(self) -> str:
    sizes = " × ".join(f"{n}={s}" for n, s in zip(MESH_AXES, self.sizes))
    where = f" on {self.num_slices} × {self.topology}" if self.topology else ""
    return sizes + where

  def expected_devices(self) -> int | None:
    """Devices the named topology has (all slices), or None without a topology."""
    if self.topology is None:
      return None
    return tpu_slices.parse_slice(self.topology).devices * self.num_slices

  def resolved_sizes(self, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes with -1 filled in for `num_devices` devices."""
    sizes = self.sizes
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
          f"{num_devices} devices do not divide into mesh {self.describe()}; "
          f"the fixed axes' product ({known}) must divide the device count"
        )
      sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
      raise ValueError(
        f"mesh {self.describe()} needs {int(np.prod(sizes))} devices but {num_devices} are "
        "available; set one axis to -1 or match the device count"
      )
    return tuple(sizes)

  def build(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh on `devices` (default: all of `jax.devices()`).

    Raises:
      ValueError: the devices are not the slice the preset names, the sizes do not multiply to
        the device count, or (TPU) the axes cannot be laid out on the torus.
    """
    devices = list(jax.devices() if devices is None else devices)[: self.max_devices]
    expected = self.expected_devices()
    if expected is not None and expected != len(devices):
      raise ValueError(
        f"the mesh preset is for {self.num_slices} × {self.topology} ({expected} devices) but "
        f"this job has {len(devices)} {devices[0].device_kind} devices; use the preset of this "
        "slice (configs/mesh/<accelerator type>.gin) or check a preset without its slice via "
        "`imagen-jax compile`"
      )
    sizes = self.resolved_sizes(len(devices))
    if self.num_slices > 1 and sizes[0] % self.num_slices:
      raise ValueError(
        f"mesh {self.describe()}: data={sizes[0]} must be a multiple of num_slices="
        f"{self.num_slices} (the data axis is what spans slices)"
      )
    try:
      if self.num_slices > 1:
        per_slice = (sizes[0] // self.num_slices, sizes[1], sizes[2])
        grid = mesh_utils.create_hybrid_device_mesh(
          per_slice,
          (self.num_slices, 1, 1),
          devices,
          allow_split_physical_axes=self.allow_split_physical_axes,
        )
      else:
        grid = mesh_utils.create_device_mesh(
          sizes, devices, allow_split_physical_axes=self.allow_split_physical_axes
        )
    except (ValueError, NotImplementedError, AssertionError, AttributeError) as e:
      raise ValueError(
        f"mesh {self.describe()} cannot be laid out on these {len(devices)} "
        f"{devices[0].device_kind} devices: {str(e).split('. ')[0]}. Make each axis a product of "
        "whole torus dimensions (e.g. a 4x4x4 v4-128: data=4, fsdp=16), or set "
        "allow_split_physical_axes=True knowingly"
      ) from None
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def create_mesh(
  data: int = -1,
  fsdp: int = 1,
  model: int = 1,
  devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh; one size may be -1 to take the rest.

  Args:
    data: data-parallel replicas (-1 = fill).
    fsdp: parameter-sharding (ZeRO-3) axis size (-1 = fill).
    model: tensor-parallel axis size.
    devices: devices to use (default: all, in `jax.devices()` order).

  Returns:
    A mesh whose axes are all `AxisType.Auto`, as linen's logical partitioning requires.
  """
  return MeshConfig(data, fsdp, model).build(devices)


def resolve_mesh(mesh: Mesh | MeshConfig | None) -> Mesh:
  """A ready mesh from what a config binds: a Mesh, a MeshConfig, or None (all devices on data)."""
  if isinstance(mesh, Mesh):
    return mesh
  return (mesh or MeshConfig()).build()


def tpu_topology_devices(tpu_slice: tpu_slices.TpuSlice, num_slices: int = 1) -> list[Any]:
  """The devices of a TPU slice, without the slice: for ahead-of-time compiles only.

  libtpu describes the topology (chips, torus coordinates, hosts); programs lowered on a mesh of
  these devices compile with the TPU compiler, and nothing can execute.

  Raises:
    RuntimeError: libtpu is not installed, or refused the topology.
  """
  import importlib.util

  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
      "deviceless TPU compiles need libtpu: pip install -e '.[tpu]' (or pip install "
      "'libtpu==0.0.50.*', the version jax[tpu] pins for jax 0.12)"
    )
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=tpu_slice.topology,
      chip_config_name=tpu_slice.generation.chip_config,
      chips_per_host_bounds=tpu_slice.chips_per_host_bounds,
      num_slices=num_slices,
      wrap=(False,) * 3,
    )
  except Exception as e:  # libtpu reports bad topologies as XlaRuntimeError
    raise RuntimeError(
      f"libtpu refused topology {tpu_slice.topology} × {num_slices}: {str(e).splitlines()[0]}"
    ) from None
  return list(desc.devices)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


class BatchSplit:
  """Inference on every local device: a batch split over them along one 'batch' axis, the
  params replicated on each (sampling and evaluation; training uses the logical-axis mesh)."""

  AXIS = "batch"

  def __init__(self, devices: Sequence[jax.Device] | None = None):
    self.devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.array(self.devices), (self.AXIS,))
    self._split = NamedSharding(mesh, PartitionSpec(self.AXIS))
    self._replicated = replicated(mesh)

  def round_up(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the device count (an equal share each)."""
    n = len(self.devices)
    return -(-batch_size // n) * n

  def replicate(self, tree: Any) -> Any:
    """`tree` (e.g. params) copied onto every device."""
    return jax.device_put(tree, self._replicated)

  def split(self, array: Any) -> Any:
    """A host array with a leading batch dim (divisible by the device count), split over the
    devices; None stays None."""
    return None if array is None else jax.device_put(array, self._split)


# Sampling vmaps a single-image program over the batch: the vmapped axis carries the batch split
# (`jax.vmap(spmd_axis_name=BATCH_AXES)`), so the network's own (size-1) batch axis is unsplit.
SAMPLING_AXIS_RULES: tuple[tuple[str, Any], ...] = (("batch", None), *LOGICAL_AXIS_RULES)


def parse_mesh_flag(text: str) -> MeshConfig:
  """`data=2,fsdp=4` (any of data/fsdp/model; unnamed axes keep MeshConfig's defaults) ->
  MeshConfig; ValueError naming the bad part."""
  sizes: dict[str, int] = {}
  for part in (p.strip() for p in text.split(",") if p.strip()):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES or name in sizes:
      raise ValueError(
        f"{part!r} is not AXIS=SIZE with AXIS one of {', '.join(MESH_AXES)} (each once)"
      )
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"{part!r}: size {value.strip()!r} is not an integer") from None
  if not sizes:
    raise ValueError("no axis sizes given (e.g. data=2,fsdp=4)")
  return MeshConfig(**sizes)


def _divisible_spec(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with the axes dropped from dimensions they do not divide (those stay whole)."""
  dims = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    dims.append(axes if size % ways == 0 else None)
  return PartitionSpec(*dims)


class SamplingMesh:
  """Inference on a ('data', 'fsdp', 'model') mesh of this process's devices.

  The batch is split over ('data', 'fsdp'); parameters are placed by the training job's logical
  rules, so `fsdp` > 1 stores each stage FSDP-sharded (ZeRO-3: XLA gathers each weight where it
  is used) and the default mesh (every device on `data`) replicates them. Each process builds
  its own mesh: in a multi-host run every host samples its own images, no collectives between
  hosts.

  Args:
    config: axis sizes (default: every device on 'data').
    devices: the devices (default: `jax.local_devices()`).
  """

  def __init__(self, config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None):
    self.config = config or MeshConfig()
    self.mesh = self.config.build(jax.local_devices() if devices is None else devices)
    self.devices = list(self.mesh.devices.flat)

  @property
  def batch_ways(self) -> int:
    return data_parallel_size(self.mesh)

  def round_up(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the batch split (an equal share each)."""
    return -(-batch_size // self.batch_ways) * self.batch_ways

  def split(self, array: Any) -> Any:
    """A host array with a leading batch dim (a multiple of `batch_ways`) split over the
    batch axes; None stays None."""
    return None if array is None else jax.device_put(array, batch_sharding(self.mesh, array.ndim))

  def param_shardings(self, init_fn, *args) -> Any:
    """NamedShardings of `init_fn(*args)`'s (boxed) params under the logical rules; a dimension
    an axis does not divide stays whole (a bundle's widths need not suit every mesh)."""
    abstract, shardings = abstract_and_shardings(init_fn, self.mesh, *args)
    return jax.tree.map(
      lambda x, s: NamedSharding(self.mesh, _divisible_spec(x.shape, s.spec, self.mesh)),
      abstract,
      shardings,
    )

  def context(self) -> contextlib.ExitStack:
    """The mesh and sampling rules for tracing a program (activation constraints apply)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(SAMPLING_AXIS_RULES))
    return stack


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def logical_to_shardings(
  logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    mesh_specs,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def abstract_and_shardings(
  init_fn, mesh: Mesh, *args, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
) -> tuple[Any, Any]:
  """Shapes and shardings of `init_fn(*args)` without allocating anything.

  `init_fn` returns a pytree possibly holding `nn.Partitioned` boxes (from
  `nn.with_logical_partitioning`). Returns (abstract unboxed tree, NamedSharding tree).
  """
  # No mesh context here: names are read from the boxes, and flax's in-init constraints on
  # reshaped kernels (DenseGeneral) are not meaningful before the layout is decided.
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, *args)
  logical_specs = nn.get_partition_spec(boxed)
  shardings = logical_to_shardings(logical_specs, mesh, rules)
  return nn.unbox(boxed), shardings


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts multi-host JAX before any backend is touched.

  On TPU pods and SLURM clusters all three arguments may be None (JAX reads the environment).
  On CPU (local multi-process runs) the collectives go through gloo.
  """
  if num_processes is not None and num_processes <= 1 and coordinator_address is None:
    return
  if coordinator_address and (
    "127.0.0.1" in coordinator_address or "localhost" in coordinator_address
  ):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
  )


def process_placement(
  process_index: int | None = None, process_count: int | None = None
) -> tuple[int, int]:
  """(this host, number of hosts): the arguments, jax's where None."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return index, count


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
  """Blocks until every process reaches the barrier `name` (no-op for one process).

  The barrier runs on JAX's coordination service, not on device collectives: gloo (CPU
  multi-process) gives up connecting after ~30 s, so a host that is still compiling or loading
  data when its peer issues the first collective would fail the run. Meeting here first makes
  the collectives that follow start together.
  """
  if jax.process_count() <= 1:
    return
  from jax._src import distributed  # the coordination-service client; no public handle exists

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("wait_for_all_processes: jax.distributed.initialize() was not called")
  client.wait_at_barrier(f"imagen_jax_{name}", int(timeout_s * 1000))


def first_device() -> list[jax.Device]:
  """Just the first device (a one-device mesh on a multi-device host)."""
  return jax.devices()[:1]
