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

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.nn import base, layers

SKIP_SCALE = 1.0 / math.sqrt(2.0)


class EfficientUNet(base.TextConditionedUNet):
  """Text-conditioned Efficient U-Net for super-resolution.

  Attributes (besides `base.TextConditionedUNet`'s; `image_size` is the training (output)
  resolution, for SR-1024 the crop size (256); `lowres_factor` is 4 in the paper):
    block_channels: width of each down/up block pair, highest resolution first.
    block_res_blocks: residual blocks in each block (paper: (2, 4, 8, 8)).
    block_attention: per block 'none', 'self', 'self_text' (self-attention with text K/V)
      or 'cross' (text cross-attention only).
    num_heads: attention heads (paper: 8).
    final_res_blocks: residual blocks at the full resolution, after the last skip
      concatenation (paper: 0; imagen-pytorch's `final_resnet_block` is 1). Every other conv
      runs at half resolution or less, so without one only the stem and the output conv see
      the output's pixels. Tried on the demo's SR stages it did not help their small shapes
      (README "What was tried for the small shapes"), so no shipped recipe sets it.
  """

  image_size: int = 256
  lowres_factor: int | None = 4
  channels: int = 128
  block_channels: tuple[int, ...] = (128, 256, 512, 1024)
  block_res_blocks: tuple[int, ...] = (2, 4, 8, 8)
  block_attention: tuple[str, ...] = ("none", "none", "none", "self_text")
  num_heads: int = 8
  final_res_blocks: int = 0

  @property
  def downsampling_layout(self) -> str:
    """The config fields that set `total_downsampling`, as error messages quote them."""
    return f"2**len(block_channels), block_channels={self.block_channels}"

  @property
  def total_downsampling(self) -> int:
    """Every block halves the resolution."""
    return 2 ** len(self.block_channels)

  def validate_layout(self) -> None:
    """Raises ValueError naming the block value that cannot work."""
    name = type(self).__name__
    n = len(self.block_channels)
    if n == 0:
      raise ValueError(f"{name}: block_channels must list at least one block")
    if self.final_res_blocks < 0:
      raise ValueError(f"{name}: final_res_blocks={self.final_res_blocks} must be >= 0")
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
    emb, text, text_mask, h = self.condition(
      x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr
    )
    kw = self._kw
    res_cls, attn_cls = self.block_classes()

    def res(out, name):
      return res_cls(out, self.dropout, "none", self.norm_groups, deterministic, name=name, **kw)

    def attn(h, kind, name):
      if kind == "none":
        return h
      text_args = () if kind == "self" else (text, text_mask)
      return attn_cls(kind, self.num_heads, self.norm_groups, name=name, **kw)(h, *text_args)

    h = self.stem(h)
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
    for j in range(self.final_res_blocks):
      h = res(self.channels, f"final_res_{j}")(h, emb)
    return self.output_head(h)
