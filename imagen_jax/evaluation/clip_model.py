"""CLIP's image and text towers in Flax, and a reader of Hugging Face `CLIPModel` folders.

The architecture is HF's `CLIPModel` (OpenAI's CLIP):
  image  patch conv (no bias) -> [class token; patches] + position embedding -> pre-LayerNorm
         (`pre_layrnorm`, HF's spelling) -> N pre-LN transformer blocks -> post-LayerNorm of the
         class token -> `visual_projection` (no bias);
  text   token + position embedding -> N causal pre-LN blocks -> final LayerNorm -> the feature
         at the end token -> `text_projection` (no bias).
A block is x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))), act from `hidden_act` (OpenAI's
models: quick_gelu, x·sigmoid(1.702x); LAION's: exact gelu).

Sizes come from the folder's `config.json` (ViT-B/32, ViT-B/16, ViT-L/14 or any other); module
names mirror HF's so a safetensors name maps onto a Flax path by rule (`hf_name`). Matmuls run at
HIGHEST precision so scores do not depend on the accelerator's default (bf16 passes on TPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import errors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
WHERE_TO_GET = (
  "a Hugging Face CLIP folder (config.json, model.safetensors, vocab.json, merges.txt), e.g. "
  "`huggingface-cli download openai/clip-vit-large-patch14`"
)
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}
# Tensors of the file that the embeddings do not use (the contrastive temperature, and the
# position_ids buffers older transformers versions saved).
UNUSED = (
  "logit_scale",
  "text_model.embeddings.position_ids",
  "vision_model.embeddings.position_ids",
)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer stack (HF's CLIPTextConfig / CLIPVisionConfig fields)."""

  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and the shared embedding size."""

  text: TowerConfig
  vision: TowerConfig
  projection_dim: int
  vocab_size: int = 49408
  max_positions: int = 77
  # HF's rule: id 2 (configs written before transformers 4.31, OpenAI's among them) means "the
  # position of the highest id" (the end token is the last id of CLIP's vocabulary); any other
  # value is the end token's id, and the first occurrence is taken.
  eos_token_id: int = 49407
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> CLIPConfig:
    """From a `CLIPModel` config.json dict (missing fields take HF's defaults)."""
    text = config.get("text_config") or {}
    vision = config.get("vision_config") or {}
    return cls(
      text=_tower_from_hf(text, hidden_size=512, intermediate_size=2048, num_heads=8),
      vision=_tower_from_hf(vision, hidden_size=768, intermediate_size=3072, num_heads=12),
      projection_dim=int(config.get("projection_dim", 512)),
      vocab_size=int(text.get("vocab_size", 49408)),
      max_positions=int(text.get("max_position_embeddings", 77)),
      eos_token_id=int(text.get("eos_token_id", 49407)),
      image_size=int(vision.get("image_size", 224)),
      patch_size=int(vision.get("patch_size", 32)),
      num_channels=int(vision.get("num_channels", 3)),
    )


def _tower_from_hf(
  config: Mapping[str, Any], hidden_size: int, intermediate_size: int, num_heads: int
) -> TowerConfig:
  """A tower of a config.json's text_config / vision_config; the sizes are HF's defaults."""
  return TowerConfig(
    hidden_size=int(config.get("hidden_size", hidden_size)),
    intermediate_size=int(config.get("intermediate_size", intermediate_size)),
    num_layers=int(config.get("num_hidden_layers", 12)),
    num_heads=int(config.get("num_attention_heads", num_heads)),
    hidden_act=str(config.get("hidden_act", "quick_gelu")),
    layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
  )


PRECISION = jax.lax.Precision.HIGHEST


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, precision=PRECISION, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF's CLIPAttention)."""

  config: TowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    c = self.config
    b, length, width = x.shape
    head_dim = width // c.num_heads

    def heads(name: str) -> jax.Array:
      return _dense(width, name)(x).reshape(b, length, c.num_heads, head_dim)

    q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=PRECISION) * head_dim**-0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=PRECISION)
    return _dense(width, "out_proj")(out.reshape(b, length, width))


class MLP(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.config.hidden_act]
    return _dense(self.config.hidden_size, "fc2")(
      act(_dense(self.config.intermediate_size, "fc1")(x))
    )


class EncoderLayer(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    eps = self.config.layer_norm_eps
    x = x + Attention(self.config, name="self_attn")(nn.LayerNorm(eps, name="layer_norm1")(x), mask)
    return x + MLP(self.config, name="mlp")(nn.LayerNorm(eps, name="layer_norm2")(x))


class Encoder(nn.Module):
  config: TowerConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.config.num_layers):
      x = EncoderLayer(self.config, name=f"layers_{i}")(x, mask)
    return x


class VisionEmbeddings(nn.Module):
  config: CLIPConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    c = self.config
    width, p = c.vision.hidden_size, c.patch_size
    patches = nn.Conv(
      width, (p, p), strides=(p, p), padding="VALID", use_bias=False, precision=PRECISION,
      name="patch_embedding",
    )(pixels)  # fmt: skip
    b = patches.shape[0]
    patches = patches.reshape(b, -1, width)  # row-major over the grid, as torch's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(width**-0.5), (width,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), patches], axis=1)
    positions = nn.Embed(x.shape[1], width, name="position_embedding")(jnp.arange(x.shape[1]))
    return x + positions


class VisionTower(nn.Module):
  config: CLIPConfig

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Normalised pixels [B, S, S, 3] -> pooled class feature [B, hidden]."""
    eps = self.config.vision.layer_norm_eps
    x = VisionEmbeddings(self.config, name="embeddings")(pixels)
    x = nn.LayerNorm(eps, name="pre_layrnorm")(x)
    x = Encoder(self.config.vision, name="encoder")(x)
    return nn.LayerNorm(eps, name="post_layernorm")(x[:, 0])


class TextEmbeddings(nn.Module):
  config: CLIPConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    c = self.config
    tokens = nn.Embed(c.vocab_size, c.text.hidden_size, name="token_embedding")(ids)
    positions = nn.Embed(c.max_positions, c.text.hidden_size, name="position_embedding")
    return tokens + positions(jnp.arange(ids.shape[1]))


class TextTower(nn.Module):
  config: CLIPConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """Token ids [B, L] -> the final-LayerNorm feature at the end token [B, hidden]."""
    c = self.config
    x = TextEmbeddings(c, name="embeddings")(ids)
    length = ids.shape[1]
    # Causal: a token sees itself and what precedes it, so padding after the end token cannot
    # change the pooled feature (no padding mask needed).
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    x = Encoder(c.text, name="encoder")(x, mask)
    x = nn.LayerNorm(c.text.layer_norm_eps, name="final_layer_norm")(x)
    if c.eos_token_id == 2:
      position = jnp.argmax(ids, axis=-1)
    else:
      position = jnp.argmax(ids == c.eos_token_id, axis=-1)
    return x[jnp.arange(x.shape[0]), position]


class CLIP(nn.Module):
  """Both towers and their projections into the shared embedding space (unnormalised)."""

  config: CLIPConfig

  def setup(self):
    c = self.config
    self.vision_model = VisionTower(c)
    self.text_model = TextTower(c)
    self.visual_projection = _dense(c.projection_dim, "visual_projection", use_bias=False)
    self.text_projection = _dense(c.projection_dim, "text_projection", use_bias=False)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels))

  def encode_text(self, ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model(ids))

  def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(pixels), self.encode_text(ids)


# ----------------------------------------------------------------------------- weights


def param_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined Flax parameter names and shapes (no weights computed)."""
  from flax import traverse_util

  s = config.image_size
  tree = jax.eval_shape(
    lambda: CLIP(config).init(
      jax.random.key(0),
      jnp.zeros((1, s, s, config.num_channels)),
      jnp.zeros((1, config.max_positions), jnp.int32),
    )
  )
  flat = traverse_util.flatten_dict(tree["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def hf_name(name: str) -> str:
  """The HF state_dict name of a Flax parameter path ('/'-joined)."""
  *modules, leaf = name.split("/")
  modules = [f"layers.{m[len('layers_') :]}" if m.startswith("layers_") else m for m in modules]
  if leaf in ("kernel", "scale", "embedding"):
    leaf = "weight"
  return ".".join([*modules, leaf])


def _to_flax(value: np.ndarray, name: str) -> np.ndarray:
  if name.endswith("patch_embedding/kernel"):
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if name.endswith("/kernel"):
    return value.T  # Linear [out, in] -> Dense [in, out]
  return value


def variables_from_state_dict(
  state_dict: Mapping[str, np.ndarray], config: CLIPConfig, source: str = ""
) -> dict:
  """{"params": ...} for `CLIP(config)` from HF `CLIPModel` tensors (numpy, any float dtype).

  Raises:
    UserError: a tensor is missing, unexpected, or has a shape the config does not give.
  """
  from flax import traverse_util

  where = source or "state_dict"
  want = param_shapes(config)
  names = {hf_name(k): k for k in want}
  unknown = [k for k in state_dict if k not in names and k not in UNUSED]
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise errors.UserError(
      f"{where}: unexpected tensor {unknown[0]!r}{more}: expected a Hugging Face CLIPModel "
      "(text_model.*, vision_model.*, *_projection); CLIPTextModel/CLIPVisionModel-only or "
      "open_clip checkpoints are not read"
    )
  missing = [k for k in names if k not in state_dict]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise errors.UserError(f"{where}: missing tensor {missing[0]!r}{more}: {WHERE_TO_GET}")
  flat = {}
  for hf, ours in names.items():
    value = _to_flax(np.asarray(state_dict[hf]), ours)
    if tuple(value.shape) != want[ours]:
      got = tuple(np.shape(state_dict[hf]))
      raise errors.UserError(
        f"{where}: tensor {hf!r} has shape {got}, but config.json gives "
        f"{tuple(_to_flax(np.zeros(want[ours]), ours).shape)}: the weights and config.json "
        "are from different models"
      )
    flat[ours] = np.ascontiguousarray(value, dtype=np.float32)
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def read_config(directory: str) -> CLIPConfig:
  """The CLIPConfig of a HF folder's config.json (UserError if absent, unreadable or unusable)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(f"{path}: missing; --clip takes {WHERE_TO_GET}")
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{path}: unreadable ({e}): {WHERE_TO_GET}") from e
  if not isinstance(raw, dict) or "vision_config" not in raw or "text_config" not in raw:
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    raise errors.UserError(
      f"{path}: not a CLIPModel config (needs text_config and vision_config; model_type "
      f"{kind!r}): {WHERE_TO_GET}"
    )
  config = CLIPConfig.from_hf(raw)
  for tower in (config.text, config.vision):
    if tower.hidden_act not in ACTIVATIONS:
      raise errors.UserError(
        f"{path}: hidden_act {tower.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})"
      )
    if tower.hidden_size % tower.num_heads:
      raise errors.UserError(
        f"{path}: hidden_size {tower.hidden_size} is not a multiple of {tower.num_heads} heads"
      )
  return config


def weight_files(directory: str) -> list[str]:
  """The folder's weight file(s): model.safetensors, its shards by index, or pytorch_model.bin."""
  index = os.path.join(directory, WEIGHTS_INDEX)
  single = os.path.join(directory, WEIGHTS_FILE)
  if os.path.isfile(index):
    from imagen_jax.text import t5_checkpoints

    try:
      return t5_checkpoints._files_from_index(index)
    except (ValueError, FileNotFoundError) as e:
      raise errors.UserError(str(e)) from e
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(os.path.join(directory, TORCH_WEIGHTS_FILE)):
    return [os.path.join(directory, TORCH_WEIGHTS_FILE)]
  raise errors.UserError(
    f"{directory}: no {WEIGHTS_FILE} (or {WEIGHTS_INDEX}, {TORCH_WEIGHTS_FILE}): --clip takes "
    f"{WHERE_TO_GET}"
  )


def read_state_dict(files: list[str]) -> dict[str, np.ndarray]:
  """HF tensors by name from safetensors (memory-mapped) or a pytorch_model.bin (no torch)."""
  from imagen_jax.text import t5_checkpoints

  out: dict[str, np.ndarray] = {}
  for file in files:
    if not file.endswith(".safetensors"):
      from imagen_jax.evaluation import torch_checkpoint

      out.update(torch_checkpoint.load_state_dict(file))
      continue
    try:
      tensors = t5_checkpoints._safetensors_index(file)
    except (ValueError, KeyError, OSError) as e:
      raise errors.UserError(
        f"{file}: not a readable safetensors file ({e}): download it again"
      ) from e
    for name, (array, where) in tensors.items():
      if array is None:
        if name in UNUSED:
          continue
        raise errors.UserError(f"{file}: tensor {name!r} has unsupported dtype {where}")
      out[name] = array
  return out


def load(
  directory: str, config: CLIPConfig | None = None, files: list[str] | None = None
) -> tuple[CLIP, dict]:
  """The model and its variables from a Hugging Face CLIP folder.

  `config` and `files` are `read_config` / `weight_files` of the folder when the caller has
  already checked them (the CLI does, before the weights load); otherwise they are read here.
  """
  config = read_config(directory) if config is None else config
  files = weight_files(directory) if files is None else files
  state_dict = read_state_dict(files)
  source = files[0] if len(files) == 1 else os.path.join(directory, WEIGHTS_INDEX)
  return CLIP(config), variables_from_state_dict(state_dict, config, source=source)
