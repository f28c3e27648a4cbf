"""The precompute job for real: tiny shapes, a SentencePiece model trained here, tiny random T5.

The resume tests run `imagen-jax precompute` in a subprocess, SIGKILL it after k shards (or in
the middle of a repair), rerun it and check that finished shards were not rewritten and the
output is complete and unique. The repair tests damage real shard files byte by byte.
"""

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from imagen_jax import cli
from imagen_jax.data import input_pipeline, precompute, records, shapes, shards
from imagen_jax.inference import cascade
from imagen_jax.text import vocabulary
from tests import cli_helpers, shard_hooks

NUM, PER_SHARD, RES, LENGTH = 64, 8, 16, 16


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  captions = [shapes.caption(shapes.example_spec(0, "train", i)) for i in range(300)]
  return vocabulary.train_sentencepiece(
    captions, str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=64
  )


def _cmd(out, spm, num_validation=8):
  return [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "precompute",
    "--source=shapes",
    f"--out={out}",
    f"--vocab={spm}",
    "--t5_checkpoint=random",
    "--t5_size=tiny",
    f"--max_length={LENGTH}",
    f"--examples_per_shard={PER_SHARD}",
    f"--num_examples={NUM}",
    f"--num_validation={num_validation}",
    f"--resolution={RES}",
    "--batch_size=8",
    "--no_progress",
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


def test_precompute_survives_sigkill_and_resumes(tmp_path, spm, capsys, monkeypatch):
  out = str(tmp_path / "out")
  k = 2
  proc = subprocess.Popen(
    [*_cmd(out, spm), shard_hooks.FLAG],
    env=shard_hooks.env(0.5, _env()),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
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

  # The rerun goes through the same CLI entry point, in this process (saves a JAX start-up),
  # with an --after_shard hook that records each shard it is called with.
  (tmp_path / "shard_recorder.py").write_text(
    "from imagen_jax.data import shards\n"
    "seen = []\n"
    "def record(path):\n"
    "  seen.append((path, shards.shard_is_complete(path)))\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  assert cli.main([*_cmd(out, spm)[3:], "--after_shard=shard_recorder:record"]) == 0
  summary = [line for line in capsys.readouterr().out.splitlines() if "precompute:" in line]
  print("rerun:", summary[-1])
  assert f"{len(done)} already complete" in summary[-1]
  import shard_recorder

  recorded = [os.path.basename(p) for p, _ in shard_recorder.seen]
  assert all(complete for _, complete in shard_recorder.seen)  # called once the shard is whole
  assert recorded and recorded == sorted(set(_complete(out)) - set(done))  # each new one, once

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


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


def _edit_sidecar(path, edit):
  with open(path + ".json") as f:
    meta = json.load(f)
  edit(meta)
  with open(path + ".json", "w") as f:
    json.dump(meta, f)


def _snapshot(out):
  """{name: (bytes, mtime)} of every shard file and sidecar."""
  snap = {}
  for n in sorted(os.listdir(out)):
    if ".tfrecord" in n and ".tmp-" not in n:
      with open(f"{out}/{n}", "rb") as f:
        snap[n] = (f.read(), os.stat(f"{out}/{n}").st_mtime_ns)
  return snap


def _all_keys(out):
  keys = []
  for n in sorted(n for n in os.listdir(out) if n.endswith(".tfrecord")):
    for payload in tf.compat.v1.io.tf_record_iterator(f"{out}/{n}"):
      keys.append(shards.decode_record(payload, 64)["key"])
  return keys


def _rewrites(caplog):
  """{shard name: reason} of the 'rewriting' log lines (one line per shard)."""
  lines = [r.getMessage() for r in caplog.records if "precompute: rewriting" in r.getMessage()]
  got = dict(re.match(r"precompute: rewriting (\S+): (.*)", line).groups() for line in lines)
  assert len(got) == len(lines), lines
  return got


def test_first_run_without_validation_is_quiet_and_keeps_its_vocabulary(tmp_path, spm, capfd):
  out = str(tmp_path / "out")
  capfd.readouterr()
  assert cli.main(_cmd(out, spm, num_validation=0)[3:]) == 0
  captured = capfd.readouterr()
  # --no_progress: neither our bar nor TFDS's ("Generating splits...: 100%|███| ...").
  for bar in ("%|", "it/s]", "ex/s]", "Generating splits", "Shuffling"):
    assert bar not in captured.err, captured.err[-2000:]
  assert "0 rewritten as bad" in captured.out

  # --num_validation=0: no validation split anywhere, and the manifest says so.
  with open(f"{out}/{shards.MANIFEST}") as f:
    manifest = json.load(f)
  assert manifest["source"]["splits"] == ["train"]
  assert list(manifest["splits"]) == ["train"]
  assert manifest["flags"]["num_validation"] == 0
  assert not [n for n in os.listdir(out) if n.startswith("validation")]
  # ... and training reads it.
  it = input_pipeline.make_train_iterator(
    out, batch_size=4, resolution=RES, max_length=LENGTH, process_index=0, process_count=1
  )
  assert next(it)["text_emb"].shape == (4, LENGTH, 64)

  # The vocabulary sits beside the data: `sample` finds it from the data dir alone.
  assert manifest["vocab_files"] == [os.path.basename(spm), os.path.basename(spm)[:-6] + ".vocab"]
  found = cascade.find_vocabulary(cascade.encoder_reference_from_data(out))
  assert found == os.path.join(out, os.path.basename(spm))
  assert vocabulary.file_sha256(found) == vocabulary.file_sha256(spm)
  assert os.path.isfile(found[:-6] + ".vocab")


def test_old_none_spelling_of_random_weights_still_works_and_resumes(tmp_path, spm, caplog):
  """'random' is the one spelling (as in encode and sample); 'none' warns and means the same,
  and a manifest an older version wrote with 'none' resumes under the new spelling."""
  out = tmp_path / "out"
  argv = _cmd(out, spm, num_validation=0)[3:]
  old = [a if a != "--t5_checkpoint=random" else "--t5_checkpoint=none" for a in argv]
  with caplog.at_level(logging.WARNING):
    assert cli.main(old) == 0
  assert "--t5_checkpoint=none is deprecated; spell it --t5_checkpoint=random" in caplog.text
  manifest_path = out / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  assert manifest["flags"]["t5_checkpoint"] == "random"
  manifest["flags"]["t5_checkpoint"] = "none"  # as the old version wrote it
  manifest_path.write_text(json.dumps(manifest))
  before = _snapshot(out)
  assert before
  assert cli.main(argv) == 0  # same flags: nothing to redo, no "other flags" refusal
  assert _snapshot(out) == before  # no shard rewritten


def test_rerun_rewrites_exactly_the_bad_shards(tmp_path, spm, caplog, capsys):
  caplog.set_level(logging.WARNING, logger="imagen_jax.data.precompute")
  out = str(tmp_path / "out")
  argv = _cmd(out, spm)[3:]
  assert cli.main(argv) == 0
  capsys.readouterr()
  good = _snapshot(out)
  name = [shards.shard_name("train", s, NUM // PER_SHARD) for s in range(NUM // PER_SHARD)]
  path = [f"{out}/{n}" for n in name]

  # Damage five shards five ways. Shard 1: one payload byte (same size: only CRCs see it).
  meta1 = shards.load_shard_meta(path[1])
  _flip_byte(path[1], meta1["offsets"][3] + 40)
  with open(path[3], "ab") as f:  # 3: bytes appended (a botched copy)
    f.write(b"junk!")
  _edit_sidecar(path[5], lambda m: m["offsets"].__setitem__(0, 7))  # 5: index broken

  def drop_last(m):
    m["offsets"].pop()
    m["num_records"] -= 1

  _edit_sidecar(path[6], drop_last)  # 6: self-consistent index, record count != manifest's
  os.remove(path[7] + ".json")  # 7: sidecar gone
  damaged = _snapshot(out)

  # A plain rerun: the cheap checks find 3, 5, 6 and 7 and rewrite only those.
  caplog.clear()
  assert cli.main(argv) == 0
  got = _rewrites(caplog)
  print("\nrerun rewrote:", json.dumps(got, indent=1))
  size3 = len(good[name[3]][0])
  assert got == {
    name[3]: f"it is {size3 + 5} bytes but its sidecar says {size3}",
    name[5]: "its sidecar is corrupt: its offsets are not the index of a TFRecord file of "
    "that size",
    name[6]: "its sidecar counts 7 records, the manifest 8",
    name[7]: "its sidecar is missing",
  }
  assert "(4 rewritten as bad), 4 already complete (checked)" in capsys.readouterr().out
  now = _snapshot(out)
  for n in (name[0], name[2], name[4], name[1]):
    assert now[n] == damaged[n], f"{n} was rewritten"  # shard 1 still corrupt: CRCs unread
  for n in (name[3], name[5], name[6], name[7]):
    assert now[n][0] == good[n][0] and now[f"{n}.json"][0] == good[f"{n}.json"][0]

  # Training names the shard, the repair command (the manifest's, with --verify) and the knob.
  it = input_pipeline.make_train_iterator(
    out,
    batch_size=8,
    resolution=RES,
    max_length=LENGTH,
    process_index=0,
    process_count=1,
    max_corrupt_fraction=0.0,
  )
  with pytest.raises(records.CorruptDataError) as e:
    for _ in range(NUM // 8):
      next(it)
  msg = str(e.value)
  print("training error:", msg)
  assert "\n" not in msg and path[1] in msg and "--gin.MAX_CORRUPT_FRACTION=0.04" in msg
  repair = re.search(r"rerun `(imagen-jax precompute [^`]*--verify)`", msg).group(1)

  # That very command repairs shard 1, and nothing else.
  caplog.clear()
  assert cli.main(shlex.split(repair)[1:] + ["--no_progress"]) == 0
  got = _rewrites(caplog)
  assert list(got) == [name[1]] and re.match(r"record 3 \(byte \d+\) fails its CRC", got[name[1]])
  assert "(1 rewritten as bad), 7 already complete (CRC-verified)" in capsys.readouterr().out
  final = _snapshot(out)
  assert {n: b for n, (b, _) in final.items()} == {n: b for n, (b, _) in good.items()}
  for n in final:
    if n not in (name[1], name[1] + ".json"):
      assert final[n][1] == now[n][1], f"{n} was rewritten"
  assert sorted(_all_keys(out)) == [f"train_{i:08d}" for i in range(NUM)]

  # All good now: --verify rewrites nothing (and needs no encoder: nothing to encode).
  caplog.clear()
  assert cli.main([*argv, "--verify"]) == 0
  assert _rewrites(caplog) == {}
  assert "(0 rewritten as bad), 8 already complete (CRC-verified)" in capsys.readouterr().out
  assert _snapshot(out) == final


def test_sigkill_during_a_repair_leaves_what_a_rerun_repairs(tmp_path, spm, capsys):
  out = str(tmp_path / "out")
  assert cli.main(_cmd(out, spm)[3:]) == 0
  good = _snapshot(out)
  bad = [f"{out}/{shards.shard_name('train', s, NUM // PER_SHARD)}" for s in (2, 5)]
  for p in bad:
    _flip_byte(p, shards.load_shard_meta(p)["offsets"][1] + 30)

  # The repair writes shard 2, then sleeps: killed there, shard 5 is still to be rewritten.
  # The test's own XLA settings: the subprocess then encodes bit for bit as this process does.
  proc = subprocess.Popen(
    [*_cmd(out, spm), shard_hooks.FLAG, "--verify"],
    env=shard_hooks.env(3),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  deadline = time.time() + 120
  name2 = os.path.basename(bad[0])

  def repaired(p):
    return shards.shard_problem(p, check_crc=True) is None

  while time.time() < deadline and (os.path.exists(bad[1]) or not os.path.exists(bad[0])):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.02)
  while time.time() < deadline and not (os.path.exists(bad[0]) and repaired(bad[0])):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  log = proc.stdout.read().decode()
  assert f"rewriting {name2}: record 1" in log, log[-3000:]
  assert shards.shard_is_complete(bad[0]) and not os.path.exists(bad[1])
  print(f"\nkilled mid-repair: {name2} rewritten, {os.path.basename(bad[1])} not yet")

  # A plain rerun (no --verify) finishes the repair: the killed shard reads as unfinished.
  assert cli.main(_cmd(out, spm)[3:]) == 0
  summary = capsys.readouterr().out
  assert "1 shards written (0 rewritten as bad), 7 already complete" in summary, summary
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  final = _snapshot(out)
  assert sorted(final) == sorted(good)
  for n in final:
    if n == name2:  # rewritten by the other process: protobuf may order its fields differently
      _assert_same_records(f"{out}/{n}", good[n][0], tmp_path)
    elif n != name2 + ".json":
      assert final[n][0] == good[n][0], n
  assert sorted(_all_keys(out)) == [f"train_{i:08d}" for i in range(NUM)]


def _assert_same_records(path, want_bytes, tmp_path):
  want_path = str(tmp_path / "want.tfrecord")
  with open(want_path, "wb") as f:
    f.write(want_bytes)
  got = list(tf.compat.v1.io.tf_record_iterator(path))
  want = list(tf.compat.v1.io.tf_record_iterator(want_path))
  assert len(got) == len(want)
  for a, b in zip(got, want):
    a, b = shards.decode_record(a, 64), shards.decode_record(b, 64)
    assert (a["key"], a["caption"], a["image"]) == (b["key"], b["caption"], b["image"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(np.asarray(a["embedding"], np.float32), b["embedding"])


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
  assert manifest["splits"]["train"]["shard_records"] == [None, 5]
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


def test_precompute_bad_arguments_fail_before_anything_is_written(tmp_path, spm, capsys):
  out = tmp_path / "new" / "out"
  base = ["precompute", "--source=shapes", f"--out={out}", f"--vocab={spm}", "--no_progress"]
  cases = [
    ([f"--vocab={tmp_path / 'x.model'}"], r"--vocab=.*x\.model.*no such SentencePiece"),
    (["--examples_per_shard=0"], r"--examples_per_shard=0 is out of range; fix: pass"),
    (["--source=image_text_folder"], r"--source_dir=None is not one; fix: pass --source_dir"),
    ([f"--t5_checkpoint={tmp_path / 'ckpt'}"], r"--t5_checkpoint=.*ckpt' does not exist"),
    (["--t5_size=huge"], r"--t5_size='huge' is not a T5 size; fix: pass one of tiny, small"),
    (["--num_validation=-1"], r"--num_validation=-1 is out of range for shapes"),
    (["--resolution=4"], r"--resolution=4 is out of range for shapes; fix: pass --resolution=8"),
    (
      ["--num_validation=0", "--split=train", "--split=validation"],
      r"--split=validation is not a split of --source=shapes \(--num_validation=0\); fix: "
      "pick from train",
    ),
    (["--process_index=2", "--process_count=2"], r"--process_index=2 is not in \[0, "),
    (["--batch_size=0"], r"--batch_size=0 is out of range"),
    (["--source=coco_captions", f"--tfds_data_dir={tmp_path / 'tfds'}"], r"does not exist"),
    (["--source=coco_captions", f"--tfds_data_dir={tmp_path}"], r"no prepared TFDS dataset"),
  ]
  for flags, pattern in cases:
    cli_helpers.user_error(capsys, [*base, *flags], pattern)
  # An --out that cannot be a directory: below a regular file.
  (tmp_path / "file").write_text("x")
  cli_helpers.user_error(
    capsys,
    [*base, f"--out={tmp_path / 'file' / 'out'}"],
    r"--out=.*cannot be created in .*file \(not a writable directory\); fix: choose",
  )
  assert not (tmp_path / "new").exists()  # nothing written by any of them

  # --out holding shards of other flags: a rerun would mix two datasets.
  cfg = precompute.PrecomputeConfig(source="shapes", out=str(out), vocab=spm, max_length=LENGTH)
  out.mkdir(parents=True)
  manifest = {"format": shards.FORMAT, "flags": precompute.shard_flags(cfg), "command": "CMD"}
  (out / shards.MANIFEST).write_text(json.dumps(manifest))
  line = cli_helpers.user_error(
    capsys,
    [*base, "--max_length=32"],
    r"holds shards precomputed with other flags \(--max_length=16 then, 32 now\); fix: rerun "
    r"with the original flags \(CMD\) or choose a new --out",
  )
  assert sorted(os.listdir(out)) == [shards.MANIFEST], line


def test_plan_shards_gives_every_process_a_shard():
  plan = precompute.plan_shards(10, 8, 4)
  assert [len(r) for r in plan] == [3, 3, 3, 1]
  assert sum((list(r) for r in plan), []) == list(range(10))
  assert [len(r) for r in precompute.plan_shards(64, 8, 1)] == [8] * 8
  with pytest.raises(ValueError, match="3 examples cannot give each of 4"):
    precompute.plan_shards(3, 8, 4)


def test_rerun_command_keeps_the_after_shard_hook(tmp_path, spm):
  """The manifest's command repeats the job on every host, hook included; without one it
  names none."""
  base = precompute.PrecomputeConfig(out=str(tmp_path / "out"), vocab=spm, source="shapes")
  hooked = precompute.PrecomputeConfig(
    out=str(tmp_path / "out"), vocab=spm, source="shapes", after_shard="my_hooks:upload"
  )
  assert "--after_shard" not in precompute.command(base)
  assert precompute.command(hooked) == precompute.command(base) + " --after_shard=my_hooks:upload"
