"""`imagen-jax eval coco`: the seeded COCO-30K draw, its one-line input errors, an end-to-end
report on tiny stages (checked against `eval clip` and a direct FID), and a SIGKILLed run that
resumes without redoing its finished images.

The stage dirs are test_cli's tiny random-weight MODEL_DIRs (base16 -> sr32); the Inception
weights are test_evaluation_fid's random pytorch-fid network, the CLIP folder the golden tiny one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from imagen_jax import cli
from imagen_jax.cli import sample as sample_cli
from imagen_jax.evaluation import coco, fid
from tests import cli_helpers, test_cli, test_evaluation_clip, test_evaluation_fid

stage_dirs = test_cli.stage_dirs
random_weights = test_evaluation_fid.random_weights
weights_file = test_evaluation_fid.weights_file
CLIP_DIR = test_evaluation_clip.TINY
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Six images with 1-3 captions each; their draws are what the protocol picks from.
ANNOTATIONS = [
  (11, "a large red circle on a white background"),
  (11, "a red  circle\non white"),  # whitespace is normalised
  (12, "a small blue square on a gray background"),
  (13, "a green triangle on a black background"),
  (13, "a large green triangle"),
  (13, "a triangle, green"),
  (14, "two yellow circles on a white background"),
  (15, "a small purple square on a black background"),
  (16, "a blue circle above a red square"),
  (16, "a circle and a square"),
]
NUM = 5


def _captions_json(path) -> str:
  anns = [{"id": i, "image_id": im, "caption": c} for i, (im, c) in enumerate(ANNOTATIONS)]
  path.write_text(json.dumps({"images": [], "annotations": anns}))
  return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, stage_dirs, weights_file) -> dict[str, str]:
  root = tmp_path_factory.mktemp("coco")
  # Reference statistics of 64 seeded Gaussian features (a full-rank-free but valid mu, sigma).
  feats = np.random.default_rng(0).normal(size=(64, 2048))
  ref = str(root / "ref.npz")
  fid.save_stats(ref, feats.mean(0), np.cov(feats, rowvar=False), 64)
  return {
    "captions": _captions_json(root / "captions_val2014.json"),
    "reference": ref,
    "inception": weights_file,
    "stage_dirs": ",".join(stage_dirs[1]),
  }


def _argv(inputs: dict[str, str], out, *extra: str) -> list[str]:
  return [
    "eval",
    "coco",
    f"--stage_dirs={inputs['stage_dirs']}",
    f"--captions={inputs['captions']}",
    f"--num={NUM}",
    f"--reference={inputs['reference']}",
    f"--inception={inputs['inception']}",
    f"--clip={CLIP_DIR}",
    f"--out={out}",
    "--matrix_sqrt=eigh",  # scipy's sqrtm at 2048-d costs ~45 CPU-s; test_evaluation_fid agrees
    "--fid_batch_size=8",
    "--clip_batch_size=8",
    "--batch_size=1",  # one image per sampling batch: a kill lands between finished images
    "--steps=2",
    "--guidance=2,1",
    "--no_progress",
    *extra,
  ]


# ---- the draw ----


def test_draw_is_one_seeded_caption_per_distinct_image(tmp_path):
  groups = coco.read_captions(_captions_json(tmp_path / "c.json"))
  assert [k for k, _ in groups] == ["11", "12", "13", "14", "15", "16"]
  assert groups[0][1] == ["a large red circle on a white background", "a red circle on white"]
  by_id = dict(groups)
  first = coco.select(groups, 4, seed=0)
  assert first == coco.select(groups, 4, seed=0)  # deterministic
  assert len({c["image_id"] for c in first}) == 4  # distinct images
  assert all(c["caption"] in by_id[c["image_id"]] for c in first)
  assert coco.select(groups, 6, seed=0)[:4] == first  # a larger --num extends the draw
  draws = [tuple(c["image_id"] for c in coco.select(groups, 2, seed=s)) for s in range(50)]
  assert len(set(draws)) > 10  # the seed moves the draw
  # One random caption per image: over 600 seeds image 13's three captions come up about
  # equally (each 200 expected; 140..260 is > 5 standard deviations wide).
  counts = Counter(
    c["caption"]
    for s in range(600)
    for c in coco.select(groups, 6, seed=s)
    if c["image_id"] == "13"
  )
  assert len(counts) == 3 and all(140 <= n <= 260 for n in counts.values()), counts


def test_text_file_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text("a red circle\n\n  a blue   square \nthird\n")
  groups = coco.read_captions(str(path))
  assert groups == [
    ("line 1", ["a red circle"]),
    ("line 3", ["a blue square"]),
    ("line 4", ["third"]),
  ]
  chosen = coco.select(groups, 3, seed=1)
  assert sorted(c["caption"] for c in chosen) == ["a blue square", "a red circle", "third"]


@pytest.fixture
def no_model_loads(monkeypatch):
  def load(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(sample_cli, "_load_model", load)


def test_bad_inputs_refused_before_any_model_loads(inputs, tmp_path, capsys, no_model_loads):
  out = tmp_path / "out"
  base = _argv(inputs, out)

  def swap(flag: str, value: str) -> list[str]:
    return [f"{flag}={value}" if a.startswith(f"{flag}=") else a for a in base]

  bad_json = tmp_path / "bad.json"
  bad_json.write_text('{"annotations": [{"image_id": 1}]}')
  not_coco = tmp_path / "other.json"
  not_coco.write_text('{"images": []}')
  cases = [
    (swap("--captions", str(tmp_path / "nope.json")), r"--captions=.*is not a file: pass COCO"),
    (swap("--captions", str(bad_json)), r"annotations\[0\] lacks an \"image_id\" or a \"caption\""),
    (swap("--captions", str(not_coco)), r'has no "annotations" list'),
    (swap("--num", "7"), r"--num=7 but .* has only 6 images .*pass --num=6 or fewer"),
    (swap("--num", "0"), r"--num=0 must be at least 1"),
    (swap("--inception", str(tmp_path / "w.pth")), r"--inception=.*is not a file: pass pytorch"),
    (swap("--clip", str(tmp_path)), r"config.json"),
    (swap("--reference", str(tmp_path / "r.npz")), r"neither a statistics \.npz nor a folder"),
    (swap("--fid_batch_size", "0"), r"--fid_batch_size=0 must be at least 1"),
    # sample's own checks: its sampler and device flags reach it
    (swap("--steps", "0"), r"--steps='0': num_steps=0 is invalid"),
    ([*base, "--mesh=bogus=3"], r"--mesh='bogus=3': .*e\.g\. data=2,fsdp=4"),
  ]
  for argv, pattern in cases:
    cli_helpers.user_error(capsys, argv, pattern)
  assert not (out / "images").exists()


# ---- end to end ----


def _report(out) -> dict:
  with open(os.path.join(out, "report.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("coco_run") / "run")
  assert cli.main(_argv(inputs, out)) == 0
  return out


@pytest.mark.slow
def test_report_matches_eval_clip_and_a_direct_fid(inputs, uninterrupted, tmp_path):
  report = _report(uninterrupted)
  chosen = coco.select(coco.read_captions(inputs["captions"]), NUM, seed=0)
  with open(os.path.join(uninterrupted, "images", "index.json")) as f:
    index = json.load(f)
  assert [e["prompt"] for e in index["images"]] == [c["caption"] for c in chosen]
  assert report["num_images"] == NUM and report["num_reference_images"] == 64
  assert [p["image_id"] for p in report["per_image"]] == [c["image_id"] for c in chosen]
  assert report["settings"]["num"] == NUM and report["settings"]["sampling"] == index["run"]
  with open(inputs["captions"], "rb") as f:
    assert report["settings"]["captions_sha256"] == hashlib.sha256(f.read()).hexdigest()

  # CLIP score: the same as `eval clip` on the images folder.
  clip_out = str(tmp_path / "clip.json")
  argv = ["eval", "clip", f"--images={uninterrupted}/images", f"--clip={CLIP_DIR}"]
  assert cli.main([*argv, f"--out={clip_out}"]) == 0
  with open(clip_out) as f:
    clip_report = json.load(f)
  assert report["clip_score"] == pytest.approx(clip_report["clip_score"], abs=1e-6)
  assert 0.0 <= report["clip_score"] <= 100.0

  # FID: the listed PNGs' statistics against the reference file, computed directly.
  extractor = fid.FeatureExtractor.from_file(inputs["inception"], 8)
  files = [os.path.join(uninterrupted, p["file"]) for p in report["per_image"]]
  stats = fid.directory_stats(files, extractor, progress=False)
  mu, sigma, _ = fid.load_stats(inputs["reference"])
  want = fid.frechet_distance(stats.mean, stats.sigma, mu, sigma, method="eigh")
  assert report["fid"] == pytest.approx(want, rel=1e-9) and report["fid"] > 0
  with open(os.path.join(uninterrupted, "report.md")) as f:
    md = f.read()
  assert f"| FID | {report['fid']:.4f} |" in md and f"| images | {NUM} |" in md


def _listed(out) -> list[str]:
  path = os.path.join(out, "images", "index.json")
  try:
    with open(path) as f:
      return [e["file"] for e in json.load(f)["images"]]
  except (OSError, ValueError):  # not written yet (the write itself is atomic)
    return []


@pytest.mark.slow
def test_sigkill_mid_sampling_resumes_without_redoing_images(
  inputs, uninterrupted, tmp_path, capsys
):
  out = str(tmp_path / "killed")
  # The subprocess sets what conftest sets in-process (devices, matmul precision), so its
  # images are the bits an in-process run gives.
  code = (
    "import sys, jax; jax.config.update('jax_num_cpu_devices', 8); "
    "jax.config.update('jax_default_matmul_precision', 'highest'); "
    "from imagen_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code, *_argv(inputs, out)],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 600  # a guard against a hung child, not a timing assertion
  while not _listed(out) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = _listed(out)
  assert 1 <= len(done) < NUM, done  # killed mid-sampling
  mtimes = {f: os.stat(os.path.join(out, "images", f)).st_mtime_ns for f in done}
  assert not os.path.exists(os.path.join(out, "report.json"))

  capsys.readouterr()
  assert cli.main(_argv(inputs, out)) == 0
  assert f"resuming: {len(done)} already done" in capsys.readouterr().out
  assert {f: os.stat(os.path.join(out, "images", f)).st_mtime_ns for f in done} == mtimes
  assert len(_listed(out)) == NUM
  resumed, whole = _report(out), _report(uninterrupted)
  for key in ("fid", "clip_score", "num_images", "num_reference_images"):
    assert resumed[key] == whole[key], key
  assert [p["clip_score"] for p in resumed["per_image"]] == [
    p["clip_score"] for p in whole["per_image"]
  ]

  # A third run finds every image finished: nothing is sampled, the report is rewritten equal.
  capsys.readouterr()
  assert cli.main(_argv(inputs, out)) == 0
  assert f"all {NUM} images are already in" in capsys.readouterr().out
  assert _report(out)["fid"] == whole["fid"]
