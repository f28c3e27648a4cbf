"""The whole pipeline: prompts -> frozen text encoder -> stage 1 -> stage 2 -> ... -> images.

A `Cascade` holds a text encoder and a chain of `CascadeStage`s (a `Stage` with its EMA params),
built from training MODEL_DIRs or IF dirs (`Cascade.from_stage_dirs`, through
`inference.loaders`) or read from an export bundle (`inference.bundle.load_bundle`, which
imports this module; this one never imports it).
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

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import parallel
from imagen_jax.inference.loaders import (  # noqa: F401  (the cascade's public names, in one place)
  IF_PREFIX,
  CascadeStage,
  absolute_stage_dir,
  abstract_params,
  checked_stage_dirs,
  encoder_reference_from_data,
  find_vocabulary,
  load_encoder_from_reference,
  load_stage_dir,
  resolve_encoder_reference,
  stage_dir_problem,
  stage_spec_from_gin,
)
from imagen_jax.inference.settings import (  # noqa: F401
  MAX_SEED,
  StageSampling,
  check_guidance_weight,
  check_seeds,
)
from imagen_jax.stage import Stage, stage_from_spec, stage_spec  # noqa: F401

log = logging.getLogger(__name__)


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
