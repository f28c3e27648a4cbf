"""One table of network sizes and one place that builds networks from a size name or gin.

`configs/models/<size>.gin` spells each size out field by field (the operative config saved
with a run shows every value); `NETWORK_SIZES` holds the same values for code and tests, and a
test keeps the two in step.
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn

from imagen_jax.nn import efficient_unet, unet

# size -> (network class, fields). Paper sizes reproduce Imagen Appendix F; the widths the
# paper leaves unstated (embedding widths, SR-1024's last block depth) are chosen to land on the
# published parameter counts (see configs/models/*.gin for the arithmetic).
NETWORK_SIZES: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
  # Base 64x64, paper 2B: ADM, 512 channels, mult (1,2,3,4), 3 res blocks, attention at 32/16/8.
  "base64": (
    unet.UNet,
    dict(
      image_size=64,
      channels=512,
      channel_mult=(1, 2, 3, 4),
      num_res_blocks=3,
      attention_resolutions=(32, 16, 8),
      text_attention=True,
      head_dim=64,
      emb_dim=1024,
      text_dim=4096,
      dropout=0.0,
    ),
  ),
  # SR 64->256, paper 600M: blocks (128,2)(256,4)(512,8)(1024,8), self+text attention last.
  "sr256": (
    efficient_unet.EfficientUNet,
    dict(
      image_size=256,
      lowres_factor=4,
      channels=128,
      block_channels=(128, 256, 512, 1024),
      block_res_blocks=(2, 4, 8, 8),
      block_attention=("none", "none", "none", "self_text"),
      num_heads=8,
      emb_dim=2048,
      text_dim=4096,
    ),
  ),
  # SR 256->1024, paper 400M: text cross-attention only, trained on 256 crops of 1024 images.
  "sr1024": (
    efficient_unet.EfficientUNet,
    dict(
      image_size=256,
      lowres_factor=4,
      channels=128,
      block_channels=(128, 256, 512, 1024),
      block_res_blocks=(2, 4, 8, 7),
      block_attention=("none", "none", "none", "cross"),
      num_heads=8,
      emb_dim=512,
      text_dim=4096,
    ),
  ),
  # Demo cascade (tiny T5, width 64): base 16px -> SR 16->32 -> SR 32->64 (crops of 32).
  "tiny_base": (
    unet.UNet,
    dict(
      image_size=16,
      channels=32,
      channel_mult=(1, 1, 2),
      num_res_blocks=1,
      attention_resolutions=(8, 4),
      text_attention=True,
      head_dim=16,
      emb_dim=64,
      text_dim=64,
      norm_groups=8,
    ),
  ),
  "tiny_sr": (
    efficient_unet.EfficientUNet,
    dict(
      image_size=32,
      lowres_factor=2,
      channels=32,
      block_channels=(32, 64, 64),
      block_res_blocks=(1, 1, 2),
      block_attention=("none", "none", "self_text"),
      num_heads=4,
      emb_dim=64,
      text_dim=64,
      norm_groups=8,
    ),
  ),
  "tiny_sr_crossonly": (
    efficient_unet.EfficientUNet,
    dict(
      image_size=32,
      lowres_factor=2,
      channels=32,
      block_channels=(32, 64, 64),
      block_res_blocks=(1, 1, 2),
      block_attention=("none", "none", "cross"),
      num_heads=4,
      emb_dim=64,
      text_dim=64,
      norm_groups=8,
    ),
  ),
}


def build_network(size: str, **overrides: Any) -> nn.Module:
  """Builds the network of a named size, with field overrides.

  Args:
    size: a key of NETWORK_SIZES ('base64', 'sr256', 'sr1024', 'tiny_base', 'tiny_sr',
      'tiny_sr_crossonly').
    **overrides: network fields to change (e.g. dtype='bfloat16', remat=True).

  Returns:
    The (unbound) flax module.
  """
  if size not in NETWORK_SIZES:
    raise ValueError(f"network size {size!r} unknown; choose one of {sorted(NETWORK_SIZES)}")
  cls, fields = NETWORK_SIZES[size]
  unknown = set(overrides) - set(cls.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ValueError(
      f"overrides {sorted(unknown)} are not fields of {cls.__name__} (size {size!r})"
    )
  return cls(**{**fields, **overrides})


def network(
  module: nn.Module | None = None,
  size: str | None = None,
  overrides: dict[str, Any] | None = None,
) -> nn.Module:
  """The gin entry point: the network a `configs/models/*.gin` file defines.

  Bind exactly one of `module` (a fully configured `@unet.UNet()` /
  `@efficient_unet.EfficientUNet()`, as the size files do) or `size`.

  Args:
    module: a configured network module.
    size: a NETWORK_SIZES name, used when `module` is None.
    overrides: fields replaced on top of either (e.g. {'remat': True}).

  Returns:
    The (unbound) flax module.
  """
  overrides = dict(overrides or {})
  if (module is None) == (size is None):
    raise ValueError(
      "factory.network needs exactly one of module=@unet.UNet()/@efficient_unet.EfficientUNet() "
      f"or size=<one of {sorted(NETWORK_SIZES)}>; include a configs/models/*.gin file"
    )
  if module is None:
    return build_network(size, **overrides)
  return module.clone(**overrides) if overrides else module


def network_fields(module: nn.Module) -> dict[str, Any]:
  """The configuration fields of a network (everything but flax's parent/name)."""
  return {
    k: getattr(module, k) for k in type(module).__dataclass_fields__ if k not in ("parent", "name")
  }
