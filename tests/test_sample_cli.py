"""`imagen-jax sample` for long runs: flag checks before any model loads, streaming batches,
an index that survives Ctrl-C, and reruns that continue where the last one stopped.

The stage dirs are the tiny random-weight MODEL_DIRs of tests/test_cli.py (base16 -> sr32).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from imagen_jax import cli, images
from imagen_jax.cli import sample as sample_cli
from imagen_jax.inference import bundle as export
from imagen_jax.inference import cascade
from tests import cli_helpers, test_cli

# test_cli's module-scoped tiny stage dirs (base16 -> sr32), built once for this module too.
stage_dirs = test_cli.stage_dirs

PROMPTS = ("a large red circle on a white background", "a small blue square on a gray background")


def _argv(dirs: list[str], out, *extra: str) -> list[str]:
  return [
    "sample",
    f"--stage_dirs={','.join(dirs)}",
    *(f"--prompt={p}" for p in PROMPTS),
    "--prompt=",
    "--num_per_prompt=2",  # 6 images
    "--batch_size=2",  # in 3 batches
    "--steps=2",
    "--guidance=2,1",
    "--seed=3",
    f"--out={out}",
    "--no_progress",
    *extra,
  ]


def _listing(out) -> list[str]:
  return sorted(os.listdir(out))


def _index_files(out) -> list[str]:
  with open(os.path.join(out, "index.json")) as f:
    return [e["file"] for e in json.load(f)["images"]]


def _pixels(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im)


_LOADED: dict[str, cascade.Cascade] = {}


@pytest.fixture(autouse=True)
def load_each_source_once(monkeypatch):
  """These tests rerun `sample` on the same stage dirs many times; each loads them once (the
  load itself is the same code path whether cached or not, and test_cli covers it too)."""
  real_load = sample_cli._load_model

  def load(args, source):
    key = json.dumps(source, sort_keys=True)
    if key not in _LOADED:
      _LOADED[key] = real_load(args, source)
    return _LOADED[key]

  monkeypatch.setattr(sample_cli, "_load_model", load)


@pytest.fixture
def no_model_loads(monkeypatch):
  """Fails the test if `sample` loads a model (stage dirs or bundle)."""

  def load(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(sample_cli, "_load_model", load)
  monkeypatch.setattr(cascade.Cascade, "from_stage_dirs", load)
  monkeypatch.setattr(export, "load_bundle", load)


@pytest.fixture
def fake_bundle(tmp_path):
  # Only the manifest is read before loading; the load itself is patched out (no_model_loads).
  bundle = tmp_path / "bundle"
  bundle.mkdir()
  stages = [{"dir": "stages/0_base16", "name": "base16"}, {"dir": "stages/1_sr32", "name": "sr32"}]
  (bundle / "manifest.json").write_text(json.dumps({"format_version": 1, "stages": stages}))
  return str(bundle)


BAD_FLAGS = [
  ("--guidance=-3", r"--guidance='-3': guidance_weight=-3\.0 is invalid.*1 = no guidance.*larger"),
  ("--guidance=2,-1", r"--guidance='2,-1' \(stage 2\): guidance_weight=-1\.0"),
  ("--guidance=nan", r"guidance_weight=nan is invalid"),
  ("--steps=0", r"--steps='0': num_steps=0 is invalid"),
  ("--steps=4,x", r"--steps='4,x': 'x' is not an integer"),
  ("--steps=1,2,3", r"one value or one per stage \(2 stages\)"),
  ("--eta=2", r"--eta='2': eta=2\.0 is out of range"),
  ("--percentile=0", r"--percentile='0': percentile=0\.0 is out of range"),
  ("--aug_level=1,2", r"--aug_level='1,2' \(stage 2\): aug_level=2\.0"),
  ("--sampler=euler", r"--sampler='euler': sampler='euler' is not supported"),
  ("--thresholding=clip", r"--thresholding='clip': thresholding='clip' is not supported"),
  ("--num_per_prompt=0", r"--num_per_prompt=0: must be >= 1"),
  ("--batch_size=0", r"--batch_size=0: must be >= 1"),
  ("--seed=-1", r"--seed=-1 .*seed -1 is outside \[0, 4294967295\]"),
  ("--seed=4294967295", r"seeds 4294967295\.\.4294967297: seed 4294967297 is outside"),
  ("--stop_after=3", r"--stop_after=3: must be between 1 and 2"),
]


@pytest.mark.parametrize("source", ["stage_dirs", "bundle"])
@pytest.mark.parametrize("flag,pattern", BAD_FLAGS)
def test_bad_flags_refused_before_any_model_loads(
  source, flag, pattern, stage_dirs, fake_bundle, tmp_path, capsys, no_model_loads
):
  _, dirs = stage_dirs
  out = tmp_path / "out"
  argv = [a for a in _argv(dirs, out) if not a.startswith(("--num_per_prompt", "--batch_size"))]
  if source == "bundle":
    argv = [f"--bundle={fake_bundle}" if a.startswith("--stage_dirs") else a for a in argv]
  cli_helpers.user_error(capsys, [*argv, flag], pattern)
  assert not out.exists()  # nothing written either


def test_bad_sources_refused_before_any_model_loads(stage_dirs, tmp_path, capsys, no_model_loads):
  _, dirs = stage_dirs
  out = tmp_path / "out"
  argv = _argv(dirs, out)
  missing = str(tmp_path / "nope")
  cli_helpers.user_error(
    capsys,
    [f"--stage_dirs={dirs[0]},{missing}" if a.startswith("--stage_dirs") else a for a in argv],
    re.escape(f"--stage_dirs: {missing} does not exist"),
  )
  cli_helpers.user_error(
    capsys,
    [f"--stage_dirs={tmp_path}" if a.startswith("--stage_dirs") else a for a in argv],
    "has no checkpoints/ directory",
  )
  cli_helpers.user_error(
    capsys,
    [f"--bundle={missing}" if a.startswith("--stage_dirs") else a for a in argv],
    re.escape(f"--bundle={missing}: ") + ".*not an export bundle",
  )
  assert not out.exists()


class _CtrlCWhileWriting:
  """Patches PNG writing so that write number `at` (1-based) is interrupted half-way: part of
  a file lands on disk, then KeyboardInterrupt — a Ctrl-C arriving mid-write."""

  def __init__(self, monkeypatch, at: int):
    self.calls, self.at = 0, at
    real_save = Image.Image.save

    def save(im, fp, *args, **kwargs):
      self.calls += 1
      if self.calls == self.at:
        with open(fp, "wb") as f:
          f.write(b"\x89PNG\r\n\x1a\n half an image")
        raise KeyboardInterrupt
      return real_save(im, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_interrupted_runs_resume_to_the_same_pngs(stage_dirs, tmp_path, capsys, monkeypatch):
  _, dirs = stage_dirs
  # Uninterrupted, watching the stream: every model call gets one batch, and each batch's PNGs
  # (and the index listing them) are on disk before the next batch is sampled.
  calls = []
  real_sample = cascade.Cascade.sample

  def spy(self, prompts, seeds, *args, **kwargs):
    out_a = str(tmp_path / "a")
    listed = _index_files(out_a) if os.path.exists(os.path.join(out_a, "index.json")) else []
    calls.append((list(seeds), sorted(f for f in os.listdir(out_a) if f.endswith(".png")), listed))
    return real_sample(self, prompts, seeds, *args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(cascade.Cascade, "sample", spy)
    assert cli.main(_argv(dirs, tmp_path / "a")) == 0
  png = [images.image_file(i) for i in range(6)]
  assert calls == [
    ([3, 4], [], []),
    ([5, 6], png[:2], png[:2]),
    ([7, 8], png[:4], png[:4]),
  ]
  assert _listing(tmp_path / "a") == sorted([*png, "index.json"])

  # Ctrl-C while writing image 1 (mid first batch): exit 130, image 0 listed, no partial file.
  out = tmp_path / "b"
  with monkeypatch.context() as m:
    _CtrlCWhileWriting(m, at=2)
    assert cli.main(_argv(dirs, out)) == 130
  assert "interrupted" in capsys.readouterr().err
  assert _index_files(out) == png[:1]
  assert _listing(out) == [png[0], "index.json"]
  first_mtime = os.stat(out / png[0]).st_mtime_ns

  # The same command: batch 1 runs again (for image 1's bits), then Ctrl-C at image 4, i.e.
  # after k = 2 finished batches.
  with monkeypatch.context() as m:
    ctrl_c = _CtrlCWhileWriting(m, at=4)  # writes: image 1, 2, 3, then 4 is interrupted
    assert cli.main(_argv(dirs, out)) == 130
  assert ctrl_c.calls == 4
  assert _index_files(out) == png[:4]
  assert _listing(out) == sorted([*png[:4], "index.json"])
  assert os.stat(out / png[0]).st_mtime_ns == first_mtime  # finished images are not rewritten

  capsys.readouterr()
  assert cli.main(_argv(dirs, out)) == 0
  assert "resuming: 4 already done" in capsys.readouterr().out
  assert _listing(out) == _listing(tmp_path / "a")
  for name in png:  # bit-identical to the uninterrupted run
    np.testing.assert_array_equal(_pixels(out / name), _pixels(tmp_path / "a" / name), name)
  index_a = json.loads((tmp_path / "a" / "index.json").read_text())
  index_b = json.loads((out / "index.json").read_text())
  assert index_b["images"] == index_a["images"]
  assert index_b["run"] == index_a["run"] and index_b["total"] == 6


def test_progress_bar_counts_images(stage_dirs, tmp_path, capsys):
  _, dirs = stage_dirs
  argv = [a for a in _argv(dirs, tmp_path / "out") if a != "--no_progress"]
  capsys.readouterr()
  assert cli.main(argv) == 0
  err = capsys.readouterr().err
  assert re.search(r"sample: 100%.*6/6 .*img", err), err
  # A rerun of the finished command starts no bar and loads no model.
  assert cli.main(argv) == 0
  assert "6/6" not in capsys.readouterr().err


def test_other_settings_refused_overwrite_resamples(stage_dirs, tmp_path, capsys, monkeypatch):
  _, dirs = stage_dirs
  out = tmp_path / "out"
  argv = _argv(dirs, out, "--stop_after=1")
  assert cli.main(argv) == 0
  before = {f: _pixels(out / f) for f in _index_files(out)}
  with monkeypatch.context() as m:
    m.setattr(sample_cli, "_load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for changed, what in [
      ("--prompt=a small green triangle on a black background", "num_prompts, prompts"),
      ("--seed=4", "seed"),
      ("--guidance=3,1", "settings"),
      ("--save_stages", "save_stages"),
    ]:
      flag = changed.split("=")[0] + "="
      line = cli_helpers.user_error(
        capsys,
        [*(a for a in argv if not a.startswith(flag)), changed],
        re.escape(f"--out={out} already holds 6 images sampled with other settings"),
      )
      assert line.endswith(
        f"(changed: {what}); pass --overwrite to sample afresh into it, or choose a new --out"
      )
  # A batch size never changes an image, so it is not a setting: the same run, nothing to do.
  assert cli.main([*argv, "--batch_size=4"]) == 0
  assert "nothing to do" in capsys.readouterr().out
  # --overwrite resamples everything with the new settings.
  assert cli.main([*argv, "--seed=4", "--overwrite"]) == 0
  after = {f: _pixels(out / f) for f in _index_files(out)}
  assert list(after) == list(before)
  # seed 4 is image 0's seed now and was image 1's: the same prompt and seed, the same image
  # (up to float rounding: it sat in another position of its batch).
  same = after[images.image_file(0)].astype(int) - before[images.image_file(1)]
  assert np.abs(same).max() <= 1
  assert np.abs(after[images.image_file(1)].astype(int) - before[images.image_file(1)]).max() > 0


def test_an_image_with_a_missing_file_is_sampled_again(stage_dirs, tmp_path, capsys):
  _, dirs = stage_dirs
  out = tmp_path / "out"
  argv = _argv(dirs, out, "--save_stages")
  assert cli.main(argv) == 0
  entries = json.loads((out / "index.json").read_text())["images"]
  assert entries[4]["stage_files"] == {"base16": "00004_base16.png", "sr32": "00004_sr32.png"}
  os.remove(out / "00004_base16.png")  # image 4 is no longer whole
  mtimes = {f: os.stat(out / f).st_mtime_ns for f in _listing(out) if f.endswith(".png")}
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "1 images at 32px" in capsys.readouterr().out
  assert _listing(out) == sorted([*mtimes, "00004_base16.png", "index.json"])
  rewritten = {f for f, t in mtimes.items() if os.stat(out / f).st_mtime_ns != t}
  assert rewritten == {"00004.png", "00004_sr32.png"}
  assert json.loads((out / "index.json").read_text())["images"] == entries


def test_image_index_write_is_atomic_and_throttled(tmp_path):
  index = images.ImageIndex(str(tmp_path), {"run": {"seed": 1}})
  index.add(3, np.zeros((4, 4, 3), np.uint8), {"prompt": "x"})
  index.add(1, np.full((4, 4, 3), 255, np.uint8), {"prompt": "y"})
  assert index.write()
  data = images.read_index(str(tmp_path))
  assert [e["file"] for e in data["images"]] == ["00001.png", "00003.png"]
  assert data["run"] == {"seed": 1}
  assert sorted(os.listdir(tmp_path)) == ["00001.png", "00003.png", "index.json"]
  # An index whose last rewrite took long is not rewritten after every batch (unless forced).
  index._write_seconds = 1e6
  assert not index.write(force=False)
  assert index.write()
  (tmp_path / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match="unreadable"):
    images.read_index(str(tmp_path))
