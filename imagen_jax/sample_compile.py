"""`imagen-jax compile --sample`: the stage's sampling loop compiled for the same slice.

The loop is the one `Stage.sample` runs (one compiled `lax.scan` over denoising steps, guidance
as one network call on [cond; uncond]), at the stage's full output resolution (SR-1024: 1024 px
from 256 px, fully convolutional), with the EMA parameters in the training job's shardings and
the batch split over ('data', 'fsdp').
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
from flax import linen as nn

from imagen_jax import aot, flop_count, parallel
from imagen_jax.diffusion import samplers
from imagen_jax.training import program as train_program


def _trace_sampling(program, mesh, batch: int, config: samplers.SamplerConfig):
  stage = program.stage
  cfg = stage.config
  settings = program.settings
  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape))
  )
  text_emb = sharded((batch, settings.max_length, settings.text_dim), jax.numpy.float32)
  text_mask = sharded((batch, settings.max_length), jax.numpy.bool_)
  lowres = None
  if cfg.is_super_resolution:
    lowres = sharded((batch, cfg.lowres_resolution, cfg.lowres_resolution, 3), jax.numpy.float32)
  key = train_program.rng_shape()
  params = program.abstract_state.ema_params
  param_shardings = program.state_shardings.ema_params

  def sample(params, text_emb, text_mask, rng, lowres):
    return stage.sample(params, text_emb, text_mask, rng, config, lowres=lowres)

  lowres_sharding = None if lowres is None else lowres.sharding
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    return jax.jit(
      sample,
      in_shardings=(
        param_shardings,
        text_emb.sharding,
        text_mask.sharding,
        parallel.replicated(mesh),
        lowres_sharding,
      ),
      out_shardings=parallel.batch_sharding(mesh, 4),
    ).trace(params, text_emb, text_mask, key, lowres)


def compile_sampling(
  train_report: aot.CompileReport, built: tuple[Any, Any, Any], args: argparse.Namespace
) -> aot.CompileReport:
  """Compiles the stage's sampling loop on the train step's mesh and reports it."""
  program, mesh, _ = built
  dp = parallel.data_parallel_size(mesh)
  batch = args.sample_batch or dp
  if batch % dp:
    raise ValueError(f"--sample_batch={batch} must be a multiple of the data-parallel size {dp}")
  config = samplers.SamplerConfig(
    sampler="ddim", num_steps=args.sample_steps, guidance_weight=args.sample_guidance
  )
  t0 = time.perf_counter()
  traced = _trace_sampling(program, mesh, batch, config)
  compiled = aot.compile_or_explain(traced.lower(), 1, train_report.limit_bytes)  # same headroom
  compile_s = time.perf_counter() - t0
  costs = aot.program_costs(compiled)
  # Per chip and denoising step, like XLA's count (which counts the loop's body once).
  loop_flops = flop_count.jaxpr_flops(traced.jaxpr)
  costs["model_flops"] = loop_flops / args.sample_steps / len(mesh.devices.flat)
  cfg = program.stage.config
  return dataclasses.replace(
    train_report,
    program=f"sample ({cfg.resolution} px, DDIM, guidance {args.sample_guidance:g})",
    global_batch=batch * train_report.chips // len(mesh.devices.flat),
    per_device_batch=batch // dp,
    num_microbatches=1,
    costs=costs,
    compile_s=compile_s,
    peak_host_rss_bytes=aot.peak_host_rss_bytes(),
    fingerprint="",
    loop_steps=args.sample_steps,
    notes=[n for n in train_report.notes if "sub-slice" in n or "dtype" in n],
  )
