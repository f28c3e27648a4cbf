"""Shared U-Net building blocks: norms, noise-level embedding, text conditioning, attention,
BigGAN residual blocks and resampling.

Every parameter carries logical axis names (see `imagen_jax.parallel.LOGICAL_AXIS_RULES`) and
block outputs carry logical activation constraints, so one code path runs on one CPU or a pod.
Compute happens in `dtype` (bf16 on accelerators) with `param_dtype` (f32) weights; norms and
softmax statistics are always computed in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Array = jax.Array

# Activations of image feature maps and of token sequences.
IMAGE_AXES = ("batch", "height", "width", "channels")
SEQ_AXES = ("batch", "length", "channels")

# log-SNR spans roughly [-20, 20]; scaling by 25 maps that onto the [-500, 500] range over which
# the ADM sinusoidal embedding (max period 1e4, designed for t*1000) resolves distinct levels.
LOG_SNR_SCALE = 25.0

REMAT_POLICIES = {
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

ATTENTION_KINDS = ("none", "self", "self_text", "cross")


def remat_policy(name: str):
  """The `jax.checkpoint_policies` entry called `name` (see REMAT_POLICIES)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}; must be one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def maybe_remat(module_cls: type[nn.Module], remat: bool, policy: str) -> type[nn.Module]:
  """`nn.remat(module_cls)` with the named policy when `remat`, else `module_cls` unchanged.

  Blocks take `deterministic` as a dataclass field, so nothing needs to be a static argument.
  """
  if not remat:
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(policy), prevent_cse=True)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """Logical sharding constraint on an activation (no-op without rules/mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


def partitioned(init: Callable, axes: Sequence[str | None]) -> Callable:
  """An initialiser whose parameter carries logical axis names (for the sharding rules)."""
  return nn.with_logical_partitioning(init, tuple(axes))


def conv(
  features: int,
  kernel_size: int = 3,
  *,
  strides: int = 1,
  zero_init: bool = False,
  in_axis: str = "conv_in",
  out_axis: str = "conv_out",
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A 'SAME' conv with 4-D logical kernel axes (height, width, in, out).

  Args:
    features: output channels.
    kernel_size: square kernel size.
    strides: spatial stride.
    zero_init: zero the kernel (residual-branch outputs start as the identity).
    in_axis: logical name of the input-channel dim ('image_channels' for RGB inputs).
    out_axis: logical name of the output-channel dim ('image_channels' for RGB outputs).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    name: module name.

  Returns:
    The `nn.Conv` module.
  """
  kernel_init = nn.initializers.zeros_init() if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding="SAME",
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=partitioned(kernel_init, ("conv_height", "conv_width", in_axis, out_axis)),
    bias_init=partitioned(nn.initializers.zeros_init(), (out_axis,)),
    name=name,
  )


class Dense(nn.Module):
  """A dense layer contracting the last `in_dims` input dims, with a full-rank logical kernel.

  Unlike `nn.DenseGeneral` (which initialises a flattened 2-D kernel), the initialiser sees the
  kernel's real shape, so multi-dim kernels such as [embed, heads, kv] carry one logical axis
  name per dimension.

  Attributes:
    features: output feature dims (e.g. (heads, head_dim)).
    kernel_axes: logical names of the kernel dims, contracted input dims first.
    in_dims: how many trailing input dims are contracted.
    zero_init: zero the kernel.
    kernel_init: the kernel's initialiser (default: fan-in truncated normal, or zeros).
    use_bias: add a bias (its axes are the output part of `kernel_axes`).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  in_dims: int = 1
  zero_init: bool = False
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = tuple(x.shape[x.ndim - self.in_dims :])
    kshape = in_shape + tuple(self.features)
    if len(self.kernel_axes) != len(kshape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {kshape}")
    if self.kernel_init is not None:
      init = self.kernel_init
    elif self.zero_init:
      init = nn.initializers.zeros_init()
    else:
      init = nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(range(self.in_dims)),
        out_axis=tuple(range(self.in_dims, len(kshape))),
      )
    kernel = self.param("kernel", partitioned(init, self.kernel_axes), kshape, self.param_dtype)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param(
        "bias",
        partitioned(nn.initializers.zeros_init(), self.kernel_axes[self.in_dims :]),
        tuple(self.features),
        self.param_dtype,
      )
      y = y + bias.astype(self.dtype)
    return y


def dense(
  features: int | Sequence[int],
  kernel_axes: Sequence[str | None],
  *,
  axis: int | Sequence[int] = -1,
  zero_init: bool = False,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> Dense:
  """A `Dense` whose kernel has logical axes `kernel_axes` (inputs then outputs).

  Args:
    features: output feature dims (an int or a tuple, e.g. (heads, head_dim)).
    kernel_axes: logical names of the kernel dims, contracted input dims first.
    axis: contracted trailing input axes (-1, or (-2, -1) for [heads, kv] inputs).
    zero_init: zero the kernel.
    kernel_init: the kernel's initialiser (default: fan-in truncated normal, or zeros).
    use_bias: add a bias.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    name: module name.

  Returns:
    The `Dense` module.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if sorted(axes) != list(range(-len(axes), 0)):
    raise ValueError(f"dense contracts trailing axes only, got axis={axis}")
  return Dense(
    features,
    tuple(kernel_axes),
    len(axes),
    zero_init,
    use_bias,
    dtype,
    param_dtype,
    name=name,
  )


def num_groups(channels: int, groups: int) -> int:
  """The largest group count <= `groups` dividing `channels` (tiny test widths need fewer)."""
  return math.gcd(channels, groups)


def _group_mean(per_channel: Array, groups: int) -> Array:
  """[B, C] per-channel means -> [B, 1, C]: each channel gets the mean of its group."""
  b, c = per_channel.shape
  group = per_channel.reshape(b, groups, c // groups).mean(-1)
  return jnp.repeat(group, c // groups, axis=1)[:, None, :]


def _group_stats(xf: Array, groups: int, epsilon: float) -> tuple[Array, Array]:
  """Per-group mean and 1/sqrt(var + eps) of [B, N, C] float32, each as [B, 1, C], two-pass.

  Reducing over the positions first ([B, N, C] -> [B, C], contiguous in C) and only then over
  a group's channels is what XLA:CPU runs fast; a [B, N, G, C/G] reduction over axes (1, 3)
  cost as much as the convolutions of the tiny networks (demo base step -8%).
  """
  mean = _group_mean(xf.mean(1), groups)
  centred = xf - mean
  var = _group_mean(jnp.mean(centred * centred, 1), groups)
  return mean, jax.lax.rsqrt(var + epsilon)


def _flat(x: Array) -> Array:
  """[B, ..., C] -> [B, N, C] float32 (N: the positions)."""
  return x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(
  x: Array, scale: Array, bias: Array, groups: int, epsilon: float, dtype: Dtype
) -> Array:
  """GroupNorm of [B, ..., C] with statistics in float32, returned in `dtype`.

  Its gradient saves only `x` (in its own dtype) and the per-group statistics and recomputes
  the normalised values: autodiff of the plain formula keeps a float32 copy of the centred input
  per norm, which in a bf16 network is most of the activation memory written per step.
  """
  return _group_norm_fwd(x, scale, bias, groups, epsilon, dtype)[0]


def _group_norm_fwd(x, scale, bias, groups, epsilon, dtype):
  xf = _flat(x)
  mean, inv = _group_stats(xf, groups, epsilon)
  y = (xf - mean) * (inv * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
  return y.reshape(x.shape).astype(dtype), (x, scale, bias, mean, inv)


def _group_norm_bwd(groups, epsilon, dtype, residuals, g):
  del epsilon, dtype
  x, scale, bias, mean, inv = residuals
  xhat = (_flat(x) - mean) * inv
  g32 = _flat(g)
  d_scale = jnp.sum(g32 * xhat, axis=(0, 1)).astype(scale.dtype)
  d_bias = jnp.sum(g32, axis=(0, 1)).astype(bias.dtype)
  gs = g32 * scale.astype(jnp.float32)
  dx = inv * (
    gs - _group_mean(gs.mean(1), groups) - xhat * _group_mean((gs * xhat).mean(1), groups)
  )
  return dx.reshape(x.shape).astype(x.dtype), d_scale, d_bias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class _NormParams(nn.Module):
  """A norm's scale and bias (axis ('norm',)), at the path flax's GroupNorm used."""

  features: int
  param_dtype: Dtype

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    shape, axes = (self.features,), ("norm",)
    scale = self.param(
      "scale", partitioned(nn.initializers.ones_init(), axes), shape, self.param_dtype
    )
    bias = self.param(
      "bias", partitioned(nn.initializers.zeros_init(), axes), shape, self.param_dtype
    )
    return scale, bias


class GroupNorm(nn.Module):
  """GroupNorm with float32 statistics, returned in `dtype` (default float32; a bf16 network
  passes its compute dtype so the normalised activations and their gradients stay bf16).
  scale/bias have axis ('norm',)."""

  groups: int = 32
  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Named as flax's nn.GroupNorm submodule was: checkpoints keep their parameter paths.
    scale, bias = _NormParams(x.shape[-1], self.param_dtype, name="GroupNorm_0")()
    groups = num_groups(x.shape[-1], self.groups)
    return group_norm(x, scale, bias, groups, self.epsilon, jnp.dtype(self.dtype))


class LayerNorm(nn.Module):
  """LayerNorm over the last dim in float32 (returns float32); params have axis ('norm',)."""

  epsilon: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.LayerNorm(
      epsilon=self.epsilon,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
      bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)),
    )(x.astype(jnp.float32))


def sinusoidal_embedding(
  log_snr: Array, dim: int, scale: float = LOG_SNR_SCALE, max_period: float = 10_000.0
) -> Array:
  """ADM-style sinusoidal features of a continuous noise level.

  Args:
    log_snr: [B] noise levels (log-SNR λ).
    dim: embedding width (even).
    scale: multiplier applied to λ before embedding (see LOG_SNR_SCALE).
    max_period: longest period of the sinusoids.

  Returns:
    [B, dim] float32 features: cos then sin.
  """
  if dim % 2:
    raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (log_snr.astype(jnp.float32) * scale)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class NoiseLevelEmbedding(nn.Module):
  """Sinusoidal embedding of a log-SNR followed by a 2-layer SiLU MLP."""

  features: int
  emb_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, log_snr: Array) -> Array:
    """[B] log-SNR -> [B, emb_dim] embedding (compute dtype)."""
    h = sinusoidal_embedding(log_snr, self.features).astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.emb_dim, ("embed", "mlp"), name="dense_0", **kw)(h)
    h = dense(self.emb_dim, ("mlp", "embed"), name="dense_1", **kw)(nn.silu(h))
    return h


@jax.custom_vjp
def masked_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """Multi-head softmax attention with a key-padding mask that tolerates all-masked rows.

  A row whose keys are all masked (a classifier-free-dropped caption) attends to nothing:
  its output is exactly 0 rather than NaN or a uniform average of padding. Logits and softmax
  are float32, the probabilities meet `v` in its dtype (as `jax.nn.dot_product_attention`'s
  XLA path does). The gradient is hand-written: it saves the [B, N, T] log-sum-exp instead of
  the [B, N, T, S] probabilities and recomputes them, and runs the four matmuls of the softmax
  backward directly (autodiff of the softmax made XLA:CPU transpose and re-read the
  probabilities several times: demo base step -14%).

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, N, H] keys.
    v: [B, S, N, H] values.
    mask: [B, S] bool, True = attend; None = attend to all.

  Returns:
    [B, T, N, H] attention output, in q's dtype.
  """
  return _attention_fwd(q, k, v, mask)[0]


def _softmax_scale(q: Array) -> float:
  """1/sqrt(head dim), the logits' scale."""
  return 1.0 / math.sqrt(q.shape[-1])


def _attention_logits(q: Array, k: Array, mask: Array | None) -> Array:
  """[B, N, T, S] float32 scaled dot products; masked keys -inf.

  The mask is added as a [B, 1, 1, S] bias rather than selected: XLA:CPU materialised the -inf
  operand of a select at the full [B, N, T, S] size. The scale multiplies q, S times fewer
  elements than the logits (demo base train step 0.905x, A/B in one process).
  """
  scaled_q = q * _softmax_scale(q)  # a Python float: q keeps its dtype
  logits = jnp.einsum("btnh,bsnh->bnts", scaled_q, k, preferred_element_type=jnp.float32)
  if mask is None:
    return logits
  return logits + jnp.where(mask, 0.0, -jnp.inf)[:, None, None, :]


def _attention_fwd(q, k, v, mask):
  logits = _attention_logits(q, k, mask)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # dead rows: all -inf
  unnormalised = jnp.exp(logits - row_max)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  total = jnp.where(total > 0, total, 1.0)  # dead rows: every probability 0
  probs = unnormalised / total
  out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  out = out.astype(q.dtype)
  return out, (q, k, v, mask, out, row_max + jnp.log(total))


def _attention_bwd(residuals, d_out):
  q, k, v, mask, out, log_sum_exp = residuals
  probs = jnp.exp(_attention_logits(q, k, mask) - log_sum_exp)  # masked keys: exp(-inf) = 0
  f32 = dict(preferred_element_type=jnp.float32)
  d_v = jnp.einsum("bnts,btnh->bsnh", probs.astype(d_out.dtype), d_out, **f32)
  d_probs = jnp.einsum("btnh,bsnh->bnts", d_out, v, **f32)
  # Softmax backward: dS = P * (dP - sum_s P dP), and sum_s P dP = <dO, O> per row.
  row_dot = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
  d_logits = (probs * (d_probs - row_dot[..., None]) * _softmax_scale(q)).astype(q.dtype)
  d_q = jnp.einsum("bnts,bsnh->btnh", d_logits, k, **f32)
  d_k = jnp.einsum("bnts,btnh->bsnh", d_logits, q, **f32)
  d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_mask


masked_attention.defvjp(_attention_fwd, _attention_bwd)


class AttentionPool(nn.Module):
  """Multi-head attention pooling of a (LayerNorm'd) token sequence into one vector.

  A learned query attends over the valid tokens; a row with no valid token (a dropped
  caption) gets a zero attention output, so it pools to the output bias: a learned null vector.
  """

  out_dim: int
  num_heads: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    """[B, L, D] tokens, [B, L] mask -> [B, out_dim]."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"attention-pool width {d} must be divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    query = self.param(
      "query",
      partitioned(nn.initializers.normal(1.0 / math.sqrt(d)), ("heads", "kv")),
      (self.num_heads, head_dim),
      self.param_dtype,
    )
    # The mean of the valid tokens joins the learned query so the query is input dependent.
    m = mask[..., None].astype(x.dtype)
    mean = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    q = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), name="q", **kw)(mean)
    q = (q + query.astype(self.dtype))[:, None]
    k = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), name="k", **kw)(x)
    v = dense((self.num_heads, head_dim), ("embed", "heads", "kv"), name="v", **kw)(x)
    out = masked_attention(q, k, v, mask)[:, 0]
    return dense(self.out_dim, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)(out)


class TextConditioning(nn.Module):
  """LayerNorm on the text embeddings, projection to `cond_dim`, attention pooling.

  Returns the projected sequence (for per-layer attention K/V) and the pooled vector (added to
  the noise-level embedding).
  """

  cond_dim: int
  emb_dim: int
  pool_heads: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_emb: Array, text_mask: Array) -> tuple[Array, Array]:
    """[B, L, D_text], [B, L] -> ([B, L, cond_dim] sequence, [B, emb_dim] pooled)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(param_dtype=self.param_dtype, name="norm")(text_emb).astype(self.dtype)
    h = dense(self.cond_dim, ("embed", "mlp"), name="proj", **kw)(h)
    h = constrain(h, SEQ_AXES)
    pooled = AttentionPool(self.emb_dim, self.pool_heads, name="pool", **kw)(h, text_mask)
    return h, pooled


class SpatialAttention(nn.Module):
  """Pre-norm attention over the pixels of a feature map, with a residual connection.

  kind='self': self-attention; 'self_text': self-attention whose keys/values are extended with
  the projected text sequence (padding masked; paper's base and SR-256 text conditioning);
  'cross': queries from pixels, keys/values from the text only (SR-1024). The output projection
  starts at zero so the block starts as the identity.
  """

  kind: str = "self"
  num_heads: int = 8
  groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, text: Array | None = None, text_mask: Array | None = None):
    """[B, H, W, C] (+ [B, L, cond] text, [B, L] mask) -> [B, H, W, C]."""
    if self.kind not in ("self", "self_text", "cross"):
      raise ValueError(f"attention kind={self.kind!r}; must be 'self', 'self_text' or 'cross'")
    b, hgt, wid, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention width {c} must be divisible by num_heads={self.num_heads}")
    hd = c // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: dense((self.num_heads, hd), ("embed", "heads", "kv"), name=name, **kw)
    h = GroupNorm(self.groups, param_dtype=self.param_dtype, dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, c)
    q = proj("q")(h)
    mask = None
    if self.kind == "cross":
      k, v, mask = proj("text_k")(text), proj("text_v")(text), text_mask
    else:
      k, v = proj("k")(h), proj("v")(h)
      if self.kind == "self_text":
        k = jnp.concatenate([k, proj("text_k")(text)], axis=1)
        v = jnp.concatenate([v, proj("text_v")(text)], axis=1)
        mask = jnp.concatenate([jnp.ones((b, hgt * wid), bool), text_mask], axis=1)
    out = masked_attention(q, k, v, mask)
    out = dense(c, ("heads", "kv", "embed"), axis=(-2, -1), zero_init=True, name="out", **kw)(out)
    return constrain(x + out.reshape(b, hgt, wid, c).astype(x.dtype), IMAGE_AXES)


def downsample_2x(x: Array) -> Array:
  """2x2 average pooling."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def upsample_2x(x: Array) -> Array:
  """Nearest-neighbour 2x upsampling."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """BigGAN-style residual block with scale-shift (FiLM) conditioning on the embedding.

  GN -> SiLU -> [resample] -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout ->
  conv3x3 (zero-initialised) ; skip: [resample] -> 1x1 conv when the width changes.
  """

  out_channels: int
  dropout: float = 0.0
  resample: str = "none"  # 'none' | 'up' | 'down'
  groups: int = 32
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """[B, H, W, C], [B, E] -> [B, H', W', out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Norms return the compute dtype, and SiLU and the FiLM scale/shift run in it: in a bf16
    # network these activations (and their gradients) cross HBM at 2 bytes, not 4.
    norm = lambda name: GroupNorm(
      self.groups, param_dtype=self.param_dtype, dtype=self.dtype, name=name
    )
    h = nn.silu(norm("norm_0")(x))
    if self.resample != "none":
      fn = {"up": upsample_2x, "down": downsample_2x}[self.resample]
      h, x = fn(h), fn(x)
    h = conv(self.out_channels, 3, name="conv_0", **kw)(h)
    ss = dense(2 * self.out_channels, ("embed", "mlp"), name="emb_proj", **kw)(nn.silu(emb))
    scale, shift = jnp.split(ss.astype(self.dtype)[:, None, None, :], 2, axis=-1)
    h = nn.silu(norm("norm_1")(h) * (1.0 + scale) + shift)
    h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = conv(self.out_channels, 3, zero_init=True, name="conv_1", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="skip", **kw)(x.astype(self.dtype))
    return constrain(x.astype(self.dtype) + h, IMAGE_AXES)


class Resample(nn.Module):
  """Strided 3x3 conv (down) or nearest upsampling then 3x3 conv (up) to `out_channels`."""

  out_channels: int
  mode: str  # 'up' | 'down'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H or H/2, ..., out_channels]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.mode == "down":
      h = conv(self.out_channels, 3, strides=2, name="conv", **kw)(x)
    elif self.mode == "up":
      h = conv(self.out_channels, 3, name="conv", **kw)(upsample_2x(x))
    else:
      raise ValueError(f"Resample mode={self.mode!r}; must be 'up' or 'down'")
    return constrain(h, IMAGE_AXES)


def validate_network_inputs(
  network: nn.Module,
  x: jax.Array,
  log_snr: jax.Array,
  text_emb: jax.Array,
  text_mask: jax.Array,
  lowres: jax.Array | None,
  lowres_aug_log_snr: jax.Array | None,
) -> None:
  """Every input check shared by the U-Nets; errors name the config value to change.

  Args:
    network: the U-Net being called; its `text_dim`, `lowres_factor`, `in_channels`,
      `total_downsampling` and `downsampling_layout` (how its downsampling is configured,
      quoted in the error) are checked against the inputs.
  """
  name = type(network).__name__
  validate_conditioning(name, x, log_snr, text_emb, text_mask, network.text_dim)
  validate_lowres(name, x, lowres, lowres_aug_log_snr, network.lowres_factor)
  if x.shape[-1] != network.in_channels:
    raise ValueError(
      f"{name}: x has {x.shape[-1]} channels; config in_channels={network.in_channels}"
    )
  factor = network.total_downsampling
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ValueError(
      f"{name}: input {x.shape[1]}x{x.shape[2]} must be divisible by the total downsampling "
      f"{factor} ({network.downsampling_layout})"
    )


def validate_conditioning(
  network: str,
  x: Array,
  log_snr: Array,
  text_emb: Array,
  text_mask: Array,
  text_dim: int,
) -> None:
  """Clear errors for wrongly shaped network inputs, before anything is traced deep."""
  if x.ndim != 4:
    raise ValueError(f"{network}: x must be [B, H, W, C], got shape {x.shape}")
  b = x.shape[0]
  if log_snr.shape != (b,):
    raise ValueError(f"{network}: log_snr must have shape [B]=({b},), got {log_snr.shape}")
  if text_emb.ndim != 3 or text_emb.shape[0] != b:
    raise ValueError(f"{network}: text_emb must be [B={b}, L, D], got shape {text_emb.shape}")
  if text_emb.shape[-1] != text_dim:
    raise ValueError(
      f"{network}: text_emb width {text_emb.shape[-1]} does not match the config value "
      f"text_dim={text_dim}; set text_dim to the text encoder's width"
    )
  if text_mask.shape != text_emb.shape[:2]:
    raise ValueError(
      f"{network}: text_mask must have shape [B, L]={text_emb.shape[:2]}, got {text_mask.shape}"
    )


class Conditioning(nn.Module):
  """Everything a U-Net is conditioned on, computed once per call.

  Returns the embedding added to every residual block (noise level + pooled text + low-res
  augmentation level), the projected text sequence, its mask, and the network input (x, with
  the resized low-res image concatenated for super-resolution).
  """

  channels: int
  emb_dim: int
  cond_dim: int
  lowres_factor: int | None
  resize_method: str = "bicubic"
  pool_heads: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    log_snr: Array,
    text_emb: Array,
    text_mask: Array,
    lowres: Array | None,
    lowres_aug_log_snr: Array | None,
  ) -> tuple[Array, Array, Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    text_mask = text_mask.astype(bool)
    # Dropped (classifier-free) captions arrive as zeros with an all-False mask; zeroing
    # padding makes padded-position contents irrelevant even before masking.
    text_emb = jnp.where(text_mask[..., None], text_emb, 0).astype(jnp.float32)
    emb = NoiseLevelEmbedding(self.channels, self.emb_dim, name="noise_emb", **kw)(log_snr)
    text, pooled = TextConditioning(
      self.cond_dim, self.emb_dim, self.pool_heads, name="text", **kw
    )(text_emb, text_mask)
    emb = emb + pooled
    h = x.astype(self.dtype)
    if self.lowres_factor is not None:
      b, hgt, wid, _ = x.shape
      up = jax.image.resize(
        lowres.astype(jnp.float32), (b, hgt, wid, lowres.shape[-1]), method=self.resize_method
      )
      h = jnp.concatenate([h, up.astype(self.dtype)], axis=-1)
      emb = emb + NoiseLevelEmbedding(self.channels, self.emb_dim, name="aug_emb", **kw)(
        lowres_aug_log_snr
      )
    return constrain(emb, ("batch", None)), text, text_mask, constrain(h, IMAGE_AXES)


def validate_lowres(
  network: str,
  x: Array,
  lowres: Array | None,
  lowres_aug_log_snr: Array | None,
  lowres_factor: int | None,
) -> None:
  """Checks the low-res conditioning matches the network's configured `lowres_factor`."""
  b, hgt, wid, _ = x.shape
  if lowres_factor is None:
    if lowres is not None or lowres_aug_log_snr is not None:
      raise ValueError(
        f"{network}: got a low-res image but lowres_factor=None (not a super-resolution "
        "network); set lowres_factor or pass lowres=None"
      )
    return
  if lowres is None or lowres_aug_log_snr is None:
    raise ValueError(
      f"{network}: a super-resolution network (lowres_factor={lowres_factor}) needs both "
      "lowres [B, h, w, C] and lowres_aug_log_snr [B]"
    )
  if lowres.ndim != 4 or lowres.shape[0] != b:
    raise ValueError(f"{network}: lowres must be [B={b}, h, w, C], got shape {lowres.shape}")
  expected = (hgt // lowres_factor, wid // lowres_factor)
  if hgt % lowres_factor or wid % lowres_factor or lowres.shape[1:3] != expected:
    raise ValueError(
      f"{network}: low-res image is {lowres.shape[1]}x{lowres.shape[2]} for a {hgt}x{wid} "
      f"output; with config value lowres_factor={lowres_factor} it must be "
      f"{hgt / lowres_factor:g}x{wid / lowres_factor:g}"
    )
  if lowres_aug_log_snr.shape != (b,):
    raise ValueError(
      f"{network}: lowres_aug_log_snr must have shape [B]=({b},), got {lowres_aug_log_snr.shape}"
    )
