"""Model FLOPs counted from a jaxpr: 2 x the multiply-accumulates of every conv and matmul.

This is the count MFU is defined by (the model's arithmetic, whatever the compiler does), and it
does not depend on the device: the same figure for a CPU trace and a TPU pod. A `scan` body
(the gradient-accumulation loop, a sampling loop) counts once per iteration. Elementwise work
(norms, activations, the optimizer) is left out: it is a few percent of a U-Net's FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jex_core


def _eqn_flops(eqn: Any) -> float:
  """2 x multiply-accumulates of one `dot_general` / `conv_general_dilated` equation (else 0)."""
  name = eqn.primitive.name
  if name == "dot_general":
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    lhs_free = math.prod(d for i, d in enumerate(lhs) if i not in lc and i not in lb)
    rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rc and i not in rb)
    return 2.0 * batch * lhs_free * rhs_free * contract
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    # Each output element sums over (input features per group) x (kernel window).
    macs_per_out = rhs[rhs_spec[1]] * math.prod(rhs[i] for i in rhs_spec[2:])
    return 2.0 * math.prod(out) * macs_per_out
  return 0.0


def _sub_jaxprs(value: Any) -> list[Any]:
  """The (open) jaxprs held by an equation parameter: a Jaxpr, ClosedJaxpr or a tuple of them."""
  if isinstance(value, jex_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jex_core.Jaxpr):
    return [value]
  if isinstance(value, tuple | list):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def jaxpr_flops(jaxpr: Any) -> float:
  """FLOPs (2 x MACs) of the convs and matmuls of a jaxpr, recursing into nested jaxprs.

  A `scan` body counts `length` times; `cond` counts its most expensive branch; a `while`
  body (trip count unknown) and every other nested jaxpr (pjit, remat, custom_jvp/vjp) once.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    name = eqn.primitive.name
    if name == "cond":
      total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
      continue
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += times * jaxpr_flops(sub)
  return total


def function_flops(fn: Any, *args: Any) -> float:
  """FLOPs (2 x MACs of convs and matmuls) of `fn(*args)`, traced with `jax.make_jaxpr`."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def forward_flops(network: Any, batch_size: int, text_length: int) -> float:
  """FLOPs of one forward pass of a cascade U-Net on abstract inputs (nothing allocated)."""
  from flax import linen as nn

  inputs = network.abstract_inputs(batch_size, text_length)
  params = nn.unbox(jax.eval_shape(network.init, jax.random.key(0), *inputs)["params"])
  return function_flops(lambda p, *a: network.apply({"params": p}, *a), params, *inputs)
