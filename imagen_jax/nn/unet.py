"""The base text-conditioned U-Net (Imagen Appendix F.1; ADM architecture).

ADM layout: `num_res_blocks` BigGAN residual blocks per level, resampling with residual blocks
(`resblock_updown`), scale-shift norm, attention with 64 channels per head at the chosen
resolutions whose keys/values are extended with the LayerNorm'd, projected text sequence, and a
middle block (res, attention, res). The attention-pooled text vector joins the noise-level
embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.nn import base, layers


class UNet(base.TextConditionedUNet):
  """ADM-style text-conditioned U-Net; base 64x64 model of the cascade.

  Attributes (besides `base.TextConditionedUNet`'s; `channels` is the base width, paper: 512):
    channel_mult: width multiplier per resolution level (paper: (1, 2, 3, 4)).
    num_res_blocks: residual blocks per level (paper: 3).
    attention_resolutions: resolutions with attention (paper: (32, 16, 8)).
    text_attention: extend those attention layers' K/V with the text sequence.
    cross_attention_resolutions: resolutions with text cross-attention only (queries from the
      pixels, keys/values from the text; paper: none): far cheaper than self-attention over
      every pixel. Measured on the demo base at 16 px it was 0.70x the step time but lost small
      shapes (shape at 16 px 92.2% -> 71.9%), so no shipped recipe sets it.
    head_dim: channels per attention head (paper: 64).
    resblock_updown: resample with residual blocks (BigGAN) rather than plain convs.
  """

  image_size: int = 64
  channels: int = 512
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  attention_resolutions: tuple[int, ...] = (32, 16, 8)
  text_attention: bool = True
  cross_attention_resolutions: tuple[int, ...] = ()
  head_dim: int = 64
  resblock_updown: bool = True

  @property
  def downsampling_layout(self) -> str:
    """The config fields that set `total_downsampling`, as error messages quote them."""
    return f"2**(len(channel_mult)-1), channel_mult={self.channel_mult}"

  @property
  def total_downsampling(self) -> int:
    """Factor between the input resolution and the lowest level's resolution."""
    return 2 ** (len(self.channel_mult) - 1)

  def validate_layout(self) -> None:
    """Raises ValueError naming the level, attention or width value that cannot work."""
    name = type(self).__name__
    if not self.channel_mult:
      raise ValueError(f"{name}: channel_mult must list at least one level")
    levels = [self.image_size // 2**i for i in range(len(self.channel_mult))]
    for field in ("attention_resolutions", "cross_attention_resolutions"):
      value = getattr(self, field)
      bad = [r for r in value if r not in levels]
      if bad:
        raise ValueError(
          f"{name}: {field}={value} has {bad}, which never occur; the levels of "
          f"image_size={self.image_size} with channel_mult={self.channel_mult} are {levels}"
        )
    both = sorted(set(self.attention_resolutions) & set(self.cross_attention_resolutions))
    if both:
      raise ValueError(
        f"{name}: resolutions {both} are in both attention_resolutions and "
        "cross_attention_resolutions; a level has one kind of attention, remove them from one"
      )
    for m in self.channel_mult:
      if (self.channels * m) % self.head_dim:
        raise ValueError(
          f"{name}: width channels*mult={self.channels * m} must be divisible by "
          f"head_dim={self.head_dim}"
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
    """Predicts the diffusion target (eps or v) for a noisy image.

    Args:
      x: [B, H, W, in_channels] noisy image.
      log_snr: [B] log-SNR of x's noise level.
      text_emb: [B, L, text_dim] text encoder output (zeros for a dropped caption).
      text_mask: [B, L] bool, False = padding (all False for a dropped caption).
      lowres: [B, H/lowres_factor, W/lowres_factor, C] low-res image (SR only).
      lowres_aug_log_snr: [B] log-SNR of the low-res image's augmentation noise (SR only).
      deterministic: disable dropout.

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """
    emb, text, text_mask, h = self.condition(
      x, log_snr, text_emb, text_mask, lowres, lowres_aug_log_snr
    )
    kw = self._kw
    res_cls, attn_cls = self.block_classes()
    attn_kind = "self_text" if self.text_attention else "self"
    # Attention resolutions are given at the training size; keep them as downsampling factors.
    kind_at = {self.image_size // r: attn_kind for r in self.attention_resolutions}
    kind_at.update({self.image_size // r: "cross" for r in self.cross_attention_resolutions})

    def res(out, resample="none", name=None):
      return res_cls(
        out,
        self.dropout,
        resample,
        self.norm_groups,
        deterministic,
        name=name,
        **kw,
      )

    def attn(h, name, kind=attn_kind):
      heads = h.shape[-1] // self.head_dim
      text_args = () if kind == "self" else (text, text_mask)
      return attn_cls(kind, heads, self.norm_groups, name=name, **kw)(h, *text_args)

    h = self.stem(h)
    hs = [h]
    ds = 1
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res(self.channels * mult, name=f"down_{level}_res_{i}")(h, emb)
        if ds in kind_at:
          h = attn(h, f"down_{level}_attn_{i}", kind_at[ds])
        hs.append(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(h.shape[-1], "down", name=f"down_{level}_resample")(h, emb)
        else:
          h = layers.Resample(h.shape[-1], "down", name=f"down_{level}_resample", **kw)(h)
        hs.append(h)
        ds *= 2

    h = res(h.shape[-1], name="mid_res_0")(h, emb)
    h = attn(h, "mid_attn")
    h = res(h.shape[-1], name="mid_res_1")(h, emb)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, hs.pop()], axis=-1)
        h = res(self.channels * mult, name=f"up_{level}_res_{i}")(h, emb)
        if ds in kind_at:
          h = attn(h, f"up_{level}_attn_{i}", kind_at[ds])
      if level != 0:
        if self.resblock_updown:
          h = res(h.shape[-1], "up", name=f"up_{level}_resample")(h, emb)
        else:
          h = layers.Resample(h.shape[-1], "up", name=f"up_{level}_resample", **kw)(h)
        ds //= 2

    return self.output_head(h)
