"""U-Net tests: paper sizes, shapes/dtypes, text masking, full convolution, sharding, remat,
gin size files and bad-input errors. Networks are tiny (widths 8-16, 8-32 px) so compiles stay
cheap; the paper sizes are only shape-evaluated."""

import functools

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from imagen_jax import gin_utils, info, parallel
from imagen_jax.nn import efficient_unet, factory, unet
from tests import train_helpers

TEXT_DIM = 16
TEXT_LEN = 6


def micro_base(**kw) -> unet.UNet:
  fields = dict(
    image_size=8,
    channels=8,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    emb_dim=16,
    text_dim=TEXT_DIM,
    norm_groups=4,
  )
  return factory.build_network("tiny_base", **{**fields, **kw})


def micro_sr(attention: str = "self_text", **kw) -> efficient_unet.EfficientUNet:
  fields = dict(
    image_size=16,
    lowres_factor=2,
    channels=8,
    block_channels=(8, 16),
    block_res_blocks=(1, 2),
    block_attention=("none", attention),
    num_heads=2,
    emb_dim=16,
    text_dim=TEXT_DIM,
    norm_groups=4,
  )
  return factory.build_network("tiny_sr", **{**fields, **kw})


def make_inputs(net, batch: int = 2, size: int | None = None, seed: int = 0) -> list[jax.Array]:
  """Random inputs; example 0 has 3 real tokens, example 1 is a dropped (all-masked) caption."""
  rng = np.random.default_rng(seed)
  size = size or net.image_size
  mask = np.zeros((batch, TEXT_LEN), bool)
  mask[0, :3] = True
  if batch > 2:
    mask[2:, :4] = True
  text = rng.standard_normal((batch, TEXT_LEN, net.text_dim)).astype(np.float32) * mask[..., None]
  args = [
    rng.standard_normal((batch, size, size, 3)).astype(np.float32),
    rng.uniform(-10, 10, (batch,)).astype(np.float32),
    text,
    mask,
  ]
  if net.is_super_resolution:
    lr = size // net.lowres_factor
    args += [
      rng.uniform(-1, 1, (batch, lr, lr, 3)).astype(np.float32),
      rng.uniform(-5, 5, (batch,)).astype(np.float32),
    ]
  return [jnp.asarray(a) for a in args]


def random_params(net, args, seed: int = 0):
  """Random parameters of the right shapes without compiling an init.

  Networks zero-initialise residual outputs (they start as the identity), which would make most
  comparisons trivial; random weights stand in for a trained network.
  """
  shapes = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), *args))
  rng = np.random.default_rng(seed)

  def draw(s):
    fan_in = int(np.prod(s.shape[:-1])) or 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree.map(draw, shapes)


@functools.cache
def jitted_apply(net):
  return jax.jit(net.apply)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


# --------------------------------------------------------------------------------------------
# Paper sizes (eval_shape only).


@pytest.mark.parametrize("size, paper", [("base64", 2.0e9), ("sr256", 600e6), ("sr1024", 400e6)])
def test_paper_param_counts_within_10_percent(size, paper):
  n = info.count_params(factory.build_network(size))
  assert abs(n - paper) / paper <= 0.10, f"{size}: {n:,} params vs paper {paper:,.0f}"


def test_paper_networks_structure():
  base, sr256, sr1024 = (factory.build_network(s) for s in ("base64", "sr256", "sr1024"))
  assert not base.is_super_resolution and base.lowres_factor is None
  assert sr256.is_super_resolution and sr256.lowres_factor == 4 and sr256.lowres_size == 64
  assert sr1024.block_attention == ("none", "none", "none", "cross")
  assert sr256.block_attention[-1] == "self_text"
  shapes = jax.eval_shape(sr1024.init, jax.random.key(0), *sr1024.abstract_inputs(1, 8))["params"]
  # SR-1024 has no self-attention: its lowest block attends to the text only.
  attn = shapes["down_3_attn"]
  assert "text_k" in attn and "k" not in attn


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, text masking.


@pytest.mark.parametrize("kind", ["base", "sr_self_text", "sr_cross"])
def test_output_shape_dtype_and_text_masking(kind):
  net = {"base": micro_base, "sr_self_text": micro_sr, "sr_cross": lambda: micro_sr("cross")}[
    kind
  ]()
  args = make_inputs(net)
  params = random_params(net, args)
  apply = jitted_apply(net)
  out = apply(params, *args)
  assert out.shape == args[0].shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))

  # Garbage at padded positions (and in the dropped row's embeddings) changes nothing.
  text = np.array(args[2])
  mask = np.array(args[3])
  text[~mask] = 100.0 * np.random.default_rng(1).standard_normal(text[~mask].shape)
  out_pad = apply(params, args[0], args[1], jnp.asarray(text), *args[3:])
  np.testing.assert_allclose(out_pad, out, rtol=0, atol=1e-6)

  # A dropped caption (zeros, all-False mask) differs from a real one for the same image.
  same_image = [a.at[1].set(a[0]) for a in args]
  same_image[2] = same_image[2].at[1].set(0.0)
  same_image[3] = same_image[3].at[1].set(False)
  out2 = apply(params, *same_image)
  assert bool(jnp.all(jnp.isfinite(out2)))
  assert float(jnp.max(jnp.abs(out2[0] - out2[1]))) > 1e-3
  # ...and changing the real caption changes the output.
  other = [a for a in args]
  other[2] = args[2].at[0].multiply(-1.0)
  assert float(jnp.max(jnp.abs(apply(params, *other)[0] - out[0]))) > 1e-3


def test_bf16_compute_keeps_f32_params_and_output():
  net = micro_base(dtype="bfloat16")  # a string, as gin files write it
  args = make_inputs(net)
  shapes = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), *args))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  params = random_params(net, args)
  out = jitted_apply(net)(params, *args)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  ref = jitted_apply(micro_base())(params, *args)
  # bf16 compute tracks the f32 network to bf16 precision.
  assert rel_err(out, ref) < 0.1
  hlo = jax.jit(net.apply).lower(params, *args).as_text()
  assert "bf16" in hlo


def test_dropout_uses_dropout_rng():
  net = micro_base(dropout=0.5)
  args = make_inputs(net)
  params = random_params(net, args)
  f = jax.jit(lambda p, k: net.apply(p, *args, deterministic=False, rngs={"dropout": k}))
  # unsafe_rbg keys: threefry bit generation compiles several times slower on CPU.
  key = functools.partial(jax.random.key, impl="unsafe_rbg")
  a, b = f(params, key(1)), f(params, key(2))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  np.testing.assert_array_equal(f(params, key(1)), a)


# --------------------------------------------------------------------------------------------
# Fully convolutional Efficient U-Net.


def test_efficient_unet_trained_at_32_runs_at_64_and_128():
  net = micro_sr("cross", image_size=32, block_res_blocks=(1, 1))
  args32 = make_inputs(net, batch=1, size=32)
  params = random_params(net, args32)
  for size in (64, 128):
    args = make_inputs(net, batch=1, size=size)
    out = jax.jit(net.apply)(params, *args)
    assert out.shape == (1, size, size, 3)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_efficient_unet_final_res_blocks_run_at_full_resolution():
  """final_res_blocks adds residual blocks at the output's resolution (their convs' kernels
  are channels wide, seeing the 2x-concatenated last skip), changing the prediction; 0 keeps
  the paper's layout; a negative count is one clear error."""
  plain, final = micro_sr(), micro_sr(final_res_blocks=2)
  args = make_inputs(final, batch=1)
  params = random_params(final, args)["params"]
  assert "final_res_1" in params and "final_res_2" not in params
  assert not any(k.startswith("final_res") for k in random_params(plain, args)["params"])
  assert params["final_res_0"]["conv_0"]["kernel"].shape == (3, 3, 2 * 8, 8)
  out = jax.jit(final.apply)({"params": params}, *args)
  assert out.shape == (1, 16, 16, 3)
  without = {k: v for k, v in params.items() if not k.startswith("final_res")}
  # The same weights without the final blocks do not fit (the output head sees their width):
  # the blocks are on the path to the prediction, not beside it.
  with pytest.raises(flax.errors.ScopeParamShapeError, match="norm_out"):
    plain.apply({"params": without}, *args)
  with pytest.raises(ValueError, match="final_res_blocks=-1 must be >= 0"):
    micro_sr(final_res_blocks=-1).init(jax.random.PRNGKey(0), *args)


def test_unet_cross_attention_resolutions_attend_to_the_text_only():
  """cross_attention_resolutions puts text cross-attention (queries from the pixels, K/V from
  the text only: no pixel K/V) at its levels, next to the self+text attention of
  attention_resolutions; a level in both, or one that never occurs, is one clear error."""
  net = micro_base(attention_resolutions=(4,), cross_attention_resolutions=(8,))
  args = make_inputs(net)
  params = random_params(net, args)["params"]
  for name in ("down_0_attn_0", "up_0_attn_0", "up_0_attn_1"):  # the 8 px level
    assert set(params[name]) == {"norm", "q", "text_k", "text_v", "out"}, name
  for name in ("down_1_attn_0", "mid_attn", "up_1_attn_0"):  # 4 px: self-attention + text
    assert {"k", "v", "text_k"} <= set(params[name]), name
  assert "down_0_attn_0" not in random_params(micro_base(), args)["params"]  # the default
  out = jax.jit(net.apply)({"params": params}, *args)
  assert out.shape == (2, 8, 8, 3) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match=r"resolutions \[4\] are in both"):
    micro_base(attention_resolutions=(4,), cross_attention_resolutions=(4,))
  with pytest.raises(ValueError, match=r"cross_attention_resolutions=\(2,\).*never occur"):
    micro_base(cross_attention_resolutions=(2,))


# --------------------------------------------------------------------------------------------
# Sharding.


def _spec(shardings, *path):
  node = shardings
  for k in path:
    node = node[k]
  return node.spec


def test_sharded_init_specs_and_forward_match_single_device():
  mesh = parallel.create_mesh(data=2, fsdp=4, model=1)
  net = micro_base()
  args = make_inputs(net, batch=8)
  # unsafe_rbg: threefry init compiles ~4x slower on CPU and the sharding logic is the same.
  key = jax.random.key(0, impl="unsafe_rbg")
  variables, shardings = train_helpers.sharded_init(lambda k: net.init(k, *args), mesh, key)
  ps = shardings["params"]
  assert _spec(ps, "down_0_res_0", "conv_0", "kernel") == P(None, None, "fsdp", "model")
  assert _spec(ps, "conv_in", "kernel") == P(None, None, None, "model")
  assert _spec(ps, "conv_out", "kernel") == P(None, None, "fsdp", None)
  assert _spec(ps, "down_1_attn_0", "q", "kernel") == P("fsdp", "model", None)
  assert _spec(ps, "down_1_attn_0", "out", "kernel") == P("model", None, "fsdp")
  assert _spec(ps, "down_0_res_0", "norm_0", "GroupNorm_0", "scale") == P(None)
  assert _spec(ps, "conditioning", "text", "proj", "kernel") == P("fsdp", "model")
  kernel = variables["params"]["down_0_res_0"]["conv_0"]["kernel"]
  assert kernel.sharding.spec == P(None, None, "fsdp", "model")
  assert kernel.addressable_shards[0].data.shape == (3, 3, 2, 8)  # 8 in-channels over fsdp=4

  # Every parameter is annotated: no leaf left without a logical PartitionSpec.
  boxed = jax.eval_shape(lambda k: net.init(k, *args), key)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)

  # Random (non-zero) weights placed with the same shardings, batch over (data, fsdp).
  params = random_params(net, args)
  sharded_params = jax.device_put(params, shardings)
  batch_args = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in args]
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    out = jax.jit(net.apply)(sharded_params, *batch_args)
  assert out.sharding.spec[0] == ("data", "fsdp")
  ref = jax.jit(net.apply)(params, *args)
  assert rel_err(out, ref) <= 1e-5


def test_efficient_unet_param_specs():
  mesh = parallel.create_mesh(data=2, fsdp=4, model=1)
  net = micro_sr("cross")
  args = make_inputs(net)
  _, shardings = parallel.abstract_and_shardings(
    lambda k: net.init(k, *args), mesh, jax.random.key(0)
  )
  ps = shardings["params"]
  assert _spec(ps, "down_1_attn", "text_k", "kernel") == P("fsdp", "model", None)
  assert _spec(ps, "down_0_resample", "conv", "kernel") == P(None, None, "fsdp", "model")
  assert _spec(ps, "conditioning", "aug_emb", "dense_0", "kernel") == P("fsdp", "model")
  assert _spec(ps, "conv_out", "bias") == P(None)


# --------------------------------------------------------------------------------------------
# Remat.


def test_remat_same_outputs_and_grads():
  # One block (res + self/text attention) keeps the two gradient compiles cheap.
  plain = micro_sr(
    image_size=8,
    block_channels=(16,),
    block_res_blocks=(1,),
    block_attention=("self_text",),
  )
  remat = plain.clone(remat=True, remat_policy="dots_with_no_batch_dims_saveable")
  args = make_inputs(plain)
  params = random_params(plain, args)

  def loss(net):
    return lambda p: jnp.mean(jnp.square(net.apply(p, *args)))

  remat_jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(params))
  assert "checkpoint" in remat_jaxpr or "remat" in remat_jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(jax.grad(loss(plain)))(params))
  l1, g1 = jax.jit(jax.value_and_grad(loss(plain)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1)) > 0


# --------------------------------------------------------------------------------------------
# Gin size files.


@pytest.mark.parametrize("size", sorted(factory.NETWORK_SIZES))
def test_gin_size_file_matches_table(size):
  gin_utils.parse_gin([f"configs/models/{size}.gin"])
  try:
    net = gin.get_configurable(factory.network)()
  finally:
    gin.clear_config()
  assert type(net) is factory.NETWORK_SIZES[size][0]
  assert factory.network_fields(net) == factory.network_fields(factory.build_network(size))


def test_gin_bindings_override_and_size_entry_point():
  gin_utils.parse_gin(
    ["configs/models/tiny_sr.gin"],
    ["efficient_unet.EfficientUNet.remat = True", "factory.network.overrides = {'dropout': 0.1}"],
  )
  try:
    net = gin.get_configurable(factory.network)()
  finally:
    gin.clear_config()
  assert net.remat and net.dropout == 0.1 and net.block_attention[-1] == "self_text"
  assert factory.network(size="tiny_base", overrides={"channels": 16}).channels == 16
  with pytest.raises(ValueError, match="exactly one"):
    factory.network()


# --------------------------------------------------------------------------------------------
# Bad input: errors name the config value, raised before anything deep is traced.


def _init_shapes(net, args):
  return jax.eval_shape(net.init, jax.random.key(0), *args)


def test_bad_config_errors():
  with pytest.raises(ValueError, match=r"image_size=10 .*total downsampling 4"):
    micro_base(image_size=10, channel_mult=(1, 2, 2), attention_resolutions=())
  with pytest.raises(ValueError, match=r"image_size=24 .*total downsampling 16"):
    efficient_unet.EfficientUNet(image_size=24, lowres_factor=4)
  with pytest.raises(ValueError, match=r"attention_resolutions=\(3,\).*never occur"):
    micro_base(attention_resolutions=(3,))
  with pytest.raises(ValueError, match="block_attention entry 'bogus'"):
    micro_sr("bogus")
  with pytest.raises(ValueError, match="same length"):
    micro_sr(block_res_blocks=(1,))
  with pytest.raises(ValueError, match="head_dim"):
    micro_base(head_dim=12)
  with pytest.raises(ValueError, match="remat_policy"):
    micro_base(remat_policy="everything")
  with pytest.raises(ValueError, match="network size 'huge'"):
    factory.build_network("huge")
  with pytest.raises(ValueError, match="not fields of UNet"):
    factory.build_network("tiny_base", block_channels=(8,))


def test_bad_input_errors():
  base, sr = micro_base(), micro_sr()
  args = make_inputs(base)
  with pytest.raises(ValueError, match=r"input 9x9 .*total downsampling 2"):
    _init_shapes(base, make_inputs(base, size=9)[:1] + args[1:])
  with pytest.raises(ValueError, match="text_dim=16"):
    _init_shapes(base, args[:2] + [jnp.zeros((2, TEXT_LEN, 24)), args[3]])
  with pytest.raises(ValueError, match="text_mask"):
    _init_shapes(base, args[:3] + [args[3][:, :2]])
  with pytest.raises(ValueError, match="lowres_factor=None"):
    _init_shapes(base, args + [jnp.zeros((2, 4, 4, 3)), jnp.zeros((2,))])
  sr_args = make_inputs(sr)
  with pytest.raises(ValueError, match=r"low-res image is 4x4 .*lowres_factor=2 it must be 8x8"):
    _init_shapes(sr, sr_args[:4] + [jnp.zeros((2, 4, 4, 3)), sr_args[5]])
  with pytest.raises(ValueError, match="needs both"):
    _init_shapes(sr, sr_args[:4])
  with pytest.raises(ValueError, match="log_snr"):
    _init_shapes(sr, [sr_args[0], jnp.zeros((3,))] + sr_args[2:])


def test_input_size_and_channels_checked_at_trace_time():
  net = factory.build_network("tiny_sr_crossonly")
  b, length = 1, 4

  def run(size, channels=3):
    x = jax.ShapeDtypeStruct((b, size, size, channels), jnp.float32)
    low = jax.ShapeDtypeStruct((b, size // 2, size // 2, 3), jnp.float32)
    vec = jax.ShapeDtypeStruct((b,), jnp.float32)
    emb = jax.ShapeDtypeStruct((b, length, net.text_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, length), jnp.bool_)
    return jax.eval_shape(lambda *a: net.init(jax.random.key(0), *a), x, vec, emb, mask, low, vec)

  with pytest.raises(ValueError, match=r"input 36x36 must be divisible by the total downsampling"):
    run(36)
  with pytest.raises(ValueError, match="x has 4 channels; config in_channels=3"):
    run(32, channels=4)
