"""The frozen text encoder: captions -> (T5 embeddings [B, L, D], mask [B, L]) on a mesh.

`load_text_encoder` builds it from a checkpoint in any supported format (or random weights for
demos); `TextEncoder.encode` tokenizes and runs one jitted, mesh-sharded forward pass per batch
shape. Parameters live in their logical shardings (`imagen_jax.parallel.LOGICAL_AXIS_RULES`), the
batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh

from imagen_jax import parallel
from imagen_jax.nn import t5
from imagen_jax.text import t5_checkpoints, vocabulary

logger = logging.getLogger(__name__)

# Re-exported so users find the writer next to the loader.
write_random_checkpoint = t5_checkpoints.write_random_checkpoint


class TextEncoder:
  """A frozen T5 encoder with its parameters on a mesh, its vocabulary and max length.

  Attributes:
    module: the `T5Encoder` linen module.
    params: its parameter tree, sharded on `mesh`.
    vocab: the seqio SentencePiece vocabulary.
    mesh: the device mesh.
    config: the T5Config.
  """

  def __init__(
    self,
    module: t5.T5Encoder,
    params: Any,
    vocab: Any,
    max_length: int,
    mesh: Mesh,
    param_shardings: Any,
    identity: dict[str, Any],
    rules: Sequence[tuple[str, Any]] = parallel.LOGICAL_AXIS_RULES,
  ):
    self.module = module
    self.config: t5.T5Config = module.config
    self.params = params
    self.vocab = vocab
    self.mesh = mesh
    self._max_length = int(max_length)
    self._identity = dict(identity)
    self._rules = tuple(rules)
    self._dp = parallel.data_parallel_size(mesh)
    self._trace_count = 0

    def forward(params, tokens):
      self._trace_count += 1  # runs at trace time only: counts compilations per shape
      embeddings = module.apply({"params": params}, tokens)
      return embeddings, tokens > 0

    self._forward = jax.jit(
      forward,
      in_shardings=(param_shardings, parallel.batch_sharding(mesh, 2)),
      out_shardings=(parallel.batch_sharding(mesh, 3), parallel.batch_sharding(mesh, 2)),
    )

  @property
  def zero_padding(self) -> bool:
    """Whether padding positions are zero (Imagen) or the encoder's outputs there (IF)."""
    return self.module.zero_padding

  @property
  def width(self) -> int:
    """Embedding width D (d_model)."""
    return self.config.d_model

  @property
  def max_length(self) -> int:
    """Token length every caption is padded / truncated to."""
    return self._max_length

  @property
  def dtype(self) -> Any:
    """dtype of the returned embeddings."""
    return self.config.jnp_dtype

  def identity(self) -> dict[str, Any]:
    """JSON-able description of what produces the embeddings (for data manifests)."""
    return dict(self._identity)

  def encode_tokens(self, tokens: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Encodes token ids.

    Args:
      tokens: int [B, L] (from `vocabulary.tokenize`), 0 = padding.

    Returns:
      (embeddings [B, L, D] in the encoder's dtype, zero at padding; mask [B, L] bool).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(
        f"tokens must be an integer array [batch, length], got {tokens.dtype}{list(tokens.shape)}"
      )
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
      raise ValueError(f"tokens must be non-empty, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
      raise ValueError(
        f"token ids must be in [0, {self.config.vocab_size}), got range "
        f"[{tokens.min()}, {tokens.max()}]"
      )
    batch = tokens.shape[0]
    # The batch dim is split over the data-parallel devices: pad it to a multiple with
    # all-padding rows and drop them after.
    padded = -(-batch // self._dp) * self._dp
    if padded != batch:
      tokens = np.concatenate([tokens, np.zeros((padded - batch, tokens.shape[1]), tokens.dtype)])
    # Placed first: a multi-host job refuses numpy inputs to a sharded jit (even on a host mesh).
    tokens = jax.device_put(tokens.astype(np.int32), parallel.batch_sharding(self.mesh, 2))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self._rules):
      embeddings, mask = self._forward(self.params, tokens)
    if padded != batch:
      embeddings, mask = embeddings[:batch], mask[:batch]
    return embeddings, mask

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Captions -> int32 [B, max_length] token ids (tokens + EOS, 0-padded)."""
    return vocabulary.tokenize(self.vocab, texts, self._max_length)

  def encode(self, texts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """Captions -> (embeddings [B, max_length, D], mask [B, max_length]); "" is EOS only."""
    return self.encode_tokens(self.tokenize(texts))


def load_text_encoder(
  checkpoint: str | None,
  vocab_path: str,
  size: str = "base",
  max_length: int = 128,
  dtype: str = "bfloat16",
  mesh: Mesh | None = None,
  seed: int = 0,
  zero_padding: bool = True,
) -> TextEncoder:
  """Builds the frozen T5 encoder from a checkpoint (format auto-detected) or random weights.

  Args:
    checkpoint: a T5X legacy dir, a T5X orbax dir, a T5X model dir with checkpoint_<step>
      subdirs, or Hugging Face safetensors (file, dir, or index json); None = random weights
      from `seed` (demos only: the embeddings carry no meaning).
    vocab_path: the SentencePiece `.model` (pad=0, eos=1, unk=2).
    size: 'tiny', 'small', 'base', 'large', 'xl' or 'xxl'.
    max_length: caption token length (EOS included).
    dtype: compute and parameter dtype, 'bfloat16' or 'float32'.
    mesh: device mesh; None = all devices, data-parallel.
    seed: weight seed when `checkpoint` is None.
    zero_padding: zero the embeddings at padding (Imagen); False keeps the encoder's outputs
      there, as DeepFloyd IF was trained.

  Returns:
    The TextEncoder.
  """
  if dtype not in t5.DTYPES:
    raise ValueError(f"dtype must be one of {sorted(t5.DTYPES)}, got {dtype!r} (never float16)")
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  config = t5.get_config(size, dtype=dtype)
  if checkpoint is not None and not os.path.exists(checkpoint):
    raise FileNotFoundError(f"T5 checkpoint {checkpoint!r} does not exist")
  vocab = vocabulary.load_vocabulary(vocab_path)
  if vocab.vocab_size > config.vocab_size:
    raise ValueError(
      f"vocabulary {vocab_path!r} has {vocab.vocab_size} ids but T5 size {size!r} embeds only "
      f"{config.vocab_size}; use the vocabulary the checkpoint was trained with"
    )
  mesh = mesh if mesh is not None else parallel.create_mesh()
  module = t5.T5Encoder(config, zero_padding=zero_padding)
  init_fn = lambda rng: module.init(rng, jnp.ones((1, 4), jnp.int32))
  _, shardings = parallel.abstract_and_shardings(init_fn, mesh, jax.random.key(seed))
  param_shardings = shardings["params"]
  jdtype = config.jnp_dtype
  if checkpoint is None:
    logger.warning(
      "T5 encoder %r has RANDOM weights (seed %d): its embeddings are meaningless; pass a "
      "checkpoint for real use",
      size,
      seed,
    )
    # Drawn straight into the parameter shardings: never materialised on one device.
    random_init = jax.jit(
      lambda rng: jax.tree.map(lambda x: x.astype(jdtype), t5.init_params(config, rng)),
      out_shardings=param_shardings,
    )
    params = random_init(jax.random.key(seed))
    source, fmt = f"random:{seed}", "random"
  else:
    flat_shardings = traverse_util.flatten_dict(param_shardings, sep="/")
    params, fmt = t5_checkpoints.read_t5_checkpoint(checkpoint, config, flat_shardings, jdtype)
    source = os.path.abspath(checkpoint)
  identity = {
    "size": size,
    "checkpoint": source,
    "checkpoint_format": fmt,
    "vocab_sha256": vocabulary.file_sha256(vocab_path),
    "vocab_size": int(vocab.vocab_size),
    "max_length": int(max_length),
    "dtype": dtype,
    "width": config.d_model,
  }
  if not zero_padding:  # recorded only when off: identities written before it stay equal
    identity["zero_padding"] = False
  return TextEncoder(module, params, vocab, max_length, mesh, param_shardings, identity)
