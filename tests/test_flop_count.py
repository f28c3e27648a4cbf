"""Model FLOPs from a jaxpr (`flop_count`): closed forms, and the train step's count."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from imagen_jax import flop_count, optim, parallel
from imagen_jax.nn import factory
from imagen_jax.stage import Stage, StageConfig
from imagen_jax.training import program

function_flops = flop_count.function_flops


def test_flop_counter_closed_form_conv_and_dense():
  """2 x MACs: a 3x3 conv is 2*H*W*Cout*Cin*9 per image, a dense layer 2*B*in*out."""
  conv = nn.Conv(8, (3, 3), padding="SAME")
  x = jnp.zeros((2, 5, 7, 3))
  p = conv.init(jax.random.key(0), x)
  assert function_flops(conv.apply, p, x) == 2 * 2 * 5 * 7 * 8 * 3 * 9

  dense = nn.Dense(6)
  y = jnp.zeros((4, 10, 5))
  q = dense.init(jax.random.key(0), y)
  assert function_flops(dense.apply, q, y) == 2 * 4 * 10 * 5 * 6

  # Nested: a scan of the dense layer counts once per iteration, a jit-wrapped call once.
  def scanned(params, ys):
    return jax.lax.scan(lambda c, yi: (c, jax.jit(dense.apply)(params, yi)), 0.0, ys)[1]

  assert function_flops(scanned, q, y) == 2 * 4 * 10 * 5 * 6


def test_train_step_flops_do_not_depend_on_microbatches_and_are_about_three_forwards():
  """The step's model FLOPs are the same math whether the batch runs at once or as a scan over
  2 microbatches (XLA's own count of such a loop is not), and a training step is one forward plus
  a backward of about two forwards' convs and matmuls (less: no gradient for the noisy input;
  more: attention's backward recomputes its logits, one Q.K matmul per layer; 3.007 forwards
  for this network)."""
  stage = Stage(factory.build_network("tiny_base"), StageConfig(name="t", resolution=16))
  mesh = parallel.create_mesh(data=2, fsdp=4)
  tx, lr = optim.make_optimizer("adafactor", warmup_steps=1, decay_steps=10)
  flops = {
    mb: program.build_train_program(
      stage, (tx, lr), mesh, program.StepSettings(16, 8, 64, num_microbatches=mb)
    ).model_flops
    for mb in (1, 2)
  }
  assert flops[1] == flops[2] > 0
  forward = flop_count.forward_flops(stage.network, 16, 8)
  assert 2.0 * forward < flops[1] <= 3.03 * forward, flops[1] / forward
