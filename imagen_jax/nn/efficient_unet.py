"""The Efficient U-Net super-resolution network (Imagen Appendix B.1, F.2, F.3).

Versus the base U-Net: (1) more residual blocks at low resolution, where they are cheap;
(2) skip connections scaled by 1/sqrt(2); (3) down blocks downsample BEFORE their convolutions
and up blocks upsample AFTER them, so the expensive convs run at the lower resolution.
Attention only in the chosen blocks (paper: the lowest one): self-attention with text K/V
(SR-256) or explicit text cross-attention only (SR-1024). Fully convolutional: attention is
per block, not per resolution, so a network trained on crops samples at any size that the total
downsampling divides.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.nn import layers

Dtype = Any

SKIP_SCALE = 1.0 / math.sqrt(2.0)


class EfficientUNet(nn.Module):
  """Text-conditioned Efficient U-Net for super-resolution.

  Attributes:
    image_size: training (output) resolution; for SR-1024 the crop size (256).
    lowres_factor: output size / low-res input size (4 in the paper); None = no low-res input.
    in_channels: channels of x (3 for RGB).
    out_channels: channels of the prediction.
    channels: width of the full-resolution stem conv.
    block_channels: width of each down/up block pair, highest resolution first.
    block_res_blocks: residual blocks in each block (paper: (2, 4, 8, 8)).
    block_attention: per block 'none', 'self', 'self_text' (self-attention with text K/V)
      or 'cross' (text cross-attention only).
    num_heads: attention heads (paper: 8).
    emb_dim: conditioning embedding width (default 4 * channels).
    cond_dim: width the text sequence is projected to (default emb_dim).
    text_dim: width of the incoming text embeddings (T5-XXL: 4096).
    dropout: residual-block dropout rate (rng name 'dropout').
    norm_groups: GroupNorm groups.
    resize_method: `jax.image.resize` method used to upsample the low-res image.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each residual/attention block in the backward pass.
    remat_policy: name of the `jax.checkpoint_policies` policy used with remat.
  """

  image_size: int = 256
  lowres_factor: int | None = 4
  in_channels: int = 3
  out_channels: int = 3
  channels: int = 128
  block_channels: tuple[int, ...] = (128, 256, 512, 1024)
  block_res_blocks: tuple[int, ...] = (2, 4, 8, 8)
  block_attention: tuple[str, ...] = ("none", "none", "none", "self_text")
  num_heads: int = 8
  emb_dim: int | None = None
  cond_dim: int | None = None
  text_dim: int = 4096
  dropout: float = 0.0
  norm_groups: int = 32
  resize_method: str = "bicubic"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"

  def __post_init__(self):
    self.validate_config()
    super().__post_init__()

  @property
  def is_super_resolution(self) -> bool:
    """Whether the network is conditioned on a low-res image."""
    return self.lowres_factor is not None

  @property
  def lowres_size(self) -> int | None:
    """Training resolution of the low-res conditioning image (None without one)."""
    return None if self.lowres_factor is None else self.image_size // self.lowres_factor

  @property
  def downsampling_layout(self) -> str:
    """The config fields that set `total_downsampling`, as error messages quote them."""
    return f"2**len(block_channels), block_channels={self.block_channels}"

  @property
  def total_downsampling(self) -> int:
    """Every block halves the resolution."""
    return 2 ** len(self.block_channels)

  def validate_config(self) -> None:
    """Raises ValueError naming the config value that cannot work."""
    name = type(self).__name__
    n = len(self.block_channels)
    if n == 0:
      raise ValueError(f"{name}: block_channels must list at least one block")
    if len(self.block_res_blocks) != n or len(self.block_attention) != n:
      raise ValueError(
        f"{name}: block_channels={self.block_channels}, block_res_blocks="
        f"{self.block_res_blocks} and block_attention={self.block_attention} must have the "
        "same length (one entry per block)"
      )
    for kind in self.block_attention:
      if kind not in layers.ATTENTION_KINDS:
        raise ValueError(
          f"{name}: block_attention entry {kind!r} must be one of {layers.ATTENTION_KINDS}"
        )
    for c, kind in zip(self.block_channels, self.block_attention):
      if kind != "none" and c % self.num_heads:
        raise ValueError(
          f"{name}: block width {c} (block_channels) with attention must be divisible by "
          f"num_heads={self.num_heads}"
        )
    if self.image_size % self.total_downsampling:
      raise ValueError(
        f"{name}: image_size={self.image_size} must be divisible by the total downsampling "
        f"{self.total_downsampling} (2**len(block_channels), block_channels="
        f"{self.block_channels})"
      )
    if self.lowres_factor is not None and (
      self.lowres_factor < 1 or self.image_size % self.lowres_factor
    ):
      raise ValueError(
        f"{name}: lowres_factor={self.lowres_factor} must be a positive divisor of "
        f"image_size={self.image_size}"
      )
    layers.remat_policy(self.remat_policy)

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
    """Predicts the diffusion target (eps or v) for a noisy high-res image.

    Args:
      x: [B, H, W, in_channels] noisy image (any size the total downsampling divides).
      log_snr: [B] log-SNR of x's noise level.
      text_emb: [B, L, text_dim] text encoder output (zeros for a dropped caption).
      text_mask: [B, L] bool, False = padding (all False for a dropped caption).
      lowres: [B, H/lowres_factor, W/lowres_factor, C] low-res conditioning image.
      lowres_aug_log_snr: [B] log-SNR of the low-res image's augmentation noise.
      deterministic: disable dropout.

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """
    layers.validate_network_inputs(
      self, x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr
    )

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = self.emb_dim or 4 * self.channels
    cond_dim = self.cond_dim or emb_dim
    emb, text, text_mask, h = layers.Conditioning(
      self.channels,
      emb_dim,
      cond_dim,
      self.lowres_factor,
      self.resize_method,
      name="conditioning",
      **kw,
    )(x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr)

    res_cls = layers.maybe_remat(layers.ResBlock, self.remat, self.remat_policy)
    attn_cls = layers.maybe_remat(layers.SpatialAttention, self.remat, self.remat_policy)

    def res(out, name):
      return res_cls(out, self.dropout, "none", self.norm_groups, deterministic, name=name, **kw)

    def attn(h, kind, name):
      if kind == "none":
        return h
      text_args = () if kind == "self" else (text, text_mask)
      return attn_cls(kind, self.num_heads, self.norm_groups, name=name, **kw)(h, *text_args)

    h = layers.conv(self.channels, 3, in_axis="image_channels", name="conv_in", **kw)(h)
    skips = [h]
    blocks = list(zip(self.block_channels, self.block_res_blocks, self.block_attention))
    # DBlock: downsample first, then the residual blocks run at the lower resolution.
    for i, (c, n, kind) in enumerate(blocks):
      h = layers.Resample(c, "down", name=f"down_{i}_resample", **kw)(h)
      for j in range(n):
        h = res(c, f"down_{i}_res_{j}")(h, emb)
      h = attn(h, kind, f"down_{i}_attn")
      skips.append(h)
    # UBlock: residual blocks at the low resolution, then upsample to the next block's width.
    for i, (c, n, kind) in reversed(list(enumerate(blocks))):
      h = jnp.concatenate([h, skips.pop() * SKIP_SCALE], axis=-1)
      for j in range(n):
        h = res(c, f"up_{i}_res_{j}")(h, emb)
      h = attn(h, kind, f"up_{i}_attn")
      out_c = self.block_channels[i - 1] if i > 0 else self.channels
      h = layers.Resample(out_c, "up", name=f"up_{i}_resample", **kw)(h)
    h = jnp.concatenate([h, skips.pop() * SKIP_SCALE], axis=-1)

    h = layers.GroupNorm(self.norm_groups, param_dtype=self.param_dtype, name="norm_out")(h)
    h = nn.silu(h).astype(self.dtype)
    out = layers.conv(
      self.out_channels, 3, zero_init=True, out_axis="image_channels", name="conv_out", **kw
    )(h)
    return out.astype(jnp.float32)
