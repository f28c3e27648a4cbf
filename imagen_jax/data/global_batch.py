"""Per-process numpy batches -> global `jax.Array`s sharded over the mesh's batch axes."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_global_batch(batch: dict[str, Any], mesh) -> dict[str, Any]:
  """Assembles each process's batch into global arrays, dim 0 split over ('data', 'fsdp').

  Args:
    batch: per-process numpy arrays (all with the same leading size); non-numeric fields
      (e.g. 'key') stay on the host and are dropped from the result.
    mesh: the training mesh.

  Returns:
    {name: jax.Array} of global batch size = per-process size x process count.

  Raises:
    ValueError: the per-process batch does not divide over this process's devices.
  """
  import jax

  from imagen_jax import parallel

  out = {}
  # Distinct batch slices held by this process (model-axis replicas share one).
  local_slices = len({d.id for d in mesh.local_devices}) // int(
    np.prod([mesh.shape[a] for a in mesh.axis_names if a not in parallel.BATCH_AXES])
  )
  for name, value in batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf" and value.dtype.name != "bfloat16":
      continue
    if value.shape[0] % max(local_slices, 1):
      raise ValueError(
        f"batch field {name!r} has {value.shape[0]} rows per process, not divisible by the "
        f"{local_slices} batch shards this process holds on the mesh"
      )
    sharding = parallel.batch_sharding(mesh, value.ndim)
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out
