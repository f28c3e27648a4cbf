"""The shapes detector and `imagen-jax eval shapes` on rendered ground-truth images."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from imagen_jax import cli, images
from imagen_jax.data import shapes
from imagen_jax.evaluation import shapes as eval_shapes
from tests import cli_helpers


def _rendered(n: int, resolution: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
  rng = np.random.default_rng(seed)
  specs = [shapes.sample_spec(rng) for _ in range(n)]
  return [shapes.render(s, resolution) for s in specs], [shapes.caption(s) for s in specs]


def test_detector_is_at_least_99_percent_right_on_rendered_images():
  imgs, captions = _rendered(200, 64, seed=7)
  accuracy, records = eval_shapes.score(imgs, captions)
  assert len(records) == 200
  for attribute in eval_shapes.ATTRIBUTES:
    assert accuracy[attribute] >= 0.99, (attribute, accuracy)
  assert accuracy["all"] >= 0.99


def test_detector_tolerates_sampling_noise():
  # Generated images are never clean: add pixel noise and a slight global colour shift.
  imgs, captions = _rendered(60, 64, seed=3)
  rng = np.random.default_rng(0)
  noisy = [
    np.clip(im.astype(np.float32) + rng.normal(0, 12, im.shape) + rng.normal(0, 8, 3), 0, 255)
    .round()
    .astype(np.uint8)
    for im in imgs
  ]
  accuracy, _ = eval_shapes.score(noisy, captions)
  for attribute in eval_shapes.ATTRIBUTES:
    assert accuracy[attribute] >= 0.95, (attribute, accuracy)


def test_detector_recovers_geometry():
  spec = shapes.ShapeSpec("gray", "purple", "triangle", "small", "bottom left", 0.27, 0.73, 0.3)
  d = eval_shapes.detect(shapes.render(spec, 64))
  assert (d.shape, d.size, d.position, d.colour, d.background) == (
    "triangle",
    "small",
    "bottom left",
    "purple",
    "gray",
  )
  np.testing.assert_allclose([d.cx, d.cy, d.extent], [0.27, 0.73, 0.3], atol=0.02)


def test_wrong_images_score_zero_on_the_changed_attribute():
  spec = shapes.ShapeSpec("white", "red", "square", "large", "center")
  image = shapes.render(spec, 64)
  other = shapes.caption(shapes.ShapeSpec("black", "blue", "circle", "small", "top left"))
  accuracy, _ = eval_shapes.score([image], [other])
  assert all(accuracy[k] == 0.0 for k in eval_shapes.ATTRIBUTES)


def test_parse_caption_round_trips_and_rejects_other_text():
  rng = np.random.default_rng(1)
  for _ in range(20):
    spec = shapes.sample_spec(rng)
    parsed = eval_shapes.parse_caption(shapes.caption(spec))
    assert parsed == {k: getattr(spec, k) for k in eval_shapes.ATTRIBUTES}
  with pytest.raises(ValueError, match="not from the shapes grammar"):
    eval_shapes.parse_caption("a photo of a cat")
  with pytest.raises(ValueError, match="colour"):
    eval_shapes.parse_caption("a large pink circle on a white background")


def test_eval_cli_reads_index_and_prints_table(tmp_path, capsys):
  imgs, captions = _rendered(12, 64, seed=5)
  entries = []
  for i, (im, c) in enumerate(zip(imgs, captions, strict=True)):
    images.save_png(im, str(tmp_path / f"{i:04d}.png"))
    entries.append({"file": f"{i:04d}.png", "prompt": c, "seed": i})
  (tmp_path / "index.json").write_text(json.dumps({"images": entries}))
  out_json = str(tmp_path / "scores.json")
  assert cli.main(["eval", "shapes", f"--images={tmp_path}", f"--json_out={out_json}"]) == 0
  printed = capsys.readouterr().out
  assert "shapes metric on 12 images" in printed
  assert "colour" in printed and "100.0%" in printed
  with open(out_json) as f:
    assert json.load(f)["accuracy"]["all"] == 1.0


def test_eval_cli_bad_input(tmp_path, capsys):
  cli_helpers.user_error(capsys, ["eval", "shapes", f"--images={tmp_path}"], "index.json")
  (tmp_path / "index.json").write_text(json.dumps({"images": [{"file": "a.png"}]}))
  cli_helpers.user_error(
    capsys, ["eval", "shapes", f"--images={tmp_path}"], r"images\[0\] \(a.png\) has no 'prompt'"
  )
  assert os.path.exists(tmp_path / "index.json")
