"""precompute through seqio: registered Tasks and Mixtures, --module, and webdataset tar shards.

Everything is built here: tiny images, a SentencePiece model trained on shapes captions, the tiny
random T5, tar shards written with `tarfile` + PIL.
"""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imagen_jax import cli, errors
from imagen_jax.data import precompute, shapes, shards, tasks, webdataset
from imagen_jax.text import vocabulary
from tests import cli_helpers, shard_hooks

LENGTH, WIDTH = 16, 64


def _captions(start, n):
  return [shapes.caption(shapes.example_spec(0, "train", i)) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return vocabulary.train_sentencepiece(
    _captions(0, 300), str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=64
  )


@pytest.fixture(scope="module")
def encoder(spm):
  import jax

  from imagen_jax import parallel
  from imagen_jax.text import encoder as text_encoder

  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices()[:2])
  return text_encoder.load_text_encoder(
    None, spm, size="tiny", max_length=LENGTH, dtype="float32", mesh=mesh
  )


def _png(colour, size=(8, 8), fmt="PNG"):
  out = io.BytesIO()
  Image.fromarray(np.full((*size, 3), colour, np.uint8)).save(out, format=fmt)
  return out.getvalue()


def _register_captions_task(name, captions, vocab, as_arrays):
  """A user-style task: captions + images from memory, the shared token preprocessors."""
  import seqio

  keys = [f"{name}-{i:04d}" for i in range(len(captions))]
  if as_arrays:  # decoded uint8 images (precompute encodes them as PNG)
    images = np.stack([np.full((8, 8, 3), i % 256, np.uint8) for i in range(len(captions))])
  else:
    images = [_png(i % 256) for i in range(len(captions))]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({"key": keys, "caption": captions, "image": images})

  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
    name,
    source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
    preprocessors=tasks.token_preprocessors(),
    output_features=tasks.output_features(vocab),
  )


def _records(out):
  """Every record of every shard, in shard order (= stream order)."""
  recs = []
  for n in sorted(n for n in os.listdir(out) if n.endswith(".tfrecord")):
    for payload in tf.compat.v1.io.tf_record_iterator(f"{out}/{n}"):
      recs.append(shards.decode_record(payload, WIDTH))
  return recs


def _task_tokens(task, split="train"):
  """caption -> the task's own text_tokens (its preprocessing, not ours)."""
  ds = tasks.get_task_dataset(task, split, LENGTH)
  return {ex["caption"].decode(): ex["text_tokens"] for ex in ds.as_numpy_iterator()}


def _cfg(out, spm, **kw):
  base = dict(
    out=str(out),
    vocab=spm,
    t5_size="tiny",
    max_length=LENGTH,
    examples_per_shard=40,
    batch_size=16,
    progress=False,
  )
  return precompute.PrecomputeConfig(**{**base, **kw})


def test_precompute_from_a_task_and_from_a_two_task_mixture(tmp_path, spm, encoder):
  import seqio

  vocab = vocabulary.load_vocabulary(spm)
  # Long captions (> LENGTH tokens) too, so the task's truncation keeping EOS is exercised.
  long_caps = [c + " and " + c for c in _captions(300, 300)]
  red = _register_captions_task("test_red", _captions(0, 300), vocab, as_arrays=True)
  blue = _register_captions_task("test_blue", long_caps, vocab, as_arrays=False)
  seqio.MixtureRegistry.remove("test_mix")
  mix = seqio.MixtureRegistry.add("test_mix", [("test_red", 3.0), ("test_blue", 1.0)])

  # A Task: its first 50 examples, tokens the task's own.
  out = tmp_path / "task"
  manifest = precompute.run_precompute(_cfg(out, spm, task="test_red", num_examples=50), encoder)
  entry = manifest["splits"]["train"]
  assert entry["num_records"] == 50 and entry["num_source_examples"] == 50
  assert entry["task_records"] == {"test_red": 50} and entry["skipped"] == {}
  assert not entry["stream_exhausted"]
  assert manifest["source"]["kind"] == "task" and manifest["source"]["name"] == "test_red"
  want = _task_tokens(red)
  recs = _records(out)
  assert [r["key"] for r in recs] == [f"test_red-{i:04d}" for i in range(50)]
  for r in recs:
    np.testing.assert_array_equal(r["tokens"], want[r["caption"]])
    assert (r["image_height"], r["image_width"]) == (8, 8)
  # The embedding is the encoder's of those very tokens.
  padded = np.zeros((2, LENGTH), np.int32)
  padded[0, : len(recs[7]["tokens"])] = recs[7]["tokens"]
  emb, _ = encoder.encode_tokens(padded)
  np.testing.assert_allclose(
    np.asarray(recs[7]["embedding"], np.float32),
    np.asarray(emb[0, : len(recs[7]["tokens"])]),
    rtol=1e-2,
    atol=1e-2,
  )

  # A Mixture at 3:1 into one set of shards.
  n = 200
  out = tmp_path / "mix"
  cfg = _cfg(out, spm, mixture="test_mix", num_examples=n, seed=3)
  manifest = precompute.run_precompute(cfg, encoder)
  entry = manifest["splits"]["train"]
  counts = entry["task_records"]
  print(f"\nmixture {n} examples at 3:1 -> {counts}")
  assert sum(counts.values()) == entry["num_records"] == n
  # Each draw is task red with p = 3/4 (seqio samples independently per example), so the red
  # count is Binomial(n, 3/4): sd = sqrt(n p (1-p)) = 6.1; 4 sd keeps a false failure < 1e-4.
  p = 0.75
  assert abs(counts["test_red"] - n * p) <= 4 * np.sqrt(n * p * (1 - p)), counts
  assert manifest["source"]["rates"] == {"test_blue": 1.0, "test_red": 3.0}
  assert manifest["source"]["kind"] == "mixture"

  recs = _records(out)
  assert len({r["key"] for r in recs}) == n
  tokens = {**_task_tokens(red), **_task_tokens(blue)}
  truncated = 0
  for r in recs:
    task, _, key = r["key"].partition("/")
    assert key.startswith(task + "-")
    np.testing.assert_array_equal(r["tokens"], tokens[r["caption"]])
    assert r["tokens"][-1] == vocabulary.EOS_ID
    truncated += len(r["tokens"]) == LENGTH
  assert truncated > 0  # some blue captions were cut, keeping their EOS
  # Same order as seqio's own Mixture.get_dataset with this seed.
  ds = mix.get_dataset(
    sequence_length={"text_tokens": LENGTH},
    split="train",
    shuffle=False,
    seed=3,
    num_epochs=1,
    use_cached=False,
    passthrough_features=["caption"],
  )
  seqio_captions = [ex["caption"].decode() for ex in ds.take(n).as_numpy_iterator()]
  assert [r["caption"] for r in recs] == seqio_captions

  # A rerun with the same flags is a no-op check; another seed is refused.
  again = precompute.run_precompute(_cfg(out, spm, mixture="test_mix", num_examples=n, seed=3))
  assert again["stats"]["shards_skipped"] == 5 and again["stats"]["shards_written"] == 0
  with pytest.raises(errors.UserError, match=r"--seed=3 then, 4 now"):
    precompute.run_precompute(_cfg(out, spm, mixture="test_mix", num_examples=n, seed=4))


def test_a_user_module_registers_the_task(tmp_path, spm, capsys, monkeypatch):
  module = "user_tasks_for_precompute"
  (tmp_path / f"{module}.py").write_text(
    f'''"""A user's tasks module, as t5x users write them."""
import seqio
import tensorflow as tf

from imagen_jax.data import tasks
from imagen_jax.text import vocabulary

CAPTIONS = {_captions(0, 12)!r}


def _dataset(split, shuffle_files, seed=None):
  images = tf.zeros([len(CAPTIONS), 8, 8, 3], tf.uint8)
  return tf.data.Dataset.from_tensor_slices({{"caption": CAPTIONS, "image": images}})


seqio.TaskRegistry.add(
  "user_captions",
  source=seqio.FunctionDataSource(_dataset, splits=["train"]),
  preprocessors=tasks.token_preprocessors(),
  output_features=tasks.output_features(vocabulary.load_vocabulary({spm!r})),
)
'''
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  out = tmp_path / "out"
  argv = [
    "precompute",
    "--task=user_captions",
    f"--module={module}",
    f"--out={out}",
    f"--vocab={spm}",
    "--t5_size=tiny",
    f"--max_length={LENGTH}",
    "--examples_per_shard=5",
    "--batch_size=8",
    "--no_progress",
  ]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "train: 12 examples taken from user_captions" in printed, printed
  manifest = shards.read_manifest(str(out))
  assert manifest["source"]["modules"] == [module]
  assert f"--module={module}" in manifest["command"]
  assert manifest["splits"]["train"]["shard_records"] == [5, 5, 2]
  recs = _records(out)
  # No key feature: the stream position is the key.
  assert [r["key"] for r in recs] == [str(i) for i in range(12)]
  assert [r["caption"] for r in recs] == _captions(0, 12)
  seqio_module = sys.modules["seqio"]
  seqio_module.TaskRegistry.remove("user_captions")


def _write_webdataset(root):
  """3 tar shards, 26 member groups: 22 good (png / jpg / webp, some with json), one corrupt
  image, one without caption, one caption without image (the very last: a tail skip), one 4x4
  image that --min_image_size=8 filters."""
  os.makedirs(root)
  captions = iter(_captions(0, 30))
  good = {}

  def sample(key, colour, fmt="PNG", ext="png", meta=True, size=(12, 10)):
    cap = next(captions)
    good[key] = (cap, colour, size)
    members = [(f"{key}.{ext}", _png(colour, size, fmt)), (f"{key}.txt", cap.encode())]
    if meta:
      members.append((f"{key}.json", json.dumps({"key": key, "url": "x"}).encode()))
    return members

  t0 = []
  for i in range(8):
    t0 += sample(f"{i:06d}", 10 * i, meta=i % 2 == 0)
  t1 = []
  for i in range(8, 11):
    t1 += sample(f"{i:06d}", 10 * i, "JPEG", "jpg")
  t1 += [("000011.jpg", b"\xff\xd8\xff this is no jpeg"), ("000011.txt", b"a corrupt image")]
  t1 += [("000012.png", _png(50))]  # no caption
  for i in range(13, 16):
    t1 += sample(f"{i:06d}", 10 * i, "WEBP", "webp", meta=False)
  t2 = []
  for i in range(16, 20):
    t2 += sample(f"{i:06d}", 10 * i)
  t2 += [("000020.png", _png(200, (4, 4))), ("000020.txt", b"a tiny image")]  # filtered
  for i in range(21, 25):
    t2 += sample(f"{i:06d}", 10 * i)
  t2 += [("000025.txt", b"a caption without its image")]
  for n, members in enumerate((t0, t1, t2)):
    webdataset.write_tar(f"{root}/{n:05d}.tar", members)
  return good


def _wds_cmd(out, src, spm):
  return [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "precompute",
    "--source=webdataset",
    f"--source_dir={src}",
    "--min_image_size=8",
    f"--out={out}",
    f"--vocab={spm}",
    "--t5_size=tiny",
    f"--max_length={LENGTH}",
    "--examples_per_shard=4",
    "--batch_size=8",
    "--no_progress",
  ]


def _complete(out):
  return sorted(
    n for n in os.listdir(out) if n.endswith(".tfrecord") and shards.shard_is_complete(f"{out}/{n}")
  )


def test_webdataset_skips_and_counts_and_survives_sigkill(tmp_path, spm, capsys):
  src, out = str(tmp_path / "wds"), str(tmp_path / "out")
  good = _write_webdataset(src)
  assert len(good) == 22
  env = shard_hooks.env(1.0, dict(os.environ, JAX_PLATFORMS="cpu"))
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  proc = subprocess.Popen(
    [*_wds_cmd(out, src, spm), shard_hooks.FLAG],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  deadline = time.time() + 150
  k = 2
  while time.time() < deadline and (not os.path.isdir(out) or len(_complete(out)) < k):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = _complete(out)
  # 22 examples (26 groups - 3 skipped - 1 filtered) in shards of 4: 6 shards.
  assert k <= len(done) < 6, done
  assert not os.path.exists(f"{out}/{shards.MANIFEST}")
  mtimes = {n: os.stat(f"{out}/{n}").st_mtime_ns for n in done}
  print(f"\nkilled after {len(done)} of 6 shards")

  assert cli.main(_wds_cmd(out, src, spm)[3:]) == 0
  printed = [line for line in capsys.readouterr().out.splitlines() if "precompute:" in line]
  print("\n".join(printed))
  assert f"{len(done)} already complete" in printed[0]
  assert printed[1] == (
    "precompute: train: 22 examples taken from imagen_webdataset; records per task: "
    "imagen_webdataset 22; skipped: filtered 1, missing_caption 1, missing_image 1, "
    "undecodable_image 1"
  )
  for n, t in mtimes.items():
    assert os.stat(f"{out}/{n}").st_mtime_ns == t, n
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  manifest = shards.read_manifest(out)
  entry = manifest["splits"]["train"]
  assert entry["num_records"] == 22 and entry["shard_records"] == [4, 4, 4, 4, 4, 2]
  assert entry["stream_exhausted"]
  assert entry["skipped"] == {
    "undecodable_image": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "filtered": 1,
  }
  assert manifest["flags"]["min_image_size"] == 8
  # The recorded command repeats the job: a plain check of the six shards, nothing rewritten.
  print("manifest command:", manifest["command"])
  assert "--source=webdataset" in manifest["command"]
  assert cli.main(shlex.split(manifest["command"])[1:] + ["--no_progress", "--verify"]) == 0
  assert "(0 rewritten as bad), 6 already complete (CRC-verified)" in capsys.readouterr().out

  recs = _records(out)
  keys = [r["key"] for r in recs]
  assert len(keys) == len(set(keys)) == 22  # no duplicates after the kill and resume
  assert keys == sorted(good)  # every good group once, in tar order
  for r in recs:
    cap, colour, (h, w) = good[r["key"]]
    assert r["caption"] == cap
    assert (r["image_height"], r["image_width"]) == (h, w)
    pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), np.int32)
    assert np.abs(pixels - colour).max() <= 8  # jpg / webp are lossy
  # Where the skips fell: the stretch before 000013 (shard 2) and the tail (shard 5).
  sidecars = [shards.load_shard_meta(f"{out}/{n}") for n in entry["shards"]]
  assert sidecars[2]["skipped"] == {"undecodable_image": 1, "missing_caption": 1}
  assert sidecars[4]["skipped"] == {"filtered": 1}
  assert sidecars[5]["skipped"] == {"missing_image": 1}


def test_bad_task_input_is_one_line(tmp_path, spm, capsys, monkeypatch):
  (tmp_path / "broken_tasks_mod.py").write_text("raise RuntimeError('boom')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "notes.txt").write_text("no tars here")
  out = tmp_path / "new" / "out"
  base = ["precompute", f"--out={out}", f"--vocab={spm}", "--no_progress"]
  wds = ["--source=webdataset", f"--source_dir={tmp_path / 'empty'}"]
  cases = [
    (
      ["--task=no_such_task"],
      r"--task='no_such_task' is not a registered seqio Task or Mixture; fix: register it in a "
      r"module passed with --module=MODULE, or pick one of .*imagen_shapes",
    ),
    (
      ["--task=imagen_shapes", "--module=broken_tasks_mod"],
      r"--module=broken_tasks_mod failed to import \(RuntimeError: boom\); fix: make",
    ),
    (
      ["--task=imagen_shapes", "--module=no_such_module_here"],
      r"--module=no_such_module_here failed to import \(ModuleNotFoundError: ",
    ),
    (
      ["--task=imagen_shapes", "--after_shard=broken_tasks_mod:f"],
      r"--after_shard=broken_tasks_mod failed to import \(RuntimeError: boom\); fix: make",
    ),
    (["--task=imagen_shapes", "--after_shard=json"], r"--after_shard='json' is not MODULE:FUN"),
    (
      ["--task=imagen_shapes", "--after_shard=json:no_such_fn"],
      r"--after_shard: module 'json' has no function 'no_such_fn'; fix: name one it defines",
    ),
    (wds, r"imagen_webdataset: no \.tar shards in .*empty' \(--source_dir\); fix: pass a dir"),
    (["--source=webdataset"], r"no --source_dir given; fix: pass --source_dir"),
    (["--task=imagen_shapes", "--source=shapes"], r"--source and --task given together; fix:"),
    ([], r"no data given; fix: pass exactly one of --source, --task, --mixture"),
    (["--mixture=imagen_shapes"], r"--mixture='imagen_shapes' is a Task; fix: pass --task="),
    ([*wds, "--split=validation"], r"--split=validation is not a split of --source=webdataset"),
    ([*wds, "--max_aspect_ratio=0.5"], r"--max_aspect_ratio=0.5 is below 1"),
    (["--task=imagen_image_text_folder"], r"needs a folder; --source_dir=None is not one"),
    (
      ["--task=imagen_coco_captions", f"--tfds_data_dir={tmp_path}"],
      r"imagen_coco_captions: no prepared TFDS dataset",
    ),
  ]
  for flags, pattern in cases:
    cli_helpers.user_error(capsys, [*base, *flags], pattern)
  assert not (tmp_path / "new").exists()  # nothing written by any of them


def test_task_imagen_shapes_holds_what_source_shapes_holds(tmp_path, spm, encoder):
  flags = dict(num_examples=12, num_validation=0, resolution=16, examples_per_shard=5)
  direct = precompute.run_precompute(_cfg(tmp_path / "a", spm, source="shapes", **flags), encoder)
  seqio_run = precompute.run_precompute(
    _cfg(tmp_path / "b", spm, task="imagen_shapes", **flags), encoder
  )
  assert direct["splits"]["train"]["shard_records"] == [5, 5, 2]
  assert seqio_run["splits"]["train"]["shard_records"] == [5, 5, 2]
  a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
  # Both in TFDS's on-disk order.
  assert [r["key"] for r in a] == [r["key"] for r in b]
  assert sorted(r["key"] for r in a) == [f"train_{i:08d}" for i in range(12)]
  for x, y in zip(a, b):
    assert (x["caption"], x["image"]) == (y["caption"], y["image"])  # the stored PNG bytes
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(np.asarray(x["embedding"]), np.asarray(y["embedding"]))


def test_two_hosts_and_verify_on_a_webdataset_task(tmp_path, spm, encoder, caplog):
  src, out = str(tmp_path / "wds"), tmp_path / "out"
  good = _write_webdataset(src)
  flags = dict(source="webdataset", source_dir=src, min_image_size=8, examples_per_shard=4)
  # Host 1 first: it plans the same 6 shards alone and writes the odd ones.
  one = precompute.run_precompute(
    _cfg(out, spm, process_index=1, process_count=2, **flags), encoder
  )
  assert one["splits"]["train"]["shard_records"] == [None, 4, None, 4, None, 2]
  assert one["splits"]["train"]["skipped"] is None  # host 0's shards are not there yet
  zero = precompute.run_precompute(
    _cfg(out, spm, process_index=0, process_count=2, **flags), encoder
  )
  entry = zero["splits"]["train"]
  assert entry["shard_records"] == [4, 4, 4, 4, 4, 2]
  assert sum(entry["skipped"].values()) == 4 and entry["task_records"] == {"imagen_webdataset": 22}
  assert [r["key"] for r in _records(out)] == sorted(good)
  assert "--process_count=2" in zero["command"] and "--source=webdataset" in zero["command"]

  # One flipped byte in host 0's shard 2: a --verify rerun by host 0 rewrites exactly it.
  path = out / entry["shards"][2]
  good_bytes = path.read_bytes()
  meta = shards.load_shard_meta(str(path))
  with open(path, "r+b") as f:
    f.seek(meta["offsets"][1] + 30)
    byte = f.read(1)
    f.seek(meta["offsets"][1] + 30)
    f.write(bytes([byte[0] ^ 0xFF]))
  again = precompute.run_precompute(
    _cfg(out, spm, process_index=0, process_count=2, verify=True, **flags), encoder
  )
  assert [name for name, _ in again["stats"]["rewritten"]] == [entry["shards"][2]]
  assert again["stats"]["shards_skipped"] == 2
  assert path.read_bytes() == good_bytes
  assert shards.load_shard_meta(str(path))["skipped"] == {
    "undecodable_image": 1,
    "missing_caption": 1,
  }


def _fake_coco(data_dir):
  """A prepared TFDS 'coco_captions' with coco's feature layout: image, image/id, captions."""
  import tensorflow_datasets as tfds

  class CocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.1.0")

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/id": tfds.features.Scalar(np.int64),
            "captions": tfds.features.Sequence(
              {"id": tfds.features.Scalar(np.int64), "text": tfds.features.Text()}
            ),
          }
        )
      )

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        texts = _captions(10 * i, i + 1)  # 1, 2 and 3 captions
        yield (
          i,
          {
            "image": np.full((16, 12, 3), 60 * i, np.uint8),
            "image/id": 100 + i,
            "captions": [{"id": j, "text": t} for j, t in enumerate(texts)],
          },
        )

  CocoCaptions.name = "coco_captions"
  builder = CocoCaptions(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def test_imagen_coco_captions_gives_one_example_per_caption(tmp_path, spm, encoder):
  _fake_coco(str(tmp_path / "tfds"))
  cfg = _cfg(
    tmp_path / "out", spm, task="imagen_coco_captions", tfds_data_dir=str(tmp_path / "tfds")
  )
  manifest = precompute.run_precompute(cfg, encoder)
  assert manifest["splits"]["train"]["num_records"] == 6
  recs = {r["key"]: r for r in _records(tmp_path / "out")}
  assert sorted(recs) == ["100/0", "101/0", "101/1", "102/0", "102/1", "102/2"]
  for i in range(3):
    for j, text in enumerate(_captions(10 * i, i + 1)):
      r = recs[f"{100 + i}/{j}"]
      assert r["caption"] == text and (r["image_height"], r["image_width"]) == (16, 12)
      assert r["image"][:2] == b"\xff\xd8"  # the stored JPEG, not decoded and re-encoded
