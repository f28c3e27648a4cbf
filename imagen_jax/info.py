"""Parameter count, training FLOPs and compiled memory of a network (`imagen-jax info`).

Nothing is allocated: parameters come from `jax.eval_shape`, and one training step's gradient
(forward + backward) is lowered and compiled ahead of time on abstract inputs, so XLA's
`cost_analysis()` gives the FLOPs and `memory_analysis()` the per-device bytes.
"""

from __future__ import annotations

import math
import time
from typing import Any


def count_params(network, text_length: int = 8) -> int:
  """Number of parameters, from `jax.eval_shape` (nothing allocated)."""
  import jax
  from flax import linen as nn

  args = network.abstract_inputs(1, text_length)
  shapes = jax.eval_shape(network.init, jax.random.key(0), *args)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


def network_info(
  network, batch_size: int = 1, text_length: int = 128, compile_step: bool = True
) -> dict[str, Any]:
  """Parameter count and (optionally) the compiled training-gradient cost of a network.

  Args:
    network: a UNet / EfficientUNet module.
    batch_size: batch the gradient step is compiled for.
    text_length: text sequence length.
    compile_step: also lower + compile the gradient step (FLOPs, memory).

  Returns:
    dict with 'params', and with compile_step: 'train_flops_per_image', 'compile_seconds',
    'argument_bytes', 'output_bytes', 'temp_bytes', 'total_bytes' (per device).
  """
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  if batch_size < 1 or text_length < 1:
    raise ValueError(f"batch_size={batch_size} and text_length={text_length} must be >= 1")
  args = network.abstract_inputs(batch_size, text_length)
  shapes = jax.eval_shape(network.init, jax.random.key(0), *args)
  params = nn.unbox(shapes["params"])
  info: dict[str, Any] = {"params": sum(math.prod(x.shape) for x in jax.tree.leaves(params))}
  if not compile_step:
    return info

  def loss(p, rng, x, *cond):
    out = network.apply({"params": p}, x, *cond, deterministic=False, rngs={"dropout": rng})
    return jnp.mean(jnp.square(out - x))

  key = jax.eval_shape(lambda: jax.random.key(0))
  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(params, key, *args).compile()
  info["compile_seconds"] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax returned one dict per device
    cost = cost[0]
  info["train_flops_per_image"] = float(cost.get("flops", float("nan"))) / batch_size
  mem = compiled.memory_analysis()
  if mem is not None:
    info["argument_bytes"] = int(mem.argument_size_in_bytes)
    info["output_bytes"] = int(mem.output_size_in_bytes)
    info["temp_bytes"] = int(mem.temp_size_in_bytes)
    # Upper bound of what one device holds: inputs (params + batch), grads and scratch.
    info["total_bytes"] = info["argument_bytes"] + info["output_bytes"] + info["temp_bytes"]
  return info
