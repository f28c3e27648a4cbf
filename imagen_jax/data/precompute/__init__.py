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

from typing import Any

from imagen_jax.data.precompute.config import (
  BUILTIN_SOURCES,
  OLD_RANDOM_WEIGHTS,
  RANDOM_WEIGHTS,
  PrecomputeConfig,
  canonical_t5_checkpoint,
)
from imagen_jax.data.precompute.indexed import prepare_source, run_indexed_job
from imagen_jax.data.precompute.manifest import command, shard_flags
from imagen_jax.data.precompute.streams import resolve_provider, run_stream_job
from imagen_jax.data.precompute.work import image_size, plan_shards

__all__ = [
  "BUILTIN_SOURCES",
  "OLD_RANDOM_WEIGHTS",
  "RANDOM_WEIGHTS",
  "PrecomputeConfig",
  "canonical_t5_checkpoint",
  "command",
  "image_size",
  "plan_shards",
  "prepare_source",
  "resolve_provider",
  "run_precompute",
  "shard_flags",
]


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
  cfg.validate()
  if cfg.uses_tasks:
    return run_stream_job(cfg, encoder)
  return run_indexed_job(cfg, encoder)
