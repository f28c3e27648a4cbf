"""DeepFloyd IF: parity with diffusers, the checkpoint reader, parameter counts, the schedule.

Goldens come from tools/make_deepfloyd_golden.py (torch + diffusers 0.42.1, not test deps).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.deepfloyd import checkpoints, stages
from imagen_jax.diffusion import discrete, samplers, schedules
from imagen_jax.errors import UserError
from imagen_jax.nn import deepfloyd_unet
from imagen_jax.stage import Stage, StageConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "deepfloyd")
PARITY_ATOL = 1e-4  # f32


def _nhwc(x: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _io(stage: str) -> dict[str, np.ndarray]:
  return dict(np.load(os.path.join(GOLDEN, f"{stage}_io.npz")))


def _apply(network, params, io):
  args = [
    _nhwc(io["sample"]),
    jnp.asarray(io["timestep"]),
    jnp.asarray(io["encoder_hidden_states"]),
  ]
  if "class_labels" in io:
    args.append(jnp.asarray(io["class_labels"]))
  return np.asarray(network.apply({"params": params}, *args))


@pytest.mark.parametrize("stage", ["stage_I", "stage_II"])
def test_parity_with_diffusers(stage):
  network, params = checkpoints.load(os.path.join(GOLDEN, stage))
  io = _io(stage)
  out = _apply(network, params, io)
  ref = io["output"].transpose(0, 2, 3, 1)
  err = float(np.max(np.abs(out - ref)))
  print(f"{stage}: max |ours - diffusers| = {err:.2e} (output scale {np.abs(ref).max():.2f})")
  assert out.shape == ref.shape
  assert err < PARITY_ATOL


def test_stage_ii_is_the_fp16_variant_and_class_embedding_matters():
  files = os.listdir(os.path.join(GOLDEN, "stage_II", "unet"))
  assert "diffusion_pytorch_model.fp16.safetensors" in files
  network, params = checkpoints.load(os.path.join(GOLDEN, "stage_II"))
  assert network.class_embed and network.resnet_skip_time_act
  io = _io("stage_II")
  io["class_labels"] = io["class_labels"] + 100.0
  assert np.max(np.abs(_apply(network, params, io) - io["output"].transpose(0, 2, 3, 1))) > 1e-2


def test_sharded_index_loads_the_same_params(tmp_path):
  from safetensors.numpy import load_file, save_file

  src = os.path.join(GOLDEN, "stage_I", "unet")
  dst = tmp_path / "stage" / "unet"
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
  tensors = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  names = sorted(tensors)
  weight_map = {}
  for s, part in enumerate((names[::2], names[1::2])):
    file = f"diffusion_pytorch_model-{s + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, str(dst / file))
    weight_map.update({k: file for k in part})
  with open(dst / "diffusion_pytorch_model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  _, want = checkpoints.load(os.path.join(GOLDEN, "stage_I"))
  _, got = checkpoints.load(str(tmp_path / "stage"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  # bf16 placement: the reader casts.
  _, bf = checkpoints.load(str(tmp_path / "stage"), dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf)} == {jnp.dtype(jnp.bfloat16)}


def test_reader_errors(tmp_path):
  with pytest.raises(UserError, match="no unet/config.json"):
    checkpoints.read_config(str(tmp_path))
  config = checkpoints.read_config(os.path.join(GOLDEN, "stage_I"))
  with pytest.raises(UserError, match="resnet_time_scale_shift='default' is not supported"):
    checkpoints.network_from_config({**config, "resnet_time_scale_shift": "default"})
  # A config that does not match the weights (wider first level).
  bad = tmp_path / "bad" / "unet"
  os.makedirs(bad)
  with open(bad / "config.json", "w") as f:
    json.dump({**config, "block_out_channels": [16, 16]}, f)
  shutil.copy(os.path.join(GOLDEN, "stage_I", "unet", "diffusion_pytorch_model.safetensors"), bad)
  with pytest.raises(UserError, match="has shape .* expected"):
    checkpoints.load(str(tmp_path / "bad"))
  os.remove(bad / "diffusion_pytorch_model.safetensors")
  with pytest.raises(UserError, match="no diffusion_pytorch_model"):
    checkpoints.load(str(tmp_path / "bad"))


def test_logical_axes_and_bf16_remat_close_to_f32():
  network, params = checkpoints.load(os.path.join(GOLDEN, "stage_I"))
  boxed = checkpoints.abstract_params(network)
  conv = boxed["down_blocks.0.resnets.0"]["conv1"]["kernel"]
  assert conv.names == ("conv_height", "conv_width", "conv_in", "conv_out")
  io = _io("stage_I")
  fast = network.clone(dtype=jnp.bfloat16, remat=True)
  out32, out16 = _apply(network, params, io), _apply(fast, params, io)
  assert out16.dtype == np.float32
  err = np.max(np.abs(out16 - out32)) / np.max(np.abs(out32))
  assert 0 < err < 0.05, err


@pytest.mark.parametrize(("name", "billions"), [("IF-I-XL-v1.0", 4.3), ("IF-II-L-v1.0", 1.2)])
def test_published_parameter_counts(name, billions):
  with open(os.path.join(GOLDEN, "published_configs.json")) as f:
    config = json.load(f)[name]
  count = checkpoints.param_count(checkpoints.network_from_config(config))
  print(f"{name}: {count:,} parameters ({count / 1e9:.3f}B; model card {billions}B)")
  assert abs(count / 1e9 - billions) / billions < 0.03


def test_discrete_schedule_matches_diffusers_and_inverts():
  golden = np.load(os.path.join(GOLDEN, "ddim_trajectory.npz"))
  np.testing.assert_allclose(discrete.alphas_cumprod(), golden["alphas_cumprod"], rtol=1e-5)
  n = jnp.arange(1000, dtype=jnp.float32)
  lam = schedules.get_schedule("deepfloyd")((n + 1.0) / 1000.0)
  acp = np.asarray(jax.nn.sigmoid(lam))
  np.testing.assert_allclose(acp, golden["alphas_cumprod"], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(discrete.timestep_from_log_snr(lam)), n, atol=2e-3)
  # t = 0 is clean data; λ decreases monotonically in t.
  assert float(schedules.get_schedule("deepfloyd")(jnp.zeros(()))) == schedules.LOG_SNR_MAX
  assert np.all(np.diff(np.asarray(lam)) < 0)


@pytest.mark.parametrize("key", ["x", "x_thresholded"])
def test_our_ddim_on_the_adapter_reproduces_diffusers_ddim(key):
  """Without thresholding x̂₀ from t = 999 is ~7e4 (random weights), so x is compared relative
  to its scale; with IF's p = 95 dynamic thresholding x stays O(1) and is compared absolutely."""
  golden = np.load(os.path.join(GOLDEN, "ddim_trajectory.npz"))
  unet, params = checkpoints.load(os.path.join(GOLDEN, "stage_I"))
  stage = Stage(
    deepfloyd_unet.DeepFloydStageNet(unet),
    StageConfig(name="if_I", resolution=8, schedule="deepfloyd"),
  )
  steps = len(golden["timesteps"])
  config = samplers.SamplerConfig(
    sampler="ddim",
    num_steps=steps,
    schedule="deepfloyd",
    thresholding="dynamic" if key == "x_thresholded" else "none",
    percentile=discrete.IF_THRESHOLD_PERCENTILE,
  )
  grid = samplers.log_snr_grid(schedules.get_schedule("deepfloyd"), steps, "uniform_t")
  np.testing.assert_allclose(
    np.asarray(discrete.timestep_from_log_snr(grid[:-1])), golden["timesteps"], atol=2e-3
  )
  text = jnp.asarray(golden["encoder_hidden_states"])
  cond = {"text_emb": text, "text_mask": jnp.ones(text.shape[:2], bool)}
  x_t = _nhwc(golden["x"][0])
  _, path = samplers.sample(
    stage.model_fn,
    {"unet": params},
    cond,
    None,
    jax.random.key(0),
    x_t.shape,
    config,
    init_noise=x_t,
    return_intermediates=True,
  )
  want = golden[key][1:].transpose(0, 1, 3, 4, 2)
  err = np.max(np.abs(np.asarray(path) - want), axis=(1, 2, 3, 4)) / np.max(np.abs(want))
  print(
    f"DDIM ({key}) max |ours - diffusers| / max |x| per step:", " ".join(f"{e:.1e}" for e in err)
  )
  assert np.max(err) < 1e-5


def _tiny_cascade_stages():
  base = stages.if_stage("if:" + os.path.join(GOLDEN, "stage_I"), max_length=7)
  sr = stages.if_stage(
    os.path.join(GOLDEN, "stage_II"), lowres_factor=2, resolution=16, max_length=7
  )
  return base, sr


def test_tiny_if_cascade_samples_end_to_end():
  from imagen_jax.inference import cascade

  (base, base_params, base_spec), (sr, sr_params, sr_spec) = _tiny_cascade_stages()
  assert sr.config.lowres_resolution == base.config.resolution == 8
  assert sr.config.aug_schedule == "deepfloyd" and sr.config.aug_sample_level == stages.IF_AUG_LEVEL
  chain = cascade.Cascade(
    None,
    [
      cascade.CascadeStage(base, base_params, base_spec),
      cascade.CascadeStage(sr, sr_params, sr_spec),
    ],
  )
  text = np.random.default_rng(0).standard_normal((3, 7, 24)).astype(np.float32)
  text[2] = text[0]
  settings = cascade.StageSampling(
    num_steps=5, guidance_weight=2.0, percentile=stages.IF_THRESHOLD_PERCENTILE
  )
  out = chain.sample_embeddings(text, np.ones((3, 7), bool), [0, 1, 0], settings)
  assert [x.shape for x in out.per_stage] == [(3, 8, 8, 3), (3, 16, 16, 3)]
  assert np.all(np.isfinite(out.images)) and np.max(np.abs(out.images)) <= 1.0
  # Same prompt and seed -> same image; another prompt and seed -> another image.
  np.testing.assert_allclose(out.images[0], out.images[2], atol=1e-5)
  assert np.max(np.abs(out.per_stage[0][0] - out.per_stage[0][1])) > 1e-2


def test_fine_tuning_from_if_weights_lowers_the_loss():
  import optax

  (base, params, _), _ = _tiny_cascade_stages()
  rng = np.random.default_rng(3)
  batch = {
    "image": jnp.asarray(np.tanh(rng.standard_normal((4, 8, 8, 3))), jnp.float32),
    "text_emb": jnp.asarray(rng.standard_normal((4, 7, 24)), jnp.float32),
    "text_mask": jnp.ones((4, 7), bool),
  }
  opt = optax.adam(1e-3)
  state = opt.init(params)
  key = jax.random.key(0)  # the same t, noise and text drop every step: the loss is comparable

  @jax.jit
  def step(params, state):
    (loss, _), grads = jax.value_and_grad(base.loss_fn, has_aux=True)(params, batch, key)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(15):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  print("IF fine-tune losses:", " ".join(f"{v:.4f}" for v in losses))
  assert losses[-1] < 0.8 * losses[0]


def test_cascade_from_if_stage_dirs(tmp_path):
  """`Cascade.from_stage_dirs` takes `if:PATH` entries (the `--stage_dirs=if:I,if:II` hook)."""
  import types

  from imagen_jax.inference import cascade

  # IF-II's factor 4 from stage I's 8 px: stage II at 32 px (the network is convolutional).
  sr_dir = tmp_path / "IF-II"
  shutil.copytree(os.path.join(GOLDEN, "stage_II"), sr_dir)
  config = checkpoints.read_config(str(sr_dir))
  with open(sr_dir / "unet" / "config.json", "w") as f:
    json.dump({**config, "sample_size": 32}, f)
  encoder = types.SimpleNamespace(width=24, max_length=stages.IF_TEXT_LENGTH)
  chain = cascade.Cascade.from_stage_dirs(
    ["if:" + os.path.join(GOLDEN, "stage_I"), f"if:{sr_dir}"], encoder=encoder
  )
  assert [s.config.resolution for s in chain.stages] == [8, 32]
  assert chain.stages[1].config.lowres_resolution == 8
  text = np.random.default_rng(1).standard_normal((2, 77, 24)).astype(np.float32)
  out = chain.sample_embeddings(
    text, np.ones((2, 77), bool), [5, 6], cascade.StageSampling(num_steps=3)
  )
  assert out.images.shape == (2, 32, 32, 3) and np.all(np.isfinite(out.images))
  with pytest.raises(FileNotFoundError, match="do not exist"):
    cascade.Cascade.from_stage_dirs([f"if:{tmp_path / 'nope'}"], encoder=encoder)


def test_load_params_straight_into_shardings():
  from flax import traverse_util

  from imagen_jax import parallel

  path = os.path.join(GOLDEN, "stage_I")
  network, want = checkpoints.load(path)
  mesh = parallel.SamplingMesh(parallel.MeshConfig(data=1, fsdp=2, model=4))
  shardings = mesh.param_shardings(checkpoints.init_fn(network))
  flat = traverse_util.flatten_dict(shardings, sep="/")
  got = checkpoints.load_params(path, network, shardings=flat)
  kernel = got["down_blocks.1.resnets.0"]["conv2"]["kernel"]  # [3, 3, 16, 16]: fsdp x model
  assert kernel.sharding.spec == flat["down_blocks.1.resnets.0/conv2/kernel"].spec
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 8, 4)}
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


# ------------------------------------------------------------------------------------------------
# A tiny random IF pipeline through the commands: sample, export, precompute + train --init_from
# ------------------------------------------------------------------------------------------------

IF_TEXT_DIM = 64  # the tiny T5's d_model, as IF's encoder_hid_dim is T5-XXL's 4096


def _tiny_if_pipeline(root) -> tuple[str, str]:
  """IF-I (8 px) and IF-II (8 -> 32 px) dirs in the diffusers layout with random weights; IF-I
  also holds the pipeline's text encoder (HF T5, tiny) and tokenizer, as a download does."""
  from imagen_jax.nn import t5
  from imagen_jax.text import t5_checkpoints
  from tests import train_helpers

  dirs = []
  for name, golden, size in (("IF-I", "stage_I", 8), ("IF-II", "stage_II", 32)):
    config = checkpoints.read_config(os.path.join(GOLDEN, golden))
    config = {**config, "encoder_hid_dim": IF_TEXT_DIM, "sample_size": size}
    path = str(root / name)
    checkpoints.write_random_stage(path, config, seed=len(dirs))
    dirs.append(path)
  t5_checkpoints.write_random_checkpoint(
    os.path.join(dirs[0], "text_encoder"), "tiny", fmt="hf", config=t5.get_config("tiny")
  )
  os.makedirs(os.path.join(dirs[0], "tokenizer"))
  shutil.copyfile(
    train_helpers.shapes_vocabulary(str(root)),
    os.path.join(dirs[0], "tokenizer", "spiece.model"),
  )
  return dirs[0], dirs[1]


def test_random_stage_writer_round_trips_through_the_reader(tmp_path):
  config = checkpoints.read_config(os.path.join(GOLDEN, "stage_II"))
  checkpoints.write_random_stage(str(tmp_path / "a"), config, seed=3)
  network, params = checkpoints.load(str(tmp_path / "a"))
  udir = checkpoints.save_params(str(tmp_path / "b"), config, params, fp16=True)
  assert set(os.listdir(udir)) == {"diffusion_pytorch_model.fp16.safetensors", "config.json"}
  _, again = checkpoints.load(str(tmp_path / "b"))
  # fp16 storage: each weight within half an fp16 ulp of the float32 one.
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2**-11, atol=1e-7), again, params
  )
  io = _io("stage_II")
  out = _apply(network, params, io)
  assert out.shape == (2, 8, 8, 6) and np.all(np.isfinite(out)) and np.std(out) > 1e-3


def test_if_stage_spec_rebuilds_the_network():
  from imagen_jax.stage import stage_from_spec, stage_spec

  sr, config = stages.if_network_and_config(os.path.join(GOLDEN, "stage_II"))
  spec = stage_spec(sr, config, 77, 24)
  rebuilt = stage_from_spec(json.loads(json.dumps(spec)))
  assert rebuilt.network == sr and rebuilt.config == config
  assert spec["network"]["fields"]["unet"]["__module__"]["class"].endswith("DeepFloydUNet")


@pytest.mark.slow
def test_if_pipeline_samples_exports_and_fine_tunes_through_the_cli(tmp_path, caplog):
  from imagen_jax import cli, images
  from imagen_jax.deepfloyd import checkpoints as if_checkpoints

  stage_i, stage_ii = _tiny_if_pipeline(tmp_path)
  stage_dirs = f"--stage_dirs=if:{stage_i},if:{stage_ii}"
  knobs = ["--prompt=a red circle", "--prompt=a blue square", "--steps=3", "--guidance=3"]
  knobs += ["--no_progress", "--batch_size=2"]
  assert cli.main(["sample", stage_dirs, f"--out={tmp_path / 'direct'}", *knobs]) == 0
  direct = images.read_index(str(tmp_path / "direct"))
  assert [e["stages"] for e in direct["images"]] == [["IF-I", "IF-II"]] * 2
  pngs = [images.load_png(str(tmp_path / "direct" / e["file"])) for e in direct["images"]]
  assert pngs[0].shape == (32, 32, 3) and np.abs(pngs[0].astype(int) - pngs[1]).max() > 10

  assert cli.main(["export", stage_dirs, f"--out={tmp_path / 'bundle'}"]) == 0
  with open(tmp_path / "bundle" / "text_encoder" / "encoder.json") as f:
    encoder = json.load(f)
  assert encoder["size"] == "tiny" and encoder["max_length"] == 77
  assert encoder["zero_padding"] is False  # IF's T5 outputs at padding, and T5("") as null
  bundle = f"--bundle={tmp_path / 'bundle'}"
  assert cli.main(["sample", bundle, f"--out={tmp_path / 'bundled'}", *knobs]) == 0
  bundled = images.read_index(str(tmp_path / "bundled"))
  for a, b in zip(direct["images"], bundled["images"], strict=True):
    x = images.load_png(str(tmp_path / "direct" / a["file"])).astype(int)
    y = images.load_png(str(tmp_path / "bundled" / b["file"])).astype(int)
    assert np.abs(x - y).max() <= 1  # same weights and encoder: float rounding only

  # Fine-tune IF-I on shapes encoded by the pipeline's own T5 (77 tokens, padding kept).
  data = str(tmp_path / "data")
  assert (
    cli.main(
      [
        "precompute",
        "--source=shapes",
        f"--out={data}",
        f"--vocab={stage_i}/tokenizer/spiece.model",
        f"--t5_checkpoint={stage_i}/text_encoder",
        "--t5_size=tiny",
        "--max_length=77",
        "--t5_padding=keep",
        "--resolution=8",
        "--num_examples=32",
        "--num_validation=8",
        "--examples_per_shard=16",
        "--no_progress",
      ]
    )
    == 0
  )
  with open(os.path.join(data, "manifest.json")) as f:
    assert json.load(f)["encoder"]["zero_padding"] is False
  run = str(tmp_path / "run")
  argv = [
    "train",
    "--gin_file=configs/stages/deepfloyd_if.gin",
    "--gin_file=configs/mesh/cpu.gin",
    "--gin_file=configs/runs/tiny.gin",
    f"--gin.MODEL_DIR='{run}'",
    f"--gin.DATA='{data}'",
    f"--gin.train.train.init_from='if:{stage_i}'",
    f"--gin.train.train.text_dim={IF_TEXT_DIM}",
    "--gin.train.train.batch_size=8",
    "--gin.train.train.num_train_steps=4",
    "--gin.train.train.checkpoint_every=4",
    "--gin.train.train.log_every=1",
    "--gin.optim.make_optimizer.learning_rate=1e-3",
    "--gin.optim.make_optimizer.warmup_steps=0",
  ]
  with caplog.at_level("INFO", logger="imagen_jax"):
    assert cli.main(argv) == 0
  assert f"initialised from if:{stage_i}" in caplog.text
  from imagen_jax.inference import cascade

  tuned = cascade.load_stage_dir(run)
  assert tuned.spec["network"]["class"].endswith("DeepFloydStageNet")
  _, start = if_checkpoints.load(stage_i)
  deltas = jax.tree_util.tree_leaves(
    jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), tuned.params, {"unet": start}
    )
  )
  # Started from IF's weights (a random init would differ by O(0.1-1)), then moved: Adam at
  # lr 1e-3 moves each weight by at most ~1e-3 per step, 4 steps, EMA-averaged.
  assert max(deltas) < 5e-3 and max(deltas) > 0
  # The fine-tuned stage samples in place of IF-I, with IF-II after it.
  tuned_dirs = f"--stage_dirs={run},if:{stage_ii}"
  assert cli.main(["sample", tuned_dirs, f"--out={tmp_path / 'tuned'}", *knobs]) == 0
  assert len(images.read_index(str(tmp_path / "tuned"))["images"]) == 2


def test_init_from_names_something_loadable_before_any_compile(tmp_path):
  from imagen_jax.training import init_from

  with pytest.raises(UserError, match="does not exist; pass if:PATH"):
    init_from.check_init_from(f"if:{tmp_path / 'nope'}")
  with pytest.raises(UserError, match="has no checkpoints/ directory"):
    init_from.check_init_from(str(tmp_path))
  with pytest.raises(UserError, match="train.train.network is not set"):
    init_from.network_and_stage(None, None, StageConfig(name="x", resolution=8))
  network, config = init_from.network_and_stage(
    "if:" + os.path.join(GOLDEN, "stage_II"), None, None
  )
  assert network.is_super_resolution and config.lowres_resolution == 2  # 8 px / factor 4
  assert config.schedule == "deepfloyd" and config.text_drop_prob == 0.0


def test_if_stages_sample_with_ifs_thresholding_by_default():
  from imagen_jax.diffusion import thresholding
  from imagen_jax.inference import cascade

  _, config = stages.if_network_and_config(os.path.join(GOLDEN, "stage_I"))
  resolved = cascade.StageSampling().sampler_config(config)
  assert (resolved.percentile, resolved.max_threshold) == (95.0, 1.5)
  paper = cascade.StageSampling().sampler_config(StageConfig(name="b", schedule="cosine"))
  assert (paper.percentile, paper.max_threshold) == (99.5, None)
  explicit = cascade.StageSampling(percentile=99.0, max_threshold=float("inf"))
  assert explicit.sampler_config(config).max_threshold is None  # inf: no cap
  # IF's cap: |x| has its 95th percentile at 3, so s = min(3, 1.5) and x -> clip(x, ±1.5) / 1.5.
  x = jnp.linspace(-3.0, 3.0, 201).reshape(1, 201) * jnp.asarray([[1.0]])
  x = x.at[0, 0].set(-3.2)
  scale = thresholding.dynamic_threshold_scale(x, 95.0)
  capped = thresholding.threshold(x, "dynamic", 95.0, max_scale=1.5)
  assert float(scale[0]) > 2.5
  np.testing.assert_allclose(capped, jnp.clip(x, -1.5, 1.5) / 1.5, atol=1e-6)
  with pytest.raises(ValueError, match="must be >= 1"):
    cascade.StageSampling(max_threshold=0.5)
