"""CLI smoke: every subcommand's --help, and a real export -> sample -> eval chain on tiny stages.

The stage dirs are real MODEL_DIRs (orbax checkpoints with the operative gin config, written by
`Checkpointer`) holding random weights, so no training is needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gin
import numpy as np
import pytest

from imagen_jax import checkpoints, cli, gin_utils
from imagen_jax.inference import cascade
from tests import cascade_helpers, cli_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGE_GINS = ("configs/stages/demo_base16.gin", "configs/stages/demo_sr32.gin")


def test_every_subcommand_documents_its_flags(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  top = capsys.readouterr().out
  for name in ("precompute", "train", "info", "encode", "sample", "export", "eval", "demo"):
    assert name in top, name
  parser = cli.build_parser()
  subparsers = next(a for a in parser._actions if a.dest == "command").choices
  for name, sub in subparsers.items():
    for action in sub._actions:
      if action.option_strings and action.dest != "help":
        assert action.help, f"imagen-jax {name} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
      cli.main([name, "--help"])
    assert e.value.code == 0
    assert "usage: imagen-jax " + name in capsys.readouterr().out


def _make_stage_dir(model_dir: str, stage_gin: str, data_dir: str, seed: int) -> None:
  gin_utils.parse_gin(
    [stage_gin, "configs/mesh/cpu.gin", "configs/runs/tiny.gin"],
    [f"MODEL_DIR = '{model_dir}'", f"DATA = '{data_dir}'"],
  )
  text = gin.config_str()
  spec = cascade.stage_spec_from_gin(text)
  stage = cascade.stage_from_spec(spec)
  params = cascade_helpers.init_params(stage, seed, perturb=0.0)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), async_save=False)
  ckpt.save(7, {"step": np.int32(7)}, params, {}, text, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  enc, vocab = cascade_helpers.tiny_encoder(str(root))
  data_dir = root / "precomputed"
  data_dir.mkdir()
  # The precompute manifest's encoder record (what `imagen-jax precompute` writes).
  manifest = {"encoder": enc.identity(), "vocab_file": os.path.basename(vocab)}
  (data_dir / "manifest.json").write_text(json.dumps(manifest))
  dirs = []
  for k, gin_file in enumerate(STAGE_GINS):
    d = str(root / f"stage{k}")
    _make_stage_dir(d, gin_file, str(data_dir), seed=k)
    dirs.append(d)
  return root, dirs


def test_export_sample_eval_chain(stage_dirs, capsys):
  root, dirs = stage_dirs
  bundle = str(root / "bundle")
  assert cli.main(["export", f"--stage_dirs={','.join(dirs)}", f"--out={bundle}"]) == 0
  assert "export: 2 stages" in capsys.readouterr().out
  with open(os.path.join(bundle, "stages/0_base16/stage.json")) as f:
    spec = json.load(f)
  assert spec["source"]["step"] == 7 and spec["stage_config"]["resolution"] == 16
  cli_helpers.user_error(
    capsys, ["export", f"--stage_dirs={','.join(dirs)}", f"--out={bundle}"], "--overwrite"
  )

  out = str(root / "samples")
  prompt = "a large red circle on a white background"
  argv = [
    "sample",
    f"--bundle={bundle}",
    f"--prompt={prompt}",
    "--prompt=",
    "--num_per_prompt=2",
    "--seed=5",
    "--steps=2",
    "--guidance=2,1",
    f"--out={out}",
    "--grid",
    "--no_progress",
  ]
  assert cli.main(argv) == 0
  with open(os.path.join(out, "index.json")) as f:
    index = json.load(f)
  entries = index["images"]
  assert [e["prompt"] for e in entries] == [prompt, prompt, "", ""]
  assert [e["seed"] for e in entries] == [5, 6, 7, 8]
  assert entries[0]["settings"]["base16"]["guidance_weight"] == 2.0
  assert entries[0]["settings"]["sr32"]["num_steps"] == 2
  from PIL import Image

  for e in entries:
    with Image.open(os.path.join(out, e["file"])) as im:
      assert im.size == (32, 32)
  assert os.path.isfile(os.path.join(out, "grid.png"))
  # The same command again: every image is finished, so nothing is resampled or rewritten.
  mtimes = {e["file"]: os.stat(os.path.join(out, e["file"])).st_mtime_ns for e in entries}
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert "nothing to do" in capsys.readouterr().out
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in mtimes} == mtimes
  # Other settings into the same --out: refused, naming the directory and the fix.
  changed = ["--steps=3" if a == "--steps=2" else a for a in argv]
  cli_helpers.user_error(capsys, changed, re.escape(out) + r".*changed: settings.*--overwrite")

  # Sampling straight from the training dirs gives the same first image (same weights, seed).
  out2 = str(root / "samples_dirs")
  argv2 = [a if not a.startswith("--bundle") else f"--stage_dirs={','.join(dirs)}" for a in argv]
  argv2 = [a if not a.startswith("--out") else f"--out={out2}" for a in argv2]
  assert cli.main(argv2) == 0
  a = np.asarray(Image.open(os.path.join(out, "00000.png")), np.int32)
  b = np.asarray(Image.open(os.path.join(out2, "00000.png")), np.int32)
  assert np.abs(a - b).max() <= 1

  # The shapes metric reads the index (only the grammar prompts can be scored).
  scored = str(root / "scored")
  os.makedirs(scored)
  for e in entries[:2]:
    os.link(os.path.join(out, e["file"]), os.path.join(scored, e["file"]))
  (root / "scored" / "index.json").write_text(json.dumps({"images": entries[:2]}))
  assert cli.main(["eval", "shapes", f"--images={scored}"]) == 0
  assert "shapes metric on 2 images" in capsys.readouterr().out


def test_sample_and_export_bad_input(stage_dirs, tmp_path, capsys):
  root, dirs = stage_dirs
  cli_helpers.user_error(
    capsys,
    ["export", f"--stage_dirs={dirs[0]},{root / 'nope'}", f"--out={tmp_path / 'b'}"],
    "nope does not exist",  # names the missing stage dir
  )
  cli_helpers.user_error(
    capsys,
    ["export", f"--stage_dirs={dirs[1]},{dirs[0]}", f"--out={tmp_path / 'b'}"],
    "do not chain|not a super-resolution",
  )
  assert not os.path.exists(tmp_path / "b")
  cli_helpers.user_error(
    capsys, ["sample", f"--stage_dirs={dirs[0]}", f"--out={tmp_path / 's'}"], "no prompts"
  )
  cli_helpers.user_error(
    capsys,
    [
      "sample",
      f"--stage_dirs={','.join(dirs)}",
      "--prompt=x",
      "--steps=1,2,3",
      f"--out={tmp_path}",
    ],
    "one per stage",
  )


def test_export_skips_a_truncated_newest_checkpoint(stage_dirs, tmp_path, capsys, caplog):
  import logging
  import shutil
  import time

  root, dirs = stage_dirs
  # The base stage with a newer step 9 whose config JSON was cut short (a kill mid-copy).
  base = tmp_path / "base"
  shutil.copytree(dirs[0], base)
  shutil.copytree(base / "checkpoints" / "7", base / "checkpoints" / "9")
  config_json = base / "checkpoints" / "9" / "config" / "metadata"
  config_json.write_bytes(config_json.read_bytes()[:5])
  bundle = tmp_path / "bundle"
  with caplog.at_level(logging.WARNING):
    assert cli.main(["export", f"--stage_dirs={base},{dirs[1]}", f"--out={bundle}"]) == 0
  assert f"skipping checkpoint step 9 in {base / 'checkpoints'}: {config_json}: " in caplog.text
  spec = json.loads((bundle / "stages" / "0_base16" / "stage.json").read_text())
  assert spec["source"]["step"] == 7
  assert os.path.isdir(base / "checkpoints" / "9"), "export only reads: nothing is moved"
  # `sample --stage_dirs` loads through the same function; an explicit step does not fall back.
  assert cascade.load_stage_dir(str(base)).spec["source"]["step"] == 7
  with pytest.raises(ValueError, match=re.escape(str(config_json))):
    cascade.load_stage_dir(str(base), step=9)
  # With no loadable step: one line naming the directory, the steps tried and the first reason.
  arrays = base / "checkpoints" / "7" / "ema_params" / "manifest.ocdbt"
  arrays.write_bytes(arrays.read_bytes()[:5])
  cli_helpers.user_error(
    capsys,
    ["export", f"--stage_dirs={base},{dirs[1]}", f"--out={tmp_path / 'b2'}"],
    re.escape(f"no checkpoint in {base / 'checkpoints'} loads (tried steps 9, 7); step 9: ")
    + ".*JSONDecodeError",
  )
  # An --out that cannot be written fails before any stage loads.
  (tmp_path / "a_file").write_text("x")
  t0 = time.time()
  cli_helpers.user_error(
    capsys,
    ["export", f"--stage_dirs={','.join(dirs)}", f"--out={tmp_path / 'a_file' / 'sub' / 'b'}"],
    r"--out=.*a_file/sub/b: its parent directory .*a_file/sub is not a writable directory",
  )
  assert time.time() - t0 < 2.0


@pytest.mark.parametrize(
  "flag,pattern",
  [
    ("--thresholding=dynamic,clip,static", "thresholding='clip'"),
    ("--guidance=3,1", "give one value or one per stage (3 stages)"),
    ("--train_steps=10,x,10", "--train_steps='10,x,10'"),
    ("--batch_size=16,0,16", "--batch_size='16,0,16'"),
    ("--sampler=ddim,heun,ddim", "sampler='heun'"),
    ("--concurrent_stages=0", "--concurrent_stages=0; must be >= 1"),
  ],
)
def test_demo_rejects_bad_flags_before_any_work(flag, pattern, tmp_path, capsys):
  out = tmp_path / "demo_out"
  cli_helpers.user_error(capsys, ["demo", f"--out={out}", flag], re.escape(pattern))
  assert not out.exists()  # nothing rendered, trained or written


@pytest.mark.slow
def test_demo_quick_runs_every_step(tmp_path, capsys):
  # The whole demo at smoke size (20 steps per stage, 16 prompts): data, vocabulary, tiny T5,
  # precompute, three trainings, cascade sampling, PNGs, metric. Quality is not asserted here
  # (20 steps learn nothing); README "The demo" reports the full run.
  from PIL import Image

  from imagen_jax.evaluation import shapes as eval_shapes

  out = tmp_path / "demo_out"
  argv = ["demo", f"--out={out}", "--quick", "--batch_size=8,16,8", "--sampler=ddim,dpmpp_2m,ddim"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  for attribute in eval_shapes.ATTRIBUTES:
    assert attribute in printed
  metrics = json.loads((out / "metrics.json").read_text())
  assert set(metrics["accuracy"]) == {*eval_shapes.ATTRIBUTES, "all"}
  assert all(0.0 <= v <= 1.0 for v in metrics["accuracy"].values())
  for name in ("base16", "sr32", "sr64"):
    ckpt = checkpoints.Checkpointer(str(out / "work" / name / "checkpoints"))
    assert ckpt.latest_step() == 20, name
    ckpt.close()
  index = json.loads((out / "samples" / "index.json").read_text())
  assert len(index["images"]) == 16
  assert [s["num_steps"] for s in index["settings"].values()] == [8, 8, 8]
  assert [s["sampler"] for s in index["settings"].values()] == ["ddim", "dpmpp_2m", "ddim"]
  with Image.open(out / "samples" / index["images"][3]["file"]) as im:
    assert im.size == (64, 64)
  with Image.open(out / "samples.png") as im:  # rows: 16, 32, 64 px stages; 16 columns
    w, h = im.size
  assert w > h and h >= 3 * 64
  for name in ("base16", "sr32", "sr64"):  # each stage trained as its own `imagen-jax train`
    assert "checkpoint step 20 " in (out / "work" / name / "train.log").read_text(), name
  # A rerun trains nothing: every stage already has its checkpoint at --train_steps.
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  for name in ("base16", "sr32", "sr64"):
    assert f"3/5 {name}: already trained to step 20" in printed
  assert "train_base16" not in json.loads((out / "metrics.json").read_text())["timings_s"]
  # benchmarks/demo_shapes_study.py reads the trained cascade stage by stage, from a directory
  # outside the repo. Its first 4 prompts of seed 100 are the first 4 of the README's 256, whose
  # true 32 and 64 px renders the detector reads 100% right.
  script = os.path.join(REPO, "benchmarks", "demo_shapes_study.py")
  report = tmp_path / "study.md"
  study = [sys.executable, script, f"--demo_out={out}", "--num_prompts=4", "--truth"]
  study += ["--variant=fast=dpmpp_2m/4,2,2/8,1,1", f"--out={report}"]
  subprocess.run(study, check=True, cwd=tmp_path, timeout=600)
  md = report.read_text()
  row = r"^\| fast \| [\d.]+ / [\d.]+ / [\d.]+ \| [\d.]+% \| \d of 4 \| .* \| \d+ \| "
  row += r"(-|(\w+ [\d.]+%(, )?)+) \|$"  # the last column: attributes below 100% at 64 px
  assert re.search(row, md, re.M), md
  for res in (32, 64):
    assert f"| true renders at {res} px | 100.0% | 0 |" in md, md
  assert re.search(r"^\| SR-64 fed true 32 px: shape at 64 px \| [\d.]+% \|", md, re.M), md
