"""The precompute job for real: tiny shapes, a SentencePiece model trained here, tiny random T5.

The resume test runs `imagen-jax precompute` in a subprocess, SIGKILLs it after k shards, reruns
it and checks that finished shards were not rewritten and the output is complete and unique.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from imagen_jax.data import precompute, records, shapes, shards
from imagen_jax.text import vocabulary

NUM, PER_SHARD, RES, LENGTH = 64, 8, 16, 16


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  captions = [shapes.caption(shapes.example_spec(0, "train", i)) for i in range(300)]
  return vocabulary.train_sentencepiece(
    captions, str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=64
  )


def _cmd(out, spm, delay):
  return [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "precompute",
    "--source=shapes",
    f"--out={out}",
    f"--vocab={spm}",
    "--t5_checkpoint=none",
    "--t5_size=tiny",
    f"--max_length={LENGTH}",
    f"--examples_per_shard={PER_SHARD}",
    f"--num_examples={NUM}",
    "--num_validation=8",
    f"--resolution={RES}",
    "--batch_size=8",
    "--no_progress",
    f"--debug_shard_delay_s={delay}",
  ]


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


def _complete(out):
  return sorted(
    n for n in os.listdir(out) if n.endswith(".tfrecord") and shards.shard_is_complete(f"{out}/{n}")
  )


def test_precompute_survives_sigkill_and_resumes(tmp_path, spm, capsys):
  out = str(tmp_path / "out")
  k = 2
  proc = subprocess.Popen(
    _cmd(out, spm, delay=0.5), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  deadline = time.time() + 120
  while time.time() < deadline and (not os.path.isdir(out) or len(_complete(out)) < k):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  done = _complete(out)
  assert k <= len(done) < NUM // PER_SHARD, done
  assert not os.path.exists(f"{out}/{shards.MANIFEST}")
  mtimes = {n: os.stat(f"{out}/{n}").st_mtime_ns for n in done}
  print(f"\nkilled after {len(done)} of {NUM // PER_SHARD} shards: {done}")

  # The rerun goes through the same CLI entry point, in this process (saves a JAX start-up).
  from imagen_jax import cli

  assert cli.main(_cmd(out, spm, delay=0)[3:]) == 0
  summary = [line for line in capsys.readouterr().out.splitlines() if "precompute:" in line]
  print("rerun:", summary[-1])
  assert f"{len(done)} already complete" in summary[-1]

  # Finished shards untouched; all shards now complete; no temporary files left.
  for n, t in mtimes.items():
    assert os.stat(f"{out}/{n}").st_mtime_ns == t, n
  final = _complete(out)
  assert len(final) == NUM // PER_SHARD
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  with open(f"{out}/{shards.MANIFEST}") as f:
    manifest = json.load(f)
  assert manifest["splits"]["train"]["shards"] == final
  assert manifest["splits"]["train"]["num_records"] == NUM
  assert manifest["max_length"] == LENGTH and manifest["embedding_width"] == 64
  assert manifest["encoder"]["size"] == "tiny"
  assert manifest["vocab_sha256"] == vocabulary.file_sha256(spm)

  # Every example exactly once.
  keys = []
  for n in final:
    meta = shards.load_shard_meta(f"{out}/{n}")
    for payload in tf.compat.v1.io.tf_record_iterator(f"{out}/{n}"):
      keys.append(shards.decode_record(payload, 64)["key"])
    assert meta["num_records"] == PER_SHARD
  assert sorted(keys) == [f"train_{i:08d}" for i in range(NUM)]
  print(f"after resume: {len(final)} shards, {len(keys)} records, {len(set(keys))} unique keys")


def test_records_hold_real_token_embeddings_of_the_caption(tmp_path, spm):
  import jax

  from imagen_jax import parallel
  from imagen_jax.text import encoder as text_encoder

  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices()[:2])
  enc = text_encoder.load_text_encoder(
    None, spm, size="tiny", max_length=LENGTH, dtype="float32", mesh=mesh
  )
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=str(tmp_path / "out"),
    vocab=spm,
    t5_size="tiny",
    max_length=LENGTH,
    examples_per_shard=5,
    num_examples=10,
    num_validation=2,
    resolution=RES,
    batch_size=4,
    splits=("train", "validation"),
    process_index=1,
    process_count=2,
    progress=False,
  )
  # Process 0 builds the source; the other processes wait for it, so build it here first.
  shapes.build(f"{cfg.out}/tfds", RES, 10, 2, seed=0)
  manifest = precompute.run_precompute(cfg, encoder=enc)
  # Process 1 of 2 writes the odd shards of each split (validation: 2 shards of 1 example).
  assert manifest["splits"]["train"]["num_shards"] == 2
  assert manifest["splits"]["validation"]["num_shards"] == 2
  assert manifest["splits"]["train"]["num_records"] is None  # process 0's shards not written
  written = sorted(n for n in os.listdir(cfg.out) if n.endswith(".tfrecord"))
  assert written == ["train-00001-of-00002.tfrecord", "validation-00001-of-00002.tfrecord"]
  st = manifest["stats"]
  assert st["examples"] == 6 and st["shards_written"] == 2

  # Shard 1 holds source records 5..9 (TFDS's on-disk order).
  source = records.TfdsSource(records.find_tfds_dir(f"{cfg.out}/tfds", "shapes"), "train")
  shard1_keys = {source.pairs(i)[0][0] for i in range(5, 10)}
  path = f"{cfg.out}/train-00001-of-00002.tfrecord"
  meta = shards.load_shard_meta(path)
  reader = records.RandomReaders()
  vocab = vocabulary.load_vocabulary(spm)
  for offset in meta["offsets"]:
    rec = shards.decode_record(reader.read(path, offset), enc.width)
    index = int(rec["key"].split("_")[1])
    assert rec["key"] in shard1_keys
    spec = shapes.example_spec(0, "train", index)
    assert rec["caption"] == shapes.caption(spec)
    tokens = vocabulary.tokenize(vocab, [rec["caption"]], LENGTH)
    n = int((tokens > 0).sum())
    np.testing.assert_array_equal(rec["tokens"], tokens[0, :n])
    assert rec["embedding"].shape == (n, enc.width)
    emb, _ = enc.encode_tokens(tokens)
    want = np.asarray(emb[0, :n], np.float32)
    np.testing.assert_allclose(np.asarray(rec["embedding"], np.float32), want, rtol=1e-2, atol=1e-2)
    assert (rec["image_height"], rec["image_width"]) == (RES, RES)
    assert meta["min_height"] == RES


def test_precompute_bad_arguments(tmp_path, spm):
  base = dict(source="shapes", out=str(tmp_path), vocab=spm)
  with pytest.raises(FileNotFoundError, match="--vocab"):
    precompute.PrecomputeConfig(**{**base, "vocab": str(tmp_path / "x.model")}).validate()
  with pytest.raises(ValueError, match="--examples_per_shard"):
    precompute.PrecomputeConfig(**base, examples_per_shard=0).validate()
  with pytest.raises(ValueError, match="--source_dir"):
    precompute.PrecomputeConfig(**{**base, "source": "image_text_folder"}).validate()
  with pytest.raises(FileNotFoundError, match="--t5_checkpoint"):
    precompute.PrecomputeConfig(**base, t5_checkpoint=str(tmp_path / "ckpt")).validate()


def test_plan_shards_gives_every_process_a_shard():
  plan = precompute.plan_shards(10, 8, 4)
  assert [len(r) for r in plan] == [3, 3, 3, 1]
  assert sum((list(r) for r in plan), []) == list(range(10))
  assert [len(r) for r in precompute.plan_shards(64, 8, 1)] == [8] * 8
  with pytest.raises(ValueError, match="3 examples cannot give each of 4"):
    precompute.plan_shards(3, 8, 4)
