"""Checkpointing: the only module that talks to orbax.

A checkpoint is a step directory with named items:
  state          train state without EMA (step, params, optimizer state, counters)
  ema_params     the EMA parameters (what sampling and export read)
  data_iterator  the input iterator's JSON state (so resume continues with the next batch)
  config         the operative gin config, as text inside JSON
Saves are asynchronous; only finalized step directories count. Paths may be local or gs://.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "ema_params", "data_iterator", "config")


def _use_coordination_service_barriers() -> None:
  """Makes orbax meet through JAX's coordination service (300 s timeout) instead of device
  all-gathers, which on CPU go through gloo and fail after ~30 s when a host lags."""
  from absl import flags
  from orbax.checkpoint._src.multihost import multihost

  flag = flags.FLAGS[multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name]
  flag.value = True
  flag.present = 1  # read as set even when absl never parsed the command line


def absolute_path(path: str) -> str:
  """`path` made absolute unless it is remote (gs://...): orbax refuses relative paths, deep
  inside a restore, and users pass them (--stage_dirs=demo_out/work/base16)."""
  return path if "://" in path else os.path.abspath(path)


class Checkpointer:
  """Saves and restores training checkpoints under `directory`.

  Args:
    directory: MODEL_DIR/checkpoints (local or gs://).
    max_to_keep: keep the last K finalized checkpoints.
    save_interval_steps: `maybe_save` saves when step % interval == 0.
    async_save: write in a background thread while training continues.
  """

  def __init__(
    self,
    directory: str,
    max_to_keep: int = 3,
    save_interval_steps: int = 1000,
    async_save: bool = True,
  ):
    self.directory = absolute_path(directory)
    if jax.process_count() > 1:
      _use_coordination_service_barriers()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    """Finalized checkpoint steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(
    self,
    step: int,
    state: Any,
    ema_params: Any,
    data_iterator_state: dict,
    config_text: str,
    force: bool = False,
  ) -> bool:
    """Saves all items at `step` (asynchronously); returns whether a save started."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      ema_params=ocp.args.StandardSave(ema_params),
      data_iterator=ocp.args.JsonSave(data_iterator_state),
      config=ocp.args.JsonSave({"gin": config_text}),
    )
    return bool(self._manager.save(step, args=args, force=force))

  def should_save(self, step: int) -> bool:
    return bool(self._manager.should_save(step))

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host saw a preemption notice (multi-host safe)."""
    return bool(self._manager.reached_preemption(step))

  def restore(
    self, step: int, abstract_state: Any, abstract_ema: Any
  ) -> tuple[Any, Any, dict, str]:
    """Restores one step into the shardings carried by the abstract trees.

    Returns:
      (state, ema_params, data iterator state, gin config text).
    """
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      ema_params=ocp.args.StandardRestore(abstract_ema),
      data_iterator=ocp.args.JsonRestore(),
      config=ocp.args.JsonRestore(),
    )
    restored = self._manager.restore(step, args=args)
    return (
      restored.state,
      restored.ema_params,
      restored.data_iterator,
      restored.config["gin"],
    )

  def restore_latest(
    self, abstract_state: Any, abstract_ema: Any
  ) -> tuple[int, tuple[Any, Any, dict, str]] | None:
    """Restores the newest checkpoint that loads; falls back past corrupt ones.

    Returns:
      (step, restored items) or None when no checkpoint exists.
    """
    for step in reversed(self.all_steps()):
      try:
        return step, self.restore(step, abstract_state, abstract_ema)
      except Exception as e:  # a truncated or corrupt item: fall back to the previous step
        logging.warning(
          "checkpoint step %d in %s could not be restored (%s: %s); trying the previous one",
          step,
          self.directory,
          type(e).__name__,
          e,
        )
    return None

  def restore_ema_params(self, step: int | None, abstract_ema: Any | None = None) -> Any:
    """Reads only the EMA parameters (for sampling / export)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
    item = ocp.args.StandardRestore(abstract_ema) if abstract_ema is not None else None
    args = ocp.args.Composite(ema_params=item or ocp.args.StandardRestore())
    return self._manager.restore(step, args=args).ema_params

  def read_config(self, step: int | None = None) -> str:
    """The gin config text saved with a checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored.config["gin"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the target layout for a restore."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


# ------------------------------------------------------------------------------------------------
# Single-tree checkpoints in other projects' layouts (e.g. T5X's orbax checkpoints)
# ------------------------------------------------------------------------------------------------


def read_pytree_metadata(path: str) -> Any:
  """The tree of array metadata (shapes, dtypes) of a single-item orbax checkpoint."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(absolute_path(path))
  return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree


def restore_pytree_subset(path: str, abstract_tree: Any) -> Any:
  """Restores only the leaves named in `abstract_tree` (ShapeDtypeStructs with shardings),
  cast to their dtypes and placed straight into their shardings."""
  restore_args = jax.tree.map(
    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape),
    abstract_tree,
  )
  return ocp.PyTreeCheckpointer().restore(
    absolute_path(path),
    args=ocp.args.PyTreeRestore(
      item=abstract_tree, restore_args=restore_args, partial_restore=True
    ),
  )


def save_pytree(path: str, tree: Any) -> None:
  """Writes one pytree as an orbax checkpoint directory (must not exist yet)."""
  ocp.PyTreeCheckpointer().save(absolute_path(path), tree)
