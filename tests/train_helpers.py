"""Builders shared by the training tests: a tiny precomputed `shapes` dataset and gin runs."""

from __future__ import annotations

import os

from imagen_jax import demo

TEXT_DIM = 64  # the 'tiny' T5's d_model
MAX_LENGTH = 16  # shapes captions are ≤ 14 word-level tokens + EOS


def shapes_vocabulary(directory: str) -> str:
  """A real (word-level) SentencePiece model trained on the shapes grammar's captions."""
  return demo.train_shapes_vocabulary(os.path.join(directory, "spm"))


def build_precomputed_shapes(
  directory: str, num_examples: int = 64, resolution: int = 32, examples_per_shard: int = 16
) -> str:
  """Renders `shapes`, encodes captions with a random tiny T5 and writes shards.

  Returns:
    The precomputed data directory.
  """
  _, data = demo.precompute_shapes(
    directory,
    num_examples=num_examples,
    num_validation=8,
    resolution=resolution,
    max_length=MAX_LENGTH,
    examples_per_shard=examples_per_shard,
    batch_size=32,
  )
  return data


def sharded_init(init_fn, mesh, *args):
  """Runs `init_fn(*args)` straight into the shardings training's logical rules give its
  boxes (never materialised on one device). Returns (unboxed tree, NamedSharding tree)."""
  import jax
  from flax import linen as nn

  from imagen_jax import parallel

  _, shardings = parallel.abstract_and_shardings(init_fn, mesh, *args)
  with nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings
