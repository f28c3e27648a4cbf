"""Checkpointing: the only module that talks to orbax.

A checkpoint is a step directory with named items:
  state          train state without EMA (step, params, optimizer state, counters)
  ema_params     the EMA parameters (what sampling and export read)
  data_iterator  the input iterator's JSON state (so resume continues with the next batch)
  config         the operative gin config, as text inside JSON
  stage_spec     the stage's spec (`imagen_jax.stage.stage_spec`: network class + fields,
                 StageConfig, text length/width), so readers rebuild the stage without gin;
                 steps saved before it existed have no such item (readers fall back to config)
Saves are asynchronous; only finalized step directories count. Paths may be local or gs://.

Every reader goes through `Checkpointer.load_newest`: the newest step that loads, falling back
past truncated or corrupt ones with a warning each; the training job also moves those aside.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax import errors

log = logging.getLogger(__name__)

ITEMS = ("state", "ema_params", "data_iterator", "config", "stage_spec")
CORRUPT_PREFIX = "corrupt."  # a step moved aside: `corrupt.<step>`, which orbax does not count
_REASON_CHARS = 300

T = TypeVar("T")


class UnloadableItem(errors.UserError):
  """One item of a checkpoint step could not be read; the message names its file and why."""


def _use_coordination_service_barriers() -> None:
  """Makes orbax meet through JAX's coordination service (300 s timeout) instead of device
  all-gathers, which on CPU go through gloo and fail after ~30 s when a host lags."""
  from absl import flags
  from orbax.checkpoint._src.multihost import multihost

  flag = flags.FLAGS[multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name]
  flag.value = True
  flag.present = 1  # read as set even when absl never parsed the command line


def _reason(exc: BaseException) -> str:
  """`Type: message` on one line, cut short (tensorstore errors run to pages)."""
  if isinstance(exc, UnloadableItem):
    return str(exc)
  text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
  if len(text) > _REASON_CHARS:
    text = text[:_REASON_CHARS] + "..."
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    stage_spec: dict[str, Any] | None = None,
  ) -> bool:
    """Saves all items at `step` (asynchronously); returns whether a save started."""
    items = dict(
      state=ocp.args.StandardSave(state),
      ema_params=ocp.args.StandardSave(ema_params),
      data_iterator=ocp.args.JsonSave(data_iterator_state),
      config=ocp.args.JsonSave({"gin": config_text}),
    )
    if stage_spec is not None:
      items["stage_spec"] = ocp.args.JsonSave(stage_spec)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

  def should_save(self, step: int) -> bool:
    return bool(self._manager.should_save(step))

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host saw a preemption notice (multi-host safe)."""
    return bool(self._manager.reached_preemption(step))

  def _item_path(self, step: int, name: str) -> str:
    """The file a reader of item `name` at `step` failed on (JSON items: their one file)."""
    item_dir = os.path.join(self.directory, str(step), name)
    json_file = os.path.join(item_dir, "metadata")
    return json_file if "://" not in json_file and os.path.isfile(json_file) else item_dir

  def _restore_items(self, step: int, **args: Any) -> dict[str, Any]:
    """Restores the named items of one step one at a time, so a failure names its item."""
    out = {}
    for name, arg in args.items():
      try:
        out[name] = getattr(
          self._manager.restore(step, args=ocp.args.Composite(**{name: arg})), name
        )
      except Exception as e:  # orbax/tensorstore raise many types for a truncated item
        raise UnloadableItem(f"{self._item_path(step, name)}: {_reason(e)}") from e
    return out

  def restore(
    self, step: int, abstract_state: Any, abstract_ema: Any
  ) -> tuple[Any, Any, dict, str]:
    """Restores one step into the shardings carried by the abstract trees.

    Returns:
      (state, ema_params, data iterator state, gin config text).
    """
    # Cheap items first: a truncated step is found before its arrays are read.
    r = self._restore_items(
      step,
      config=ocp.args.JsonRestore(),
      data_iterator=ocp.args.JsonRestore(),
      ema_params=ocp.args.StandardRestore(abstract_ema),
      state=ocp.args.StandardRestore(abstract_state),
    )
    return r["state"], r["ema_params"], r["data_iterator"], r["config"]["gin"]

  def load_newest(
    self, load: Callable[[int], T], step: int | None = None, move_aside: bool = False
  ) -> tuple[int, T] | None:
    """`(step, load(step))` for the newest step that loads: the one loader every reader uses.

    A step whose `load` raises is skipped with a one-line warning (step, directory, why). With
    `move_aside` (the training job, which owns the directory) skipped steps are renamed to
    `corrupt.<step>` once an older step has loaded, so keep-last-K stops counting them and the
    run can save that step again; nothing is moved when no step loads (a changed model config
    fails on every step, and must not look like a fresh start on the next launch).

    Args:
      load: reads what the caller needs from one step (raises if it cannot).
      step: load exactly this step: failing is an error, never a fallback.
      move_aside: rename skipped steps (training only; sample/export only read).

    Returns:
      (step, loaded) or None when the directory has no finalized checkpoint.

    Raises:
      errors.UserError: `step` does not load, or no step does (naming the steps and why).
    """
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise errors.UserError(
          f"checkpoint step {step} is not in {self.directory} (finalized steps: {steps or 'none'})"
        )
      try:
        return step, load(step)
      except Exception as e:  # any failure of an explicitly chosen step is the user's answer
        raise errors.UserError(f"checkpoint step {step} does not load: {_reason(e)}") from e
    failed: list[tuple[int, str]] = []
    for candidate in reversed(steps):
      try:
        loaded = load(candidate)
      except Exception as e:  # a truncated or corrupt item: fall back to the previous step
        failed.append((candidate, _reason(e)))
        log.warning(
          "skipping checkpoint step %d in %s: %s", candidate, self.directory, failed[-1][1]
        )
        continue
      if failed and move_aside:
        self._move_aside([s for s, _ in failed])
      return candidate, loaded
    if not failed:
      return None
    first_step, first_reason = failed[0]
    tried = ", ".join(str(s) for s, _ in failed)
    raise errors.UserError(
      f"no checkpoint in {self.directory} loads (tried steps {tried}); step {first_step}: "
      f"{first_reason}; restore the files, move the broken steps away, or use a fresh "
      "directory if the model config changed"
    )

  def _move_aside(self, steps: list[int]) -> None:
    """Renames unloadable steps to `corrupt.<step>` (kept for inspection, never deleted)."""
    from etils import epath

    root = epath.Path(self.directory)
    if jax.process_index() == 0:
      for step in steps:
        src, dst = root / str(step), root / f"{CORRUPT_PREFIX}{step}"
        n = 1
        while dst.exists():
          dst = root / f"{CORRUPT_PREFIX}{step}.{n}"
          n += 1
        try:
          src.rename(dst)
        except Exception as e:  # e.g. a store without directory renames: leave it, say so
          log.warning("could not move checkpoint step %d aside (%s); it stays", step, e)
          continue
        log.warning(
          "moved unloadable checkpoint step %d to %s (kept for inspection; keep-last-K no "
          "longer counts it)",
          step,
          dst,
        )
    if jax.process_count() > 1:
      from imagen_jax import parallel

      parallel.wait_for_all_processes("checkpoints_moved_aside")
    self._manager.reload()

  def restore_latest(
    self, abstract_state: Any, abstract_ema: Any, move_aside: bool = False
  ) -> tuple[int, tuple[Any, Any, dict, str]] | None:
    """Restores the newest checkpoint that loads (see `load_newest`).

    Returns:
      (step, restored items) or None when no checkpoint exists.
    """
    return self.load_newest(
      lambda s: self.restore(s, abstract_state, abstract_ema), move_aside=move_aside
    )

  def _at_or_newest(self, read: Callable[[int], T], step: int | None) -> T:
    """`read(step)` (its error names the file), or of the newest step that loads."""
    if step is not None:
      return read(step)
    loaded = self.load_newest(read)
    if loaded is None:
      raise errors.UserError(f"no finalized checkpoint in {self.directory}")
    return loaded[1]

  def restore_ema_params(self, step: int | None, abstract_ema: Any | None = None) -> Any:
    """Reads only the EMA parameters (for sampling / export) of `step` (None: newest loadable)."""

    def read(s: int) -> Any:
      return self._restore_items(s, ema_params=ocp.args.StandardRestore(abstract_ema))["ema_params"]

    return self._at_or_newest(read, step)

  def read_config(self, step: int | None = None) -> str:
    """The gin config text saved with a checkpoint (`step` None: the newest loadable)."""

    def read(s: int) -> str:
      return self._restore_items(s, config=ocp.args.JsonRestore())["config"]["gin"]

    return self._at_or_newest(read, step)

  def read_stage_spec(self, step: int) -> dict[str, Any] | None:
    """The stage spec saved with `step`; None for a step saved before that item existed."""
    if not (epath.Path(self.directory) / str(step) / "stage_spec").exists():
      return None
    return self._restore_items(step, stage_spec=ocp.args.JsonRestore())["stage_spec"]

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
