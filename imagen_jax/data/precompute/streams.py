"""seqio Tasks and Mixtures (`--task`, `--mixture`, `--source=webdataset`): a stream, planned on
stream positions (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from imagen_jax import errors
from imagen_jax.data import records, shards
from imagen_jax.data.precompute.config import (
  PrecomputeConfig,
  check_minimums,
  check_source_folder,
  fail,
  import_modules,
)
from imagen_jax.data.precompute.indexed import prepare_source, resolved_tfds_dir
from imagen_jax.data.precompute.manifest import finish_job, previous_manifest, task_manifest
from imagen_jax.data.precompute.work import encode_rows, image_size, plan_job

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Task / Mixture jobs
# ----------------------------------------------------------------------------------------------


def run_stream_job(cfg: PrecomputeConfig, encoder: Any = None) -> dict[str, Any]:
  """run_precompute for --task / --mixture (see the module docstring for the plan)."""
  from imagen_jax.text import vocabulary

  vocab_sha = vocabulary.file_sha256(cfg.vocab)
  provider, tasks_read = resolve_provider(cfg)
  previous = previous_manifest(cfg, vocab_sha)
  # Every check above reads only; from here on the job writes (a built-in TFDS source builds).
  errors.check_writable_dir(cfg.out, "--out")
  lengths = {split: _stream_length(cfg, provider, split, previous) for split in cfg.splits}
  sizes = {split: n for split, (n, _) in lengths.items()}
  plans, todo, skipped, rewritten, encoder, progress = plan_job(cfg, sizes, previous, encoder)
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
  manifest = task_manifest(cfg, provider, tasks_read, lengths, plans, encoder, vocab_sha)
  return finish_job(
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
  import_modules(cfg.modules)
  name = cfg.provider_name
  flag = cfg.provider_flag
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
    fail(
      f"{flag} is not a registered seqio Task or Mixture",
      f"register it in a module passed with --module=MODULE, or pick one of {shown}",
    )
  is_mixture = isinstance(provider, seqio.Mixture)
  if cfg.task and is_mixture:
    fail(f"{flag} is a Mixture", f"pass --mixture={name}")
  if cfg.mixture and not is_mixture:
    fail(f"{flag} is a Task", f"pass --task={name}")
  for split in cfg.splits:
    if split not in provider.splits:
      fail(
        f"--split={split} is not a split of {flag}",
        f"pick from {', '.join(sorted(provider.splits))}",
      )
  feature = provider.output_features.get(tasks.TEXT_FEATURE)
  if feature is None:
    fail(
      f"{flag} has no {tasks.TEXT_FEATURE!r} output feature (has {sorted(provider.output_features)})",
      "tokenize the caption into 'text_tokens' (tasks.token_preprocessors())",
    )
  _check_vocabulary(cfg, flag, feature.vocabulary)
  names = sorted({t.name for split in cfg.splits for t in tasks.leaf_tasks(provider, split)})
  for task_name in names:
    if task_name in tasks.BUILTIN_TASKS:
      _check_builtin_input(cfg, task_name)
  return provider, names


def _check_vocabulary(cfg: PrecomputeConfig, flag: str, vocab: Any) -> None:
  """The task's tokens must be ids of --vocab: the encoder's embedding table is --vocab's."""
  from imagen_jax.text import vocabulary

  path = getattr(vocab, "sentencepiece_model_file", None)
  if path and os.path.isfile(path):
    same = vocabulary.file_sha256(path) == vocabulary.file_sha256(cfg.vocab)
  else:
    same = vocab.vocab_size == vocabulary.load_vocabulary(cfg.vocab).vocab_size
  if not same:
    fail(
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
    check_minimums(
      ("--num_validation", cfg.num_validation, 0),
      ("--resolution", cfg.resolution, 8),
      context=" for imagen_shapes",
    )
  elif name == "imagen_image_text_folder":
    check_source_folder(name, cfg.source_dir)
  elif name == "imagen_webdataset":
    if not cfg.source_dir:
      fail(f"{name} needs tar shards; no --source_dir given", "pass --source_dir=DIR or a glob")
    try:
      webdataset.list_tars(cfg.source_dir)
    except FileNotFoundError as e:
      fail(
        f"{name}: {e} (--source_dir)",
        "pass a directory or glob of webdataset .tar shards (key.jpg + key.txt [+ key.json])",
      )
  elif name == "imagen_coco_captions":
    try:
      records.find_tfds_dir(resolved_tfds_dir(cfg), "coco_captions")
    except FileNotFoundError as e:
      fail(f"{name}: {e}", "prepare coco_captions with TFDS, and pass its --tfds_data_dir")


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
    fail(f"{cfg.provider_flag}: {e}", "yield 'caption', 'image' and 'text_tokens'")
  n = 0
  # Only a scalar per example crosses into Python; the stream is read to --num_examples + 1.
  for _ in ds.take(cfg.num_examples + 1).map(lambda ex: ex["task"]).as_numpy_iterator():
    n += 1
  count = min(n, cfg.num_examples)
  if count < cfg.process_count:
    fail(
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
  payloads, sizes = encode_rows(rows, encoder, cfg, progress)
  return payloads, sizes, counts
