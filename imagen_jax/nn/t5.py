"""The T5 v1.1 encoder in Flax linen, with T5X's parameter tree and logical axis names.

Parameter tree (identical to a T5X checkpoint's `target`, decoder left out):
  token_embedder/embedding                         [vocab, embed]        ('vocab', 'embed')
  encoder/relpos_bias/rel_embedding                [heads, 32]           ('heads', 'relpos_buckets')
  encoder/layers_{i}/pre_attention_layer_norm/scale [embed]              ('embed',)
  encoder/layers_{i}/attention/{query,key,value}/kernel [embed, heads*kv] ('embed', 'joined_kv')
  encoder/layers_{i}/attention/out/kernel          [heads*kv, embed]     ('joined_kv', 'embed')
  encoder/layers_{i}/pre_mlp_layer_norm/scale      [embed]               ('embed',)
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel        [embed, mlp]          ('embed', 'mlp')
  encoder/layers_{i}/mlp/wo/kernel                 [mlp, embed]          ('mlp', 'embed')
  encoder/encoder_norm/scale                       [embed]               ('embed',)

Numerics follow T5X: RMS norm in float32, no biases, no 1/sqrt(d) in attention (it is folded into
the query init), float32 attention logits and softmax, one bidirectional relative-position bias
shared by all layers, gated tanh-GELU MLP. The output is zeroed at padding (token id 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from imagen_jax.nn import layers

# Per-size hyperparameters (T5 v1.1): d_model, heads, mlp dim, layers. Head dim 64, vocab 32128.
# 'tiny' is for tests and demos: small enough that a random checkpoint is a few hundred KB.
SIZES: dict[str, dict[str, int]] = {
  "tiny": dict(vocab_size=256, d_model=64, num_heads=2, head_dim=32, mlp_dim=128, num_layers=2),
  "small": dict(d_model=512, num_heads=6, mlp_dim=1024, num_layers=8),
  "base": dict(d_model=768, num_heads=12, mlp_dim=2048, num_layers=12),
  "large": dict(d_model=1024, num_heads=16, mlp_dim=2816, num_layers=24),
  "xl": dict(d_model=2048, num_heads=32, mlp_dim=5120, num_layers=24),
  "xxl": dict(d_model=4096, num_heads=64, mlp_dim=10240, num_layers=24),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 v1.1 encoder hyperparameters."""

  vocab_size: int = 32128
  d_model: int = 768
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 2048
  num_layers: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype: 'float32' or 'bfloat16' (never float16: T5 overflows)

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"T5Config.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim", "num_layers"):
      if getattr(self, name) < 1:
        raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def jnp_dtype(self) -> Any:
    return DTYPES[self.dtype]


def get_config(size: str, **overrides: Any) -> T5Config:
  """The config of a named size ('tiny', 'small', 'base', 'large', 'xl', 'xxl').

  Args:
    size: size name.
    **overrides: T5Config fields to change (e.g. dtype='bfloat16').

  Returns:
    The T5Config.
  """
  if size not in SIZES:
    raise ValueError(f"unknown T5 size {size!r}; expected one of {list(SIZES)}")
  return T5Config(**{**SIZES[size], **overrides})


def relative_position_buckets(
  length: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
  """T5X's bidirectional relative-position bucket of every (query, key) pair.

  Returns:
    int32 [length, length].
  """
  context = np.arange(length, dtype=np.int32)[:, None]
  memory = np.arange(length, dtype=np.int32)[None, :]
  n = -(memory - context)
  half = num_buckets // 2
  ret = (n < 0).astype(np.int32) * half
  n = np.abs(n)
  max_exact = half // 2
  is_small = n < max_exact
  # The eps (as in T5X) keeps exact powers from rounding down at bucket edges.
  val_if_large = max_exact + (
    np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
    / math.log(max_distance / max_exact)
    * (half - max_exact)
  ).astype(np.int32)
  val_if_large = np.minimum(val_if_large, half - 1)
  return ret + np.where(is_small, n, val_if_large)


class RMSNorm(nn.Module):
  """T5 layer norm: x * rsqrt(mean(x^2) + eps) * scale, computed in float32."""

  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    scale = self.param(
      "scale", layers.partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32
    )
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    return jnp.asarray(y, self.dtype) * jnp.asarray(scale, self.dtype)


def _dense(features: int, axes: tuple[str, str], init: Any, dtype: Any, name: str) -> nn.Module:
  """T5's bias-free dense layer: a float32 kernel cast to the compute dtype."""
  return layers.Dense((features,), axes, use_bias=False, kernel_init=init, dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with an additive bias and no 1/sqrt(d) scaling."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = cfg.jnp_dtype
    inner = cfg.num_heads * cfg.head_dim
    # T5 folds 1/sqrt(head_dim) into the query init instead of the logits.
    query_init = nn.initializers.variance_scaling(1.0 / cfg.head_dim, "fan_in", "normal")
    kv_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    b, length, _ = x.shape

    def heads(name, init):
      y = _dense(inner, ("embed", "joined_kv"), init, dtype, name=name)(x)
      y = y.reshape(b, length, cfg.num_heads, cfg.head_dim)
      return nn.with_logical_constraint(y, ("batch", "length", "act_heads", "act_kv"))

    q = heads("query", query_init)
    k = heads("key", kv_init)
    v = heads("value", kv_init)
    logits = jnp.einsum(
      "bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=None
    )
    weights = jax.nn.softmax(logits + bias).astype(dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, inner)
    return _dense(cfg.d_model, ("joined_kv", "embed"), kv_init, dtype, name="out")(out)


class Mlp(nn.Module):
  """Gated-GELU feed-forward: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = cfg.jnp_dtype
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    gate = nn.gelu(_dense(cfg.mlp_dim, ("embed", "mlp"), init, dtype, name="wi_0")(x))
    linear = _dense(cfg.mlp_dim, ("embed", "mlp"), init, dtype, name="wi_1")(x)
    h = nn.with_logical_constraint(gate * linear, ("batch", "length", "mlp"))
    return _dense(cfg.d_model, ("mlp", "embed"), init, dtype, name="wo")(h)


class EncoderLayer(nn.Module):
  """Pre-norm residual block: attention then MLP."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = cfg.jnp_dtype
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_attention_layer_norm")(x)
    x = x + Attention(cfg, name="attention")(h, bias)
    h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="pre_mlp_layer_norm")(x)
    x = x + Mlp(cfg, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", None))


class Embed(nn.Module):
  """Token embedding table (T5 v1.1: no sqrt(d) scaling, not tied to an output layer)."""

  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.param(
      "embedding",
      layers.partitioned(nn.initializers.normal(1.0), ("vocab", "embed")),
      (self.num_embeddings, self.features),
      jnp.float32,
    )
    # A gather, not T5X's one-hot matmul: identical values, far fewer FLOPs off-TPU.
    return jnp.take(jnp.asarray(table, self.dtype), tokens, axis=0)


class RelativePositionBias(nn.Module):
  """The [heads, buckets] table turned into a bidirectional [1, heads, q, k] bias."""

  config: T5Config

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    cfg = self.config
    table = self.param(
      "rel_embedding",
      layers.partitioned(
        nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), ("heads", "relpos_buckets")
      ),
      (cfg.num_heads, cfg.relative_attention_num_buckets),
      jnp.float32,
    )
    buckets = relative_position_buckets(
      length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
    )
    return jnp.asarray(table, jnp.float32)[:, buckets][None]


class Encoder(nn.Module):
  """The layer stack with its shared relative-position bias and final norm."""

  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    position_bias = RelativePositionBias(cfg, name="relpos_bias")(x.shape[1])
    # One bias for all layers: relative positions plus -1e10 where the key is padding.
    bias = position_bias + jnp.where(mask[:, None, None, :], 0.0, -1e10).astype(jnp.float32)
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
    return RMSNorm(cfg.layer_norm_epsilon, cfg.jnp_dtype, name="encoder_norm")(x)


class T5Encoder(nn.Module):
  """T5 v1.1 encoder: tokens [B, L] int -> embeddings [B, L, D] in `config.dtype`.

  Positions whose token is 0 (padding) are zero in the output unless `zero_padding` is False
  (DeepFloyd IF, like Hugging Face's T5EncoderModel, keeps what the encoder computes there).
  """

  config: T5Config
  zero_padding: bool = True

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    mask = tokens > 0
    x = Embed(cfg.vocab_size, cfg.d_model, cfg.jnp_dtype, name="token_embedder")(tokens)
    x = nn.with_logical_constraint(x, ("batch", "length", None))
    x = Encoder(cfg, name="encoder")(x, mask)
    if not self.zero_padding:
      return x
    return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


def param_count(config: T5Config) -> int:
  """Number of encoder parameters (embedding included), from `jax.eval_shape`."""
  shapes = jax.eval_shape(
    lambda: T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  )
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes))))


def init_params(config: T5Config, rng: jax.Array) -> dict[str, Any]:
  """Random encoder parameters with T5X's init scales, as a plain (unboxed) float32 tree.

  Built from a single normal draw (no truncated normals), which compiles in a fraction of the
  time of `T5Encoder.init`; jit it with `out_shardings` to create the weights already sharded.
  Norm scales are 1; embedding N(0, 1); kernels N(0, 1/fan_in), the query's also / head_dim
  (T5 folds 1/sqrt(head_dim) into it); the relative-position table N(0, 1/heads).

  Args:
    config: the encoder size.
    rng: a PRNG key.

  Returns:
    The `params` collection of `T5Encoder(config)`.
  """
  shapes = jax.eval_shape(
    lambda: T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(shapes)["params"])[0]
  }
  # One normal draw for all tensors, sliced up: a draw per tensor compiles far slower on CPU.
  names = sorted(flat)
  sizes = [int(np.prod(flat[n].shape)) for n in names]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  offsets = np.cumsum([0] + sizes)
  out = {}
  for name, start, size in zip(names, offsets[:-1], sizes):
    shape = flat[name].shape
    if name.endswith("/scale"):
      out[name] = jnp.ones(shape, jnp.float32)
      continue
    std = 1.0 if name == "token_embedder/embedding" else 1.0 / math.sqrt(shape[0])
    if name.endswith("attention/query/kernel"):
      std /= math.sqrt(config.head_dim)
    out[name] = std * jax.lax.dynamic_slice_in_dim(noise, int(start), size).reshape(shape)
  tree: dict[str, Any] = {}
  for name, value in out.items():
    node = tree
    *parents, leaf_name = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf_name] = value
  return tree
