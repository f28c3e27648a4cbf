"""The whole pipeline: prompts -> frozen text encoder -> stage 1 -> stage 2 -> ... -> images.

A `Cascade` holds a text encoder and a chain of `CascadeStage`s (a `Stage` with its EMA params),
built from training MODEL_DIRs (`Cascade.from_stage_dirs`) or read from an export bundle
(`imagen_jax.export.load_bundle`, which imports this module; this one never imports it).
`Cascade.sample` runs every stage with its own `StageSampling` knobs
(sampler, steps, η, guidance weight, thresholding, noise-aug level).

Seeds are per image: image i is drawn from PRNGKey(seeds[i]) (stage k folds in k), and each
stage's program is the single-image sampler vmapped over the batch, so an image depends only on
its prompt, seed and settings, never on what else is in the batch. Each stage's whole sampling
loop is one compiled program (one `jax.jit` around the vmapped `Stage.sample`).

An empty prompt "" is the unconditional (dropped-text) condition; a negative prompt replaces the
unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from imagen_jax import parallel
from imagen_jax.diffusion import samplers
from imagen_jax.errors import UserError
from imagen_jax.stage import Stage, StageConfig, stage_from_spec, stage_spec

log = logging.getLogger(__name__)


# ================================================================================================
# Per-stage sampling knobs
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class StageSampling:
  """Sampling knobs of one stage (the schedule and objective are the stage's own).

  Attributes:
    sampler: 'ddim', 'ancestral' or 'dpmpp_2m' (DPM-Solver++(2M): DDIM-256 quality in far
      fewer steps).
    num_steps: denoising steps.
    eta: DDIM stochasticity (0 = deterministic; 1 = ancestral).
    guidance_weight: classifier-free guidance w (1 = none; paper COCO: 1.35 base, 8 SR).
    thresholding: 'dynamic' (paper), 'static' or 'none'.
    percentile: dynamic-thresholding percentile p (None = the stage's `sample_percentile`:
      99.5 as in the paper, 95 for DeepFloyd IF).
    max_threshold: cap on dynamic thresholding's s (None = the stage's
      `sample_max_threshold`: no cap, 1.5 for IF; inf = no cap).
    aug_level: SR stages' noise-conditioning level (None = the stage's `aug_sample_level`).
    time_spacing: 'uniform_t' (steps uniform in time) or 'uniform_log_snr'.
  """

  sampler: str = "ddim"
  num_steps: int = 64
  eta: float = 0.0
  guidance_weight: float = 1.0
  thresholding: str = "dynamic"
  percentile: float | None = None
  max_threshold: float | None = None
  aug_level: float | None = None
  time_spacing: str = "uniform_t"

  def __post_init__(self):
    # The one place sampling knobs are range-checked: the library, `imagen-jax sample` and the
    # demo all build a StageSampling before any model loads.
    check_guidance_weight(self.guidance_weight)
    self.sampler_config()  # validates every other field with a clear message
    if self.aug_level is not None and not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f"aug_level={self.aug_level}; must be in [0, 1] (paper: 0 to 0.3)")

  def sampler_config(self, stage: StageConfig | None = None) -> samplers.SamplerConfig:
    """The sampler's config, unset knobs taken from `stage` (else the paper's)."""
    stage = stage or StageConfig(schedule="cosine")
    cap = stage.sample_max_threshold if self.max_threshold is None else self.max_threshold
    return samplers.SamplerConfig(
      sampler=self.sampler,
      num_steps=self.num_steps,
      eta=self.eta,
      guidance_weight=float(self.guidance_weight),
      thresholding=self.thresholding,
      percentile=stage.sample_percentile if self.percentile is None else self.percentile,
      max_threshold=None if cap == math.inf else cap,
      time_spacing=self.time_spacing,
    )

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_guidance_weight(weight: Any) -> float:
  """`weight` as a float if it is a usable classifier-free guidance weight w, else ValueError.

  Guidance is ε̃ = w · ε(z, c) + (1 − w) · ε(z): w = 1 is plain conditional sampling, w > 1
  follows the prompt more strongly, 0 <= w < 1 blends towards unconditional; w < 0 pushes away
  from the prompt, which no sampler setting wants.
  """
  try:
    w = float(weight)
  except (TypeError, ValueError):
    w = float("nan")
  if not (math.isfinite(w) and w >= 0.0):
    raise ValueError(
      f"guidance_weight={weight!r} is invalid; it must be a number >= 0: 1 = no guidance (plain "
      "conditional sampling), larger values follow the prompt more strongly (paper: 1.35 base, "
      "8 super-resolution), values below 1 blend towards unconditional samples"
    )
  return w


# PRNGKey keeps a seed's low 32 bits (without jax_enable_x64): seed 2**32 would repeat seed 0's
# image and seed -1 seed 2**32 - 1's.
MAX_SEED = 2**32 - 1


def check_seeds(seeds: Sequence[int]) -> list[int]:
  """Seeds as ints, each in [0, MAX_SEED] (every seed its own images), else ValueError."""
  out = []
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int | np.integer):
      raise ValueError(f"seed {s!r} is not an integer; seeds are integers in [0, {MAX_SEED}]")
    if not 0 <= int(s) <= MAX_SEED:
      raise ValueError(
        f"seed {int(s)} is outside [0, {MAX_SEED}]: PRNG seeds are 32-bit, so it would repeat "
        "another seed's image; use seeds in that range"
      )
    out.append(int(s))
  return out


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


IF_PREFIX = "if:"  # a --stage_dirs entry naming a DeepFloyd IF dir (diffusers layout)


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


# ================================================================================================
# The cascade
# ================================================================================================


@dataclasses.dataclass
class CascadeOutput:
  """Result of `Cascade.sample`.

  Attributes:
    images: final images, float32 [B, R, R, 3] in [−1, 1].
    per_stage: each run stage's output, in order.
    stages_run: indices of the stages that ran.
    seconds: wall time per run stage (compile included on first use).
  """

  images: np.ndarray
  per_stage: list[np.ndarray]
  stages_run: list[int]
  seconds: list[float]


def check_chain(stages: Sequence[CascadeStage]) -> None:
  """Each SR stage's low-res input must be the previous stage's output resolution."""
  if not stages:
    raise ValueError("a cascade needs at least one stage")
  for prev, cur in zip(stages, stages[1:]):
    if not cur.config.is_super_resolution:
      raise ValueError(
        f"stage {cur.config.name!r} follows {prev.config.name!r} but is not a super-resolution "
        "stage; only the first stage may be a base stage"
      )
    if cur.config.lowres_resolution != prev.config.resolution:
      raise ValueError(
        f"stage resolutions do not chain: {prev.config.name!r} outputs {prev.config.resolution}px "
        f"but {cur.config.name!r} takes {cur.config.lowres_resolution}px low-res inputs"
      )
  dims = {(s.text_dim, s.max_length) for s in stages}
  if len(dims) != 1:
    raise ValueError(
      "stages disagree on the text condition (text_dim, max_length): "
      + ", ".join(f"{s.config.name}={s.text_dim, s.max_length}" for s in stages)
    )


class Cascade:
  """A text encoder and a chain of stages.

  Args:
    encoder: a `TextEncoder` (or anything with `encode(texts)`, `tokenize(texts)`, `width`,
      `max_length`); may be None when only `sample_embeddings` is used.
    stages: stages in order, base first (a cascade of SR stages only can start from images).
    devices: where images are sampled (default: all of this process's devices).
    mesh: their ('data', 'fsdp', 'model') layout (default: all on 'data'): each batch is split
      over ('data', 'fsdp') and every stage's params are placed by the training job's logical
      rules (replicated by default, FSDP-sharded with fsdp > 1), so one call runs on every
      device; an image still depends only on its prompt, seed and settings (up to float
      rounding between layouts). A `SamplingMesh` may be passed ready-made (`devices` unused).
  """

  def __init__(
    self,
    encoder: Any,
    stages: Sequence[CascadeStage],
    devices: Sequence[jax.Device] | None = None,
    mesh: parallel.MeshConfig | parallel.SamplingMesh | None = None,
  ):
    check_chain(stages)
    self.encoder = encoder
    self.stages = list(stages)
    if encoder is not None and encoder.width != self.stages[0].text_dim:
      raise ValueError(
        f"text encoder width {encoder.width} != the stages' text_dim {self.stages[0].text_dim}"
      )
    if not isinstance(mesh, parallel.SamplingMesh):
      mesh = parallel.SamplingMesh(mesh, devices)
    self._split = mesh
    self.mesh = mesh.mesh
    self.devices = mesh.devices
    self._placed_params: dict[int, Any] = {}

  def _params_on_devices(self, index: int) -> Any:
    """Stage `index`'s params on the sampling mesh, by the logical rules (placed once)."""
    if index not in self._placed_params:
      st = self.stages[index]
      batch = st.stage.dummy_batch(1, st.max_length, st.text_dim)
      shardings = self._split.param_shardings(st.stage.init_params, jax.random.key(0), batch)
      self._placed_params[index] = jax.device_put(st.params, shardings)
    return self._placed_params[index]

  # --- constructors -------------------------------------------------------------------------

  @classmethod
  def from_stage_dirs(
    cls,
    stage_dirs: Sequence[str],
    vocab_path: str | None = None,
    t5_checkpoint: str | None = None,
    t5_size: str | None = None,
    encoder: Any = None,
    mesh: parallel.MeshConfig | None = None,
  ) -> Cascade:
    """Loads every stage's latest EMA params from training MODEL_DIRs.

    The text encoder is the one recorded in the first stage's precompute manifest (DATA), with
    the vocabulary found beside the data, unless given (`encoder`) or overridden. `mesh` lays
    out this process's devices (see `Cascade`); the encoder runs on the same mesh.
    """
    missing = [d for d in stage_dirs if not os.path.isdir(d.removeprefix(IF_PREFIX))]
    if missing:
      raise FileNotFoundError(f"stage dirs do not exist: {missing}")
    stages = [load_stage_dir(d) for d in stage_dirs]
    check_chain(stages)
    sampling = parallel.SamplingMesh(mesh)
    if encoder is None:
      ref, vocab_path = resolve_encoder_reference(stages, vocab_path, t5_checkpoint, t5_size)
      encoder = load_encoder_from_reference(ref, vocab_path, mesh=sampling.mesh)
    return cls(encoder, stages, mesh=sampling)

  # --- text ---------------------------------------------------------------------------------

  def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (embeddings [B, L, D] float32, mask [B, L] bool); "" = unconditional (zeros,
    or the encoder's output of "" for an encoder that keeps padding outputs, as IF's).

    Prompts longer than the encoder's max length are truncated (EOS kept) with a warning.
    """
    if self.encoder is None:
      raise ValueError("this cascade has no text encoder: use sample_embeddings")
    prompts = [str(p) for p in prompts]
    max_length = self.encoder.max_length
    # Count tokens without the length cap so every truncated prompt is reported by name.
    vocab = getattr(self.encoder, "vocab", None)
    for p in prompts:
      if vocab is not None and p and len(vocab.encode(p)) + 1 > max_length:
        log.warning("prompt truncated to max_length=%d tokens (EOS kept): %r", max_length, p[:120])
    emb, mask = self.encoder.encode(prompts)
    emb = np.array(jax.device_get(emb), np.float32)
    mask = np.array(jax.device_get(mask), bool)
    if getattr(self.encoder, "zero_padding", True):  # IF's null condition is T5("") itself
      empty = np.array([p.strip() == "" for p in prompts])
      emb[empty] = 0.0
      mask[empty] = False
    return emb, mask

  # --- sampling -----------------------------------------------------------------------------

  def _program(self, index: int, settings: StageSampling) -> Callable:
    program = stage_program(self.stages[index].stage, settings, self.mesh)

    def traced_on_mesh(*args):
      with self._split.context():
        return program(*args)

    return traced_on_mesh

  def sample_embeddings(
    self,
    text_emb: np.ndarray,
    text_mask: np.ndarray,
    seeds: Sequence[int],
    settings: Sequence[StageSampling] | StageSampling = StageSampling(),
    uncond_emb: np.ndarray | None = None,
    uncond_mask: np.ndarray | None = None,
    lowres: np.ndarray | None = None,
    stop_after: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
  ) -> CascadeOutput:
    """Runs the cascade on text embeddings (see `sample` for the arguments)."""
    text_emb = np.asarray(text_emb, np.float32)
    text_mask = np.asarray(text_mask, bool)
    n = text_emb.shape[0]
    seeds = check_seeds(seeds)
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
      raise ValueError(f"batch_size={batch_size!r}; must be an integer >= 1")
    if len(seeds) != n:
      raise ValueError(f"got {len(seeds)} seeds for {n} prompts; give one seed per image")
    if uncond_emb is None:
      uncond_emb, uncond_mask = np.zeros_like(text_emb), np.zeros_like(text_mask)
    settings = self._per_stage(settings)
    first, last = self._stage_range(lowres, stop_after)
    if lowres is not None:
      lowres = np.asarray(lowres, np.float32)
      if lowres.shape[0] == 1 and n > 1:
        lowres = np.repeat(lowres, n, axis=0)
      if lowres.shape[0] != n or lowres.ndim != 4 or lowres.shape[-1] != 3:
        raise ValueError(f"lowres must be [{n}, h, w, 3] (or [1, h, w, 3]), got {lowres.shape}")
    # A multiple of the device count, so every device gets an equal share of each call.
    batch_size = self._split.round_up(batch_size or n)
    keys = np.stack([np.asarray(jax.random.PRNGKey(s)) for s in seeds])

    current, per_stage, seconds = lowres, [], []
    for k in range(first, last + 1):
      program = self._program(k, settings[k])
      stage_keys = np.asarray(
        jax.vmap(jax.random.fold_in, in_axes=(0, None))(jnp.asarray(keys), k), np.uint32
      )
      bar = _progress_bar(
        n, f"stage {k + 1}/{len(self.stages)} {self.stages[k].config.name}", progress
      )
      t0 = time.time()
      outs = []
      for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        # Every call gets exactly batch_size images (a short chunk is padded with copies of its
        # last image), so one compiled program serves every call, including a caller's last,
        # smaller batch.
        pad_idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        args = [
          self._split.split(a)
          for a in (
            text_emb[pad_idx],
            text_mask[pad_idx],
            uncond_emb[pad_idx],
            np.asarray(uncond_mask, bool)[pad_idx],
            stage_keys[pad_idx],
            None if current is None else current[pad_idx],
          )
        ]
        out = np.asarray(jax.device_get(program(self._params_on_devices(k), *args)), np.float32)
        outs.append(out[: len(idx)])
        if bar is not None:
          bar.update(len(idx))
      if bar is not None:
        bar.close()
      current = np.concatenate(outs)
      per_stage.append(current)
      seconds.append(time.time() - t0)
    return CascadeOutput(current, per_stage, list(range(first, last + 1)), seconds)

  def sample(
    self,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: Sequence[StageSampling] | StageSampling = StageSampling(),
    negative_prompts: Sequence[str] | str | None = None,
    lowres: np.ndarray | None = None,
    stop_after: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
  ) -> CascadeOutput:
    """Prompts -> images through the stages.

    Args:
      prompts: one prompt per image ("" = unconditional).
      seeds: one seed per image; the image depends only on (prompt, seed, settings).
      settings: one StageSampling per stage (or one for all).
      negative_prompts: guidance's unconditional branch per image (or one for all); default
        the dropped-text condition (zeros; "" encoded for an IF-style encoder that keeps
        padding outputs). Only used where guidance_weight != 1.
      lowres: start from these images (float [B or 1, h, w, 3] in [−1, 1]) at the first SR
        stage taking h-px inputs, skipping the stages before it.
      stop_after: stop after this stage (1-based; default: the last).
      batch_size: images per program call (default: all at once), rounded up to a multiple of
        the sampling devices; fewer images are padded to it, so calls with up to batch_size
        images share one compiled program.
      progress: show a progress bar per stage.

    Returns:
      CascadeOutput.
    """
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of strings, not one string")
    if not prompts:
      raise ValueError("prompts is empty")
    self._per_stage(settings)  # fail on bad settings and seeds before encoding
    self._stage_range(lowres, stop_after)
    check_seeds(seeds)
    emb, mask = self.encode(prompts)
    uemb = umask = None
    if negative_prompts is None and not getattr(self.encoder, "zero_padding", True):
      negative_prompts = ""  # DeepFloyd IF's unconditional branch: the encoded empty prompt
    if negative_prompts is not None:
      if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
      if len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
      uemb, umask = self.encode(negative_prompts)
    return self.sample_embeddings(
      emb, mask, seeds, settings, uemb, umask, lowres, stop_after, batch_size, progress
    )

  def _per_stage(self, settings) -> list[StageSampling]:
    if isinstance(settings, StageSampling):
      return [settings] * len(self.stages)
    settings = list(settings)
    if len(settings) != len(self.stages) or not all(isinstance(s, StageSampling) for s in settings):
      raise ValueError(
        f"settings must be one StageSampling or one per stage ({len(self.stages)}), "
        f"got {settings!r}"
      )
    return settings

  def _stage_range(self, lowres, stop_after) -> tuple[int, int]:
    n = len(self.stages)
    last = n - 1 if stop_after is None else int(stop_after) - 1
    first = 0
    if lowres is not None:
      h = np.shape(lowres)[1]
      matches = [i for i, s in enumerate(self.stages) if s.config.lowres_resolution == h]
      if not matches:
        raise ValueError(
          f"lowres images are {h}px but no super-resolution stage takes {h}px inputs "
          f"(stages take {[s.config.lowres_resolution for s in self.stages]})"
        )
      first = matches[0]
    elif self.stages[0].config.is_super_resolution:
      raise ValueError("this cascade starts with a super-resolution stage: pass lowres images")
    if not first <= last < n:
      raise ValueError(
        f"stop_after={stop_after} must be between {first + 1} and {n} (stages are 1-based)"
      )
    return first, last


# (network repr, stage config, settings) -> jitted program. Keyed on what the program computes,
# not on object identity, so cascades rebuilt from a bundle reuse compiled programs.
_PROGRAMS: dict[tuple, Callable] = {}


def stage_program(stage: Stage, settings: StageSampling, mesh: jax.sharding.Mesh) -> Callable:
  """The compiled sampler of one stage for a batch: `program(params, emb, mask, uncond_emb,
  uncond_mask, rngs, lowres) -> images`, the single-image `Stage.sample` vmapped over the batch
  (per-image PRNG keys, the vmapped axis split over `mesh`'s batch axes) under one `jax.jit`.
  Call it inside `SamplingMesh.context()`, where the network's logical constraints apply."""
  key = (type(stage.network), repr(stage.network), stage.config, settings, mesh)
  if key not in _PROGRAMS:
    config = settings.sampler_config(stage.config)
    aug_level = settings.aug_level

    def one(params, emb, mask, uemb, umask, rng, lowres):
      out = stage.sample(
        params,
        emb[None],
        mask[None],
        rng,
        config,
        lowres=None if lowres is None else lowres[None],
        aug_level=aug_level,
        uncond_text=(uemb[None], umask[None]),
      )
      return out[0]

    batched = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, 0), spmd_axis_name=parallel.BATCH_AXES)
    _PROGRAMS[key] = jax.jit(batched, out_shardings=parallel.batch_sharding(mesh, 4))
  return _PROGRAMS[key]


def _progress_bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm

  return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)
