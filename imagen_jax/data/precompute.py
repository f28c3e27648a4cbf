"""The embedding precompute job: source -> frozen T5 encoder -> sharded TFRecords + manifest.

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
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from imagen_jax import errors
from imagen_jax.data import records, shards

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("shapes", "image_text_folder")


@dataclasses.dataclass
class PrecomputeConfig:
  """What to precompute; see `imagen-jax precompute --help` for each field."""

  source: str
  out: str
  vocab: str
  t5_checkpoint: str = "none"
  t5_size: str = "base"
  max_length: int = 128
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
  # Test hook: sleep this long after each shard, so a test can kill the job between shards.
  debug_shard_delay_s: float = 0.0

  def validate(self) -> None:
    """Raises errors.UserError on bad arguments, before anything is loaded or written."""
    from imagen_jax.nn import t5

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
    if self.t5_checkpoint != "none" and not os.path.exists(self.t5_checkpoint):
      _fail(
        f"--t5_checkpoint={self.t5_checkpoint!r} does not exist",
        "pass a T5X / HF checkpoint, or 'none' for random weights",
      )
    if not self.splits or len(set(self.splits)) != len(self.splits):
      _fail(f"--split={list(self.splits)}", "give each split once, at least one")
    _check_out_dir(self.out)
    if self.source == "shapes":
      self._validate_shapes()
    elif self.source == "image_text_folder":
      if not self.source_dir or not os.path.isdir(self.source_dir):
        _fail(
          f"--source=image_text_folder needs a folder; --source_dir={self.source_dir!r} is not one",
          "pass --source_dir=FOLDER (images + captions)",
        )
      from imagen_jax.data import image_text_folder

      self._check_splits(sorted(image_text_folder.list_splits(self.source_dir)))
    elif self.tfds_data_dir is not None and not os.path.isdir(self.tfds_data_dir):
      _fail(
        f"--tfds_data_dir={self.tfds_data_dir!r} does not exist",
        f"pass the TFDS data dir holding {self.source!r}",
      )

  def _validate_shapes(self) -> None:
    _check_minimums(
      ("--num_examples", self.num_examples, 1),
      ("--num_validation", self.num_validation, 0),
      ("--resolution", self.resolution, 8),
      ("--seed", self.seed, 0),
      context=" for shapes",
    )
    self._check_splits(["train", "validation"] if self.num_validation else ["train"])

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


def _check_minimums(*checks: tuple[str, int, int], context: str = "") -> None:
  """Each (flag, value, lowest allowed value)."""
  for flag, value, low in checks:
    if value < low:
      _fail(f"{flag}={value} is out of range{context}", f"pass {flag}={low} or more")


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
  data_dir = cfg.tfds_data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )
  return records.find_tfds_dir(data_dir, cfg.source)


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
  plans = {
    split: plan_shards(len(src), cfg.examples_per_shard, cfg.process_count)
    for split, src in sources.items()
  }
  todo, skipped, rewritten = _plan_work(cfg, plans, previous)
  total = sum(len(plans[split][s]) for split, s, _ in todo)
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

  progress = _Progress(total, cfg.progress)
  written_bytes, written = 0, 0
  t0 = time.time()
  for split, s, path in todo:
    payloads, sizes = _encode_range(sources[split], plans[split][s], vocab, encoder, cfg, progress)
    meta = shards.write_shard(path, payloads, sizes, source=plans[split][s])
    written_bytes += meta["size_bytes"]
    written += 1
    if cfg.debug_shard_delay_s:
      time.sleep(cfg.debug_shard_delay_s)
  seconds = time.time() - t0
  rate = progress.close()

  # One copier (process 0, which every precompute has), so one writer of each copy.
  vocab_files = _copy_vocabulary(cfg.vocab, cfg.out, copy=cfg.process_index == 0)
  manifest = _manifest(cfg, tfds_dir, sources, plans, encoder, vocab_sha, vocab_files)
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


def shard_flags(cfg: PrecomputeConfig) -> dict[str, Any]:
  """The flags that decide the shards' contents (recorded in the manifest)."""
  out = {}
  for name in _SHARD_FLAGS:
    value = getattr(cfg, name)
    if name in ("num_examples", "num_validation", "resolution", "seed") and cfg.source != "shapes":
      continue  # the shapes generator's flags
    if name in ("source_dir", "t5_checkpoint") and value not in (None, "none"):
      value = _abs(value)
    out[name] = value
  return out


def _abs(path: str) -> str:
  return path if "://" in path else os.path.abspath(path)


def command(cfg: PrecomputeConfig) -> str:
  """The `imagen-jax precompute` command line that repeats `cfg` on every host (it resumes)."""
  import shlex

  flags = {
    "source": cfg.source,
    "source_dir": cfg.source_dir and _abs(cfg.source_dir),
    "tfds_data_dir": cfg.tfds_data_dir and _abs(cfg.tfds_data_dir),
    "out": _abs(cfg.out),
    "vocab": _abs(cfg.vocab),
    **{k: v for k, v in shard_flags(cfg).items() if k not in ("source", "source_dir")},
    "batch_size": cfg.batch_size,
  }
  # Every host reruns it with its own --process_index (jax's by default).
  if cfg.process_count == 1:
    del flags["process_count"]
  parts = ["imagen-jax", "precompute"]
  parts += [f"--{k}={shlex.quote(str(v))}" for k, v in flags.items() if v is not None]
  parts += [f"--split={shlex.quote(s)}" for s in cfg.splits]
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

  # 'none' = random weights (demos, tests); the manifest's encoder identity records it.
  checkpoint = None if cfg.t5_checkpoint == "none" else cfg.t5_checkpoint
  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices())
  return text_encoder.load_text_encoder(
    checkpoint, cfg.vocab, size=cfg.t5_size, max_length=cfg.max_length, mesh=mesh
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
  payloads, sizes = [], []
  batch = _encode_batch_size(cfg.batch_size)
  for start in range(0, len(pairs), batch):
    chunk = pairs[start : start + batch]
    tokens = vocabulary.tokenize(vocab, [c for _, c, _ in chunk], cfg.max_length)
    # A fixed batch shape: the last, short batch is padded so the encoder never recompiles.
    padded = np.zeros((batch, cfg.max_length), np.int32)
    padded[: len(chunk)] = tokens
    emb, mask = encoder.encode_tokens(padded)
    emb, mask = np.asarray(emb), np.asarray(mask)
    for j, (key, text, image) in enumerate(chunk):
      n = int(mask[j].sum())
      h, w = image_size(image)
      sizes.append((h, w))
      payloads.append(
        shards.make_record(key, text, image, h, w, tokens[j, :n], emb[j, :n].astype(np.float32))
      )
    progress.update(len(chunk))
  return payloads, sizes


def _encode_batch_size(batch_size: int) -> int:
  import jax

  n = jax.local_device_count()
  return max(n, math.ceil(batch_size / n) * n)


def _shard_records(out: str, names: list[str]) -> list[int | None]:
  """Records per shard; None for a shard not (yet) complete, e.g. another process's."""
  counts = []
  for name in names:
    try:
      counts.append(int(shards.load_shard_meta(os.path.join(out, name))["num_records"]))
    except (FileNotFoundError, ValueError):
      counts.append(None)
  return counts


def _manifest(cfg, tfds_dir, sources, plans, encoder, vocab_sha, vocab_files) -> dict[str, Any]:
  identity = dict(encoder.identity())
  splits = {}
  for split, plan in plans.items():
    names = [shards.shard_name(split, s, len(plan)) for s in range(len(plan))]
    counts = _shard_records(cfg.out, names)
    splits[split] = {
      "num_source_examples": len(sources[split]),
      # None while another process is still writing some of the shards.
      "num_records": None if None in counts else sum(counts),
      "num_shards": len(plan),
      "shards": names,
      "shard_records": counts,
    }
  available = next(iter(sources.values())).available_splits
  return {
    "format": shards.FORMAT,
    "encoder": identity,
    "vocab_sha256": vocab_sha,
    "vocab_file": os.path.basename(cfg.vocab),
    # Copies beside the shards: `sample` finds the vocabulary from the data dir alone.
    "vocab_files": vocab_files,
    "max_length": cfg.max_length,
    "embedding_width": int(encoder.width),
    "embedding_dtype": "bfloat16",
    "embedding_holds": "real tokens only (EOS included); re-pad to max_length with zeros",
    # The source's splits: a 'validation' missing here was not built (--num_validation=0).
    "source": {"name": cfg.source, "tfds_dir": tfds_dir, "seed": cfg.seed, "splits": available},
    "examples_per_shard": cfg.examples_per_shard,
    "process_count": cfg.process_count,
    "splits": splits,
    "flags": shard_flags(cfg),
    # What repairs these shards: rerun it (add --verify to also check every record's CRCs).
    "command": command(cfg),
  }


# ----------------------------------------------------------------------------------------------
# `imagen-jax precompute`
# ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
  """Flags of `imagen-jax precompute`."""
  parser.description = (
    "Encode captions once with the frozen T5 encoder and write resumable TFRecord shards of "
    "{key, caption, image bytes, bf16 embedding of the real tokens, token length} + a manifest. "
    "Rerunning with the same flags skips finished shards that pass cheap checks and rewrites "
    "the others; add --verify to also check every record's CRCs."
  )
  a = parser.add_argument
  a(
    "--source",
    required=True,
    help="shapes | image_text_folder | a prepared TFDS name (e.g. coco_captions)",
  )
  a("--source_dir", default=None, help="image_text_folder: the folder of images + captions")
  a(
    "--tfds_data_dir",
    default=None,
    help="TFDS data dir (default OUT/tfds for shapes / image_text_folder, else $TFDS_DATA_DIR or ~/tensorflow_datasets)",
  )
  a("--out", required=True, help="output directory for shards and manifest.json")
  a("--vocab", required=True, help="SentencePiece .model of the T5 vocabulary")
  a(
    "--t5_checkpoint",
    default="none",
    help="T5 encoder checkpoint (T5X / HF); 'none' = random weights (demos, tests)",
  )
  a("--t5_size", default="base", help="T5 v1.1 size: tiny | small | base | large | xl | xxl")
  a("--max_length", type=int, default=128, help="text length in tokens (EOS included)")
  a("--examples_per_shard", type=int, default=1024, help="source examples per shard")
  a(
    "--split", action="append", default=None, help="split(s) to process (repeatable; default train)"
  )
  a("--num_examples", type=int, default=10_000, help="shapes: train examples")
  a("--num_validation", type=int, default=1_000, help="shapes: validation examples")
  a("--resolution", type=int, default=64, help="shapes: image resolution")
  a("--seed", type=int, default=0, help="shapes: generation seed")
  a(
    "--batch_size",
    type=int,
    default=64,
    help="encoder batch (rounded up to the local device count)",
  )
  a("--process_index", type=int, default=None, help="this host (default: jax.process_index())")
  a(
    "--process_count", type=int, default=None, help="number of hosts (default: jax.process_count())"
  )
  a("--no_progress", action="store_true", help="no progress bars (ours and TFDS's)")
  a(
    "--verify",
    action="store_true",
    help="also read every finished shard and check each record's CRCs; rewrites the bad ones",
  )
  a("--debug_shard_delay_s", type=float, default=0.0, help=argparse_suppress())


def argparse_suppress():
  import argparse

  return argparse.SUPPRESS


def run(args) -> int:
  """Runs `imagen-jax precompute`; prints throughput and size per example."""
  if args.process_index is None or args.process_count is None:
    import jax

    args.process_index = jax.process_index() if args.process_index is None else args.process_index
    args.process_count = jax.process_count() if args.process_count is None else args.process_count
  cfg = PrecomputeConfig(
    source=args.source,
    out=args.out,
    vocab=args.vocab,
    t5_checkpoint=args.t5_checkpoint,
    t5_size=args.t5_size,
    max_length=args.max_length,
    examples_per_shard=args.examples_per_shard,
    splits=tuple(args.split or ["train"]),
    source_dir=args.source_dir,
    tfds_data_dir=args.tfds_data_dir,
    num_examples=args.num_examples,
    num_validation=args.num_validation,
    resolution=args.resolution,
    seed=args.seed,
    batch_size=args.batch_size,
    process_index=args.process_index,
    process_count=args.process_count,
    progress=not args.no_progress,
    verify=args.verify,
    debug_shard_delay_s=args.debug_shard_delay_s,
  )
  manifest = run_precompute(cfg)
  st = manifest["stats"]
  checked = "CRC-verified" if cfg.verify else "checked"
  print(
    f"precompute: {st['examples']} examples in {st['seconds']:.1f}s "
    f"({st['examples_per_s']:.1f} examples/s), {st['shards_written']} shards written "
    f"({st['shards_rewritten']} rewritten as bad), {st['shards_skipped']} already complete "
    f"({checked}), {st['bytes_per_example']:.0f} bytes/example; "
    f"manifest {os.path.join(cfg.out, shards.MANIFEST)}"
  )
  return 0
