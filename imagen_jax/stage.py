"""One cascade stage = a network + its diffusion setup; owns the objective and sampling.

The trainer talks to a stage only through `init_params`, `loss_fn` and `sample` (like t5x's
`BaseModel`); the network knows nothing about noise schedules.

Batches are dicts of batch-major arrays:
  image      [B, H, W, 3] float in [−1, 1]  (the stage's output resolution, or a training crop)
  text_emb   [B, L, D]    text embeddings (zero at padding)
  text_mask  [B, L]       bool, True at real tokens
  lowres     [B, h, w, 3] super-resolution stages only: the low-res conditioning image
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax.diffusion import losses, noise_aug, process, samplers, schedules, thresholding
from imagen_jax.utils.validation import check_choice, check_range


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """A stage's diffusion recipe (paper Appendix F defaults; one gin line each).

  Attributes:
    name: stage name, e.g. 'base64', 'sr256', 'sr1024'.
    resolution: output resolution when sampling.
    lowres_resolution: resolution of the conditioning image (None for the base stage).
    train_crop: train on random crops of this size (SR-1024 style; None = full images).
    schedule: log-SNR schedule of the denoising process ('cosine' or 'linear'), optionally
      shifted: 'cosine+2.77' adds 2.77 to λ at every t (less noise; the demo's 16 px base).
    objective: what the network predicts: 'eps' (paper) or 'v'.
    min_snr_gamma: optional min-SNR-γ loss weighting (None = the paper's unweighted loss).
    text_drop_prob: probability of zeroing the text condition (classifier-free guidance).
    aug_schedule: schedule of the low-res noise-conditioning augmentation.
    aug_max_level: training draws aug levels from U(0, aug_max_level).
    aug_sample_level: augmentation level used when sampling.
    sample_percentile / sample_max_threshold: the stage's default dynamic thresholding (the
      paper's p = 99.5 and no cap; DeepFloyd IF's 95 with s capped at 1.5).
  """

  name: str = "base64"
  resolution: int = 64
  lowres_resolution: int | None = None
  train_crop: int | None = None
  schedule: str = "cosine"
  objective: str = "eps"
  min_snr_gamma: float | None = None
  text_drop_prob: float = 0.1
  aug_schedule: str = "cosine"
  aug_max_level: float = 1.0
  aug_sample_level: float = noise_aug.DEFAULT_SAMPLING_AUG_LEVEL
  sample_percentile: float = thresholding.DEFAULT_PERCENTILE
  sample_max_threshold: float | None = None

  def __post_init__(self):
    schedules.check_schedule("schedule", self.schedule)
    schedules.check_schedule("aug_schedule", self.aug_schedule)
    check_choice("objective", self.objective, process.OBJECTIVES)
    check_range("text_drop_prob", self.text_drop_prob, 0.0, 1.0)
    check_range("aug_max_level", self.aug_max_level, 0.0, 1.0)
    check_range("aug_sample_level", self.aug_sample_level, 0.0, 1.0)
    check_range("sample_percentile", self.sample_percentile, 0.0, 100.0, low_open=True)
    thresholding.check_max_scale(self.sample_max_threshold)
    if self.lowres_resolution is not None and self.resolution % self.lowres_resolution:
      raise ValueError(
        f"stage {self.name!r}: resolution={self.resolution} must be a multiple of "
        f"lowres_resolution={self.lowres_resolution}"
      )
    if self.train_crop is not None:
      if self.lowres_resolution is None:
        raise ValueError(f"stage {self.name!r}: train_crop needs a super-resolution stage")
      factor = self.resolution // self.lowres_resolution
      if self.train_crop % factor or self.train_crop > self.resolution:
        raise ValueError(
          f"stage {self.name!r}: train_crop={self.train_crop} must be a multiple of the "
          f"upsampling factor {factor} and at most resolution={self.resolution}"
        )

  @property
  def is_super_resolution(self) -> bool:
    return self.lowres_resolution is not None

  @property
  def train_resolution(self) -> int:
    """Side of the training images (the crop size for crop-trained stages)."""
    return self.train_crop or self.resolution

  @property
  def train_lowres_resolution(self) -> int | None:
    if self.lowres_resolution is None:
      return None
    return self.train_resolution * self.lowres_resolution // self.resolution


def drop_text(
  text_emb: jax.Array, text_mask: jax.Array, rng: jax.Array, drop_prob: float
) -> tuple[jax.Array, jax.Array]:
  """Zeroes the embeddings and mask of each example with probability `drop_prob`."""
  keep = jax.random.uniform(rng, (text_emb.shape[0],)) >= drop_prob
  return text_emb * keep[:, None, None].astype(text_emb.dtype), text_mask & keep[:, None]


def unconditional_like(text_emb: jax.Array, text_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The dropped-text condition used for the unconditional half of guidance."""
  return jnp.zeros_like(text_emb), jnp.zeros_like(text_mask)


class Stage:
  """Network + diffusion for one cascade stage.

  Args:
    network: a U-Net module with the call signature
      `(x, log_snr, text_emb, text_mask, lowres=None, lowres_aug_log_snr=None,
      deterministic=True)`.
    config: the stage's diffusion recipe.
  """

  def __init__(self, network: nn.Module, config: StageConfig):
    self.network = network
    self.config = config
    self.log_snr_fn = schedules.get_schedule(config.schedule)
    if bool(getattr(network, "is_super_resolution", config.is_super_resolution)) != (
      config.is_super_resolution
    ):
      raise ValueError(
        f"stage {config.name!r}: lowres_resolution={config.lowres_resolution} but the network "
        f"is_super_resolution={network.is_super_resolution}; use an SR network for SR stages"
      )

  # --- shapes -------------------------------------------------------------------------------

  def dummy_batch(self, batch_size: int, text_length: int, text_dim: int) -> dict[str, Any]:
    """Abstract training batch (ShapeDtypeStructs) for init and AOT compilation."""
    res, lowres = self.config.train_resolution, self.config.train_lowres_resolution
    batch = {
      "image": jax.ShapeDtypeStruct((batch_size, res, res, 3), jnp.float32),
      "text_emb": jax.ShapeDtypeStruct((batch_size, text_length, text_dim), jnp.float32),
      "text_mask": jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
    }
    if lowres is not None:
      batch["lowres"] = jax.ShapeDtypeStruct((batch_size, lowres, lowres, 3), jnp.float32)
    return batch

  def init_inputs(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Zero inputs of batch size 1 with the batch's shapes (parameters don't depend on B)."""
    return {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype) for k, v in batch.items()}

  def init_params(self, rng: jax.Array, batch: dict[str, Any]) -> Any:
    """Initial (logically boxed) parameters.

    Args:
      rng: PRNG key.
      batch: example inputs — arrays (pass them as jit arguments: zeros created inside a
        jitted init let XLA constant-fold the whole forward pass, which compiles for minutes)
        or ShapeDtypeStructs (fine under `jax.eval_shape`).
    """
    inputs = {
      k: jnp.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v
      for k, v in batch.items()
    }
    b = inputs["image"].shape[0]
    variables = self.network.init(
      {"params": rng},
      inputs["image"],
      jnp.zeros((b,), jnp.float32),
      inputs["text_emb"],
      inputs["text_mask"],
      inputs.get("lowres"),
      jnp.zeros((b,), jnp.float32) if "lowres" in inputs else None,
      True,
    )
    return variables["params"]

  # --- training -----------------------------------------------------------------------------

  def loss_fn(
    self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising loss of one batch.

    Draws t ~ U(0, 1) per example, noises the image with the stage's schedule, drops the text
    with probability `text_drop_prob`, noise-augments the low-res image (SR stages), and
    regresses the objective's target with squared error.

    Returns:
      (scalar mean loss, metrics dict of scalars).
    """
    cfg = self.config
    t_rng, noise_rng, drop_rng, aug_rng, dropout_rng = jax.random.split(rng, 5)
    image = batch["image"].astype(jnp.float32)
    b = image.shape[0]
    t = jax.random.uniform(t_rng, (b,))
    log_snr = self.log_snr_fn(t)
    noise = jax.random.normal(noise_rng, image.shape, jnp.float32)
    z = process.q_sample(image, log_snr, noise)
    text_emb, text_mask = drop_text(
      batch["text_emb"], batch["text_mask"].astype(bool), drop_rng, cfg.text_drop_prob
    )
    lowres, aug_log_snr = None, None
    if cfg.is_super_resolution:
      lowres, aug_log_snr = noise_aug.augment_lowres(
        batch["lowres"].astype(jnp.float32),
        aug_rng,
        level=None,
        schedule=cfg.aug_schedule,
        max_level=cfg.aug_max_level,
      )
    out = self.network.apply(
      {"params": params},
      z,
      log_snr,
      text_emb,
      text_mask,
      lowres,
      aug_log_snr,
      False,
      rngs={"dropout": dropout_rng},
    )
    per_example = losses.diffusion_loss(
      out, image, noise, log_snr, cfg.objective, cfg.min_snr_gamma
    )
    loss = jnp.mean(per_example)
    return loss, {"loss": loss}

  def loss_at(
    self,
    params: Any,
    batch: dict[str, jax.Array],
    t: jax.Array,
    noise: jax.Array,
    aug_noise: jax.Array | None = None,
  ) -> jax.Array:
    """Per-example denoising loss [B] at given times and noise: the validation loss.

    Everything `loss_fn` draws is an input or fixed here, so the same params give the same
    number on every call: the text is kept (the conditional loss), dropout is off, and SR
    stages noise the low-res image at the sampling level `aug_sample_level` with `aug_noise`.

    Args:
      params: network parameters.
      batch: a batch as `loss_fn` takes it.
      t: [B] diffusion times in (0, 1).
      noise: ε, shaped like batch["image"].
      aug_noise: SR stages: the low-res augmentation's noise, shaped like batch["lowres"].
    """
    cfg = self.config
    image = batch["image"].astype(jnp.float32)
    log_snr = self.log_snr_fn(t)
    lowres, aug_log_snr = None, None
    if cfg.is_super_resolution:
      if aug_noise is None:
        raise ValueError(f"stage {cfg.name!r} is super-resolution: pass aug_noise")
      levels = jnp.full((image.shape[0],), cfg.aug_sample_level, jnp.float32)
      aug_log_snr = schedules.get_schedule(cfg.aug_schedule)(levels)
      lowres = process.q_sample(batch["lowres"].astype(jnp.float32), aug_log_snr, aug_noise)
    out = self.network.apply(
      {"params": params},
      process.q_sample(image, log_snr, noise),
      log_snr,
      batch["text_emb"],
      batch["text_mask"].astype(bool),
      lowres,
      aug_log_snr,
      True,
    )
    return losses.diffusion_loss(out, image, noise, log_snr, cfg.objective, cfg.min_snr_gamma)

  # --- sampling -----------------------------------------------------------------------------

  def model_fn(self, params: Any, z: jax.Array, log_snr: jax.Array, cond: dict) -> jax.Array:
    """The network as the sampler sees it: `cond` holds text (and low-res) inputs."""
    return self.network.apply(
      {"params": params},
      z,
      log_snr,
      cond["text_emb"],
      cond["text_mask"],
      cond.get("lowres"),
      cond.get("aug_log_snr"),
      True,
    )

  def sample(
    self,
    params: Any,
    text_emb: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    sampler_config: samplers.SamplerConfig,
    lowres: jax.Array | None = None,
    aug_level: float | None = None,
    resolution: int | None = None,
    init_noise: jax.Array | None = None,
    uncond_text: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """Samples images [B, R, R, 3] in [−1, 1] for a batch of text conditions.

    Args:
      params: (EMA) network parameters.
      text_emb / text_mask: [B, L, D] / [B, L] text condition; zero rows = unconditional.
      rng: PRNG key.
      sampler_config: sampler, steps, guidance, thresholding (schedule/objective are the
        stage's and override the config's).
      lowres: SR stages: [B, h, w, 3] images from the previous stage, in [−1, 1].
      aug_level: SR noise-conditioning level (default: the stage's `aug_sample_level`).
      resolution: output size (default: the stage's; SR stages infer it from `lowres`).
      init_noise: z at t = 1 (default: drawn from `rng`).
      uncond_text: (emb, mask) of guidance's unconditional branch, e.g. a negative prompt
        (default: the dropped-text condition, as in training).
    """
    cfg = self.config
    sampler_config = dataclasses.replace(
      sampler_config, schedule=cfg.schedule, objective=cfg.objective
    )
    b = text_emb.shape[0]
    cond = {"text_emb": text_emb, "text_mask": text_mask.astype(bool)}
    if cfg.is_super_resolution:
      if lowres is None:
        raise ValueError(f"stage {cfg.name!r} is super-resolution: pass lowres images")
      factor = cfg.resolution // cfg.lowres_resolution
      resolution = lowres.shape[1] * factor
      aug_rng, rng = jax.random.split(rng)
      level = cfg.aug_sample_level if aug_level is None else aug_level
      cond["lowres"], cond["aug_log_snr"] = noise_aug.augment_lowres(
        lowres.astype(jnp.float32), aug_rng, level=level, schedule=cfg.aug_schedule
      )
    elif lowres is not None:
      raise ValueError(f"stage {cfg.name!r} is a base stage: it takes no lowres images")
    resolution = resolution or cfg.resolution
    uncond = None
    if sampler_config.guidance_weight != 1.0:
      uncond = dict(cond)
      if uncond_text is None:
        uncond_text = unconditional_like(text_emb, cond["text_mask"])
      uncond["text_emb"], uncond["text_mask"] = uncond_text[0], uncond_text[1].astype(bool)
    return samplers.sample_jit(
      self.model_fn,
      params,
      cond,
      uncond,
      rng,
      (b, resolution, resolution, 3),
      sampler_config,
      init_noise,
    )


# ------------------------------------------------------------------------------------------------
# The stage spec: everything needed to rebuild a stage (network class + fields, StageConfig,
# text length and width) as JSON. Training saves it as a checkpoint item; bundles hold it as
# stage.json; readers rebuild the stage from it without gin.
# ------------------------------------------------------------------------------------------------


def _module_json(module: nn.Module) -> dict[str, Any]:
  """{class, fields} of a linen module (its dataclass fields, JSON-able)."""
  cls = type(module)
  fields = {
    k: _json_value(getattr(module, k))
    for k in cls.__dataclass_fields__
    if k not in ("parent", "name")
  }
  return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}


def _module_from_json(value: dict[str, Any]) -> nn.Module:
  module_name, _, cls_name = value["class"].rpartition(".")
  if not module_name.startswith("imagen_jax."):
    raise ValueError(f"stage spec network class {value['class']!r} is not imagen_jax's")
  cls = getattr(importlib.import_module(module_name), cls_name)
  return cls(**{k: _from_json_value(v) for k, v in value["fields"].items()})


def _json_value(value: Any) -> Any:
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, nn.Module):  # a submodule field (e.g. an IF U-Net inside its adapter)
    return {"__module__": _module_json(value)}
  if isinstance(value, tuple | list):
    return [_json_value(v) for v in value]
  if isinstance(value, dict):
    return {k: _json_value(v) for k, v in value.items()}
  try:  # dtypes (jnp.float32, 'bfloat16', np.dtype) are stored by name
    return {"__dtype__": jnp.dtype(value).name}
  except TypeError as e:
    raise ValueError(f"network field value {value!r} cannot be stored in a stage spec") from e


def _from_json_value(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_from_json_value(v) for v in value)
  if isinstance(value, dict):
    if set(value) == {"__dtype__"}:
      return jnp.dtype(value["__dtype__"])
    if set(value) == {"__module__"}:
      return _module_from_json(value["__module__"])
    return {k: _from_json_value(v) for k, v in value.items()}
  return value


def stage_spec(
  network: nn.Module,
  config: StageConfig,
  max_length: int,
  text_dim: int,
  **extra: Any,
) -> dict[str, Any]:
  """The JSON-able description of a stage (what `stage.json` holds).

  Args:
    network: the stage's U-Net module.
    config: its StageConfig.
    max_length / text_dim: the text condition's length and width it was trained with.
    **extra: more JSON-able fields (e.g. source model_dir and step).

  Returns:
    {stage_config, network: {class, fields}, max_length, text_dim, ...extra}.
  """
  return {
    "stage_config": dataclasses.asdict(config),
    "network": _module_json(network),
    "max_length": int(max_length),
    "text_dim": int(text_dim),
    **extra,
  }


def stage_from_spec(spec: dict[str, Any]) -> Stage:
  """Rebuilds the `Stage` a `stage_spec` describes."""
  config_fields = {
    k: tuple(v) if isinstance(v, list) else v for k, v in spec["stage_config"].items()
  }
  return Stage(_module_from_json(spec["network"]), StageConfig(**config_fields))
