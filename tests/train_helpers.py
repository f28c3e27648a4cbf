"""Builders shared by the training tests: a tiny precomputed `shapes` dataset and gin runs."""

from __future__ import annotations

import os

import numpy as np

from imagen_jax.data import precompute, shapes
from imagen_jax.text import vocabulary

TEXT_DIM = 64  # the 'tiny' T5's d_model
MAX_LENGTH = 32


def shapes_vocabulary(directory: str) -> str:
  """A real SentencePiece model trained on the shapes grammar's captions."""
  rng = np.random.default_rng(0)
  captions = [shapes.caption(shapes.sample_spec(rng)) for _ in range(400)]
  return vocabulary.train_sentencepiece(captions, os.path.join(directory, "spm"), vocab_size=64)


def build_precomputed_shapes(
  directory: str, num_examples: int = 64, resolution: int = 32, examples_per_shard: int = 16
) -> str:
  """Renders `shapes`, encodes captions with a random tiny T5 and writes shards.

  Returns:
    The precomputed data directory.
  """
  vocab = shapes_vocabulary(directory)
  out = os.path.join(directory, "precomputed")
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=out,
    vocab=vocab,
    t5_checkpoint="none",
    t5_size="tiny",
    max_length=MAX_LENGTH,
    examples_per_shard=examples_per_shard,
    tfds_data_dir=os.path.join(directory, "tfds"),
    num_examples=num_examples,
    num_validation=8,
    resolution=resolution,
    batch_size=32,
    progress=False,
  )
  precompute.run_precompute(cfg)
  return out
