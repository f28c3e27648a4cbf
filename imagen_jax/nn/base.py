"""What every text-conditioned U-Net of the cascade shares.

The fields, the one input signature (x, log-SNR, text, mask, low-res image, its augmentation
level), the checks on config and inputs, the conditioning (noise-level + pooled text embedding,
projected text sequence, low-res image concatenated to x), the stem conv and the output head.
A network family (`UNet`, `EfficientUNet`) adds only its layout: its blocks between `stem` and
`output_head`, its own config checks, and how its resolution halves (`total_downsampling`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.nn import layers

Dtype = Any


class TextConditionedUNet(nn.Module):
  """Base of the cascade's U-Nets (subclasses set the defaults of their family).

  Attributes:
    image_size: training resolution (for a fully convolutional SR network, the crop size).
    lowres_factor: None for a base model; output size / low-res input size for super-resolution.
    in_channels: channels of x (3 for RGB).
    out_channels: channels of the prediction.
    channels: width of the full-resolution stem conv.
    emb_dim: conditioning embedding width (default 4 * channels).
    cond_dim: width the text sequence is projected to (default emb_dim).
    text_dim: width of the incoming text embeddings (T5-XXL: 4096).
    dropout: residual-block dropout rate (rng name 'dropout').
    norm_groups: GroupNorm groups (fewer for tiny widths).
    resize_method: `jax.image.resize` method used to upsample the low-res image.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each residual/attention block in the backward pass.
    remat_policy: name of the `jax.checkpoint_policies` policy used with remat.
  """

  image_size: int = 64
  lowres_factor: int | None = None
  in_channels: int = 3
  out_channels: int = 3
  channels: int = 128
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
    """Training resolution of the low-res conditioning image (None for a base model)."""
    return None if self.lowres_factor is None else self.image_size // self.lowres_factor

  @property
  def total_downsampling(self) -> int:
    """Factor between the input resolution and the lowest level's resolution."""
    raise NotImplementedError

  @property
  def downsampling_layout(self) -> str:
    """The config fields that set `total_downsampling`, as error messages quote them."""
    raise NotImplementedError

  def validate_layout(self) -> None:
    """The family's own config checks (run before the shared ones, which rely on them)."""

  def validate_config(self) -> None:
    """Raises ValueError naming the config value that cannot work."""
    self.validate_layout()
    name = type(self).__name__
    if self.image_size % self.total_downsampling:
      raise ValueError(
        f"{name}: image_size={self.image_size} must be divisible by the total downsampling "
        f"{self.total_downsampling} ({self.downsampling_layout})"
      )
    if self.lowres_factor is not None and (
      self.lowres_factor < 1 or self.image_size % self.lowres_factor
    ):
      raise ValueError(
        f"{name}: lowres_factor={self.lowres_factor} must be a positive divisor of "
        f"image_size={self.image_size}"
      )
    layers.remat_policy(self.remat_policy)

  def abstract_inputs(self, batch_size: int, text_length: int) -> list[jax.ShapeDtypeStruct]:
    """The call's inputs at the training resolution, as ShapeDtypeStructs (nothing allocated):
    [x, log_snr, text_emb, text_mask] (+ [lowres, lowres_aug_log_snr] for super-resolution)."""
    b, s, c = batch_size, self.image_size, self.in_channels
    args = [
      jax.ShapeDtypeStruct((b, s, s, c), jnp.float32),
      jax.ShapeDtypeStruct((b,), jnp.float32),
      jax.ShapeDtypeStruct((b, text_length, self.text_dim), jnp.float32),
      jax.ShapeDtypeStruct((b, text_length), jnp.bool_),
    ]
    if self.is_super_resolution:
      lr = self.lowres_size
      args += [
        jax.ShapeDtypeStruct((b, lr, lr, c), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.float32),
      ]
    return args

  @property
  def _kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  @nn.nowrap
  def condition(
    self,
    x: jax.Array,
    log_snr: jax.Array,
    text_emb: jax.Array,
    text_mask: jax.Array,
    lowres: jax.Array | None,
    lowres_aug_log_snr: jax.Array | None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Checks the inputs; returns (embedding, text sequence, text mask, network input)."""
    layers.validate_network_inputs(
      self, x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr
    )
    emb_dim = self.emb_dim or 4 * self.channels
    return layers.Conditioning(
      self.channels,
      emb_dim,
      self.cond_dim or emb_dim,
      self.lowres_factor,
      self.resize_method,
      name="conditioning",
      **self._kw,
    )(x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr)

  @nn.nowrap
  def block_classes(self) -> tuple[type[nn.Module], type[nn.Module]]:
    """The residual and attention block classes, rematerialised when `remat` is on."""
    return (
      layers.maybe_remat(layers.ResBlock, self.remat, self.remat_policy),
      layers.maybe_remat(layers.SpatialAttention, self.remat, self.remat_policy),
    )

  @nn.nowrap
  def stem(self, h: jax.Array) -> jax.Array:
    """The full-resolution input conv."""
    return layers.conv(self.channels, 3, in_axis="image_channels", name="conv_in", **self._kw)(h)

  @nn.nowrap
  def output_head(self, h: jax.Array) -> jax.Array:
    """GroupNorm, SiLU and a zero-initialised conv to the prediction, returned in float32."""
    h = layers.GroupNorm(
      self.norm_groups, param_dtype=self.param_dtype, dtype=self.dtype, name="norm_out"
    )(h)
    h = nn.silu(h)
    out = layers.conv(
      self.out_channels, 3, zero_init=True, out_axis="image_channels", name="conv_out", **self._kw
    )(h)
    return out.astype(jnp.float32)
