"""The embedding precompute job: source -> frozen T5 encoder -> sharded TFRecords + manifest.

Two ways in. `--source=NAME` reads a prepared TFDS split by record index (shapes,
image_text_folder, coco_captions, ...). `--task=NAME` / `--mixture=NAME` read a registered seqio
Task or Mixture (built-in `imagen_*` tasks, or the user's own from `--module`), whose
preprocessors tokenize and filter; `--source=webdataset` is `--task=imagen_webdataset`.

A seqio dataset is a stream, so a task job is planned on stream positions: the stream is the
task's unshuffled single epoch (a mixture's is sampled at its rates with `--seed`, see
`tasks.stream`), cut to its first `--num_examples` examples. A counting pass measures its length
T <= num_examples first, so every host plans the same shards without talking to the others;
shard s holds stream positions [s * per_shard, ...) and its sidecar records that range, so reruns
and hosts agree and a rerun checks and resumes exactly as for a TFDS split. Each host reads the
stream from the start up to its last shard (reading is cheap next to encoding).

Work is cut into shards of `examples_per_shard` source examples in the source's on-disk order;
process p of P writes shards p, p + P, p + 2P, ... (at least one each). The frozen encoder is
sharded over the process's local devices only: hosts never talk to each other, so one slow or
restarted host does not stall the rest. A rerun skips shards already complete once they pass
cheap checks (sidecar index, file size, record count, source range), and with `verify` also
their CRCs; a shard that fails is rewritten, one log line saying why.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

from imagen_jax import errors
from imagen_jax.data import records, shards

logger = logging.getLogger(__name__)

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
      _fail(f"--after_shard={self.after_shard!r} is not MODULE:FUNCTION", "e.g. my_hooks:upload")
    _import_modules([module], flag="--after_shard")
    fn = getattr(sys.modules[module], name, None)
    if not callable(fn):
      _fail(f"--after_shard: module {module!r} has no function {name!r}", "name one it defines")
    return fn

  def validate(self) -> None:
    """Raises errors.UserError on bad arguments, before anything is loaded or written."""
    from imagen_jax.nn import t5

    self.shard_hook()  # imports the hook now: a bad one fails before any work

    named = (("--source", self.source), ("--task", self.task), ("--mixture", self.mixture))
    given = [flag for flag, value in named if value]
    if len(given) != 1:
      _fail(
        f"{' and '.join(given) + ' given together' if given else 'no data given'}",
        "pass exactly one of --source, --task, --mixture",
      )
    _check_minimums(
      ("--max_length", self.max_length, 1),
      ("--examples_per_shard", self.examples_per_shard, 1),
      ("--batch_size", self.batch_size, 1),
      ("--process_count", self.process_count, 1),
    )
    if not 0 <= self.process_index < self.process_count:
      _fail(
        f"--process_index={self.process_index} is not in [0, --process_count={self.process_count})",
        "number the hosts 0 .. process_count-1",
      )
    if self.t5_size not in t5.SIZES:
      _fail(f"--t5_size={self.t5_size!r} is not a T5 size", f"pass one of {', '.join(t5.SIZES)}")
    if not os.path.isfile(self.vocab):
      _fail(f"--vocab={self.vocab!r}: no such SentencePiece model file", "pass the .model file")
    if self.t5_checkpoint != RANDOM_WEIGHTS and not os.path.exists(self.t5_checkpoint):
      _fail(
        f"--t5_checkpoint={self.t5_checkpoint!r} does not exist",
        f"pass a T5X / HF checkpoint, or {RANDOM_WEIGHTS!r} for random weights",
      )
    if not self.splits or len(set(self.splits)) != len(self.splits):
      _fail(f"--split={list(self.splits)}", "give each split once, at least one")
    _check_out_dir(self.out)
    if self.uses_tasks:
      self._validate_filters()
    elif self.source == "shapes":
      self._validate_shapes()
    elif self.source == "image_text_folder":
      _check_source_folder("--source=image_text_folder", self.source_dir)
      from imagen_jax.data import image_text_folder

      self._check_splits(sorted(image_text_folder.list_splits(self.source_dir)))
    elif self.tfds_data_dir is not None and not os.path.isdir(self.tfds_data_dir):
      _fail(
        f"--tfds_data_dir={self.tfds_data_dir!r} does not exist",
        f"pass the TFDS data dir holding {self.source!r}",
      )

  def _validate_filters(self) -> None:
    _check_minimums(
      ("--num_examples", self.num_examples, 1),
      ("--seed", self.seed, 0),
      ("--min_image_size", self.min_image_size, 0),
      ("--min_caption_length", self.min_caption_length, 0),
      ("--max_caption_length", self.max_caption_length, 0),
    )
    if self.max_aspect_ratio and self.max_aspect_ratio < 1:
      _fail(f"--max_aspect_ratio={self.max_aspect_ratio} is below 1", "pass 0 (off) or >= 1")
    if self.max_caption_length and self.max_caption_length < self.min_caption_length:
      _fail(
        f"--max_caption_length={self.max_caption_length} < --min_caption_length="
        f"{self.min_caption_length}",
        "pass 0 (no limit) or a larger maximum",
      )

  def _validate_shapes(self) -> None:
    _check_minimums(
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
      _fail(
        f"--split={missing[0]} is not a split of --source={self.source}{why}",
        f"pick from {', '.join(available)}",
      )


def _fail(problem: str, fix: str) -> NoReturn:
  raise errors.UserError(f"{problem}; fix: {fix}")


def _check_minimums(*checks: tuple[str, float, int], context: str = "") -> None:
  """Each (flag, value, lowest allowed value)."""
  for flag, value, low in checks:
    if value < low:
      _fail(f"{flag}={value} is out of range{context}", f"pass {flag}={low} or more")


def _check_source_folder(what: str, source_dir: str | None) -> None:
  """An image_text_folder job (--source or the built-in task, named by `what`) needs its folder."""
  if not source_dir or not os.path.isdir(source_dir):
    _fail(
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


def prepare_source(cfg: PrecomputeConfig) -> str:
  """Builds (shapes / image_text_folder) or finds (other TFDS names) the source dataset.

  Returns:
    The TFDS dataset directory (holding dataset_info.json).
  """
  import tensorflow_datasets as tfds

  # TFDS draws its own bars while building; --no_progress silences them too.
  tfds.display_progress_bar(cfg.progress)
  tfds_dir = cfg.tfds_data_dir or os.path.join(cfg.out, "tfds")
  if cfg.source in BUILTIN_SOURCES and cfg.process_index != 0:
    # Process 0 builds; the others wait for it rather than racing on the same directory.
    return _wait_for_tfds(tfds_dir, cfg.source)
  if cfg.source == "shapes":
    from imagen_jax.data import shapes

    builder = shapes.build(
      tfds_dir, cfg.resolution, cfg.num_examples, cfg.num_validation, seed=cfg.seed
    )
    return os.fspath(builder.data_path)
  if cfg.source == "image_text_folder":
    from imagen_jax.data import image_text_folder

    builder = image_text_folder.build(cfg.source_dir, tfds_dir)
    return os.fspath(builder.data_path)
  return records.find_tfds_dir(_tfds_data_dir(cfg), cfg.source)


def _tfds_data_dir(cfg: PrecomputeConfig) -> str:
  """Where prepared TFDS datasets are looked up: --tfds_data_dir, else TFDS's own default."""
  return cfg.tfds_data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def _wait_for_tfds(tfds_dir: str, name: str, timeout_s: float = 3600) -> str:
  deadline = time.time() + timeout_s
  while True:
    try:
      return records.find_tfds_dir(tfds_dir, name)
    except FileNotFoundError:
      if time.time() > deadline:
        raise
      time.sleep(5)


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, reading only its header."""
  from PIL import Image

  with Image.open(io.BytesIO(data)) as im:
    return im.height, im.width


def plan_shards(num_examples: int, examples_per_shard: int, process_count: int) -> list[range]:
  """Source-example ranges of every shard; shrinks shards so each process gets at least one.

  Raises:
    ValueError: fewer examples than processes.
  """
  if num_examples < process_count:
    raise ValueError(
      f"{num_examples} examples cannot give each of {process_count} processes a shard"
    )
  per_shard = min(examples_per_shard, math.ceil(num_examples / process_count))
  num_shards = max(math.ceil(num_examples / per_shard), process_count)
  bounds = [min(num_examples, i * per_shard) for i in range(num_shards + 1)]
  return [range(bounds[i], bounds[i + 1]) for i in range(num_shards)]


class _Progress:
  """tqdm bar with examples/s and ETA (or periodic log lines without a terminal)."""

  def __init__(self, total: int, enabled: bool):
    self.start = time.time()
    self.count = 0
    self.bar = None
    if enabled:
      from tqdm import tqdm

      self.bar = tqdm(total=total, unit="ex", desc="precompute", smoothing=0.1)

  def update(self, n: int) -> None:
    self.count += n
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> float:
    if self.bar is not None:
      self.bar.close()
    elapsed = max(time.time() - self.start, 1e-9)
    return self.count / elapsed


def run_precompute(cfg: PrecomputeConfig, encoder: Any = None) -> dict[str, Any]:
  """Runs the whole job for this process.

  Args:
    cfg: the job.
    encoder: an already loaded TextEncoder (tests); by default loaded from cfg.

  Returns:
    The manifest, plus 'stats' {'examples', 'seconds', 'examples_per_s', 'bytes_written',
    'shards_written', 'shards_skipped', 'shards_rewritten', 'rewritten': [(name, reason)]} for
    this process.
  """
  from imagen_jax.text import vocabulary

  cfg.validate()
  if cfg.uses_tasks:
    return _run_tasks(cfg, encoder)
  vocab = vocabulary.load_vocabulary(cfg.vocab)
  vocab_sha = vocabulary.file_sha256(cfg.vocab)
  previous = _previous_manifest(cfg, vocab_sha)
  # A prepared TFDS source is only looked up: it and its splits are checked before any write.
  prepared = cfg.source not in BUILTIN_SOURCES
  if prepared:
    tfds_dir, sources = _open_sources(cfg)
  # Every check above reads only; from here on the job writes.
  errors.check_writable_dir(cfg.out, "--out")
  if not prepared:
    tfds_dir, sources = _open_sources(cfg)
  sizes = {split: len(src) for split, src in sources.items()}
  plans, todo, skipped, rewritten, encoder, progress = _plan(cfg, sizes, previous, encoder)
  written_bytes, written = 0, 0
  after_shard = cfg.shard_hook()
  t0 = time.time()
  for split, s, path in todo:
    payloads, image_sizes = _encode_range(
      sources[split], plans[split][s], vocab, encoder, cfg, progress
    )
    meta = shards.write_shard(path, payloads, image_sizes, source=plans[split][s])
    written_bytes += meta["size_bytes"]
    written += 1
    after_shard(path)
  seconds = time.time() - t0
  splits = _split_entries(cfg, plans, sizes)
  available = next(iter(sources.values())).available_splits
  # The source's splits: a 'validation' missing here was not built (--num_validation=0).
  source = {"name": cfg.source, "tfds_dir": tfds_dir, "seed": cfg.seed, "splits": available}
  manifest = _manifest(cfg, encoder, vocab_sha, source, splits)
  return _finish(
    cfg, manifest, previous, progress, seconds, written_bytes, written, skipped, rewritten
  )


def _finish(cfg, manifest, previous, progress, seconds, written_bytes, written, skipped, rewritten):
  """Copies the vocabulary, writes the manifest; returns it with this process's 'stats'."""
  rate = progress.close()
  # One copier (process 0, which every precompute has), so one writer of each copy.
  manifest["vocab_files"] = _copy_vocabulary(cfg.vocab, cfg.out, copy=cfg.process_index == 0)
  if previous is not None and "flags" in previous:
    # Same flags (checked): the splits an earlier run wrote and this one did not stay listed.
    for split, entry in previous["splits"].items():
      manifest["splits"].setdefault(split, entry)
  # Every process writes the manifest when it finishes (the last one has every count).
  manifest_path = os.path.join(cfg.out, shards.MANIFEST)
  shards.atomic_write_text(manifest_path, _dumps(manifest), writer=f"p{cfg.process_index}-")
  examples = progress.count
  manifest["stats"] = {
    "examples": examples,
    "seconds": seconds,
    "examples_per_s": rate if examples else 0.0,
    "bytes_written": written_bytes,
    "bytes_per_example": written_bytes / examples if examples else 0.0,
    "shards_written": written,
    "shards_skipped": skipped,
    "shards_rewritten": len(rewritten),
    "rewritten": rewritten,
  }
  return manifest


def _plan(cfg: PrecomputeConfig, sizes: dict[str, int], previous, encoder):
  """Shard plans of splits of `sizes` examples, this process's work, the encoder, a progress bar.

  Returns:
    (plans, todo, shards skipped, shards rewritten, encoder, progress).
  """
  plans = {
    split: plan_shards(n, cfg.examples_per_shard, cfg.process_count) for split, n in sizes.items()
  }
  todo, skipped, rewritten = _plan_work(cfg, plans, previous)
  total = sum(len(plans[split][s]) for split, s, _ in todo)
  encoder = _encoder_for(cfg, encoder, todo, skipped, rewritten, previous)
  return plans, todo, skipped, rewritten, encoder, _Progress(total, cfg.progress)


def _encoder_for(cfg, encoder, todo, skipped: int, rewritten: list, previous):
  """The encoder to use: `encoder`, loaded from cfg, or (nothing to encode) the previous facts."""
  logger.info(
    "precompute: %d shards to write (%d rewritten), %d already complete",
    len(todo),
    len(rewritten),
    skipped,
  )
  if encoder is None:
    # Nothing to encode (a rerun that only checked): the previous run's manifest, made with
    # these very flags, already says what the manifest needs of the encoder.
    reuse = not todo and previous is not None and "flags" in previous
    encoder = _EncoderFacts(previous) if reuse else _load_encoder(cfg)
  if encoder.max_length != cfg.max_length:
    raise errors.UserError(
      f"the text encoder's max_length {encoder.max_length} != --max_length={cfg.max_length}; "
      "fix: pass the same length to both"
    )
  return encoder


def _open_sources(cfg: PrecomputeConfig) -> tuple[str, dict[str, records.TfdsSource]]:
  tfds_dir = prepare_source(cfg)
  return tfds_dir, {split: records.TfdsSource(tfds_dir, split) for split in cfg.splits}


def _plan_work(
  cfg: PrecomputeConfig, plans: dict[str, list[range]], previous: dict[str, Any] | None
) -> tuple[list[tuple[str, int, str]], int, list[tuple[str, str]]]:
  """This process's shards to write, how many are already complete, and the bad ones.

  Returns:
    ([(split, shard index, path)] to write, number skipped, [(shard name, why rewritten)]).
  """
  import tensorflow as tf

  todo, skipped, rewritten = [], 0, []
  for split, plan in plans.items():
    counts = _recorded_counts(previous, split, len(plan))
    for s in range(cfg.process_index, len(plan), cfg.process_count):
      name = shards.shard_name(split, s, len(plan))
      path = os.path.join(cfg.out, name)
      # Leftovers of a killed run (the shard's and its sidecar's temporary files) go now, even
      # for a shard that is complete and will not be written again.
      shards.remove_temporaries(path)
      shards.remove_temporaries(path + ".json")
      if tf.io.gfile.exists(path):
        problem = shards.shard_problem(
          path, num_records=counts[s], source=plan[s], check_crc=cfg.verify
        )
        if problem is None:
          skipped += 1
          continue
        logger.warning("precompute: rewriting %s: %s", name, problem)
        rewritten.append((name, problem))
        # Removed now, not replaced at its turn: if the job dies before then, the shard reads
        # as unfinished and a plain rerun writes it.
        tf.io.gfile.remove(path)
      todo.append((split, s, path))
  return todo, skipped, rewritten


def _recorded_counts(previous: dict[str, Any] | None, split: str, num_shards: int) -> list:
  """Per-shard record counts of the previous manifest (None where unknown)."""
  entry = (previous or {}).get("splits", {}).get(split, {})
  counts = entry.get("shard_records")
  if entry.get("num_shards") != num_shards or not isinstance(counts, list):
    return [None] * num_shards
  return [c if isinstance(c, int) else None for c in counts] + [None] * (num_shards - len(counts))


# Flags that decide what the shards hold: a rerun must repeat them (the others may change).
_SHARD_FLAGS = (
  "source",
  "source_dir",
  "t5_checkpoint",
  "t5_size",
  "max_length",
  "examples_per_shard",
  "num_examples",
  "num_validation",
  "resolution",
  "seed",
  "process_count",
)


# The same for a task job (what the task yields is the task's code: its module is recorded).
_TASK_SHARD_FLAGS = (
  "source",
  "task",
  "mixture",
  "modules",
  "source_dir",
  "min_image_size",
  "max_aspect_ratio",
  "min_caption_length",
  "max_caption_length",
  "t5_checkpoint",
  "t5_size",
  "max_length",
  "examples_per_shard",
  "num_examples",
  # The mixture's sampling seed; for imagen_shapes also its generator's, with the two below.
  "seed",
  "num_validation",
  "resolution",
  "process_count",
)


def shard_flags(cfg: PrecomputeConfig) -> dict[str, Any]:
  """The flags that decide the shards' contents (recorded in the manifest)."""
  if cfg.uses_tasks:
    out = {name: getattr(cfg, name) for name in _TASK_SHARD_FLAGS}
    out["modules"] = list(cfg.modules)
    for name in ("source_dir", "t5_checkpoint"):
      if out[name] not in (None, RANDOM_WEIGHTS):
        out[name] = _abs(out[name])
    return out
  out = {}
  for name in _SHARD_FLAGS:
    value = getattr(cfg, name)
    if name in ("num_examples", "num_validation", "resolution", "seed") and cfg.source != "shapes":
      continue  # the shapes generator's flags
    if name in ("source_dir", "t5_checkpoint") and value not in (None, RANDOM_WEIGHTS):
      value = _abs(value)
    out[name] = value
  return out


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def command(cfg: PrecomputeConfig) -> str:
  """The `imagen-jax precompute` command line that repeats `cfg` on every host (it resumes)."""
  import shlex

  if cfg.uses_tasks:
    named = {k: getattr(cfg, k) for k in ("source", "task", "mixture")}
    skip = ("source", "task", "mixture", "modules", "source_dir")
  else:
    named = {"source": cfg.source}
    skip = ("source", "source_dir")
  flags = {
    **named,
    "source_dir": cfg.source_dir and _abs(cfg.source_dir),
    "tfds_data_dir": cfg.tfds_data_dir and _abs(cfg.tfds_data_dir),
    "out": _abs(cfg.out),
    "vocab": _abs(cfg.vocab),
    **{k: v for k, v in shard_flags(cfg).items() if k not in skip},
    "batch_size": cfg.batch_size,
  }
  # Every host reruns it with its own --process_index (jax's by default).
  if cfg.process_count == 1:
    del flags["process_count"]
  parts = ["imagen-jax", "precompute"]
  parts += [f"--{k}={shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
  parts += [f"--module={shlex.quote(m)}" for m in cfg.modules]
  parts += [f"--split={shlex.quote(s)}" for s in cfg.splits]
  if cfg.after_shard:
    parts.append(f"--after_shard={shlex.quote(cfg.after_shard)}")
  return " ".join(parts)


def _previous_manifest(cfg: PrecomputeConfig, vocab_sha: str) -> dict[str, Any] | None:
  """The manifest a previous run left in --out, checked to be of the same flags.

  Raises:
    errors.UserError: --out holds shards of other flags (a rerun would mix the two).
  """
  try:
    previous = shards.read_manifest(cfg.out)
  except (FileNotFoundError, ValueError):
    return None  # none yet, or unreadable: the shards' own checks decide
  had = previous.get("flags")
  if not isinstance(had, dict):
    return previous  # written before manifests recorded flags
  if "t5_checkpoint" in had:  # manifests of the old spelling resume under the new one
    had = {**had, "t5_checkpoint": canonical_t5_checkpoint(had["t5_checkpoint"])}
  now = shard_flags(cfg)
  diffs = [f"--{k}={had.get(k)!r} then, {now.get(k)!r} now" for k in now if had.get(k) != now[k]]
  if previous.get("vocab_sha256") not in (None, vocab_sha):
    diffs.append("--vocab: another vocabulary (sha256 differs)")
  if diffs:
    raise errors.UserError(
      f"--out={cfg.out!r} holds shards precomputed with other flags ({'; '.join(diffs)}); "
      f"fix: rerun with the original flags ({previous.get('command', 'see its manifest.json')}) "
      "or choose a new --out"
    )
  return previous


class _EncoderFacts:
  """What the manifest needs of the encoder, from the previous manifest, when none was loaded."""

  def __init__(self, previous: dict[str, Any]):
    self.max_length = int(previous["max_length"])
    self.width = int(previous["embedding_width"])
    self._identity = dict(previous["encoder"])

  def identity(self) -> dict[str, Any]:
    return self._identity


def _copy_vocabulary(vocab: str, out: str, copy: bool = True) -> list[str]:
  """Copies the SentencePiece .model (and .vocab beside it) into `out`, so `sample` finds it.

  Returns:
    The copies' names (also when `copy` is False: another process makes them).
  """
  import tensorflow as tf

  sources = [vocab]
  if vocab.endswith(".model") and os.path.isfile(vocab[: -len(".model")] + ".vocab"):
    sources.append(vocab[: -len(".model")] + ".vocab")
  names = []
  for src in sources:
    name = os.path.basename(src)
    dst = os.path.join(out, name)
    names.append(name)
    if not copy or _abs(dst) == _abs(src):
      continue
    if tf.io.gfile.exists(dst) and _read(dst) == _read(src):
      continue
    tmp = shards.temporary_path(dst)
    tf.io.gfile.copy(src, tmp)
    tf.io.gfile.rename(tmp, dst, overwrite=True)
  return names


def _read(path: str) -> bytes:
  import tensorflow as tf

  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def _dumps(obj: Any) -> str:
  import json

  return json.dumps(obj, indent=1, sort_keys=True)


def _load_encoder(cfg: PrecomputeConfig):
  import jax

  from imagen_jax import parallel
  from imagen_jax.text import encoder as text_encoder

  # Random weights (demos, tests): the manifest's encoder identity records it.
  checkpoint = None if cfg.t5_checkpoint == RANDOM_WEIGHTS else cfg.t5_checkpoint
  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices())
  return text_encoder.load_text_encoder(
    checkpoint,
    cfg.vocab,
    size=cfg.t5_size,
    max_length=cfg.max_length,
    mesh=mesh,
    zero_padding=cfg.t5_padding == "zero",
  )


def _encode_range(source, indices: range, vocab, encoder, cfg: PrecomputeConfig, progress):
  """Reads, tokenizes and encodes the source examples `indices` into shard records."""
  from imagen_jax.text import vocabulary

  pairs = []
  for i in indices:
    try:
      pairs.extend(source.pairs(i))
    except records.CorruptRecordError as e:
      logger.warning("skipping corrupt source record %d of %s: %s", i, source.split, e)
  tokens = vocabulary.tokenize(vocab, [c for _, c, _ in pairs], cfg.max_length)
  rows = [
    (key, text, image, image_size(image), tokens[j]) for j, (key, text, image) in enumerate(pairs)
  ]
  return _encode_rows(rows, encoder, cfg, progress)


def _encode_rows(
  rows: Sequence[tuple[str, str, bytes, tuple[int, int], np.ndarray]],
  encoder,
  cfg: PrecomputeConfig,
  progress,
) -> tuple[list[bytes], list[tuple[int, int]]]:
  """Encodes (key, caption, image bytes, (height, width), tokens) rows into shard records.

  Returns:
    (payloads, image sizes), in the rows' order.
  """
  payloads, sizes = [], []
  batch = _encode_batch_size(cfg.batch_size)
  for start in range(0, len(rows), batch):
    chunk = rows[start : start + batch]
    # A fixed batch shape: the last, short batch is padded so the encoder never recompiles.
    padded = np.zeros((batch, cfg.max_length), np.int32)
    for j, row in enumerate(chunk):
      tokens = row[4][: cfg.max_length]
      padded[j, : len(tokens)] = tokens
    emb, mask = encoder.encode_tokens(padded)
    emb, mask = np.asarray(emb), np.asarray(mask)
    for j, (key, caption, image, (h, w), _) in enumerate(chunk):
      n = int(mask[j].sum())
      sizes.append((h, w))
      payloads.append(
        shards.make_record(key, caption, image, h, w, padded[j, :n], emb[j, :n].astype(np.float32))
      )
    progress.update(len(chunk))
  return payloads, sizes


def _encode_batch_size(batch_size: int) -> int:
  import jax

  n = jax.local_device_count()
  return max(n, math.ceil(batch_size / n) * n)


def _shard_metas(out: str, names: list[str]) -> list[dict[str, Any] | None]:
  """Each shard's sidecar; None for a shard not (yet) complete, e.g. another process's."""
  metas = []
  for name in names:
    try:
      metas.append(shards.read_shard_meta(os.path.join(out, name)))
    except (FileNotFoundError, ValueError):
      metas.append(None)
  return metas


def _split_entries(
  cfg, plans, num_source: dict[str, int], summed: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
  """The manifest's per-split entries: shards and record counts, and the sums over the shards
  of the sidecars' {name: count} fields `summed` (each sidecar is read once for all of them)."""
  splits = {}
  for split, plan in plans.items():
    names = [shards.shard_name(split, s, len(plan)) for s in range(len(plan))]
    metas = _shard_metas(cfg.out, names)
    counts = [None if meta is None else int(meta["num_records"]) for meta in metas]
    splits[split] = {
      "num_source_examples": num_source[split],
      # None while another process is still writing some of the shards.
      "num_records": None if None in counts else sum(counts),
      "num_shards": len(plan),
      "shards": names,
      "shard_records": counts,
      **{field: _sum_field(metas, field) for field in summed},
    }
  return splits


def _manifest(cfg, encoder, vocab_sha, source, splits) -> dict[str, Any]:
  return {
    "format": shards.FORMAT,
    "encoder": dict(encoder.identity()),
    "vocab_sha256": vocab_sha,
    "vocab_file": os.path.basename(cfg.vocab),
    # Copies beside the shards (filled in by _finish): `sample` finds the vocabulary there.
    "vocab_files": [],
    "max_length": cfg.max_length,
    "embedding_width": int(encoder.width),
    "embedding_dtype": "bfloat16",
    "embedding_holds": "real tokens only (EOS included); re-pad to max_length with zeros",
    "source": source,
    "examples_per_shard": cfg.examples_per_shard,
    "process_count": cfg.process_count,
    "splits": splits,
    "flags": shard_flags(cfg),
    # What repairs these shards: rerun it (add --verify to also check every record's CRCs).
    "command": command(cfg),
  }


# ----------------------------------------------------------------------------------------------
# Task / Mixture jobs
# ----------------------------------------------------------------------------------------------


def _run_tasks(cfg: PrecomputeConfig, encoder: Any = None) -> dict[str, Any]:
  """run_precompute for --task / --mixture (see the module docstring for the plan)."""
  from imagen_jax.text import vocabulary

  vocab_sha = vocabulary.file_sha256(cfg.vocab)
  provider, tasks_read = resolve_provider(cfg)
  previous = _previous_manifest(cfg, vocab_sha)
  # Every check above reads only; from here on the job writes (a built-in TFDS source builds).
  errors.check_writable_dir(cfg.out, "--out")
  lengths = {split: _stream_length(cfg, provider, split, previous) for split in cfg.splits}
  sizes = {split: n for split, (n, _) in lengths.items()}
  plans, todo, skipped, rewritten, encoder, progress = _plan(cfg, sizes, previous, encoder)
  written_bytes, written = 0, 0
  t0 = time.time()
  for split in cfg.splits:
    mine = {s: path for sp, s, path in todo if sp == split}
    if mine:
      b, n = _write_stream(
        cfg, provider, split, plans[split], mine, lengths[split][1], encoder, progress
      )
      written_bytes, written = written_bytes + b, written + n
  seconds = time.time() - t0
  manifest = _task_manifest(cfg, provider, tasks_read, lengths, plans, encoder, vocab_sha)
  return _finish(
    cfg, manifest, previous, progress, seconds, written_bytes, written, skipped, rewritten
  )


def resolve_provider(cfg: PrecomputeConfig) -> tuple[Any, list[str]]:
  """Registers the built-in tasks, imports --module, looks the Task / Mixture up and checks it.

  Returns:
    (the seqio Task or Mixture, the names of the Tasks it reads for cfg.splits).

  Raises:
    errors.UserError: unknown name, a module that does not import, a split it lacks, no
      'text_tokens' feature of this vocabulary, a built-in task's missing input.
  """
  import seqio

  from imagen_jax.data import tasks

  tasks.register_builtin_tasks(_builtin_inputs(cfg))
  _import_modules(cfg.modules)
  name = cfg.provider_name
  flag = cfg.provider_flag
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    _fail(
      f"{flag} is not a registered seqio Task or Mixture",
      f"register it in a module passed with --module=MODULE, or pick one of {shown}",
    )
  is_mixture = isinstance(provider, seqio.Mixture)
  if cfg.task and is_mixture:
    _fail(f"{flag} is a Mixture", f"pass --mixture={name}")
  if cfg.mixture and not is_mixture:
    _fail(f"{flag} is a Task", f"pass --task={name}")
  for split in cfg.splits:
    if split not in provider.splits:
      _fail(
        f"--split={split} is not a split of {flag}",
        f"pick from {', '.join(sorted(provider.splits))}",
      )
  feature = provider.output_features.get(tasks.TEXT_FEATURE)
  if feature is None:
    _fail(
      f"{flag} has no {tasks.TEXT_FEATURE!r} output feature (has {sorted(provider.output_features)})",
      "tokenize the caption into 'text_tokens' (tasks.token_preprocessors())",
    )
  _check_vocabulary(cfg, flag, feature.vocabulary)
  names = sorted({t.name for split in cfg.splits for t in tasks.leaf_tasks(provider, split)})
  for task_name in names:
    if task_name in tasks.BUILTIN_TASKS:
      _check_builtin_input(cfg, task_name)
  return provider, names


def _import_modules(modules: Sequence[str], flag: str = "--module") -> None:
  import importlib

  # t5x style: modules next to where the job runs import without a PYTHONPATH entry.
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  for module in modules:
    try:
      importlib.import_module(module)
    except Exception as e:  # the user's code: any failure is theirs to fix
      first = (str(e).strip().splitlines() or [""])[0]
      _fail(
        f"{flag}={module} failed to import ({type(e).__name__}: {first})",
        f"make `python -c 'import {module}'` work (PYTHONPATH, or run from its directory)",
      )


def _check_vocabulary(cfg: PrecomputeConfig, flag: str, vocab: Any) -> None:
  """The task's tokens must be ids of --vocab: the encoder's embedding table is --vocab's."""
  from imagen_jax.text import vocabulary

  path = getattr(vocab, "sentencepiece_model_file", None)
  if path and os.path.isfile(path):
    same = vocabulary.file_sha256(path) == vocabulary.file_sha256(cfg.vocab)
  else:
    same = vocab.vocab_size == vocabulary.load_vocabulary(cfg.vocab).vocab_size
  if not same:
    _fail(
      f"{flag} tokenizes with another vocabulary ({path or vocab}) than --vocab={cfg.vocab!r}",
      "build the task's output feature with the --vocab model (or pass that model as --vocab)",
    )


def _builtin_inputs(cfg: PrecomputeConfig):
  from imagen_jax.data import image_text_folder, tasks

  prepared: dict[str, str] = {}

  def tfds_dir(source: str) -> str:
    if source not in prepared:
      prepared[source] = prepare_source(dataclasses.replace(cfg, source=source, task=None))
    return prepared[source]

  folder_splits = ["train"]
  if cfg.source_dir and os.path.isdir(cfg.source_dir):
    folder_splits = sorted(image_text_folder.list_splits(cfg.source_dir))
  return tasks.BuiltinInputs(
    vocab=cfg.vocab,
    tfds_dir=tfds_dir,
    shapes_splits=cfg.shapes_splits,
    image_text_folder_splits=folder_splits,
    source_dir=cfg.source_dir,
    min_image_size=cfg.min_image_size,
    max_aspect_ratio=cfg.max_aspect_ratio,
    min_caption_length=cfg.min_caption_length,
    max_caption_length=cfg.max_caption_length,
  )


def _check_builtin_input(cfg: PrecomputeConfig, name: str) -> None:
  """What a built-in task reads exists (read-only checks)."""
  from imagen_jax.data import webdataset

  if name == "imagen_shapes":
    _check_minimums(
      ("--num_validation", cfg.num_validation, 0),
      ("--resolution", cfg.resolution, 8),
      context=" for imagen_shapes",
    )
  elif name == "imagen_image_text_folder":
    _check_source_folder(name, cfg.source_dir)
  elif name == "imagen_webdataset":
    if not cfg.source_dir:
      _fail(f"{name} needs tar shards; no --source_dir given", "pass --source_dir=DIR or a glob")
    try:
      webdataset.list_tars(cfg.source_dir)
    except FileNotFoundError as e:
      _fail(
        f"{name}: {e} (--source_dir)",
        "pass a directory or glob of webdataset .tar shards (key.jpg + key.txt [+ key.json])",
      )
  elif name == "imagen_coco_captions":
    try:
      records.find_tfds_dir(_tfds_data_dir(cfg), "coco_captions")
    except FileNotFoundError as e:
      _fail(f"{name}: {e}", "prepare coco_captions with TFDS, and pass its --tfds_data_dir")


def _stream_length(cfg: PrecomputeConfig, provider, split: str, previous) -> tuple[int, bool]:
  """(T = examples the job takes, whether the stream ended before --num_examples).

  Counted by reading the stream (once per run; a complete earlier run's count is reused: same
  flags, checked).
  """
  from imagen_jax.data import tasks

  entry = ((previous or {}).get("flags") and previous["splits"].get(split)) or {}
  if isinstance(entry.get("num_source_examples"), int) and "stream_exhausted" in entry:
    return entry["num_source_examples"], bool(entry["stream_exhausted"])
  try:
    ds, _ = tasks.stream(provider, split, cfg.max_length, cfg.seed)
  except ValueError as e:
    _fail(f"{cfg.provider_flag}: {e}", "yield 'caption', 'image' and 'text_tokens'")
  n = 0
  # Only a scalar per example crosses into Python; the stream is read to --num_examples + 1.
  for _ in ds.take(cfg.num_examples + 1).map(lambda ex: ex["task"]).as_numpy_iterator():
    n += 1
  count = min(n, cfg.num_examples)
  if count < cfg.process_count:
    _fail(
      f"{cfg.provider_flag} yields {count} examples for split {split!r}, fewer than "
      f"--process_count={cfg.process_count}",
      "check the data and its filters (the manifest of a run lists what was skipped)",
    )
  logger.info("precompute: %s %s: %d examples", cfg.provider_flag, split, count)
  return count, n <= cfg.num_examples


def _write_stream(cfg, provider, split, plan, mine, exhausted, encoder, progress):
  """Reads the stream once, encoding and writing this process's shards `mine` {s: path}.

  Returns:
    (bytes written, shards written).
  """
  import bisect

  import seqio

  from imagen_jax.data import tasks

  ds, leaf = tasks.stream(provider, split, cfg.max_length, cfg.seed)
  names = [t.name for t in leaf]
  tallies = [getattr(t.source, "tally", None) for t in leaf]
  mixture = isinstance(provider, seqio.Mixture)
  # A single task that ran out: the last shard also owns the skipped groups after its last
  # example (read to the end so the source has seen them all).
  tail_shard = len(plan) - 1 if exhausted and not mixture else None
  ds = ds if tail_shard is not None else ds.take(plan[-1].stop)
  starts = [r.start for r in plan]
  last = max(mine)
  written_bytes, written = 0, 0
  after_shard = cfg.shard_hook()
  prev = [-1] * len(leaf)  # each task's last source index before the current shard
  cur = list(prev)
  per_task = [0] * len(leaf)
  buffer: list[dict[str, Any]] = []
  pending = None

  def flush(s, examples, prev, cur, per_task, tail):
    nonlocal written_bytes, written
    skipped = _skipped(tallies, prev, cur, per_task, tail)
    payloads, sizes, counts = _encode_examples(
      examples, names, mixture, encoder, cfg, progress, skipped
    )
    extra = {"task_records": counts, "skipped": skipped}
    meta = shards.write_shard(mine[s], payloads, sizes, source=plan[s], extra=extra)
    written_bytes += meta["size_bytes"]
    written += 1
    after_shard(mine[s])

  for i, ex in enumerate(ds.as_numpy_iterator()):
    s = bisect.bisect_right(starts, i) - 1
    t = int(ex["task"])
    cur[t] = max(cur[t], int(ex["source_index"]))
    per_task[t] += 1
    if s in mine:
      buffer.append(ex)
    if i != plan[s].stop - 1:
      continue
    if s == tail_shard:
      pending = (s, buffer, list(prev), list(cur), list(per_task))
    elif s in mine:
      flush(s, buffer, prev, cur, per_task, tail=False)
    prev, per_task, buffer = list(cur), [0] * len(leaf), []
    if s >= last and s != tail_shard:
      break
  if pending is not None and pending[0] in mine:
    flush(*pending, tail=True)
  return written_bytes, written


def _skipped(tallies, prev, cur, per_task, tail: bool) -> dict[str, int]:
  """Source groups of the shard's stretch that are no example: the source's skips by reason,
  plus 'filtered' (dropped by the task's preprocessors: the groups between source indices that
  neither became an example nor were skipped)."""
  out: dict[str, int] = {}
  for t, tally in enumerate(tallies):
    if tally is None:
      continue
    end = tally.total if tail and tally.total is not None else cur[t] + 1
    bad = tally.count(prev[t] + 1, end)
    for reason, n in bad.items():
      out[reason] = out.get(reason, 0) + n
    filtered = end - (prev[t] + 1) - per_task[t] - sum(bad.values())
    if filtered > 0:
      out["filtered"] = out.get("filtered", 0) + filtered
  return out


def _encode_examples(examples, names, mixture, encoder, cfg, progress, skipped):
  """Encodes stream examples (tokens are the task's own) into shard records.

  Returns:
    (payloads, image sizes, {task name: records}); undecodable images are left out and counted
    in `skipped`.
  """
  from imagen_jax.data import webdataset

  rows = []
  counts = {name: 0 for name in names}
  for ex in examples:
    try:
      size = image_size(ex["image"])
    except Exception:  # PIL raises many kinds on bad bytes; the example is skipped either way
      reason = webdataset.UNDECODABLE_IMAGE
      skipped[reason] = skipped.get(reason, 0) + 1
      logger.warning("precompute: skipping %s: undecodable image", ex["key"].decode())
      continue
    task = names[int(ex["task"])]
    key = ex["key"].decode("utf-8")
    caption = ex["caption"].decode("utf-8")
    rows.append(
      (f"{task}/{key}" if mixture else key, caption, ex["image"], size, ex["text_tokens"])
    )
    counts[task] += 1
  payloads, sizes = _encode_rows(rows, encoder, cfg, progress)
  return payloads, sizes, counts


def _sum_field(metas: list[dict[str, Any] | None], field: str) -> dict[str, int] | None:
  """Sum over the shards' sidecars of a {name: count} field; None while a shard is missing."""
  total: dict[str, int] = {}
  for meta in metas:
    if meta is None:
      return None
    for k, v in (meta.get(field) or {}).items():
      total[k] = total.get(k, 0) + int(v)
  return total


def _task_manifest(cfg, provider, tasks_read, lengths, plans, encoder, vocab_sha) -> dict[str, Any]:
  import seqio

  from imagen_jax.data import tasks

  # With sums of the shards' sidecars (None while another process is still writing some).
  num_source = {split: n for split, (n, _) in lengths.items()}
  splits = _split_entries(cfg, plans, num_source, summed=("task_records", "skipped"))
  for split, entry in splits.items():
    entry["stream_exhausted"] = lengths[split][1]
  is_mixture = isinstance(provider, seqio.Mixture)
  source = {
    "name": provider.name,
    "kind": "mixture" if is_mixture else "task",
    "tasks": tasks_read,
    "modules": list(cfg.modules),
    "seed": cfg.seed,
    "splits": sorted(provider.splits),
  }
  if is_mixture:
    leaf = {t.name: t for split in cfg.splits for t in tasks.leaf_tasks(provider, split)}
    source["rates"] = {name: provider.get_rate(t) for name, t in sorted(leaf.items())}
  return _manifest(cfg, encoder, vocab_sha, source, splits)
