"""The train program of one stage: state shardings and the lowered step, built in ONE place.

`build_train_program` is what the training job compiles and runs, what `imagen-jax compile`
compiles for a TPU topology without devices, and what the benchmarks time: the three cannot
drift, and a program's fingerprint (sha256 of its StableHLO) shows it.

Nothing here allocates the model: shapes come from `jax.eval_shape`, shardings from the
networks' logical axis names, and the step is lowered on `ShapeDtypeStruct`s that carry them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from imagen_jax import flop_count, parallel
from imagen_jax.stage import Stage

# ================================================================================================
# Train state and the train step
# ================================================================================================


@flax.struct.dataclass
class TrainState:
  """Everything the step updates. EMA params live here too and are saved as their own item."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  consecutive_nonfinite: jax.Array  # skipped updates in a row
  total_nonfinite: jax.Array  # skipped updates over the run


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay for this update; with warm-up, min(decay, (1 + n) / (10 + n)) as in TF's EMA,
  so short runs' EMA is not dominated by the initialisation."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
  """[B, ...] -> [n, B/n, ...] where microbatch i holds rows i, i+n, i+2n, ...

  Strided, not contiguous: the batch is sharded over ('data', 'fsdp') in contiguous blocks of
  rows, so each device's block splits into n local pieces and every microbatch stays spread
  over all devices. Contiguous microbatches would each live on 1/n of the devices, and XLA
  would move activations across the mesh at every step of the accumulation loop.
  """
  n = num_microbatches
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
  stage: Stage,
  optimizer: optax.GradientTransformation,
  learning_rate_fn: optax.Schedule,
  ema_decay: float,
  ema_warmup: bool,
  num_microbatches: int,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """The pure train step: (state, global batch, base rng) -> (new state, metrics)."""

  def grads_of(params, batch, rng):
    (loss, metrics), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(params, batch, rng)
    return loss, metrics, grads

  def accumulated_grads(params, batch, rng):
    if num_microbatches == 1:
      return grads_of(params, batch, rng)
    micro = split_microbatches(batch, num_microbatches)

    def body(carry, inputs):
      loss_sum, grad_sum = carry
      i, mb = inputs
      loss, _, grads = grads_of(params, mb, jax.random.fold_in(rng, i))
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(num_microbatches), micro)
    )
    grads = jax.tree.map(lambda g: g / num_microbatches, grad_sum)
    loss = loss_sum / num_microbatches
    return loss, {"loss": loss}, grads

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    loss, metrics, grads = accumulated_grads(state.params, batch, step_rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, new_params)
    # A non-finite loss or gradient skips the whole update (params, optimizer, EMA).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      ema_params=keep(new_ema, state.ema_params),
      consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
      total_nonfinite=state.total_nonfinite + (~finite).astype(jnp.int32),
    )
    metrics = dict(
      metrics,
      grad_norm=grad_norm,
      learning_rate=learning_rate_fn(state.step),
      nonfinite_skipped=new_state.total_nonfinite,
    )
    return new_state, metrics

  return train_step


# ================================================================================================
# Shardings and the program
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What, besides stage and optimizer, decides the compiled step."""

  batch_size: int  # global batch (all processes)
  max_length: int  # text tokens per example
  text_dim: int  # text embedding width
  ema_decay: float = 0.9999
  ema_warmup: bool = True
  num_microbatches: int = 1


def check_batch_layout(
  batch_size: int, num_microbatches: int, mesh_shape: dict[str, int], num_processes: int
) -> None:
  """The global batch must split evenly over the mesh, the processes and the microbatches."""
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  if batch_size % dp:
    raise ValueError(
      f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size {dp} "
      f"(mesh {dict(mesh_shape)}: data × fsdp); use a multiple of {dp}"
    )
  if batch_size % num_processes:
    raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the {num_processes} processes")
  if num_microbatches < 1 or (batch_size // dp) % num_microbatches:
    raise ValueError(
      f"num_microbatches={num_microbatches} must divide the per-replica batch {batch_size // dp}"
    )


def optimizer_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings of an optax state: every params-shaped subtree (Adam's moments, Adafactor's
  unfactored second moments) mirrors the parameter layout leaf by leaf; everything else (step
  counts, Adafactor's factored row/column statistics, a few KB per kernel) is replicated."""
  params_def = jax.tree.structure(params)
  param_leaves = jax.tree.leaves(params)
  sharding_leaves = jax.tree.leaves(param_shardings)
  replicated = parallel.replicated(mesh)

  def like_params(subtree):
    leaves = [
      sh if leaf.shape == p.shape else replicated
      for leaf, p, sh in zip(jax.tree.leaves(subtree), param_leaves, sharding_leaves)
    ]
    return params_def.unflatten(leaves)

  def walk(node):
    if jax.tree.structure(node) == params_def:
      return like_params(node)
    children, node_def = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:  # an array leaf
      return replicated
    return node_def.unflatten([walk(c) for c in children])

  return walk(opt_state)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


@dataclasses.dataclass
class TrainProgram:
  """A stage's train step lowered for a mesh, with everything needed to run or report it.

  Attributes:
    stage / optimizer / learning_rate_fn / mesh / settings: what it was built from.
    abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings.
    state_shardings: NamedSharding tree of the state.
    batch_shapes: the global batch as ShapeDtypeStructs carrying their shardings.
    lowered: the lowered step (StableHLO); `.compile()` it for the mesh's devices.
    model_flops: FLOPs of one step over the whole mesh, counted from its jaxpr (2 x the
      multiply-accumulates of every conv and matmul; `flop_count`): what MFU is defined by,
      the same for any microbatch count and device.
  """

  stage: Stage
  optimizer: optax.GradientTransformation
  learning_rate_fn: optax.Schedule
  mesh: Mesh
  settings: StepSettings
  abstract_state: Any
  state_shardings: Any
  batch_shapes: dict[str, jax.ShapeDtypeStruct]
  lowered: Any
  model_flops: float
  _init_inputs: dict[str, jax.ShapeDtypeStruct] = dataclasses.field(repr=False, default=None)

  @property
  def batch_shardings(self) -> dict[str, NamedSharding]:
    return {k: v.sharding for k, v in self.batch_shapes.items()}

  def fingerprint(self) -> str:
    """sha256 of the lowered StableHLO: equal fingerprints mean the same program."""
    return hashlib.sha256(self.lowered.as_text().encode()).hexdigest()

  def compile(self, compiler_options: dict | None = None) -> Any:
    """Compiles the step for the mesh's devices (TPU topology devices: nothing executes)."""
    return self.lowered.compile(compiler_options)

  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_state.params))

  def init_state(self, rng: jax.Array) -> TrainState:
    """Initialises params, optimizer state and EMA directly into their shardings."""
    stage, optimizer = self.stage, self.optimizer
    inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in self._init_inputs.items()}

    def init_fn(rng, inputs):
      params = nn.unbox(stage.init_params(rng, inputs))
      return _initial_state(params, optimizer)

    with nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      # Batch-1 zero inputs passed as arguments, so XLA cannot constant-fold the forward pass.
      compiled = (
        jax.jit(init_fn, out_shardings=self.state_shardings)
        .lower(rng, inputs)
        .compile(_init_compiler_options(self.mesh))
      )
      return compiled(rng, inputs)

  def state_from_params(self, params: Any) -> TrainState:
    """A fresh state (step 0, new optimizer state, EMA = params) around given params, e.g. a
    pretrained stage's (`training.init_from`); `params` must match the network's tree."""
    want = jax.tree.structure(self.abstract_state.params)
    if jax.tree.structure(params) != want:
      raise ValueError("the initial params do not match the network's parameter tree")
    make = jax.jit(
      functools.partial(_initial_state, optimizer=self.optimizer),
      out_shardings=self.state_shardings,
    )
    return make(params)


def _initial_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    ema_params=params,
    consecutive_nonfinite=jnp.zeros((), jnp.int32),
    total_nonfinite=jnp.zeros((), jnp.int32),
  )


def _init_compiler_options(mesh: Mesh) -> dict | None:
  """XLA options for the one-off init program. On CPU, LLVM's optimisation of one threefry +
  normal sampler per parameter takes most of the compile (tiny_sr: 15 s at -O2, 3.6 s at -O0)
  for a program that runs once; values differ by at most an ulp."""
  if all(d.platform == "cpu" for d in mesh.devices.flat):
    return {"xla_backend_optimization_level": 0}
  return None


def rng_shape() -> jax.ShapeDtypeStruct:
  """The shape of the raw PRNG key the step takes (depends on the configured PRNG impl)."""
  return jax.eval_shape(lambda: jax.random.PRNGKey(0))


def build_train_program(
  stage: Stage,
  optimizer: tuple[optax.GradientTransformation, optax.Schedule],
  mesh: Mesh,
  settings: StepSettings,
) -> TrainProgram:
  """Lowers the stage's train step for `mesh` without allocating anything.

  Parameter shardings come from the network's logical axis names; optimizer-state shardings
  mirror them (`optimizer_state_shardings`); the batch is split over ('data', 'fsdp').

  Args:
    stage: the stage (network + diffusion).
    optimizer: (transformation, learning-rate schedule) from `optim.make_optimizer`.
    mesh: the device mesh; TPU topology devices give a deviceless compile.
    settings: batch, text shape, EMA and gradient accumulation.

  Returns:
    The lowered program; `.compile()` it, `.init_state(rng)` to run it.
  """
  tx, lr_fn = optimizer
  full = stage.dummy_batch(settings.batch_size, settings.max_length, settings.text_dim)
  init_inputs = {
    k: jax.ShapeDtypeStruct((1,) + tuple(v.shape[1:]), v.dtype) for k, v in full.items()
  }
  key = rng_shape()
  abstract_params, param_shardings = parallel.abstract_and_shardings(
    stage.init_params, mesh, key, init_inputs
  )
  abstract = jax.eval_shape(lambda p: _initial_state(p, tx), abstract_params)
  replicated = parallel.replicated(mesh)
  state_shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=optimizer_state_shardings(abstract.opt_state, abstract_params, param_shardings, mesh),
    ema_params=param_shardings,
    consecutive_nonfinite=replicated,
    total_nonfinite=replicated,
  )
  abstract_state = _with_shardings(abstract, state_shardings)
  batch_shapes = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, v.ndim))
    for k, v in full.items()
  }
  step_fn = make_train_step(
    stage, tx, lr_fn, settings.ema_decay, settings.ema_warmup, settings.num_microbatches
  )
  batch_shardings = {k: v.sharding for k, v in batch_shapes.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    traced = jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
    ).trace(abstract_state, batch_shapes, key)
    lowered = traced.lower()
  return TrainProgram(
    stage, tx, lr_fn, mesh, settings, abstract_state, state_shardings, batch_shapes, lowered,
    flop_count.jaxpr_flops(traced.jaxpr), init_inputs,
  )  # fmt: skip
