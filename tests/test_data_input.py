"""Training input over real precomputed shards: batch format, exact resume, hosts, bad input."""

import json
import os
import re
import shutil

import gin
import jax
import numpy as np
import pytest
from PIL import Image

from imagen_jax import errors, gin_utils, parallel
from imagen_jax.data import global_batch, input_pipeline, precompute, records, shapes, shards
from imagen_jax.text import encoder as text_encoder
from imagen_jax.text import vocabulary

NUM, RES, LENGTH = 64, 16, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("input")
  captions = [shapes.caption(shapes.example_spec(0, "train", i)) for i in range(300)]
  spm = vocabulary.train_sentencepiece(captions, str(root / "spm"), vocab_size=64)
  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices()[:2])
  enc = text_encoder.load_text_encoder(None, spm, size="tiny", max_length=LENGTH, mesh=mesh)
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=str(root / "pre"),
    vocab=spm,
    t5_size="tiny",
    max_length=LENGTH,
    examples_per_shard=8,
    num_examples=NUM,
    num_validation=4,
    resolution=RES,
    batch_size=16,
    progress=False,
  )
  manifest = precompute.run_precompute(cfg, encoder=enc)
  return {"dir": cfg.out, "enc": enc, "manifest": manifest, "spm": spm}


def _iter(data_dir, **kw):
  args = dict(batch_size=8, resolution=RES, max_length=LENGTH, process_index=0, process_count=1)
  args.update(kw)
  return input_pipeline.make_train_iterator(data_dir, **args)


def test_batch_format_and_embeddings(data):
  it = _iter(data["dir"], num_threads=1)
  batch = next(it)
  assert batch["image"].shape == (8, RES, RES, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert batch["text_emb"].shape == (8, LENGTH, 64) and batch["text_mask"].dtype == bool
  assert {k: v[0] for k, v in it.batch_shapes().items()} == {
    k: v.shape for k, v in batch.items() if k != "key"
  }
  vocab = vocabulary.load_vocabulary(data["spm"])
  for i, key in enumerate(batch["key"]):
    spec = shapes.example_spec(0, "train", int(key.split("_")[1]))
    # The image is the rendered shape, scaled to [-1, 1].
    np.testing.assert_allclose(batch["image"][i], shapes.render(spec, RES) / 127.5 - 1, atol=1e-6)
    tokens = vocabulary.tokenize(vocab, [shapes.caption(spec)], LENGTH)
    n = int((tokens > 0).sum())
    assert batch["text_mask"][i].sum() == n and batch["text_mask"][i, :n].all()
    assert not batch["text_emb"][i, n:].any()
    emb, _ = data["enc"].encode_tokens(tokens)
    np.testing.assert_allclose(
      batch["text_emb"][i, :n], np.asarray(emb[0, :n], np.float32), rtol=1e-2, atol=1e-2
    )


def test_one_epoch_visits_every_example_once_then_reshuffles(data):
  it = _iter(data["dir"])
  epoch0 = np.concatenate([next(it)["key"] for _ in range(NUM // 8)])
  epoch1 = np.concatenate([next(it)["key"] for _ in range(NUM // 8)])
  assert sorted(epoch0) == sorted(epoch1) == [f"train_{i:08d}" for i in range(NUM)]
  assert list(epoch0) != list(epoch1)
  assert it.get_state()["epoch"] == 1 and it.get_state()["position"] == NUM


def test_resume_yields_exactly_the_next_batches(data):
  kw = dict(batch_size=12, lowres_resolution=8, crop_size=8, seed=5)
  uninterrupted = _iter(data["dir"], **kw)
  reference = [next(uninterrupted) for _ in range(9)]  # 108 examples: crosses an epoch
  first = _iter(data["dir"], **kw)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
  resumed = _iter(data["dir"], **kw)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(4)]
  print(f"\nresume: state after 5 batches {state}")
  for j, (a, b) in enumerate(zip(reference[5:], got)):
    print(
      f"  batch {5 + j}: uninterrupted {[str(k) for k in a['key'][:4]]}... resumed {[str(k) for k in b['key'][:4]]}..."
    )
    np.testing.assert_array_equal(a["key"], b["key"])
    np.testing.assert_array_equal(a["image"], b["image"])  # same random crops too
    np.testing.assert_array_equal(a["lowres"], b["lowres"])
  with pytest.raises(ValueError, match="seed"):
    _iter(data["dir"], seed=6).set_state(state)


def test_two_hosts_get_disjoint_sets_whose_union_is_the_split(data):
  seen = []
  for p in range(2):
    it = _iter(data["dir"], batch_size=4, process_index=p, process_count=2)
    n = it.num_examples // 2  # each process reads its half of every global batch
    keys = np.concatenate([next(it)["key"] for _ in range(n // 4)])
    assert len(set(keys)) == len(keys) == n
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"train_{i:08d}" for i in range(NUM)}
  # The global batch is the same whatever the process count: rows of 1 process × 8 are the
  # concatenation of 2 processes × 4.
  one = next(_iter(data["dir"], batch_size=8))["key"]
  two = [
    next(_iter(data["dir"], batch_size=4, process_index=p, process_count=2))["key"] for p in (0, 1)
  ]
  np.testing.assert_array_equal(one, np.concatenate(two))


def test_sr_pair_crop_keeps_ratio_and_lowres_is_the_downsampled_crop(data):
  it = _iter(data["dir"], lowres_resolution=8, crop_size=8, batch_size=4)
  batch = next(it)
  assert batch["image"].shape == (4, 8, 8, 3) and batch["lowres"].shape == (4, 4, 4, 3)
  for i, key in enumerate(batch["key"]):
    full = shapes.render(shapes.example_spec(0, "train", int(key.split("_")[1])), RES)
    crop = np.round((batch["image"][i] + 1) * 127.5).astype(np.uint8)
    # The crop is a window of the full image.
    hits = [
      (y, x)
      for y in range(RES - 8 + 1)
      for x in range(RES - 8 + 1)
      if np.array_equal(full[y : y + 8, x : x + 8], crop)
    ]
    assert hits, key
    # The low-res image is the antialiased 2x downsampling of that crop (close to box means).
    box = crop.astype(np.float64).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3)) / 127.5 - 1
    assert np.abs(batch["lowres"][i] - box).mean() < 0.1


def test_on_the_fly_text_gives_the_same_batches(data):
  enc = data["enc"]
  tfds_dir = data["manifest"]["source"]["tfds_dir"]
  fly = _iter(
    os.path.dirname(os.path.dirname(os.path.dirname(tfds_dir))),
    text_encoder=enc,
    tfds_name="shapes",
  )
  batch = next(fly)
  assert batch["text_emb"].shape == (8, LENGTH, 64)
  vocab = vocabulary.load_vocabulary(data["spm"])
  for i, key in enumerate(batch["key"]):
    spec = shapes.example_spec(0, "train", int(key.split("_")[1]))
    np.testing.assert_allclose(batch["image"][i], shapes.render(spec, RES) / 127.5 - 1, atol=1e-6)
    n = int((vocabulary.tokenize(vocab, [shapes.caption(spec)], LENGTH) > 0).sum())
    assert batch["text_mask"][i].sum() == n
  state = fly.get_state()
  nxt = next(fly)
  again = _iter(
    os.path.dirname(os.path.dirname(os.path.dirname(tfds_dir))),
    text_encoder=enc,
    tfds_name="shapes",
  )
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["key"], nxt["key"])


def test_to_global_batch_shards_over_data_axes(data):
  mesh = parallel.create_mesh(data=4, fsdp=2)
  batch = next(_iter(data["dir"], lowres_resolution=8))
  arrays = global_batch.to_global_batch(batch, mesh)
  assert set(arrays) == {"image", "lowres", "text_emb", "text_mask"}  # 'key' stays on the host
  for name, arr in arrays.items():
    assert arr.shape == batch[name].shape
    assert arr.sharding.spec == parallel.batch_sharding(mesh, arr.ndim).spec
    assert arr.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(arr), batch[name])


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors before anything compiles
# ----------------------------------------------------------------------------------------------


def _copy(data, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(data["dir"], dst, ignore=shutil.ignore_patterns("tfds"))
  return dst


def test_missing_dir_and_manifest(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _iter(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="manifest.json not found"):
    _iter(str(tmp_path))


def test_manifest_from_another_encoder_or_length(data):
  with pytest.raises(ValueError, match=r"max_length: data 16 != config 32"):
    _iter(data["dir"], max_length=32)
  with pytest.raises(ValueError, match=r"encoder size: data 'tiny' != expected 'xxl'"):
    _iter(data["dir"], expected_encoder={"size": "xxl"})
  it = _iter(data["dir"], expected_encoder=data["enc"].identity())  # the right one passes
  assert it.num_examples == NUM


def test_truncated_or_missing_shard(data, tmp_path):
  d = _copy(data, tmp_path)
  name = f"{d}/train-00003-of-00008.tfrecord"
  with open(name, "r+b") as f:
    f.truncate(os.path.getsize(name) - 10)
  # One line naming the shard and the manifest's own precompute command, with --verify.
  repair = re.escape(f"fix: rerun `{data['manifest']['command']} --verify`")
  with pytest.raises(
    records.CorruptDataError, match=rf"00003-of-00008.tfrecord: it is \d+ bytes but .*{repair}"
  ):
    _iter(d)
  os.remove(name)
  with pytest.raises(
    records.CorruptDataError, match=rf"train-00003-of-00008.tfrecord: it is missing; {repair}"
  ):
    _iter(d)


def test_corrupt_records_are_skipped_and_counted_up_to_a_fraction(data, tmp_path):
  d = _copy(data, tmp_path)
  name = f"{d}/train-00002-of-00008.tfrecord"
  meta = shards.load_shard_meta(name)
  with open(name, "rb") as f:
    raw = bytearray(f.read())
  raw[meta["offsets"][3] + 40] ^= 0xFF  # a payload byte of record 3: its CRC fails
  with open(name, "wb") as f:
    f.write(raw)
  it = _iter(d, max_corrupt_fraction=0.05)
  keys = np.concatenate([next(it)["key"] for _ in range(NUM // 8 - 1)])  # 56 of 63 good
  assert it.corrupt_count <= 1
  rest = next(it)["key"]
  assert it.corrupt_count == 1
  # Every good example, the corrupt one never (its row took another example of its batch).
  assert len(set(keys) | set(rest)) == NUM - 1
  strict = _iter(d, max_corrupt_fraction=0.0)
  with pytest.raises(records.CorruptDataError) as e:
    for _ in range(NUM // 8):
      next(strict)
  msg = str(e.value)
  print(f"\ntraining error: {msg}")
  assert isinstance(e.value, errors.UserError) and "\n" not in msg
  assert msg.startswith("1 of 64 records are corrupt, more than max_corrupt_fraction=0.0, in ")
  assert f"in {name}; fix: rerun `imagen-jax precompute --source=shapes" in msg
  assert f"--out={data['dir']}" in msg and "--verify` (it rewrites only the bad shards)" in msg
  assert msg.endswith("or tolerate more with --gin.MAX_CORRUPT_FRACTION=0.04")

  # Without a recorded command (older manifests) it says what to add to the user's own.
  with open(f"{d}/{shards.MANIFEST}") as f:
    manifest = json.load(f)
  del manifest["command"]
  with open(f"{d}/{shards.MANIFEST}", "w") as f:
    json.dump(manifest, f)
  with pytest.raises(
    records.CorruptDataError, match="fix: rerun your precompute command with --verify"
  ):
    strict = _iter(d, max_corrupt_fraction=0.0)
    for _ in range(NUM // 8):
      next(strict)


def test_the_printed_gin_key_sets_the_tolerance(data, tmp_path):
  d = _copy(data, tmp_path)
  name = f"{d}/train-00001-of-00008.tfrecord"
  meta = shards.load_shard_meta(name)
  with open(name, "r+b") as f:
    f.seek(meta["offsets"][2] + 30)
    byte = f.read(1)
    f.seek(meta["offsets"][2] + 30)
    f.write(bytes([byte[0] ^ 0xFF]))

  def epoch():
    it = _iter(d)  # no max_corrupt_fraction: gin's, else 0.01
    for _ in range(NUM // 8):
      next(it)
    return it

  with pytest.raises(records.CorruptDataError, match=r"--gin\.MAX_CORRUPT_FRACTION=0\.04$"):
    epoch()  # 1 of 64 > 0.01
  # The binding exactly as printed, through the CLI's own gin parsing (as `imagen-jax train`).
  bindings, rest = gin_utils.split_gin_binding_flags(["--gin.MAX_CORRUPT_FRACTION=0.04"])
  assert not rest
  try:
    gin_utils.parse_gin([], bindings)
    assert epoch().corrupt_count == 1
    gin_utils.parse_gin([], ["MAX_CORRUPT_FRACTION = 'lots'"])
    with pytest.raises(errors.UserError, match="MAX_CORRUPT_FRACTION='lots' is not a number"):
      epoch()
  finally:
    gin.clear_config()


def test_images_smaller_than_the_stage(data, tmp_path):
  with pytest.raises(input_pipeline.ImageTooSmallError, match=r"as small as 16x16, below .* 32"):
    _iter(data["dir"], resolution=32)
  with pytest.raises(ValueError, match="crop_size=7 x lowres_resolution=8"):
    _iter(data["dir"], lowres_resolution=8, crop_size=7)
  img = tmp_path / "small.png"
  Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img)
  with pytest.raises(input_pipeline.ImageTooSmallError, match=r"x is 10x12, smaller than .* 16"):
    input_pipeline.process_image(img.read_bytes(), 16, name="x")
  with pytest.raises(records.CorruptRecordError, match="undecodable"):
    input_pipeline.process_image(b"junk", 16)
