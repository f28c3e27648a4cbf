"""DeepFloyd IF's U-Net: diffusers' `UNet2DConditionModel` as IF configures it, in Flax.

The layout IF uses: `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D` down blocks (residual
blocks that resample with a residual block), `UNetMidBlock2DSimpleCrossAttn`, the mirrored up
blocks; scale-shift residual blocks with GELU; attention whose keys/values are the pixels' own
plus group-norm'd text projected by added K/V layers; the time embedding plus an attention-pooled
text embedding (`addition_embed_type='text'`) plus, for stage II, the embedding of the low-res
augmentation timestep (`class_embed_type='timestep'`). Module names mirror diffusers' parameter
paths (`down_blocks.0.resnets.1` / `conv1`), so `imagen_jax.deepfloyd` maps checkpoints by rule.

Inputs are IF's: NHWC sample (stage II: the noisy image concatenated with the upsampled low-res
image), IF's discrete timestep (a float in [0, 999]), the T5 sequence. IF attends to every text
position (its pipelines pass no mask), so this network takes none. `DeepFloydStageNet` adapts it
to the cascade's log-SNR signature.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.diffusion import discrete
from imagen_jax.nn import layers

Dtype = Any
ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "silu": nn.silu}
DOWN_BLOCKS = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
UP_BLOCKS = ("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")


def timestep_embedding(
  t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 1e4
) -> jax.Array:
  """diffusers' `get_timestep_embedding`: [B] timesteps -> [B, dim] float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def _dense(features: int, axes: tuple[str, str], name: str, kw: dict) -> layers.Dense:
  return layers.dense(features, axes, name=name, **kw)


class TimestepMLP(nn.Module):
  """diffusers' `TimestepEmbedding`: linear_1, activation, linear_2."""

  features: int
  act_fn: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _dense(self.features, ("embed", "mlp"), "linear_1", kw)(x.astype(self.dtype))
    return _dense(self.features, ("mlp", "embed"), "linear_2", kw)(ACTIVATIONS[self.act_fn](h))


class TextTimeEmbedding(nn.Module):
  """IF's pooled-text embedding: LayerNorm, attention pooling (no mask), projection, LayerNorm.

  The pooling query is the token mean plus a learned vector; it attends over itself and the
  tokens (diffusers' `AttentionPooling`, copied from IF).
  """

  features: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.LayerNorm(param_dtype=self.param_dtype, name="norm1")(text).astype(self.dtype)
    pool = Pool(self.num_heads, name="pool", **kw)(h)
    out = _dense(self.features, ("embed", "mlp"), "proj", kw)(pool)
    return layers.LayerNorm(param_dtype=self.param_dtype, name="norm2")(out).astype(self.dtype)


class Pool(nn.Module):
  """diffusers' `AttentionPooling` (the class token's multi-head attention output)."""

  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, _, d = x.shape
    pos = self.param(
      "positional_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(d**-0.5), (None, "embed")),
      (1, d),
      self.param_dtype,
    )
    cls = jnp.mean(x, axis=1, keepdims=True) + pos.astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1)
    heads = lambda y: y.reshape(b, y.shape[1], self.num_heads, d // self.num_heads)
    q = heads(_dense(d, ("embed", "mlp"), "q_proj", kw)(cls))
    k = heads(_dense(d, ("embed", "mlp"), "k_proj", kw)(x))
    v = heads(_dense(d, ("embed", "mlp"), "v_proj", kw)(x))
    return jax.nn.dot_product_attention(q, k, v)[:, 0].reshape(b, d)


class ResnetBlock(nn.Module):
  """diffusers' `ResnetBlock2D` with scale-shift time conditioning and optional resampling.

  resample='down' average-pools, 'up' repeats pixels (both before conv1, on both branches).
  """

  out_channels: int
  resample: str = "none"
  groups: int = 32
  eps: float = 1e-5
  act_fn: str = "gelu"
  skip_time_act: bool = False
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = ACTIVATIONS[self.act_fn]
    norm = lambda name: layers.GroupNorm(
      self.groups, self.eps, self.param_dtype, self.dtype, name=name
    )
    h = act(norm("norm1")(x))
    if self.resample == "down":
      x, h = (nn.avg_pool(y, (2, 2), (2, 2)) for y in (x, h))
    elif self.resample == "up":
      x, h = (jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2) for y in (x, h))
    h = layers.conv(self.out_channels, 3, name="conv1", **kw)(h)
    t = temb if self.skip_time_act else act(temb)
    t = _dense(2 * self.out_channels, ("embed", "mlp"), "time_emb_proj", kw)(t.astype(self.dtype))
    scale, shift = jnp.split(t[:, None, None, :], 2, axis=-1)
    h = norm("norm2")(h) * (1.0 + scale) + shift
    h = layers.conv(self.out_channels, 3, name="conv2", **kw)(act(h).astype(self.dtype))
    if x.shape[-1] != self.out_channels:
      x = layers.conv(self.out_channels, 1, name="conv_shortcut", **kw)(x.astype(self.dtype))
    out = (x.astype(jnp.float32) + h.astype(jnp.float32)) / self.output_scale_factor
    return layers.constrain(out.astype(self.dtype), layers.IMAGE_AXES)


class AddedKVAttention(nn.Module):
  """diffusers' `Attention` with `AttnAddedKVProcessor`: pixels attend to themselves and to the
  (group-norm'd, added-K/V-projected) text; residual added."""

  head_dim: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    heads = c // self.head_dim
    split = lambda y: y.reshape(b, y.shape[1], heads, self.head_dim)
    proj = lambda name, y: split(_dense(c, ("embed", "mlp"), name, kw)(y))
    # IF's cross-attention norm is a GroupNorm of the text with diffusers' fixed 32 groups.
    t = layers.GroupNorm(32, 1e-5, self.param_dtype, name="norm_cross")(text).astype(self.dtype)
    h = layers.GroupNorm(self.groups, self.eps, self.param_dtype, name="group_norm")(x)
    h = h.astype(self.dtype).reshape(b, hgt * wid, c)
    k = jnp.concatenate([proj("add_k_proj", t), proj("to_k", h)], axis=1)
    v = jnp.concatenate([proj("add_v_proj", t), proj("to_v", h)], axis=1)
    out = jax.nn.dot_product_attention(proj("to_q", h), k, v).reshape(b, hgt * wid, c)
    out = _dense(c, ("mlp", "embed"), "to_out.0", kw)(out).reshape(b, hgt, wid, c)
    return layers.constrain((x + out).astype(self.dtype), layers.IMAGE_AXES)


class DeepFloydUNet(nn.Module):
  """IF's U-Net (stage I: 3 input channels; stage II: 6, and `class_embed=True`).

  Attributes mirror the diffusers config.json fields of the same names (see
  `imagen_jax.deepfloyd.network_from_config`); `class_embed` is `class_embed_type == 'timestep'`.
  """

  block_out_channels: tuple[int, ...] = (512, 1024, 1536, 2048)
  layers_per_block: tuple[int, ...] = (3, 3, 3, 3)
  down_block_types: tuple[str, ...] = (
    "ResnetDownsampleBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
  )
  up_block_types: tuple[str, ...] = (
    "SimpleCrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "ResnetUpsampleBlock2D",
  )
  in_channels: int = 3
  out_channels: int = 6
  sample_size: int = 64
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 4096
  encoder_hid_dim: int = 4096
  attention_head_dim: int = 64
  addition_embed_type_num_heads: int = 64
  class_embed: bool = False
  act_fn: str = "gelu"
  time_embedding_act_fn: str | None = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  mid_block_scale_factor: float = 1.0
  resnet_out_scale_factor: float = 1.0
  resnet_skip_time_act: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"

  def __post_init__(self):
    n = len(self.block_out_channels)
    if not (
      len(self.layers_per_block) == len(self.down_block_types) == len(self.up_block_types) == n
    ):
      raise ValueError(
        f"DeepFloydUNet: block_out_channels, layers_per_block, down/up_block_types must have one "
        f"entry per level ({n})"
      )
    bad = [b for b in self.down_block_types if b not in DOWN_BLOCKS]
    bad += [b for b in self.up_block_types if b not in UP_BLOCKS]
    if bad:
      raise ValueError(
        f"DeepFloydUNet: block types {bad} unsupported; IF uses {DOWN_BLOCKS + UP_BLOCKS}"
      )
    layers.remat_policy(self.remat_policy)
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    sample: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    class_labels: jax.Array | None = None,
  ) -> jax.Array:
    """IF's forward pass.

    Args:
      sample: [B, H, W, in_channels] (stage II: noisy image ++ upsampled, noised low-res image).
      timesteps: [B] IF timesteps (floats in [0, 999]).
      encoder_hidden_states: [B, L, encoder_hid_dim] T5 embeddings.
      class_labels: [B] stage II's augmentation timestep (None for stage I).

    Returns:
      [B, H, W, out_channels] float32: ε in channels 0-2, IF's variance interpolation in 3-5.
    """
    if self.class_embed != (class_labels is not None):
      raise ValueError(
        f"DeepFloydUNet: class_embed={self.class_embed} but class_labels "
        f"{'missing' if class_labels is None else 'given'}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c0 = self.block_out_channels[0]
    temb_dim = 4 * c0
    sin = lambda t: timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepMLP(temb_dim, self.act_fn, name="time_embedding", **kw)(sin(timesteps))
    if self.class_embed:
      emb = emb + TimestepMLP(temb_dim, self.act_fn, name="class_embedding", **kw)(
        sin(class_labels)
      )
    text = encoder_hidden_states.astype(self.dtype)
    emb = emb + TextTimeEmbedding(
      temb_dim, self.addition_embed_type_num_heads, name="add_embedding", **kw
    )(text)
    if self.time_embedding_act_fn is not None:
      emb = ACTIVATIONS[self.time_embedding_act_fn](emb)
    text = _dense(self.cross_attention_dim, ("embed", "mlp"), "encoder_hid_proj", kw)(text)
    text = layers.constrain(text, layers.SEQ_AXES)

    res_cls = layers.maybe_remat(ResnetBlock, self.remat, self.remat_policy)
    attn_cls = layers.maybe_remat(AddedKVAttention, self.remat, self.remat_policy)

    def res(out, name, resample="none", scale=self.resnet_out_scale_factor):
      return res_cls(
        out,
        resample,
        self.norm_num_groups,
        self.norm_eps,
        self.act_fn,
        self.resnet_skip_time_act,
        scale,
        name=name,
        **kw,
      )

    def attn(name):
      return attn_cls(self.attention_head_dim, self.norm_num_groups, self.norm_eps, name=name, **kw)

    h = layers.conv(c0, 3, in_axis="image_channels", name="conv_in", **kw)(
      sample.astype(self.dtype)
    )
    skips = [h]
    n = len(self.block_out_channels)
    for i, (width, depth, kind) in enumerate(
      zip(self.block_out_channels, self.layers_per_block, self.down_block_types)
    ):
      p = f"down_blocks.{i}"
      for j in range(depth):
        h = res(width, f"{p}.resnets.{j}")(h, emb)
        if kind == "SimpleCrossAttnDownBlock2D":
          h = attn(f"{p}.attentions.{j}")(h, text)
        skips.append(h)
      if i < n - 1:
        h = res(width, f"{p}.downsamplers.0", "down")(h, emb)
        skips.append(h)

    mid = self.block_out_channels[-1]
    h = res(mid, "mid_block.resnets.0", scale=self.mid_block_scale_factor)(h, emb)
    h = attn("mid_block.attentions.0")(h, text)
    h = res(mid, "mid_block.resnets.1", scale=self.mid_block_scale_factor)(h, emb)

    widths, depths = self.block_out_channels[::-1], self.layers_per_block[::-1]
    for i, kind in enumerate(self.up_block_types):
      p = f"up_blocks.{i}"
      for j in range(depths[i] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(widths[i], f"{p}.resnets.{j}")(h, emb)
        if kind == "SimpleCrossAttnUpBlock2D":
          h = attn(f"{p}.attentions.{j}")(h, text)
      if i < n - 1:
        h = res(widths[i], f"{p}.upsamplers.0", "up")(h, emb)

    h = layers.GroupNorm(
      self.norm_num_groups, self.norm_eps, self.param_dtype, name="conv_norm_out"
    )(h)
    h = ACTIVATIONS[self.act_fn](h).astype(self.dtype)
    out = layers.conv(self.out_channels, 3, out_axis="image_channels", name="conv_out", **kw)(h)
    return out.astype(jnp.float32)


def resize_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize with corners aligned (torch `align_corners=True`, as IF upsamples)."""

  def weights(n_in: int, n_out: int) -> jax.Array:
    src = jnp.arange(n_out, dtype=jnp.float32) * ((n_in - 1) / max(n_out - 1, 1))
    lo = jnp.clip(jnp.floor(src), 0, n_in - 1)
    frac = src - lo
    hi = jnp.clip(lo + 1, 0, n_in - 1)
    eye = jnp.eye(n_in, dtype=jnp.float32)
    return (
      eye[lo.astype(jnp.int32)] * (1 - frac)[:, None] + eye[hi.astype(jnp.int32)] * frac[:, None]
    )

  wh, ww = weights(x.shape[1], size[0]), weights(x.shape[2], size[1])
  return jnp.einsum("ph,qw,bhwc->bpqc", wh, ww, x.astype(jnp.float32))


class DeepFloydStageNet(nn.Module):
  """An IF U-Net behind the cascade's network signature, so `Stage` trains and samples it.

  log-SNR -> IF timestep through IF's discrete schedule (`diffusion.discrete`; the stage's
  schedule is 'deepfloyd'); stage II upsamples the (already noise-augmented) low-res image with
  IF's bilinear align-corners resize, concatenates it to x and feeds its augmentation level as
  the class timestep. Returns ε, IF's first three output channels: the learned-variance channels
  are dropped (our samplers do not use them; fine-tuning leaves their weights untouched).
  The text mask is unused: IF attends to all text positions.

  Attributes:
    unet: the IF network.
    lowres_factor: output / low-res size for stage II (None for stage I).
  """

  unet: DeepFloydUNet
  lowres_factor: int | None = None

  @property
  def is_super_resolution(self) -> bool:
    """Whether the network is conditioned on a low-res image."""
    return self.lowres_factor is not None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    log_snr: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    lowres: jax.Array | None = None,
    lowres_aug_log_snr: jax.Array | None = None,
    deterministic: bool = True,
  ) -> jax.Array:
    """[B, H, W, 3] noisy image at [B] log-SNR (+ stage II low-res) -> [B, H, W, 3] ε̂."""
    del text_mask, deterministic  # IF attends to every position and has no dropout
    if (lowres is None) != (self.lowres_factor is None):
      raise ValueError(
        f"DeepFloydStageNet: lowres_factor={self.lowres_factor} but lowres "
        f"{'missing' if lowres is None else 'given'}"
      )
    sample, labels = x, None
    if lowres is not None:
      up = resize_align_corners(lowres, x.shape[1:3]).astype(x.dtype)
      sample = jnp.concatenate([x, up], axis=-1)
      labels = discrete.timestep_from_log_snr(lowres_aug_log_snr)
    out = self.unet(sample, discrete.timestep_from_log_snr(log_snr), text_emb, labels)
    return out[..., :3]
