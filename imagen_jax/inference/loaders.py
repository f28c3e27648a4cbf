"""Stages ready to sample, and the text encoder they were trained with.

A stage comes from a training MODEL_DIR (its newest loadable checkpoint's EMA params and stage
spec; a checkpoint older than the spec item is read back through its gin config) or from a
DeepFloyd IF dir (`if:PATH`). The encoder is named by the stages' precompute manifest (or by an
IF pipeline dir) and rebuilt from that reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn

from imagen_jax.deepfloyd import IF_PREFIX
from imagen_jax.errors import UserError
from imagen_jax.stage import Stage, StageConfig, stage_from_spec, stage_spec

# ================================================================================================
# Stage specs (the codec is `imagen_jax.stage`'s; a checkpoint older than its stage_spec item is
# read back through its gin config)
# ================================================================================================


def _gin_value(selector: str) -> Any:
  import gin

  value = gin.query_parameter(selector)
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def stage_spec_from_gin(config_text: str, **extra: Any) -> dict[str, Any]:
  """The stage spec of a training run from its operative gin config (saved with checkpoints).

  Args:
    config_text: `Checkpointer.read_config()` text.
    **extra: more fields for the spec.

  Returns:
    The stage spec, with `data_dir` set to the run's DATA.
  """
  import gin

  if not config_text.strip():
    raise ValueError(
      "the checkpoint's gin config is empty: was it trained via gin/imagen-jax train?"
    )
  gin.clear_config()
  try:
    gin.parse_config(config_text)
    network = _gin_value("train.train.network")
    config = _gin_value("train.train.stage")
    max_length = _gin_value("train.train.max_length")
    text_dim = _gin_value("train.train.text_dim")
    try:
      data_dir = _gin_value("train.train.data_dir")
    except ValueError:
      data_dir = None
  finally:
    gin.clear_config()
  return stage_spec(network, config, max_length, text_dim, data_dir=data_dir, **extra)


# ================================================================================================
# Loaded stages and the encoder reference
# ================================================================================================


@dataclasses.dataclass
class CascadeStage:
  """One stage ready to sample: the Stage, its (EMA) params and its spec."""

  stage: Stage
  params: Any
  spec: dict[str, Any]

  @property
  def config(self) -> StageConfig:
    return self.stage.config

  @property
  def text_dim(self) -> int:
    return int(self.spec["text_dim"])

  @property
  def max_length(self) -> int:
    return int(self.spec["max_length"])


def abstract_params(stage: Stage, max_length: int, text_dim: int) -> Any:
  """ShapeDtypeStructs of a stage's (unboxed) params, placed on this process's first device
  (in a multi-host job each host restores its own copy)."""
  batch = stage.dummy_batch(1, max_length, text_dim)
  shapes = jax.eval_shape(lambda r: nn.unbox(stage.init_params(r, batch)), jax.random.key(0))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)


def stage_dir_problem(stage_dir: str) -> str | None:
  """Why `stage_dir` cannot be loaded as a stage (checked without reading weights), or None."""
  path = stage_dir.removeprefix(IF_PREFIX)
  if not os.path.exists(path):
    return "does not exist"
  if stage_dir.startswith(IF_PREFIX):
    if not any(os.path.isfile(os.path.join(path, d, "config.json")) for d in ("unet", "")):
      return "has no unet/config.json (a diffusers DeepFloyd IF stage dir has one)"
  elif not os.path.isdir(os.path.join(path, "checkpoints")):
    return "has no checkpoints/ directory"
  return None


def absolute_stage_dir(stage_dir: str) -> str:
  """`stage_dir` with its path made absolute (an `if:` prefix kept)."""
  prefix = IF_PREFIX if stage_dir.startswith(IF_PREFIX) else ""
  return prefix + os.path.abspath(stage_dir.removeprefix(prefix))


def checked_stage_dirs(flag: str) -> list[str]:
  """--stage_dirs as absolute paths, each checked loadable (UserError naming the bad one)."""
  dirs = [d.strip() for d in flag.split(",") if d.strip()]
  if not dirs:
    raise UserError("--stage_dirs is empty: give training MODEL_DIRs, base stage first")
  for d in dirs:
    problem = stage_dir_problem(d)
    if problem:
      raise UserError(
        f"--stage_dirs: {d} {problem}; give the MODEL_DIRs the stages were trained into "
        "(or if:PATH for a DeepFloyd IF stage)"
      )
  return [absolute_stage_dir(d) for d in dirs]


def load_stage_dir(model_dir: str, step: int | None = None) -> CascadeStage:
  """Loads a stage's EMA params and recipe from a training MODEL_DIR.

  Args:
    model_dir: the stage's MODEL_DIR (holding checkpoints/<step>/...).
    step: checkpoint step (default: the newest that loads; broken newer ones are skipped with a
      warning and left in place).

  Returns:
    The CascadeStage (spec includes model_dir, step and the run's data_dir).
  """
  from imagen_jax import checkpoints, errors

  if model_dir.startswith(IF_PREFIX):  # a DeepFloyd IF dir (diffusers layout): deepfloyd/
    from imagen_jax.deepfloyd import stages as if_stages

    return CascadeStage(*if_stages.if_stage(model_dir))
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"stage dir {model_dir!r} has no checkpoints/ directory")
  ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)

  def load(s: int) -> tuple[dict[str, Any], Stage, Any]:
    source = {"model_dir": os.path.abspath(model_dir), "step": int(s)}
    saved = ckpt.read_stage_spec(s)
    if saved is None:  # a step saved before checkpoints held their stage spec
      spec = stage_spec_from_gin(ckpt.read_config(s), source=source)
    else:
      spec = {**saved, "source": source}
    stage = stage_from_spec(spec)
    abstract = abstract_params(stage, spec["max_length"], spec["text_dim"])
    return spec, stage, ckpt.restore_ema_params(s, abstract)

  try:
    loaded = ckpt.load_newest(load, step)  # read-only: nothing is moved aside
  finally:
    ckpt.close()
  if loaded is None:
    raise errors.UserError(f"stage dir {model_dir} has no finalized checkpoint in {ckpt_dir}")
  spec, stage, params = loaded[1]
  return CascadeStage(stage, params, spec)


def encoder_reference_from_data(data_dir: str | None) -> dict[str, Any]:
  """The text-encoder identity recorded in a precompute manifest (DATA/manifest.json).

  Returns:
    The manifest's encoder identity plus 'vocab_file' (name) and 'data_dir'; {} if unreadable.
  """
  if not data_dir:
    return {}
  path = os.path.join(data_dir, "manifest.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    manifest = json.load(f)
  ref = dict(manifest.get("encoder", {}))
  ref["vocab_file"] = manifest.get("vocab_file")
  # The encoder identity carries the vocabulary's hash; older manifests only at the top level.
  if manifest.get("vocab_sha256") and "vocab_sha256" not in ref:
    ref["vocab_sha256"] = manifest["vocab_sha256"]
  ref["data_dir"] = data_dir
  return ref


def find_vocabulary(reference: dict[str, Any]) -> str | None:
  """Looks for the manifest's vocabulary file in its data dir (where precompute copies it), then
  beside it (sha256-checked)."""
  from imagen_jax.text import vocabulary

  name, data_dir = reference.get("vocab_file"), reference.get("data_dir")
  if not name or not data_dir:
    return None
  for candidate in (
    os.path.join(data_dir, name),
    os.path.join(os.path.dirname(os.path.abspath(data_dir)), name),
  ):
    if os.path.isfile(candidate):
      sha = reference.get("vocab_sha256")
      if sha is None or vocabulary.file_sha256(candidate) == sha:
        return candidate
  return None


def resolve_encoder_reference(
  stages: Sequence[CascadeStage],
  vocab_path: str | None = None,
  t5_checkpoint: str | None = None,
  t5_size: str | None = None,
) -> tuple[dict[str, Any], str]:
  """The text encoder of training-dir stages: the first stage's data manifest + overrides.

  Returns:
    (encoder reference, vocabulary path).
  """
  # A trained stage's data manifest, else what the stage itself names (an IF pipeline dir's).
  ref = encoder_reference_from_data(stages[0].spec.get("data_dir"))
  ref = ref or dict(stages[0].spec.get("encoder") or {})
  if t5_size:
    ref["size"] = t5_size
  if t5_checkpoint:
    ref["checkpoint"] = os.path.abspath(t5_checkpoint)
  if "size" not in ref and os.path.exists(ref.get("checkpoint") or ""):
    from imagen_jax.text import t5_checkpoints

    with contextlib.suppress(ValueError):  # a Hugging Face T5 names its dimensions
      ref["size"] = t5_checkpoints.hf_size_name(ref["checkpoint"])
  ref.setdefault("max_length", stages[0].max_length)
  vocab_path = vocab_path or find_vocabulary(ref)
  if vocab_path is None:
    raise ValueError(
      "no vocabulary found beside the stages' data: pass --vocab=PATH (the SentencePiece "
      "model the stages' data was encoded with)"
    )
  if "size" not in ref:
    raise ValueError("the stages' data manifest names no T5 size: pass --t5_size")
  if int(ref["max_length"]) != stages[0].max_length:
    raise ValueError(
      f"the encoder's max_length {ref['max_length']} != the stages' {stages[0].max_length}"
    )
  return ref, vocab_path


def load_encoder_from_reference(
  reference: dict[str, Any], vocab_path: str, checkpoint: str | None = None, mesh: Any = None
) -> Any:
  """Builds the text encoder an identity describes ('random:N' checkpoints are re-drawn).

  Args:
    reference: encoder identity (size, checkpoint, max_length, dtype, vocab_sha256).
    vocab_path: the SentencePiece model (its sha256 must match the reference's, if any).
    checkpoint: override of the reference's checkpoint path.
    mesh: device mesh for the encoder.
  """
  from imagen_jax.text import encoder as encoder_lib
  from imagen_jax.text import vocabulary

  for key in ("size", "max_length"):
    if key not in reference:
      raise ValueError(f"text encoder reference lacks {key!r}: {reference}")
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f"vocabulary {vocab_path!r} does not exist")
  want_sha = reference.get("vocab_sha256")
  if want_sha and vocabulary.file_sha256(vocab_path) != want_sha:
    raise ValueError(
      f"vocabulary {vocab_path!r} differs from the one the stages were trained with "
      f"(sha256 {want_sha[:12]}...)"
    )
  source = checkpoint or reference.get("checkpoint", "random:0")
  zero_padding = bool(reference.get("zero_padding", True))
  seed = 0
  if source.startswith("random:"):
    seed, source = int(source.split(":", 1)[1]), None
  return encoder_lib.load_text_encoder(
    source,
    vocab_path,
    size=reference["size"],
    max_length=int(reference["max_length"]),
    dtype=reference.get("dtype", "bfloat16"),
    mesh=mesh,
    seed=seed,
    zero_padding=zero_padding,
  )
