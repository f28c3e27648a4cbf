"""`imagen-jax info`: param count from eval_shape, FLOPs/memory from an AOT-compiled grad step."""

import re

import gin
import jax
import jax.numpy as jnp
import pytest

from imagen_jax import cli, gin_utils, info
from imagen_jax.nn import factory
from tests import cli_helpers

MICRO_SR = [
  "--gin.efficient_unet.EfficientUNet.image_size=16",
  "--gin.efficient_unet.EfficientUNet.channels=8",
  "--gin.efficient_unet.EfficientUNet.block_channels=(8, 16)",
  "--gin.efficient_unet.EfficientUNet.block_res_blocks=(1, 1)",
  "--gin.efficient_unet.EfficientUNet.block_attention=('none', 'cross')",
  "--gin.efficient_unet.EfficientUNet.num_heads=2",
  "--gin.efficient_unet.EfficientUNet.emb_dim=16",
  "--gin.efficient_unet.EfficientUNet.text_dim=16",
  "--gin.efficient_unet.EfficientUNet.norm_groups=4",
]


def parse(out: str) -> dict[str, str]:
  return dict(re.findall(r"^(\w+): (\S+)", out, flags=re.M))


def test_info_prints_params_flops_and_memory(capsys):
  argv = ["info", "--gin_file=configs/models/tiny_sr_crossonly.gin", "--text_length=4"] + MICRO_SR
  assert cli.main(argv) == 0
  got = parse(capsys.readouterr().out)
  gin.clear_config()
  net = factory.build_network(
    "tiny_sr_crossonly",
    image_size=16,
    channels=8,
    block_channels=(8, 16),
    block_res_blocks=(1, 1),
    block_attention=("none", "cross"),
    num_heads=2,
    emb_dim=16,
    text_dim=16,
    norm_groups=4,
  )
  n = info.count_params(net)
  assert int(got["params"]) == n
  assert got["image_size"] == "16" and got["lowres_size"] == "8"

  # Forward FLOPs of the same network at batch 1: a gradient step costs ~3x a forward pass.
  args = net.abstract_inputs(1, 4)
  params = jax.eval_shape(net.init, jax.random.key(0), *args)
  fwd = jax.jit(net.apply).lower(params, *args).compile().cost_analysis()
  fwd_flops = float(fwd["flops"])
  train = float(got["train_flops_per_image"])
  assert 2.0 * fwd_flops <= train <= 4.0 * fwd_flops, (train, fwd_flops)
  # Parameters are inputs and their gradients outputs, in f32.
  assert int(got["argument_bytes"]) >= 4 * n
  assert int(got["output_bytes"]) >= 4 * n
  total = int(got["argument_bytes"]) + int(got["output_bytes"]) + int(got["temp_bytes"])
  assert int(got["total_bytes"]) == total


def test_info_params_only_paper_size_and_remat_flag(capsys):
  assert cli.main(["info", "--gin_file=configs/models/base64.gin", "--params_only", "--remat"]) == 0
  got = parse(capsys.readouterr().out)
  gin.clear_config()
  assert int(got["params"]) == info.count_params(factory.build_network("base64"))
  assert abs(int(got["params"]) - 2e9) / 2e9 < 0.1
  assert got["remat"] == "True"
  assert "train_flops_per_image" not in got


def test_info_bad_input(capsys):
  cli_helpers.user_error(capsys, ["info"], "--gin_file")
  cli_helpers.user_error(capsys, ["info", "--gin_file=configs/models/nope.gin"], "nope.gin")
  with pytest.raises(ValueError, match="batch_size=0"):
    info.network_info(factory.build_network("tiny_base"), batch_size=0)
  gin_utils.parse_gin(["configs/models/tiny_base.gin"])
  gin.clear_config()
  args = factory.build_network("tiny_sr").abstract_inputs(2, 5)
  assert [a.shape for a in args] == [(2, 32, 32, 3), (2,), (2, 5, 64), (2, 5), (2, 16, 16, 3), (2,)]
  assert args[3].dtype == jnp.bool_
