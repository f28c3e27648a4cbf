"""Reads DeepFloyd IF U-Nets in the diffusers layout into `DeepFloydUNet` params.

A stage directory holds `unet/config.json` and `unet/diffusion_pytorch_model*.safetensors`: one
file, the fp16 variant (`*.fp16.safetensors`), or shards with a `*.safetensors.index.json`.
Our module names are diffusers' parameter paths, so the mapping is a rule: norms' `scale` is
`weight`, dense kernels are `weight` transposed ([out, in] -> [in, out]), conv kernels are
`weight` as OIHW -> HWIO. Tensors are memory-mapped and each device reads only its slice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from imagen_jax.errors import UserError
from imagen_jax.nn import deepfloyd_unet
from imagen_jax.text import t5_checkpoints

# config.json values our network does not implement, with the value IF uses.
_REQUIRED = {
  "_class_name": "UNet2DConditionModel",
  "addition_embed_type": "text",
  "cross_attention_norm": "group_norm",
  "resnet_time_scale_shift": "scale_shift",
  "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
  "time_embedding_type": "positional",
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "only_cross_attention": False,
  "class_embeddings_concat": False,
  "center_input_sample": False,
}
_OPTIONAL_NONE = (
  "time_embedding_dim",
  "timestep_post_act",
  "time_cond_proj_dim",
  "num_class_embeds",
)


def unet_dir(path: str) -> str:
  """The directory holding config.json: `path/unet` for a stage/pipeline dir, else `path`."""
  sub = os.path.join(path, "unet")
  return sub if os.path.isfile(os.path.join(sub, "config.json")) else path


def read_config(path: str) -> dict[str, Any]:
  """The U-Net's diffusers config.json (from a stage dir or its `unet/` dir)."""
  file = os.path.join(unet_dir(path), "config.json")
  if not os.path.isfile(file):
    raise UserError(
      f"DeepFloyd IF dir {path!r} has no unet/config.json; pass a diffusers IF stage dir "
      "(e.g. a download of DeepFloyd/IF-I-XL-v1.0)"
    )
  with open(file) as f:
    return json.load(f)


def _per_level(value: Any, levels: int) -> tuple[int, ...]:
  return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * levels


def network_from_config(
  config: Mapping[str, Any], **overrides: Any
) -> deepfloyd_unet.DeepFloydUNet:
  """The `DeepFloydUNet` a diffusers config.json describes (overrides: dtype, remat, ...)."""
  for key, want in _REQUIRED.items():
    if key in config and config[key] != want:
      raise UserError(
        f"DeepFloyd IF config {key}={config[key]!r} is not supported (IF uses {want!r}); "
        "only IF-configured UNet2DConditionModels load"
      )
  for key in _OPTIONAL_NONE:
    if config.get(key) is not None:
      raise UserError(
        f"DeepFloyd IF config {key}={config[key]!r} is not supported; IF leaves it null"
      )
  if config.get("class_embed_type") not in (None, "timestep"):
    raise UserError(
      f"DeepFloyd IF config class_embed_type={config['class_embed_type']!r}; IF uses null or 'timestep'"
    )
  if config.get("encoder_hid_dim") is None:
    raise UserError("DeepFloyd IF config lacks encoder_hid_dim; IF projects T5 states with it")
  head_dim = config.get("attention_head_dim", 8)
  if isinstance(head_dim, (list, tuple)):
    if len(set(head_dim)) != 1:
      raise UserError(
        f"DeepFloyd IF config attention_head_dim={head_dim}: one value per model expected"
      )
    head_dim = head_dim[0]
  widths = tuple(config["block_out_channels"])
  fields = dict(
    block_out_channels=widths,
    layers_per_block=_per_level(config.get("layers_per_block", 2), len(widths)),
    down_block_types=tuple(config["down_block_types"]),
    up_block_types=tuple(config["up_block_types"]),
    in_channels=int(config["in_channels"]),
    out_channels=int(config["out_channels"]),
    sample_size=int(config.get("sample_size") or 64),
    norm_num_groups=int(config.get("norm_num_groups", 32)),
    norm_eps=float(config.get("norm_eps", 1e-5)),
    cross_attention_dim=int(config["cross_attention_dim"]),
    encoder_hid_dim=int(config["encoder_hid_dim"]),
    attention_head_dim=int(head_dim),
    addition_embed_type_num_heads=int(config.get("addition_embed_type_num_heads", 64)),
    class_embed=config.get("class_embed_type") == "timestep",
    act_fn=config.get("act_fn", "silu"),
    time_embedding_act_fn=config.get("time_embedding_act_fn"),
    flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
    freq_shift=float(config.get("freq_shift", 0)),
    mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
    resnet_out_scale_factor=float(config.get("resnet_out_scale_factor", 1.0)),
    resnet_skip_time_act=bool(config.get("resnet_skip_time_act", False)),
  )
  try:
    return deepfloyd_unet.DeepFloydUNet(**{**fields, **overrides})
  except ValueError as e:
    raise UserError(
      f"DeepFloyd IF config does not describe an IF U-Net: {e}; check config.json"
    ) from e


def init_fn(network: deepfloyd_unet.DeepFloydUNet, text_length: int = 77):
  """A no-argument function returning the network's (logically boxed) initial params; for
  `jax.eval_shape` or `parallel.SamplingMesh.param_shardings`."""
  s = network.sample_size
  inputs = [
    jnp.zeros((1, s, s, network.in_channels), jnp.float32),
    jnp.zeros((1,), jnp.float32),
    jnp.zeros((1, text_length, network.encoder_hid_dim), jnp.float32),
  ]
  if network.class_embed:
    inputs.append(jnp.zeros((1,), jnp.float32))
  return lambda: network.init(jax.random.key(0), *inputs)["params"]


def abstract_params(network: deepfloyd_unet.DeepFloydUNet, text_length: int = 77) -> Any:
  """The network's (logically boxed) params as ShapeDtypeStructs: nothing allocated."""
  return jax.eval_shape(init_fn(network, text_length))


def param_count(network: deepfloyd_unet.DeepFloydUNet) -> int:
  """Number of parameters of the network (from shapes only)."""
  leaves = jax.tree_util.tree_leaves(abstract_params(network))
  return int(sum(np.prod(x.shape) for x in leaves))


def diffusers_name(path: tuple[str, ...]) -> tuple[str, str]:
  """Our param path -> (diffusers tensor name, layout: 'same' | 'dense' | 'conv')."""
  parts = [p for p in path if p not in ("GroupNorm_0", "LayerNorm_0")]
  leaf = parts[-1]
  if leaf == "scale":
    return ".".join(parts[:-1] + ["weight"]), "same"
  if leaf == "kernel":
    return ".".join(parts[:-1] + ["weight"]), "kernel"
  return ".".join(parts), "same"


def _weights_files(udir: str) -> list[str]:
  """The safetensors files of a diffusers U-Net dir: full precision first, else the fp16 variant."""
  entries = sorted(os.listdir(udir))
  for index in (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
  ):
    if index in entries:
      return t5_checkpoints._files_from_index(os.path.join(udir, index))
  for single in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
    if single in entries:
      return [os.path.join(udir, single)]
  raise UserError(
    f"DeepFloyd IF dir {udir!r} has no diffusion_pytorch_model[.fp16].safetensors (or its "
    "index.json); convert .bin weights to safetensors first"
  )


def _view(arr: np.ndarray, layout: str) -> np.ndarray:
  if layout == "same":
    return arr
  if arr.ndim == 4:  # conv: OIHW -> HWIO
    return arr.transpose(2, 3, 1, 0)
  return arr.T


def load_params(
  path: str,
  network: deepfloyd_unet.DeepFloydUNet,
  shardings: Mapping[str, Any] | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Reads a diffusers IF U-Net's weights as our params (checked against the network's shapes).

  Args:
    path: a stage dir (with `unet/`) or the `unet/` dir itself.
    network: the network the weights are for (`network_from_config(read_config(path))`).
    shardings: optional flat map 'a/b/kernel' -> jax.sharding.Sharding for each param.
    dtype: dtype of the placed params.

  Returns:
    The nested params dict.
  """
  udir = unet_dir(path)
  tensors: dict[str, tuple[np.ndarray | None, str]] = {}
  for file in _weights_files(udir):
    tensors.update(t5_checkpoints._safetensors_index(file))
  want = traverse_util.flatten_dict(abstract_params(network))
  flat = {}
  used = set()
  for keys, leaf in want.items():
    shape = tuple(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
    name, layout = diffusers_name(keys)
    if name not in tensors:
      raise UserError(
        f"DeepFloyd IF checkpoint {udir!r} lacks tensor {name!r} (shape {shape}); its "
        "config.json and weights do not match"
      )
    arr, where = tensors[name]
    if arr is None:
      raise UserError(
        f"DeepFloyd IF checkpoint {udir!r}: tensor {name!r} has unsupported dtype {where}"
      )
    view = _view(arr, layout)
    if layout != "same" and view.ndim == 2 and shape[0] == 1 and view.shape != shape:
      view = view.reshape(shape)
    if tuple(view.shape) != shape:
      raise UserError(
        f"DeepFloyd IF checkpoint {udir!r}: {name!r} has shape {tuple(arr.shape)}, expected "
        f"{shape} (ours, {layout} layout); config.json and weights do not match"
      )
    key = "/".join(keys)
    sharding = None if shardings is None else shardings[key]
    flat[keys] = t5_checkpoints._place(view.__getitem__, shape, sharding, dtype)
    used.add(name)
  unused = sorted(set(tensors) - used)
  if unused:
    raise UserError(
      f"DeepFloyd IF checkpoint {udir!r} has {len(unused)} tensor(s) our network does not use, "
      f"e.g. {unused[0]!r}; its config.json does not describe these weights"
    )
  return traverse_util.unflatten_dict(flat)


def load(
  path: str, dtype: Any = jnp.float32, **overrides: Any
) -> tuple[deepfloyd_unet.DeepFloydUNet, dict]:
  """(network, params) of a diffusers IF stage dir."""
  network = network_from_config(read_config(path), **overrides)
  return network, load_params(path, network, dtype=dtype)


def save_params(
  path: str, config: Mapping[str, Any], params: Mapping[str, Any], fp16: bool = False
) -> str:
  """Writes params as a diffusers IF U-Net dir (`path/unet/config.json` + safetensors).

  The inverse of `load_params` (dense kernels [in, out] -> [out, in], conv HWIO -> OIHW), so a
  tiny random IF stage can be built without torch; `fp16` writes the `.fp16` variant.

  Returns:
    The `unet/` directory written.
  """
  from safetensors.numpy import save_file

  udir = os.path.join(path, "unet")
  os.makedirs(udir, exist_ok=True)
  tensors = {}
  for keys, value in traverse_util.flatten_dict(params).items():
    name, layout = diffusers_name(keys)
    arr = np.asarray(jax.device_get(value), np.float16 if fp16 else np.float32)
    if layout != "same":
      arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T
    tensors[name] = np.ascontiguousarray(arr)
  variant = ".fp16" if fp16 else ""
  save_file(
    tensors, os.path.join(udir, f"diffusion_pytorch_model{variant}.safetensors"), {"format": "pt"}
  )
  with open(os.path.join(udir, "config.json"), "w") as f:
    json.dump({"_class_name": "UNet2DConditionModel", **config}, f, indent=2)
  return udir


def write_random_stage(path: str, config: Mapping[str, Any], seed: int = 0) -> str:
  """A diffusers-layout IF stage dir with random weights for `config` (tests and demos)."""
  network = network_from_config(config)
  shapes = traverse_util.flatten_dict(abstract_params(network))
  rng = np.random.default_rng(seed)
  params = {}
  for keys, leaf in shapes.items():
    shape = tuple(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
    if keys[-1] == "scale":  # norms start at 1, as torch initialises them
      params[keys] = np.ones(shape, np.float32)
    elif keys[-1] == "kernel":  # unit-variance outputs for unit-variance inputs
      fan_in = max(int(np.prod(shape[:-1])), 1)
      params[keys] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    else:  # biases, embeddings
      params[keys] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  return save_params(path, config, traverse_util.unflatten_dict(params))
