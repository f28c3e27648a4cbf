"""Tiny random-weight cascades (no training) shared by the cascade, export and CLI tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.inference import cascade
from imagen_jax.nn import factory
from imagen_jax.stage import Stage, StageConfig
from imagen_jax.text import encoder as encoder_lib
from tests import train_helpers

MAX_LENGTH = 32  # the demo stage configs (configs/stages/demo_*.gin) use max_length 32
TEXT_DIM = train_helpers.TEXT_DIM

# The demo's three stages in miniature: base 16 -> SR 16->32 (self+text) -> SR 32->64 (cross
# attention only, built for 32 px crops and run fully convolutionally at 64).
STAGES = (
  ("tiny_base", StageConfig(name="base16", resolution=16)),
  ("tiny_sr", StageConfig(name="sr32", resolution=32, lowres_resolution=16)),
  (
    "tiny_sr_crossonly",
    StageConfig(name="sr64", resolution=64, lowres_resolution=32, train_crop=32),
  ),
)


def init_params(stage: Stage, seed: int, perturb: float = 0.05):
  """Random params of a stage (unboxed), perturbed so zero-initialised layers are non-zero.

  Zero-initialised output layers (text attention, final conv) would hide the text condition;
  the perturbation makes prompts and negative prompts change the images. The dummy inputs are
  jit arguments: built inside the jit, XLA constant-folds the whole init forward pass (minutes).
  """
  batch = {
    k: jnp.zeros(v.shape, v.dtype) for k, v in stage.dummy_batch(1, MAX_LENGTH, TEXT_DIM).items()
  }
  sr = "lowres" in batch

  def init(rng, batch):
    variables = stage.network.init(
      {"params": rng},
      batch["image"],
      jnp.zeros((1,), jnp.float32),
      batch["text_emb"],
      batch["text_mask"],
      batch.get("lowres"),
      jnp.zeros((1,), jnp.float32) if sr else None,
      True,
    )
    params = nn.unbox(variables["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    noisy = [x + perturb * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)

  return jax.jit(init)(jax.random.PRNGKey(seed), batch)


def random_stage(size: str, config: StageConfig, seed: int) -> cascade.CascadeStage:
  stage = Stage(factory.build_network(size), config)
  params = init_params(stage, seed)
  spec = cascade.stage_spec(stage.network, config, MAX_LENGTH, TEXT_DIM)
  return cascade.CascadeStage(stage, params, spec)


def random_stages() -> list[cascade.CascadeStage]:
  return [random_stage(size, cfg, seed) for seed, (size, cfg) in enumerate(STAGES)]


def tiny_encoder(directory: str) -> tuple[encoder_lib.TextEncoder, str]:
  """A random tiny T5 (float32) with a SentencePiece model trained on shapes captions."""
  vocab = train_helpers.shapes_vocabulary(directory)
  enc = encoder_lib.load_text_encoder(
    None, vocab, size="tiny", max_length=MAX_LENGTH, dtype="float32", seed=0
  )
  return enc, vocab
