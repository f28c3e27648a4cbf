"""The manifest precompute writes beside its shards, and the flags that must match on a rerun."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from imagen_jax import errors
from imagen_jax.data import shards
from imagen_jax.data.precompute.config import (
  RANDOM_WEIGHTS,
  PrecomputeConfig,
  canonical_t5_checkpoint,
)


def finish_job(
  cfg, manifest, previous, progress, seconds, written_bytes, written, skipped, rewritten
):
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


def previous_manifest(cfg: PrecomputeConfig, vocab_sha: str) -> dict[str, Any] | None:
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


def _shard_metas(out: str, names: list[str]) -> list[dict[str, Any] | None]:
  """Each shard's sidecar; None for a shard not (yet) complete, e.g. another process's."""
  metas = []
  for name in names:
    try:
      metas.append(shards.read_shard_meta(os.path.join(out, name)))
    except (FileNotFoundError, ValueError):
      metas.append(None)
  return metas


def split_entries(
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


def build_manifest(cfg, encoder, vocab_sha, source, splits) -> dict[str, Any]:
  return {
    "format": shards.FORMAT,
    "encoder": dict(encoder.identity()),
    "vocab_sha256": vocab_sha,
    "vocab_file": os.path.basename(cfg.vocab),
    # Copies beside the shards (filled in by finish_job): `sample` finds the vocabulary there.
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


def _sum_field(metas: list[dict[str, Any] | None], field: str) -> dict[str, int] | None:
  """Sum over the shards' sidecars of a {name: count} field; None while a shard is missing."""
  total: dict[str, int] = {}
  for meta in metas:
    if meta is None:
      return None
    for k, v in (meta.get(field) or {}).items():
      total[k] = total.get(k, 0) + int(v)
  return total


def task_manifest(cfg, provider, tasks_read, lengths, plans, encoder, vocab_sha) -> dict[str, Any]:
  import seqio

  from imagen_jax.data import tasks

  # With sums of the shards' sidecars (None while another process is still writing some).
  num_source = {split: n for split, (n, _) in lengths.items()}
  splits = split_entries(cfg, plans, num_source, summed=("task_records", "skipped"))
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
  return build_manifest(cfg, encoder, vocab_sha, source, splits)
