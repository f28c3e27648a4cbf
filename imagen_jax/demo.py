"""`imagen-jax demo`: the whole system on a laptop, from nothing to a scored sample grid.

Steps (each reuses its output when rerun, so an interrupted demo continues):
  1. render the `shapes` dataset (64 px) and train a SentencePiece vocabulary on its captions;
  2. precompute caption embeddings with a tiny T5 encoder with RANDOM weights (no real T5
     weights can be downloaded offline; see the README for real checkpoints);
  3. train the three-stage cascade: base 16 px -> SR 16->32 (self + text attention) ->
     SR 32->64 (text cross-attention only, trained on random 32 px crops);
  4. sample fixed grammar prompts through the cascade -> OUT/samples.png + OUT/samples/*.png;
  5. score the samples with the shapes detector and print the metric table.
"""

from __future__ import annotations

import os
import time

STAGE_GINS = (
  "configs/stages/demo_base16.gin",
  "configs/stages/demo_sr32.gin",
  "configs/stages/demo_sr64.gin",
)
MAX_LENGTH = 32
VOCAB_SIZE = 128


def _log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo_prompts(n: int, seed: int) -> list[str]:
  """n prompts drawn from the shapes grammar (seeded)."""
  import numpy as np

  from imagen_jax.data import shapes

  rng = np.random.default_rng([seed, 7])
  return [shapes.caption(shapes.sample_spec(rng)) for _ in range(n)]


def train_shapes_vocabulary(model_prefix: str, seed: int = 0) -> str:
  """A word-level SentencePiece model for the shapes grammar; returns the .model path."""
  import numpy as np

  from imagen_jax.data import shapes
  from imagen_jax.text import vocabulary

  rng = np.random.default_rng(seed)
  captions = [shapes.caption(shapes.sample_spec(rng)) for _ in range(2000)]
  # The grammar's few distinct captions alone train a near-character vocabulary (~40 tokens a
  # caption); its words as extra sentences give one piece per word (~12 tokens a caption).
  words = [w for c in captions for w in c.split()]
  return vocabulary.train_sentencepiece(captions + words, model_prefix, vocab_size=VOCAB_SIZE)


def precompute_shapes(
  work: str,
  *,
  num_examples: int,
  num_validation: int,
  resolution: int,
  max_length: int,
  examples_per_shard: int,
  batch_size: int,
  seed: int = 0,
) -> tuple[str, str]:
  """Word-level vocabulary + `shapes` encoded by a random tiny T5 into WORK/precomputed.

  Returns:
    (vocabulary path, precomputed data dir).
  """
  from imagen_jax.data import precompute

  vocab_prefix = os.path.join(work, "spm")
  vocab = vocab_prefix + ".model"
  if not os.path.isfile(vocab):
    vocab = train_shapes_vocabulary(vocab_prefix, seed)
  data = os.path.join(work, "precomputed")
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=data,
    vocab=vocab,
    t5_checkpoint="random",
    t5_size="tiny",
    max_length=max_length,
    examples_per_shard=examples_per_shard,
    tfds_data_dir=os.path.join(work, "tfds"),
    num_examples=num_examples,
    num_validation=num_validation,
    resolution=resolution,
    seed=seed,
    batch_size=batch_size,
    progress=False,
  )
  precompute.run_precompute(cfg)
  return vocab, data


def build_data(work: str, num_examples: int, seed: int) -> tuple[str, str]:
  """The demo's vocabulary + precomputed 64 px shapes; returns (vocab path, data dir)."""
  return precompute_shapes(
    work,
    num_examples=num_examples,
    num_validation=64,
    resolution=64,
    max_length=MAX_LENGTH,
    examples_per_shard=1000,
    batch_size=128,
    seed=seed,
  )


def train_stage(
  stage_gin: str, model_dir: str, data: str, steps: int, batch_size: int, args
) -> dict:
  """One stage's training run (resumes if MODEL_DIR has checkpoints)."""
  from imagen_jax import gin_utils, train

  bindings = [
    f"MODEL_DIR = '{model_dir}'",
    f"DATA = '{data}'",
    f"train.train.num_train_steps = {steps}",
    f"train.train.batch_size = {batch_size}",
    f"train.train.checkpoint_every = {max(steps // 2, 1)}",
    f"train.train.log_every = {max(steps // 10, 1)}",
    f"train.train.seed = {args.seed}",
  ]
  gin_utils.parse_gin(
    [stage_gin, "configs/mesh/cpu.gin", "configs/runs/tiny.gin", *args.gin_file], bindings
  )
  try:
    return train.configurable_train()()
  finally:
    import gin

    gin.clear_config()
