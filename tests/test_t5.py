"""The T5 v1.1 encoder: parameter tree, sizes, HF parity, checkpoint formats, sharding, CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from imagen_jax import cli, parallel
from imagen_jax.nn import t5
from imagen_jax.text import encoder, t5_checkpoints, vocabulary
from tests import cli_helpers

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
SENTENCES = [
  "a red circle on a blue background",
  "two green squares next to a yellow triangle",
  "a photo of a cat sitting on a wooden table",
  "an astronaut riding a horse on the moon",
] * 3


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  return vocabulary.train_sentencepiece(
    SENTENCES, str(tmp_path_factory.mktemp("spm") / "t5"), vocab_size=128
  )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The same random tiny weights (seed 7) in every on-disk layout."""
  root = tmp_path_factory.mktemp("ckpts")
  layouts = {
    "t5x_legacy": dict(fmt="t5x_legacy"),
    "t5x_legacy_old_spec": dict(fmt="t5x_legacy", t5x_spec_layout="old"),
    "t5x_orbax": dict(fmt="t5x_orbax"),
    "hf": dict(fmt="hf"),
    "hf_sharded": dict(fmt="hf", hf_shards=3),
  }
  paths = {}
  for name, kwargs in layouts.items():
    paths[name] = str(root / name)
    encoder.write_random_checkpoint(paths[name], "tiny", seed=7, **kwargs)
  return paths


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# ----------------------------------------------------------------------------- module


def test_parameter_tree_and_logical_axes():
  cfg = t5.get_config("tiny")
  boxed = jax.eval_shape(lambda: t5.T5Encoder(cfg).init(jax.random.key(0), jnp.ones((1, 4), int)))
  flat = traverse_util.flatten_dict(
    boxed["params"], sep="/", is_leaf=lambda _, x: isinstance(x, nn.Partitioned)
  )
  names = {k: (tuple(v.value.shape), v.names) for k, v in flat.items()}
  d, inner, ff = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
  assert names["token_embedder/embedding"] == ((cfg.vocab_size, d), ("vocab", "embed"))
  assert names["encoder/relpos_bias/rel_embedding"] == ((2, 32), ("heads", "relpos_buckets"))
  layer = "encoder/layers_1/"
  assert names[layer + "attention/query/kernel"] == ((d, inner), ("embed", "joined_kv"))
  assert names[layer + "attention/out/kernel"] == ((inner, d), ("joined_kv", "embed"))
  assert names[layer + "mlp/wi_0/kernel"] == ((d, ff), ("embed", "mlp"))
  assert names[layer + "mlp/wo/kernel"] == ((ff, d), ("mlp", "embed"))
  assert names[layer + "pre_mlp_layer_norm/scale"] == ((d,), ("embed",))
  assert names["encoder/encoder_norm/scale"] == ((d,), ("embed",))
  # 2 layers x 9 tensors + embedding + relpos + final norm; no biases anywhere.
  assert len(names) == 2 * 9 + 3
  # The fast random init builds exactly this tree.
  init = jax.eval_shape(lambda: t5.init_params(cfg, jax.random.key(0)))
  init_flat = traverse_util.flatten_dict(init, sep="/")
  assert {k: tuple(v.shape) for k, v in init_flat.items()} == {k: v[0] for k, v in names.items()}
  # Every logical name has a rule in the one table.
  ruled = {name for name, _ in parallel.LOGICAL_AXIS_RULES}
  assert {n for _, axes in names.values() for n in axes} <= ruled


def test_xxl_parameter_count():
  # T5 v1.1 XXL encoder incl. the 32128 x 4096 embedding: the paper's "4.6B" encoder.
  count = t5.param_count(t5.get_config("xxl"))
  assert count == 4_762_310_656
  layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096
  assert count == 32128 * 4096 + 64 * 32 + 24 * layer + 4096


def test_sizes_match_design():
  want = {
    "small": (512, 6, 1024, 8),
    "base": (768, 12, 2048, 12),
    "large": (1024, 16, 2816, 24),
    "xl": (2048, 32, 5120, 24),
    "xxl": (4096, 64, 10240, 24),
  }
  for size, (d, h, ff, n) in want.items():
    cfg = t5.get_config(size)
    assert (cfg.d_model, cfg.num_heads, cfg.mlp_dim, cfg.num_layers) == (d, h, ff, n)
    assert (cfg.head_dim, cfg.vocab_size) == (64, 32128)
  with pytest.raises(ValueError, match="unknown T5 size 'huge'"):
    t5.get_config("huge")
  with pytest.raises(ValueError, match="never float16|float16"):
    t5.get_config("tiny", dtype="float16")


def test_relative_position_buckets_closed_form():
  b = t5.relative_position_buckets(300)
  # Exact buckets for |distance| < 8; keys after the query use the upper half (16 + distance).
  np.testing.assert_array_equal(b[10, 10:18], [0, 17, 18, 19, 20, 21, 22, 23])
  np.testing.assert_array_equal(b[10, 3:10][::-1], [1, 2, 3, 4, 5, 6, 7])
  # Log-spaced from 8 to 128: distance 16 starts bucket 8 + 2 (8 * log(2)/log(16)).
  assert b[0, 16] == 16 + 10 and b[16, 0] == 10 and b[15, 0] == 9
  # Everything at or beyond max_distance shares the last bucket of each half.
  assert b[0, 128] == b[0, 299] == 31 and b[299, 0] == 15
  assert b.min() == 0 and b.max() == 31


def test_padding_is_zero_and_does_not_leak():
  cfg = t5.get_config("tiny")
  model = t5.T5Encoder(cfg)
  tokens = jnp.array([[5, 9, 17, 1, 0, 0], [5, 9, 17, 1, 0, 0]])
  params = {"params": t5.init_params(cfg, jax.random.key(1))}
  # Changing what follows the padding boundary cannot change real positions.
  other = tokens.at[1, 4:].set(0)
  out = np.asarray(model.apply(params, jnp.concatenate([tokens[:1], other[1:]])))
  assert (out[:, 4:] == 0).all()
  assert np.abs(out[:, :4]).min() > 0
  longer = np.asarray(model.apply(params, jnp.array([[5, 9, 17, 1, 0, 0, 0, 0]])))
  np.testing.assert_allclose(longer[0, :4], out[0, :4], atol=1e-5)


# ----------------------------------------------------------------------------- HF parity


def test_parity_with_hf_pytorch_golden():
  """Same weights as HF's PyTorch T5EncoderModel (tools/make_t5_golden.py): f32 max error."""
  golden = np.load(os.path.join(GOLDEN_DIR, "t5_tiny_parity.npz"))
  tokens, ref = golden["tokens"], golden["last_hidden_state"]
  cfg = t5.get_config("tiny", dtype="float32")
  params, fmt = t5_checkpoints.read_t5_checkpoint(os.path.join(GOLDEN_DIR, "t5_tiny_hf"), cfg)
  assert fmt == "hf"
  out = np.asarray(t5.T5Encoder(cfg).apply({"params": params}, jnp.asarray(tokens)))
  mask = tokens > 0
  err = np.abs(out - ref)[mask].max()
  print(f"HF parity max abs error (f32): {err:.3g} ({golden['versions']})")
  assert err <= 1e-4
  assert np.abs(ref[mask]).mean() > 0.1  # a real signal, not zeros
  # HF leaves padding rows as computed; ours are zero.
  assert (out[~mask] == 0).all()
  # The EOS-only (unconditional) row is in the golden set.
  assert mask[0].sum() == 1


def test_bfloat16_close_to_float32():
  golden = np.load(os.path.join(GOLDEN_DIR, "t5_tiny_parity.npz"))
  path = os.path.join(GOLDEN_DIR, "t5_tiny_hf")
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg = t5.get_config("tiny", dtype=dtype)
    params, _ = t5_checkpoints.read_t5_checkpoint(path, cfg, dtype=cfg.jnp_dtype)
    assert all(x.dtype == cfg.jnp_dtype for x in jax.tree.leaves(params))
    y = t5.T5Encoder(cfg).apply({"params": params}, jnp.asarray(golden["tokens"]))
    assert y.dtype == cfg.jnp_dtype
    out[dtype] = np.asarray(y, np.float32)
  rel = np.abs(out["bfloat16"] - out["float32"]).max() / np.abs(out["float32"]).max()
  assert rel < 0.05


# ----------------------------------------------------------------------------- formats


def test_all_formats_load_identical_params_and_embeddings(checkpoints, spm_path):
  cfg = t5.get_config("tiny")
  want = t5_checkpoints.random_params(cfg, seed=7)
  embeddings = {}
  for name, path in checkpoints.items():
    fmt, _ = t5_checkpoints.resolve_checkpoint(path)
    assert fmt == name.split("_old")[0].replace("_sharded", "")
    params, _ = t5_checkpoints.read_t5_checkpoint(path, cfg)
    flat = _flat(params)
    assert set(flat) == set(want), name
    for key in want:
      np.testing.assert_array_equal(flat[key], want[key], err_msg=f"{name}: {key}")
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  for name, path in checkpoints.items():
    enc = encoder.load_text_encoder(
      path, spm_path, size="tiny", max_length=16, dtype="float32", mesh=mesh
    )
    embeddings[name] = np.asarray(enc.encode(["a red circle", "", "a cat on the moon"])[0])
  for name, value in embeddings.items():
    np.testing.assert_array_equal(value, embeddings["hf"], err_msg=name)


def test_t5x_legacy_layout_on_disk(checkpoints):
  from flax import serialization

  for name in ("t5x_legacy", "t5x_legacy_old_spec"):
    path = checkpoints[name]
    with open(os.path.join(path, "checkpoint"), "rb") as f:
      contents = serialization.msgpack_restore(f.read())
    assert contents["version"] == 3
    spec = contents["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    rel = "target.encoder.layers_0.attention.query.kernel"
    if name == "t5x_legacy":
      assert spec["kvstore"]["path"] == rel and "path" not in spec
    else:
      assert spec["path"] == rel and "path" not in spec["kvstore"]
    with open(os.path.join(path, rel, ".zarray")) as f:
      zarray = json.load(f)
    assert zarray["compressor"]["id"] == "gzip" and zarray["shape"] == [64, 64]
    # Decoder parameters and optimizer slots are present on disk but not read.
    assert "decoder" in contents["optimizer"]["target"]
    assert "param_states" in contents["optimizer"]["state"]


def test_t5x_model_dir_resolves_latest_step(checkpoints, tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  os.symlink(checkpoints["t5x_legacy"], model_dir / "checkpoint_1000")
  (model_dir / "checkpoint_20").mkdir()
  fmt, path = t5_checkpoints.resolve_checkpoint(str(model_dir))
  assert fmt == "t5x_legacy" and path.endswith("checkpoint_1000")


def test_bad_checkpoints(checkpoints, tmp_path, spm_path):
  cfg = t5.get_config("tiny")
  read = lambda p, c=cfg: t5_checkpoints.read_t5_checkpoint(str(p), c)
  with pytest.raises(FileNotFoundError, match="nope"):
    read(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="holds no known checkpoint"):
    read(empty)
  # Partial T5X dir: one zarr array deleted.
  import shutil

  partial = tmp_path / "partial"
  shutil.copytree(checkpoints["t5x_legacy"], partial)
  shutil.rmtree(partial / "target.encoder.layers_1.mlp.wo.kernel")
  with pytest.raises(FileNotFoundError, match=r"target/encoder/layers_1/mlp/wo/kernel.*incomplete"):
    read(partial)
  # Sharded HF with a missing shard.
  shards = tmp_path / "shards"
  shutil.copytree(checkpoints["hf_sharded"], shards)
  os.remove(shards / "model-00002-of-00003.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00003.*missing"):
    read(shards)
  # Shape mismatch against the chosen size names the parameter and both shapes.
  bigger = t5.get_config("tiny", d_model=128)
  with pytest.raises(ValueError, match=r"parameter '.*' \(ours: .*\) has shape .* expected"):
    read(checkpoints["hf"], bigger)
  for name in ("t5x_legacy", "t5x_orbax"):
    with pytest.raises(
      ValueError, match=r"parameter target/\S+ .*has shape \(64,\), expected \(128,\)"
    ):
      read(checkpoints[name], bigger)
  deeper = t5.get_config("tiny", num_layers=3)
  with pytest.raises(ValueError, match="lacks"):
    read(checkpoints["t5x_legacy"], deeper)
  # Decoder-only / non-T5 safetensors.
  from safetensors.numpy import save_file

  dec = tmp_path / "decoder_only"
  dec.mkdir()
  save_file(
    {"decoder.final_layer_norm.weight": np.ones(64, np.float32)}, str(dec / "m.safetensors")
  )
  with pytest.raises(ValueError, match="decoder-only"):
    read(dec)
  other = tmp_path / "bert.safetensors"
  save_file({"bert.embeddings.weight": np.ones((4, 4), np.float32)}, str(other))
  with pytest.raises(ValueError, match="non-T5"):
    read(other)
  # Decoder-only T5X msgpack.
  from flax import serialization

  t5x_dec = tmp_path / "t5x_dec"
  t5x_dec.mkdir()
  blob = {"version": 3, "optimizer": {"target": {"decoder": {"x": np.ones(2, np.float32)}}}}
  (t5x_dec / "checkpoint").write_bytes(serialization.msgpack_serialize(blob))
  with pytest.raises(ValueError, match="no 'encoder' parameters"):
    read(t5x_dec)
  # Vocabulary larger than the embedding table.
  big_vocab = vocabulary.train_sentencepiece(SENTENCES * 20, str(tmp_path / "big"), 300)
  if vocabulary.load_vocabulary(big_vocab).vocab_size > 256:
    with pytest.raises(ValueError, match="embeds only 256"):
      encoder.load_text_encoder(checkpoints["hf"], big_vocab, size="tiny")
  with pytest.raises(ValueError, match="dtype"):
    encoder.load_text_encoder(checkpoints["hf"], spm_path, size="tiny", dtype="float16")


# ----------------------------------------------------------------------------- encoder API


def test_sharded_encoding_equals_single_device(checkpoints, spm_path):
  single = encoder.load_text_encoder(
    checkpoints["hf"],
    spm_path,
    size="tiny",
    max_length=16,
    dtype="float32",
    mesh=parallel.create_mesh(devices=jax.devices()[:1]),
  )
  mesh8 = parallel.create_mesh(data=2, fsdp=2, model=2)
  sharded = encoder.load_text_encoder(
    checkpoints["t5x_legacy"], spm_path, size="tiny", max_length=16, dtype="float32", mesh=mesh8
  )
  kernel = sharded.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (32, 64)
  texts = ["a red circle", "", "two green squares next to a yellow triangle", "a cat", "moon"]
  e1, m1 = single.encode(texts)
  e8, m8 = sharded.encode(texts)  # 5 captions on a 4-way data split: padded inside
  assert e8.shape == (5, 16, 64) and m8.shape == (5, 16) and m8.dtype == bool
  np.testing.assert_array_equal(np.asarray(m1), np.asarray(m8))
  np.testing.assert_allclose(np.asarray(e8), np.asarray(e1), atol=2e-5, rtol=1e-5)
  # Embedding of a caption does not depend on its batch-mates.
  alone, _ = single.encode(["a cat"])
  np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(e1)[3], atol=2e-5)


def test_encode_contract(checkpoints, spm_path):
  enc = encoder.load_text_encoder(
    checkpoints["hf"],
    spm_path,
    size="tiny",
    max_length=12,
    dtype="bfloat16",
    mesh=parallel.create_mesh(data=2, fsdp=1, model=1, devices=jax.devices()[:2]),
  )
  assert enc.width == 64 and enc.max_length == 12
  emb, mask = enc.encode(["a red circle", ""])
  assert emb.dtype == jnp.bfloat16 and emb.shape == (2, 12, 64)
  tokens = enc.tokenize(["a red circle", ""])
  np.testing.assert_array_equal(np.asarray(mask), tokens > 0)
  # Empty caption: EOS only, the rest zero.
  assert np.asarray(mask)[1].tolist() == [True] + [False] * 11
  assert (np.asarray(emb, np.float32)[~np.asarray(mask)] == 0).all()
  assert np.abs(np.asarray(emb, np.float32)[1, 0]).max() > 0
  # One compilation per batch shape.
  before = enc._trace_count
  enc.encode(["x", "y"])
  enc.encode(["another caption", "and one more"])
  assert enc._trace_count == before
  enc.encode(["three", "captions", "now"])
  assert enc._trace_count == before + 1
  ident = enc.identity()
  json.dumps(ident)
  assert ident["size"] == "tiny" and ident["max_length"] == 12 and ident["dtype"] == "bfloat16"
  assert ident["checkpoint"] == os.path.abspath(checkpoints["hf"])
  assert ident["vocab_sha256"] == vocabulary.file_sha256(spm_path)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
    enc.encode_tokens(np.full((1, 4), 999))
  with pytest.raises(ValueError, match="integer array"):
    enc.encode_tokens(np.zeros((4,), np.int32))


def test_random_init_is_deterministic(spm_path, caplog):
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  a = encoder.load_text_encoder(None, spm_path, size="tiny", max_length=8, mesh=mesh, seed=3)
  b = encoder.load_text_encoder(None, spm_path, size="tiny", max_length=8, mesh=mesh, seed=3)
  c = encoder.load_text_encoder(None, spm_path, size="tiny", max_length=8, mesh=mesh, seed=4)
  assert "RANDOM weights" in caplog.text
  ea, eb = (np.asarray(x.encode(["a cat"])[0], np.float32) for x in (a, b))
  np.testing.assert_array_equal(ea, eb)
  assert np.abs(ea).max() > 0
  qa, qc = (
    np.asarray(x.params["encoder"]["layers_0"]["attention"]["query"]["kernel"]) for x in (a, c)
  )
  assert np.abs(qa.astype(np.float32) - qc.astype(np.float32)).max() > 0
  assert a.identity()["checkpoint"] == "random:3"


# ----------------------------------------------------------------------------- CLI


def test_encode_subcommand(checkpoints, spm_path, tmp_path, capsys):
  out = tmp_path / "emb.npz"
  rc = cli.main(
    [
      "encode",
      f"--t5_checkpoint={checkpoints['t5x_orbax']}",
      f"--vocab={spm_path}",
      "--text=a red circle",
      "--text=",
      f"--out={out}",
      "--gin_file=configs/models/t5_tiny.gin",
      "--gin.encoder.load_text_encoder.max_length=24",
      "--max_length=10",  # flags win over gin
    ]
  )
  assert rc == 0
  data = np.load(out)
  assert data["embeddings"].shape == (2, 10, 64) and data["embeddings"].dtype == np.float32
  assert data["tokens"].dtype == np.int32 and data["mask"].dtype == bool
  np.testing.assert_array_equal(data["mask"], data["tokens"] > 0)
  assert data["tokens"][1].tolist() == [1] + [0] * 9
  # Same numbers as the Python API on the same checkpoint (the gin file sets float32).
  enc = encoder.load_text_encoder(
    checkpoints["hf"],
    spm_path,
    size="tiny",
    max_length=10,
    dtype="float32",
    mesh=parallel.create_mesh(devices=jax.devices()[:1]),
  )
  np.testing.assert_allclose(
    data["embeddings"], np.asarray(enc.encode(["a red circle", ""])[0]), atol=2e-5
  )
  cli_helpers.user_error(
    capsys, ["encode", "--t5_checkpoint=random", f"--vocab={spm_path}", f"--out={out}"], "--text"
  )


def test_readme_encode_example_runs_without_gin_from_any_directory(checkpoints, spm_path, tmp_path):
  """The README's command (no --gin_file) in a fresh process, from outside the repository."""
  cmd = [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "encode",
    f"--t5_checkpoint={checkpoints['hf']}",
    f"--vocab={spm_path}",
    "--t5_size=tiny",
    "--text=a red square",
    "--out=emb.npz",
  ]
  r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=_cpu_env())
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.load(tmp_path / "emb.npz")["embeddings"].shape == (1, 128, 64)
  # A misspelt checkpoint path: one line, exit 2, before anything loads.
  r = subprocess.run(
    [*cmd[:4], "--t5_checkpoint=nope", *cmd[5:]],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    env=_cpu_env(),
  )
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
    "imagen-jax encode: error: --t5_checkpoint='nope' does not exist (or pass 'random' for "
    "random weights)"
  ]


def test_encode_old_size_flag_still_works(checkpoints, spm_path, tmp_path, caplog):
  argv = ["encode", f"--t5_checkpoint={checkpoints['hf']}", f"--vocab={spm_path}", "--text=x"]
  assert cli.main([*argv, "--size=tiny", f"--out={tmp_path / 'old.npz'}"]) == 0
  assert "--size is deprecated; spell it --t5_size=tiny" in caplog.text
  assert np.load(tmp_path / "old.npz")["embeddings"].shape[-1] == 64  # the tiny T5's width


def _cpu_env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu")
