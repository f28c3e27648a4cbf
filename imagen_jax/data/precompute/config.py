"""The precompute job's flags (`PrecomputeConfig`) and the checks that run before any work."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from imagen_jax import errors

BUILTIN_SOURCES = ("shapes", "image_text_folder")
# --t5_checkpoint for random weights, as `encode` and `sample` spell it; 'none' is the old spelling.
RANDOM_WEIGHTS = "random"
OLD_RANDOM_WEIGHTS = "none"


def canonical_t5_checkpoint(value: str | None) -> str | None:
  """The checkpoint flag with the old 'none' spelling of random weights read as 'random'."""
  return RANDOM_WEIGHTS if value == OLD_RANDOM_WEIGHTS else value


@dataclasses.dataclass
class PrecomputeConfig:
  """What to precompute; see `imagen-jax precompute --help` for each field."""

  out: str
  vocab: str
  # Exactly one of source / task / mixture.
  source: str | None = None
  task: str | None = None
  mixture: str | None = None
  # Imported before the task / mixture is looked up (they register the user's tasks).
  modules: Sequence[str] = ()
  # imagen_webdataset's filters (0 = off).
  min_image_size: int = 0
  max_aspect_ratio: float = 0.0
  min_caption_length: int = 0
  max_caption_length: int = 0
  t5_checkpoint: str = RANDOM_WEIGHTS
  t5_size: str = "base"
  max_length: int = 128
  t5_padding: str = "zero"  # 'zero' (Imagen) | 'keep' (DeepFloyd IF: T5's outputs at padding)
  examples_per_shard: int = 1024
  splits: Sequence[str] = ("train",)
  source_dir: str | None = None
  tfds_data_dir: str | None = None
  num_examples: int = 10_000
  num_validation: int = 1_000
  resolution: int = 64
  seed: int = 0
  batch_size: int = 64
  process_index: int = 0
  process_count: int = 1
  progress: bool = True
  # Also check every record's CRCs of the shards already complete (reads them all).
  verify: bool = False
  # 'MODULE:FUNCTION', called with each finished shard's path (e.g. to copy it elsewhere).
  after_shard: str | None = None

  @property
  def uses_tasks(self) -> bool:
    """True when the job reads a seqio Task / Mixture (--task, --mixture, --source=webdataset)."""
    return self.source is None or self.source == "webdataset"

  @property
  def provider_name(self) -> str:
    """The seqio Task or Mixture read (task jobs only)."""
    return self.task or self.mixture or "imagen_webdataset"

  @property
  def shapes_splits(self) -> list[str]:
    """The splits shapes builds: TFDS refuses an empty split, so --num_validation=0 has none."""
    return ["train", "validation"] if self.num_validation > 0 else ["train"]

  @property
  def provider_flag(self) -> str:
    """How the command line named it, e.g. "--task='x'"."""
    if self.source:
      return f"--source={self.source}"
    return f"--mixture={self.mixture!r}" if self.mixture else f"--task={self.task!r}"

  def shard_hook(self) -> Callable[[str], Any]:
    """The `after_shard` function (a no-op when unset).

    Raises:
      errors.UserError: its module does not import or lacks the function.
    """
    if not self.after_shard:
      return lambda path: None
    module, sep, name = self.after_shard.partition(":")
    if not sep or not module or not name:
      fail(f"--after_shard={self.after_shard!r} is not MODULE:FUNCTION", "e.g. my_hooks:upload")
    import_modules([module], flag="--after_shard")
    fn = getattr(sys.modules[module], name, None)
    if not callable(fn):
      fail(f"--after_shard: module {module!r} has no function {name!r}", "name one it defines")
    return fn

  def validate(self) -> None:
    """Raises errors.UserError on bad arguments, before anything is loaded or written."""
    from imagen_jax.nn import t5

    named = (("--source", self.source), ("--task", self.task), ("--mixture", self.mixture))
    given = [flag for flag, value in named if value]
    if len(given) != 1:
      fail(
        f"{' and '.join(given) + ' given together' if given else 'no data given'}",
        "pass exactly one of --source, --task, --mixture",
      )
    check_minimums(
      ("--max_length", self.max_length, 1),
      ("--examples_per_shard", self.examples_per_shard, 1),
      ("--batch_size", self.batch_size, 1),
      ("--process_count", self.process_count, 1),
    )
    if not 0 <= self.process_index < self.process_count:
      fail(
        f"--process_index={self.process_index} is not in [0, --process_count={self.process_count})",
        "number the hosts 0 .. process_count-1",
      )
    if self.t5_size not in t5.SIZES:
      fail(f"--t5_size={self.t5_size!r} is not a T5 size", f"pass one of {', '.join(t5.SIZES)}")
    if not os.path.isfile(self.vocab):
      fail(f"--vocab={self.vocab!r}: no such SentencePiece model file", "pass the .model file")
    if self.t5_checkpoint != RANDOM_WEIGHTS and not os.path.exists(self.t5_checkpoint):
      fail(
        f"--t5_checkpoint={self.t5_checkpoint!r} does not exist",
        f"pass a T5X / HF checkpoint, or {RANDOM_WEIGHTS!r} for random weights",
      )
    if not self.splits or len(set(self.splits)) != len(self.splits):
      fail(f"--split={list(self.splits)}", "give each split once, at least one")
    _check_out_dir(self.out)
    if self.uses_tasks:
      self._validate_filters()
    elif self.source == "shapes":
      self._validate_shapes()
    elif self.source == "image_text_folder":
      check_source_folder("--source=image_text_folder", self.source_dir)
      from imagen_jax.data import image_text_folder

      self._check_splits(sorted(image_text_folder.list_splits(self.source_dir)))
    elif self.tfds_data_dir is not None and not os.path.isdir(self.tfds_data_dir):
      fail(
        f"--tfds_data_dir={self.tfds_data_dir!r} does not exist",
        f"pass the TFDS data dir holding {self.source!r}",
      )
    self.shard_hook()  # imports the user's hook last, after the cheap checks, before any work

  def _validate_filters(self) -> None:
    check_minimums(
      ("--num_examples", self.num_examples, 1),
      ("--seed", self.seed, 0),
      ("--min_image_size", self.min_image_size, 0),
      ("--min_caption_length", self.min_caption_length, 0),
      ("--max_caption_length", self.max_caption_length, 0),
    )
    if self.max_aspect_ratio and self.max_aspect_ratio < 1:
      fail(f"--max_aspect_ratio={self.max_aspect_ratio} is below 1", "pass 0 (off) or >= 1")
    if self.max_caption_length and self.max_caption_length < self.min_caption_length:
      fail(
        f"--max_caption_length={self.max_caption_length} < --min_caption_length="
        f"{self.min_caption_length}",
        "pass 0 (no limit) or a larger maximum",
      )

  def _validate_shapes(self) -> None:
    check_minimums(
      ("--num_examples", self.num_examples, 1),
      ("--num_validation", self.num_validation, 0),
      ("--resolution", self.resolution, 8),
      ("--seed", self.seed, 0),
      context=" for shapes",
    )
    self._check_splits(self.shapes_splits)

  def _check_splits(self, available: list[str]) -> None:
    missing = [s for s in self.splits if s not in available]
    if missing:
      why = " (--num_validation=0)" if self.source == "shapes" and "validation" in missing else ""
      fail(
        f"--split={missing[0]} is not a split of --source={self.source}{why}",
        f"pick from {', '.join(available)}",
      )


def fail(problem: str, fix: str) -> NoReturn:
  raise errors.UserError(f"{problem}; fix: {fix}")


def check_minimums(*checks: tuple[str, float, int], context: str = "") -> None:
  """Each (flag, value, lowest allowed value)."""
  for flag, value, low in checks:
    if value < low:
      fail(f"{flag}={value} is out of range{context}", f"pass {flag}={low} or more")


def check_source_folder(what: str, source_dir: str | None) -> None:
  """An image_text_folder job (--source or the built-in task, named by `what`) needs its folder."""
  if not source_dir or not os.path.isdir(source_dir):
    fail(
      f"{what} needs a folder; --source_dir={source_dir!r} is not one",
      "pass --source_dir=FOLDER (images + captions)",
    )


def _check_out_dir(out: str) -> None:
  """--out must be a directory or creatable as one; checked without creating anything."""
  if "://" in out:
    return  # remote: its writer reports problems
  path = os.path.abspath(out)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
    what = "is not a directory" if path == os.path.abspath(out) else f"cannot be created in {path}"
    raise errors.UserError(
      f"--out={out!r} {what} (not a writable directory); fix: choose a directory you can write"
    )


def import_modules(modules: Sequence[str], flag: str = "--module") -> None:
  import importlib

  # t5x style: modules next to where the job runs import without a PYTHONPATH entry.
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  for module in modules:
    try:
      importlib.import_module(module)
    except Exception as e:  # the user's code: any failure is theirs to fix
      first = (str(e).strip().splitlines() or [""])[0]
      fail(
        f"{flag}={module} failed to import ({type(e).__name__}: {first})",
        f"make `python -c 'import {module}'` work (PYTHONPATH, or run from its directory)",
      )
