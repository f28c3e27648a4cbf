"""Inference bundles: everything a serving job needs to sample, in one directory.

Layout (format_version 1):
  manifest.json               format_version, package versions, stages, sha256 of every file
  text_encoder/encoder.json   the encoder's identity (size, checkpoint reference, max_length ...)
  text_encoder/<vocab>.model  the SentencePiece vocabulary (copied)
  stages/<k>_<name>/stage.json           StageConfig + network class and fields + text shape
  stages/<k>_<name>/ema_params.msgpack   EMA params (flax msgpack; float32 or bfloat16)
  stages/<k>_<name>/denoise_step.jaxexport  `jax.export` of the denoising step (StableHLO, params
                                            embedded), batch-polymorphic; loads with jax alone
  stages/<k>_<name>/denoise_step.json    its input names, shapes and dtypes

The bundle is written to a temporary sibling directory and renamed into place at the end, so a
failed export never leaves a half bundle or touches an existing one. The temporary directory's
name carries its writer's pid and host, so the next export to the same target removes the ones
left by killed writers.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imagen_jax.utils import files as file_utils

# jax / flax / inference.cascade are imported inside functions: `imagen-jax --help` imports
# this module and must stay fast.
if TYPE_CHECKING:
  from imagen_jax.inference import cascade

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARAM_DTYPES = ("float32", "bfloat16")
_PACKAGES = ("imagen_jax", "jax", "jaxlib", "flax", "numpy", "orbax-checkpoint")


def _versions() -> dict[str, str | None]:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")


# ================================================================================================
# The portable denoising step
# ================================================================================================


def denoise_step_inputs(stage: cascade.CascadeStage, batch: Any) -> list[tuple[str, tuple, str]]:
  """(name, shape, dtype) of the exported step's inputs; `batch` may be symbolic."""

  cfg = stage.config
  r = cfg.resolution
  inputs = [
    ("z", (batch, r, r, 3), "float32"),
    ("log_snr", (batch,), "float32"),
    ("text_emb", (batch, stage.max_length, stage.text_dim), "float32"),
    ("text_mask", (batch, stage.max_length), "bool"),
  ]
  if cfg.is_super_resolution:
    lr = cfg.lowres_resolution
    inputs += [("lowres", (batch, lr, lr, 3), "float32"), ("aug_log_snr", (batch,), "float32")]
  return inputs


def export_denoise_step(stage: cascade.CascadeStage, params: Any) -> bytes:
  """Serializes `Stage.model_fn` with `params` embedded as one StableHLO module.

  The batch dimension is symbolic; z is at the stage's sampling resolution.

  Returns:
    `jax.export` serialized bytes (reload with `jax.export.deserialize(b).call(...)`).
  """
  import jax
  import jax.numpy as jnp

  (b,) = jax.export.symbolic_shape("b")
  specs = [
    jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    for _, shape, dtype in denoise_step_inputs(stage, b)
  ]
  names = [n for n, _, _ in denoise_step_inputs(stage, 1)]
  model_fn = stage.stage.model_fn

  def step(*args):
    kw = dict(zip(names, args, strict=True))
    cond = {k: kw[k] for k in ("text_emb", "text_mask", "lowres", "aug_log_snr") if k in kw}
    return model_fn(params, kw["z"], kw["log_snr"], cond)

  exported = jax.export.export(jax.jit(step), platforms=("cpu", "cuda", "tpu"))(*specs)
  return exported.serialize()


# ================================================================================================
# Writing and reading bundles
# ================================================================================================


def _temp_prefix(out_dir: str) -> str:
  """Hidden sibling of `out_dir`: `.<name>.tmp-` (then `<pid>@<host>@<random>`)."""
  return f".{os.path.basename(os.path.abspath(out_dir))}.tmp-"


def _host() -> str:
  return socket.gethostname().replace("@", "_").replace(os.sep, "_")


def make_temp_dir(out_dir: str) -> str:
  """Creates the temporary directory a bundle for `out_dir` is written into."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  prefix = f"{_temp_prefix(out_dir)}{os.getpid()}@{_host()}@"
  return tempfile.mkdtemp(prefix=prefix, dir=parent)


def _writer_alive(pid: int, host: str) -> bool:
  if host != _host():
    return True  # another machine's process: cannot tell, so keep its directory
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's live process
  return True


def remove_stale_temp_dirs(out_dir: str) -> None:
  """Removes temporary bundles of `out_dir` whose writer (same host) is no longer running."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  prefix = _temp_prefix(out_dir)
  if not os.path.isdir(parent):
    return
  for name in sorted(os.listdir(parent)):
    if not name.startswith(prefix):
      continue
    pid, _, rest = name[len(prefix) :].partition("@")
    host = rest.rpartition("@")[0]
    if not pid.isdigit() or not host or _writer_alive(int(pid), host):
      continue  # a live (or unknown) writer's: not ours to remove
    path = os.path.join(parent, name)
    shutil.rmtree(path, ignore_errors=True)
    log.warning("removed %s, left by export process %s on %s (no longer running)", path, pid, host)


def stage_dir_name(index: int, stage: cascade.CascadeStage) -> str:
  safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage.config.name)
  return f"{index}_{safe}"


def export_bundle(
  stages: Sequence[cascade.CascadeStage],
  encoder_reference: dict[str, Any],
  vocab_path: str,
  out_dir: str,
  overwrite: bool = False,
  param_dtype: str = "float32",
  portable_step: bool = True,
) -> dict[str, Any]:
  """Writes an inference bundle.

  Args:
    stages: the cascade's stages (base first; resolutions must chain).
    encoder_reference: the text encoder's identity (size, checkpoint, max_length, dtype, ...).
    vocab_path: its SentencePiece model (copied into the bundle).
    out_dir: the bundle directory; must not exist unless `overwrite`.
    overwrite: replace an existing `out_dir`.
    param_dtype: 'float32' or 'bfloat16' for the stored EMA params.
    portable_step: also write each stage's `jax.export`ed denoising step.

  Returns:
    The manifest.
  """
  from imagen_jax.inference import cascade

  if param_dtype not in PARAM_DTYPES:
    raise ValueError(f"param_dtype={param_dtype!r}; must be one of {PARAM_DTYPES}")
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"export dir {out_dir!r} already exists; pass --overwrite to replace it")
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"vocabulary {vocab_path!r} does not exist")
  for key in ("size", "max_length"):
    if key not in encoder_reference:
      raise ValueError(f"encoder_reference needs {key!r}, got {encoder_reference}")
  cascade.check_chain(stages)

  remove_stale_temp_dirs(out_dir)
  tmp = make_temp_dir(out_dir)
  try:
    _write_encoder(tmp, encoder_reference, vocab_path)
    entries = [_write_stage(tmp, k, st, param_dtype, portable_step) for k, st in enumerate(stages)]
    manifest = _write_manifest(tmp, entries, param_dtype)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _write_encoder(tmp: str, encoder_reference: dict[str, Any], vocab_path: str) -> None:
  """text_encoder/: the vocabulary file and encoder.json (the reference, minus its data dir)."""
  enc_dir = os.path.join(tmp, "text_encoder")
  os.makedirs(enc_dir)
  vocab_name = os.path.basename(vocab_path)
  shutil.copyfile(vocab_path, os.path.join(enc_dir, vocab_name))
  encoder_json = {**encoder_reference, "vocab_file": vocab_name}
  encoder_json.pop("data_dir", None)
  _write_json(os.path.join(enc_dir, "encoder.json"), encoder_json)


def _write_stage(
  tmp: str, k: int, st: Any, param_dtype: str, portable_step: bool
) -> dict[str, str]:
  """stages/<name>/: EMA params, stage.json and (portable_step) the exported denoising step.

  Returns:
    The stage's manifest entry.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import serialization

  name = stage_dir_name(k, st)
  sdir = os.path.join(tmp, "stages", name)
  os.makedirs(sdir)
  params = jax.tree.map(
    lambda x: np.asarray(jax.device_get(x)).astype(jnp.dtype(param_dtype)), st.params
  )
  with open(os.path.join(sdir, "ema_params.msgpack"), "wb") as f:
    f.write(serialization.msgpack_serialize(params))
  _write_json(os.path.join(sdir, "stage.json"), {**st.spec, "param_dtype": param_dtype})
  if portable_step:
    with open(os.path.join(sdir, "denoise_step.jaxexport"), "wb") as f:
      f.write(export_denoise_step(st, params))
    _write_json(
      os.path.join(sdir, "denoise_step.json"),
      {
        "call": "jax.export.deserialize(bytes).call(*inputs) -> network output "
        f"({st.config.objective}-prediction) [b, R, R, 3]",
        "inputs": [
          {"name": n, "shape": ["b", *s[1:]], "dtype": d}
          for n, s, d in denoise_step_inputs(st, "b")
        ],
        "params": "embedded (EMA, " + param_dtype + ")",
      },
    )
  return {"dir": f"stages/{name}", "name": st.config.name}


def _write_manifest(tmp: str, entries: list[dict[str, str]], param_dtype: str) -> dict[str, Any]:
  """manifest.json: versions, stages, and the sha256 of every file written so far."""
  files = {}
  for root, _, names in os.walk(tmp):
    for n in sorted(names):
      path = os.path.join(root, n)
      files[os.path.relpath(path, tmp)] = file_utils.sha256(path)
  manifest = {
    "format_version": FORMAT_VERSION,
    "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "package_versions": _versions(),
    "stages": entries,
    "text_encoder": "text_encoder/encoder.json",
    "param_dtype": param_dtype,
    "files": dict(sorted(files.items())),
  }
  _write_json(os.path.join(tmp, "manifest.json"), manifest)
  return manifest


def read_manifest(bundle_dir: str, verify: bool = True) -> dict[str, Any]:
  """Reads and checks a bundle's manifest (format version and, if `verify`, every sha256)."""
  path = os.path.join(bundle_dir, "manifest.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{bundle_dir!r} is not an export bundle (no manifest.json)")
  with open(path) as f:
    manifest = json.load(f)
  version = manifest.get("format_version")
  if not isinstance(version, int) or version < 1:
    raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
  if version > FORMAT_VERSION:
    raise ValueError(
      f"bundle {bundle_dir!r} has format_version {version}, newer than this imagen_jax "
      f"supports ({FORMAT_VERSION}); upgrade imagen_jax to load it"
    )
  if verify:
    for rel, sha in manifest.get("files", {}).items():
      file_path = os.path.join(bundle_dir, rel)
      if not os.path.isfile(file_path):
        raise FileNotFoundError(f"bundle file {rel!r} listed in the manifest is missing")
      if file_utils.sha256(file_path) != sha:
        raise ValueError(f"bundle file {rel!r} does not match its sha256 in the manifest")
  return manifest


def load_stages(bundle_dir: str, verify: bool = True) -> list[cascade.CascadeStage]:
  """The bundle's stages with their EMA params (as stored: float32 or bfloat16)."""
  import jax
  import jax.numpy as jnp
  from flax import serialization

  from imagen_jax.inference import cascade

  manifest = read_manifest(bundle_dir, verify)
  stages = []
  for entry in manifest["stages"]:
    sdir = os.path.join(bundle_dir, entry["dir"])
    with open(os.path.join(sdir, "stage.json")) as f:
      spec = json.load(f)
    stage = cascade.stage_from_spec(spec)
    with open(os.path.join(sdir, "ema_params.msgpack"), "rb") as f:
      params = serialization.msgpack_restore(f.read())
    abstract = cascade.abstract_params(stage, spec["max_length"], spec["text_dim"])
    got = jax.tree.structure(params)
    if got != jax.tree.structure(abstract):
      raise ValueError(f"{sdir}: ema_params do not match the network in stage.json")
    stages.append(cascade.CascadeStage(stage, jax.tree.map(jnp.asarray, params), spec))
  return stages


def load_encoder_reference(bundle_dir: str) -> tuple[dict[str, Any], str]:
  """(encoder identity, path of the bundled vocabulary)."""
  with open(os.path.join(bundle_dir, "text_encoder", "encoder.json")) as f:
    ref = json.load(f)
  return ref, os.path.join(bundle_dir, "text_encoder", ref["vocab_file"])


def load_bundle(
  bundle_dir: str,
  encoder: Any = None,
  t5_checkpoint: str | None = None,
  verify: bool = True,
  mesh: Any = None,
) -> cascade.Cascade:
  """A ready Cascade from a bundle (the encoder is rebuilt from its reference unless given).

  `mesh` (a `parallel.MeshConfig`, default every local device on 'data') lays out this
  process's devices: the batch split over ('data', 'fsdp'), the params placed by the training
  rules (FSDP-sharded with fsdp > 1); the encoder runs on the same mesh.
  """

  from imagen_jax import parallel
  from imagen_jax.inference import cascade

  stages = load_stages(bundle_dir, verify)
  sampling = parallel.SamplingMesh(mesh)
  if encoder is None:
    ref, vocab = load_encoder_reference(bundle_dir)
    encoder = cascade.load_encoder_from_reference(ref, vocab, t5_checkpoint, mesh=sampling.mesh)
  return cascade.Cascade(encoder, stages, mesh=sampling)


# ================================================================================================
# `imagen-jax export`
# ================================================================================================
