"""Mesh, logical-axis rules and shardings: the one place that maps model axes to devices.

Mesh axes are ('data', 'fsdp', 'model'). The batch is split over ('data', 'fsdp'); parameters
and optimizer state are split over 'fsdp' on one large dimension (ZeRO-3); 'model' splits
channels / heads when FSDP alone does not fit. Networks name their axes logically
(`nn.with_logical_partitioning`, `nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` turns
those names into mesh axes. Rules are (logical name, mesh axes) pairs, first match wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh axis {name!r} has size {size}; use a positive size or -1 (fill)")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(
        f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}; "
        f"the fixed axes' product ({known}) must divide the device count"
      )
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
      f"{len(devices)} are available; set one axis to -1 or match the device count"
    )
  return jax.make_mesh(
    tuple(sizes),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


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


def sharded_init(init_fn, mesh: Mesh, *args, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
  """Runs `init_fn(*args)` directly into its shardings, never materialising on one device.

  Returns:
    (unboxed initialised tree, its NamedSharding tree).
  """
  _, shardings = abstract_and_shardings(init_fn, mesh, *args, rules=rules)
  with nn.logical_axis_rules(rules):
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


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
