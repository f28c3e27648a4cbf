"""Readers (and a random writer) for T5 v1.1 encoder checkpoints in three on-disk formats.

- 't5x_legacy': a T5X checkpoint dir: msgpack `checkpoint` file whose leaves are inline arrays or
  tensorstore specs pointing at one gzip zarr array per parameter (`target.encoder.layers_0...`).
  Both spec layouts are read: tensorstore >= 0.1.14 (`kvstore.path`) and older (top-level `path`).
- 't5x_orbax': a T5X checkpoint written by orbax: the pytree {'version', 'optimizer': {'target',
  'state'}} saved by a PyTreeCheckpointer.
- 'hf': Hugging Face T5 / T5EncoderModel safetensors, one file or shards + `*.index.json`.

Only the encoder and the token embedding are read (decoder and optimizer slots are skipped), each
array is cast to the requested dtype and placed straight into its mesh sharding, slice by slice.
Returned trees are the `params` collection of `imagen_jax.nn.t5.T5Encoder`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn
from flax import traverse_util

from imagen_jax.nn import t5

FORMATS = ("t5x_legacy", "t5x_orbax", "hf")
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt", "_sharding")
_HF_INDEX_SUFFIX = ".safetensors.index.json"

Getter = Callable[[tuple], np.ndarray]  # index tuple -> that slice of the stored array


# ----------------------------------------------------------------------------- names and shapes


def expected_shapes(config: t5.T5Config) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined parameter names of the encoder and their shapes."""
  boxed = jax.eval_shape(
    lambda: t5.T5Encoder(config).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )
  flat = traverse_util.flatten_dict(nn.unbox(boxed)["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def hf_name(name: str) -> tuple[str, bool]:
  """Hugging Face tensor name of a T5X parameter name and whether it is stored transposed."""
  if name == "token_embedder/embedding":
    return "shared.weight", False
  if name == "encoder/relpos_bias/rel_embedding":
    # HF keeps one table in block 0 and shares it; [buckets, heads] vs T5X [heads, buckets].
    return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
  if name == "encoder/encoder_norm/scale":
    return "encoder.final_layer_norm.weight", False
  m = re.fullmatch(r"encoder/layers_(\d+)/(.+)", name)
  if not m:
    raise KeyError(name)
  i, rest = m.groups()
  table = {
    "pre_attention_layer_norm/scale": ("layer.0.layer_norm.weight", False),
    "attention/query/kernel": ("layer.0.SelfAttention.q.weight", True),
    "attention/key/kernel": ("layer.0.SelfAttention.k.weight", True),
    "attention/value/kernel": ("layer.0.SelfAttention.v.weight", True),
    "attention/out/kernel": ("layer.0.SelfAttention.o.weight", True),
    "pre_mlp_layer_norm/scale": ("layer.1.layer_norm.weight", False),
    "mlp/wi_0/kernel": ("layer.1.DenseReluDense.wi_0.weight", True),
    "mlp/wi_1/kernel": ("layer.1.DenseReluDense.wi_1.weight", True),
    "mlp/wo/kernel": ("layer.1.DenseReluDense.wo.weight", True),
  }
  suffix, transposed = table[rest]
  return f"encoder.block.{i}.{suffix}", transposed


# ----------------------------------------------------------------------------- placement


def _place(getter: Getter, shape: tuple[int, ...], sharding: Any, dtype: Any) -> jax.Array:
  """Builds a (sharded) device array reading only the slices each device needs."""
  np_dtype = np.dtype(dtype)

  def read(index):
    return np.ascontiguousarray(np.asarray(getter(index)).astype(np_dtype))

  if sharding is None:
    return jax.device_put(read(tuple(slice(None) for _ in shape)))
  return jax.make_array_from_callback(shape, sharding, read)


def _assemble(
  getters: Mapping[str, tuple[Getter, tuple[int, ...]]],
  config: t5.T5Config,
  path: str,
  shardings: Mapping[str, Any] | None,
  dtype: Any,
  describe: Callable[[str], str],
) -> dict[str, Any]:
  """Checks every expected parameter is present with the right shape, then places it."""
  want = expected_shapes(config)
  missing = [k for k in want if k not in getters]
  if missing:
    raise ValueError(
      f"T5 checkpoint {path!r} lacks {len(missing)} encoder parameter(s) of size with "
      f"d_model={config.d_model}, num_layers={config.num_layers}, e.g. {describe(missing[0])} "
      f"(expected shape {want[missing[0]]}); is it a complete T5 v1.1 checkpoint of this size?"
    )
  for name, shape in want.items():
    got = getters[name][1]
    if tuple(got) != shape:
      raise ValueError(
        f"T5 checkpoint {path!r}: parameter {describe(name)} has shape {tuple(got)}, expected "
        f"{shape} for the chosen size (d_model={config.d_model}, heads={config.num_heads}, "
        f"mlp_dim={config.mlp_dim}, vocab={config.vocab_size}); pick the matching --size"
      )
  flat = {}
  for name, shape in want.items():
    sharding = None if shardings is None else shardings[name]
    flat[name] = _place(getters[name][0], shape, sharding, dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- detection


def hf_size_name(path: str) -> str:
  """The T5 size name ('xxl', ...) whose dimensions a Hugging Face dir's config.json has.

  Raises:
    ValueError: no config.json, or dimensions that match none of `t5.SIZES`.
  """
  file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
  if not os.path.isfile(file):
    raise ValueError(f"T5 checkpoint {path!r} has no config.json beside it; pass the T5 size")
  with open(file) as f:
    hf = json.load(f)
  dims = {
    "d_model": hf.get("d_model"),
    "num_heads": hf.get("num_heads"),
    "head_dim": hf.get("d_kv"),
    "mlp_dim": hf.get("d_ff"),
    "num_layers": hf.get("num_layers"),
    "vocab_size": hf.get("vocab_size"),
  }
  for name in t5.SIZES:
    config = dataclasses.asdict(t5.get_config(name))
    if all(config[k] == v for k, v in dims.items()):
      return name
  raise ValueError(
    f"T5 checkpoint {path!r}: config.json dimensions {dims} match no T5 v1.1 size "
    f"({', '.join(t5.SIZES)})"
  )


def resolve_checkpoint(path: str) -> tuple[str, str]:
  """Finds the format of a checkpoint and the path its reader takes.

  A T5X model dir holding `checkpoint_<step>` subdirs resolves to its latest step.

  Args:
    path: a checkpoint dir, a `.safetensors` file or a `*.safetensors.index.json` file.

  Returns:
    (format, resolved path), format in FORMATS.
  """
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"T5 checkpoint {path!r} does not exist")
  if os.path.isfile(path):
    if path.endswith(".safetensors") or path.endswith(".index.json"):
      return "hf", path
    if os.path.basename(path) == "checkpoint":
      return "t5x_legacy", os.path.dirname(path) or "."
    raise ValueError(
      f"T5 checkpoint {path!r} is a file but neither .safetensors, *.safetensors.index.json nor a "
      "T5X msgpack `checkpoint` file"
    )
  entries = set(os.listdir(path))
  if any(e.endswith(_HF_INDEX_SUFFIX) for e in entries) or any(
    e.endswith(".safetensors") for e in entries
  ):
    return "hf", path
  if any(m in entries for m in _ORBAX_MARKERS) or os.path.isdir(os.path.join(path, "d")):
    return "t5x_orbax", path
  if "checkpoint" in entries and os.path.isfile(os.path.join(path, "checkpoint")):
    return "t5x_legacy", path
  steps = []
  for e in entries:
    m = re.fullmatch(r"checkpoint_(\d+)", e)
    if m and os.path.isdir(os.path.join(path, e)):
      steps.append(int(m.group(1)))
  if steps:
    return resolve_checkpoint(os.path.join(path, f"checkpoint_{max(steps)}"))
  if "state" in entries and os.path.isdir(os.path.join(path, "state")):
    return resolve_checkpoint(os.path.join(path, "state"))
  raise ValueError(
    f"T5 checkpoint dir {path!r} holds no known checkpoint: expected Hugging Face *.safetensors "
    "(+ index json), a T5X msgpack `checkpoint` file with zarr arrays, an orbax checkpoint "
    f"(_METADATA), or checkpoint_<step> subdirs; found {sorted(entries)[:10]}"
  )


def read_t5_checkpoint(
  path: str,
  config: t5.T5Config,
  shardings: Mapping[str, Any] | None = None,
  dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], str]:
  """Reads the encoder parameters of a T5 v1.1 checkpoint in any supported format.

  Args:
    path: checkpoint path (see `resolve_checkpoint`).
    config: the size to expect; shapes are checked against it.
    shardings: flat '/'-joined parameter name -> jax Sharding; None = default device.
    dtype: dtype the parameters are cast to while reading.

  Returns:
    (params tree for `T5Encoder`, detected format).
  """
  fmt, resolved = resolve_checkpoint(path)
  reader = {"t5x_legacy": read_t5x_legacy, "t5x_orbax": read_t5x_orbax, "hf": read_hf}[fmt]
  return reader(resolved, config, shardings, dtype), fmt


# ----------------------------------------------------------------------------- T5X legacy


def _t5x_target(contents: Any, path: str) -> Mapping[str, Any]:
  if not isinstance(contents, dict):
    raise ValueError(f"T5X checkpoint {path!r}: msgpack file does not hold a dict")
  version = contents.get("version", 0)
  state = contents.get("optimizer", contents) if version else contents
  target = state.get("target") if isinstance(state, dict) else None
  if not isinstance(target, dict):
    raise ValueError(
      f"T5X checkpoint {path!r} has no 'optimizer/target' (or 'target') parameter tree; "
      f"top-level keys: {sorted(contents)}"
    )
  if "encoder" not in target:
    raise ValueError(
      f"T5X checkpoint {path!r} has no 'encoder' parameters (top-level params: {sorted(target)}); "
      "a decoder-only or non-T5 checkpoint cannot be used as the text encoder"
    )
  return target


def _ts_relative_path(spec: Mapping[str, Any]) -> str:
  kvstore = spec.get("kvstore", {})
  rel = kvstore.get("path") if isinstance(kvstore, dict) else None
  # tensorstore < 0.1.14 wrote the array path at the top level of the spec.
  return rel or spec.get("path", "")


def read_t5x_legacy(
  ckpt_dir: str,
  config: t5.T5Config,
  shardings: Mapping[str, Any] | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Reads a T5X msgpack + tensorstore checkpoint dir (see module docstring)."""
  import tensorstore as ts
  from flax import serialization

  msgpack_path = os.path.join(ckpt_dir, "checkpoint")
  if not os.path.isfile(msgpack_path):
    raise FileNotFoundError(f"T5X checkpoint dir {ckpt_dir!r} has no msgpack `checkpoint` file")
  with open(msgpack_path, "rb") as f:
    raw = f.read()
  if raw.startswith(b"model_checkpoint_path"):
    raise ValueError(f"{msgpack_path!r} is a TensorFlow checkpoint index, not a T5X checkpoint")
  try:
    contents = serialization.msgpack_restore(raw)
  except Exception as e:
    raise ValueError(f"T5X checkpoint {msgpack_path!r} is not a valid msgpack file: {e}") from e
  target = _t5x_target(contents, ckpt_dir)
  flat = traverse_util.flatten_dict(target, sep="/", is_leaf=lambda _, v: _is_ts_spec(v))
  want = expected_shapes(config)
  getters: dict[str, tuple[Getter, tuple[int, ...]]] = {}
  for name in want:
    leaf = flat.get(name)
    if leaf is None:
      continue
    if isinstance(leaf, np.ndarray):
      getters[name] = (leaf.__getitem__, leaf.shape)
      continue
    if not _is_ts_spec(leaf):
      raise ValueError(
        f"T5X checkpoint {ckpt_dir!r}: parameter target/{name} is a {type(leaf).__name__}, "
        "expected an array or a tensorstore spec"
      )
    rel = _ts_relative_path(leaf)
    array_dir = rel if os.path.isabs(rel) else os.path.join(ckpt_dir, rel)
    if not os.path.isfile(os.path.join(array_dir, ".zarray")):
      raise FileNotFoundError(
        f"T5X checkpoint {ckpt_dir!r}: array of parameter target/{name} is missing "
        f"(expected a zarr array at {array_dir!r}); the checkpoint dir is incomplete"
      )
    store = ts.open(
      {"driver": "zarr", "kvstore": {"driver": "file", "path": array_dir}}, open=True
    ).result()
    getters[name] = (_ts_getter(store), tuple(store.shape))
  return _assemble(
    getters, config, ckpt_dir, shardings, dtype, lambda n: f"target/{n} ({_dirname(n)})"
  )


def _dirname(name: str) -> str:
  return "target." + name.replace("/", ".")


def _is_ts_spec(value: Any) -> bool:
  return isinstance(value, dict) and "driver" in value and ("kvstore" in value or "path" in value)


def _ts_getter(store) -> Getter:
  def get(index):
    arr = store[index].read().result()
    # Checkpoint version 2 stored bfloat16 as raw uint16.
    return arr.view(ml_dtypes.bfloat16) if arr.dtype == np.uint16 else arr

  return get


# ----------------------------------------------------------------------------- T5X orbax


def read_t5x_orbax(
  ckpt_dir: str,
  config: t5.T5Config,
  shardings: Mapping[str, Any] | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Reads a T5X checkpoint written by orbax; only encoder + embedding are restored."""
  from imagen_jax import checkpoints  # the one module that talks to orbax

  try:
    tree = checkpoints.read_pytree_metadata(os.path.abspath(ckpt_dir))
  except Exception as e:
    raise ValueError(f"orbax checkpoint {ckpt_dir!r} is unreadable or incomplete: {e}") from e
  prefix: tuple[str, ...] = ()
  if isinstance(tree, dict) and "optimizer" in tree:
    prefix = ("optimizer",)
    tree = tree["optimizer"]
  target = _t5x_target({"version": 0, **tree} if isinstance(tree, dict) else tree, ckpt_dir)
  flat_meta = traverse_util.flatten_dict(target, sep="/")
  want = expected_shapes(config)
  for name, shape in want.items():
    if name not in flat_meta:
      raise ValueError(
        f"orbax T5X checkpoint {ckpt_dir!r} lacks parameter target/{name} (expected shape "
        f"{shape}); is it a complete T5 v1.1 checkpoint of this size?"
      )
    got = tuple(getattr(flat_meta[name], "shape", ()))
    if got != shape:
      raise ValueError(
        f"orbax T5X checkpoint {ckpt_dir!r}: parameter target/{name} has shape {got}, expected "
        f"{shape} for the chosen size (d_model={config.d_model}, vocab={config.vocab_size})"
      )
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {name: device for name in want}
  item = {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[name])
    for name, shape in want.items()
  }

  def nest(flat):
    t = {"target": traverse_util.unflatten_dict(flat, sep="/")}
    for key in reversed(prefix):
      t = {key: t}
    return t

  restored = checkpoints.restore_pytree_subset(os.path.abspath(ckpt_dir), nest(item))
  for key in prefix:
    restored = restored[key]
  return restored["target"]


# ----------------------------------------------------------------------------- Hugging Face

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
}


def _safetensors_index(path: str) -> dict[str, tuple[np.ndarray, str]]:
  """Maps tensor name -> (read-only memmap, file) for one .safetensors file."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"safetensors file {path!r} is truncated (no header)")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"safetensors file {path!r} has an invalid header: {e}") from e
  size = os.path.getsize(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    start, end = info["data_offsets"]
    if 8 + n + end > size:
      raise ValueError(f"safetensors file {path!r} is truncated: tensor {name!r} ends past EOF")
    if dtype is None:
      out[name] = (None, info["dtype"])
      continue
    shape = tuple(info["shape"])
    arr = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape or (1,))
    out[name] = (arr.reshape(shape), path)
  return out


def _hf_files(path: str) -> list[str]:
  if os.path.isfile(path):
    if path.endswith(".index.json"):
      return _files_from_index(path)
    return [path]
  # listdir, not glob: checkpoint paths may contain glob metacharacters.
  entries = sorted(os.listdir(path))
  indexes = [os.path.join(path, e) for e in entries if e.endswith(_HF_INDEX_SUFFIX)]
  if indexes:
    return _files_from_index(indexes[0])
  files = [os.path.join(path, e) for e in entries if e.endswith(".safetensors")]
  if not files:
    raise FileNotFoundError(f"Hugging Face checkpoint dir {path!r} has no .safetensors files")
  return files


def _files_from_index(index_path: str) -> list[str]:
  with open(index_path) as f:
    try:
      weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index_path!r} is not a safetensors index (needs 'weight_map')") from e
  base = os.path.dirname(index_path)
  files = sorted({os.path.join(base, v) for v in weight_map.values()})
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(
        f"shard {file!r} listed in {index_path!r} is missing; the checkpoint is incomplete"
      )
  return files


def read_hf(
  path: str,
  config: t5.T5Config,
  shardings: Mapping[str, Any] | None = None,
  dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """Reads Hugging Face T5 safetensors (single file, dir, or sharded with its index json)."""
  tensors: dict[str, tuple[np.ndarray, str]] = {}
  for file in _hf_files(path):
    tensors.update(_safetensors_index(file))
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
  if not any(k.startswith("encoder.block.") for k in tensors):
    kind = "a decoder-only" if any(k.startswith("decoder.") for k in tensors) else "a non-T5"
    raise ValueError(
      f"Hugging Face checkpoint {path!r} has no 'encoder.block.*' tensors: {kind} checkpoint "
      f"cannot be used as the T5 text encoder (found e.g. {sorted(tensors)[:3]})"
    )
  if any(".DenseReluDense.wi.weight" in k for k in tensors):
    raise ValueError(
      f"Hugging Face checkpoint {path!r} is T5 v1.0 (DenseReluDense.wi); Imagen uses the T5 v1.1 "
      "encoder with a gated MLP (wi_0/wi_1)"
    )
  getters: dict[str, tuple[Getter, tuple[int, ...]]] = {}
  for name in expected_shapes(config):
    key, transposed = hf_name(name)
    if key not in tensors:
      continue
    arr, where = tensors[key]
    if arr is None:
      raise ValueError(
        f"Hugging Face checkpoint {path!r}: tensor {key!r} has unsupported dtype {where}; "
        f"expected one of {sorted(_SAFETENSORS_DTYPES)}"
      )
    view = arr.T if transposed else arr
    getters[name] = (view.__getitem__, tuple(view.shape))

  def describe(name):
    key, transposed = hf_name(name)
    return f"{key!r} (ours: {name}{', transposed' if transposed else ''})"

  return _assemble(getters, config, path, shardings, dtype, describe)


# ----------------------------------------------------------------------------- writers


def random_params(config: t5.T5Config, seed: int = 0) -> dict[str, np.ndarray]:
  """Deterministic random encoder weights as a flat {name: float32 array} dict.

  Norm scales are drawn around 1 (not left at 1) so a mis-mapped scale changes the output.
  """
  params = jax.jit(lambda rng: t5.init_params(config, rng))(jax.random.key(seed))
  flat = traverse_util.flatten_dict(params, sep="/")
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(flat):
    value = np.asarray(flat[name], np.float32)
    if name.endswith("/scale"):
      value = (1.0 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
    out[name] = value
  return out


def write_random_checkpoint(
  path: str,
  size: str,
  seed: int = 0,
  fmt: str = "hf",
  *,
  t5x_spec_layout: str = "new",
  hf_shards: int = 1,
  config: t5.T5Config | None = None,
) -> None:
  """Writes a random-weight T5 v1.1 encoder checkpoint in a real on-disk layout.

  Args:
    path: output dir (created; must not already hold a checkpoint).
    size: size name (see `imagen_jax.nn.t5.SIZES`).
    seed: weight seed; the same seed gives the same weights in every format.
    fmt: 't5x_legacy' (msgpack + gzip zarr via tensorstore, with a decoder parameter and
      optimizer slots for the reader to skip), 't5x_orbax', or 'hf' (safetensors + config.json).
    t5x_spec_layout: for 't5x_legacy': 'new' (tensorstore >= 0.1.14, `kvstore.path`) or 'old'
      (top-level `path`).
    hf_shards: for 'hf': number of safetensors shards (> 1 writes an index json).
    config: overrides the size's config (its dtype is ignored: weights are float32).
  """
  if fmt not in FORMATS:
    raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
  if t5x_spec_layout not in ("new", "old"):
    raise ValueError(f"t5x_spec_layout must be 'new' or 'old', got {t5x_spec_layout!r}")
  if hf_shards < 1:
    raise ValueError(f"hf_shards must be >= 1, got {hf_shards}")
  config = config or t5.get_config(size)
  if os.path.exists(path) and os.listdir(path):
    raise ValueError(f"checkpoint path {path!r} already exists and is not empty")
  os.makedirs(path, exist_ok=True)
  params = random_params(config, seed)
  if fmt == "hf":
    _write_hf(path, config, params, hf_shards)
  elif fmt == "t5x_legacy":
    _write_t5x_legacy(path, params, t5x_spec_layout)
  else:
    _write_t5x_orbax(path, params)


def _write_hf(path: str, config: t5.T5Config, params: dict[str, np.ndarray], shards: int) -> None:
  from safetensors.numpy import save_file

  tensors = {}
  for name, value in params.items():
    key, transposed = hf_name(name)
    tensors[key] = np.ascontiguousarray(value.T if transposed else value)
  # Tied copy, as transformers writes for T5EncoderModel.
  tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
  names = sorted(tensors)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for s in range(shards):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {k: tensors[k] for k in names[s::shards]}
      save_file(part, os.path.join(path, file), metadata={"format": "pt"})
      weight_map.update({k: file for k in part})
    index = {
      "metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
      "weight_map": weight_map,
    }
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  hf_config = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_model": config.d_model,
    "d_kv": config.head_dim,
    "d_ff": config.mlp_dim,
    "num_heads": config.num_heads,
    "num_layers": config.num_layers,
    "vocab_size": config.vocab_size,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": config.relative_attention_num_buckets,
    "relative_attention_max_distance": config.relative_attention_max_distance,
    "layer_norm_epsilon": config.layer_norm_epsilon,
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
  }
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def _write_t5x_legacy(path: str, params: dict[str, np.ndarray], layout: str) -> None:
  import tensorstore as ts
  from flax import serialization

  # A decoder parameter and Adafactor-like slots exercise the reader's skipping.
  d_model = params["encoder/encoder_norm/scale"].shape[0]
  everything = dict(params)
  everything["decoder/decoder_norm/scale"] = np.ones((d_model,), np.float32)
  specs = {}
  for name, value in everything.items():
    rel = _dirname(name)
    metadata = {"compressor": {"id": "gzip"}, "shape": list(value.shape)}
    ts.open(
      {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": os.path.join(path, rel)},
        "metadata": {**metadata, "chunks": list(value.shape), "dtype": "<f4"},
      },
      create=True,
    ).result().write(value).result()
    metadata["chunks"] = list(value.shape)
    if layout == "new":
      spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": rel}}
    else:
      spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file"}, "path": rel}
    specs[name] = {**spec, "metadata": metadata}
  slots = {
    name: {"v_row": np.zeros(v.shape[:1], np.float32)} for name, v in params.items() if v.ndim == 2
  }
  contents = {
    "version": 3,
    "optimizer": {
      "target": traverse_util.unflatten_dict(specs, sep="/"),
      "state": {
        "step": np.asarray(0, np.int32),
        "param_states": traverse_util.unflatten_dict(slots, sep="/"),
      },
    },
  }
  with open(os.path.join(path, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))


def _write_t5x_orbax(path: str, params: dict[str, np.ndarray]) -> None:
  from imagen_jax import checkpoints

  state = {
    "version": 3,
    "optimizer": {
      "target": traverse_util.unflatten_dict(params, sep="/"),
      "state": {"step": np.asarray(0, np.int32)},
    },
  }
  target = os.path.abspath(path)
  # orbax writes into a fresh dir; `path` was created empty above.
  os.rmdir(target)
  checkpoints.save_pytree(target, state)
