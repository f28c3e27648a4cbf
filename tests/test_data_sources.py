"""Shapes grammar/renderer, the two TFDS builders, and the seqio task, built for real."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from imagen_jax.data import image_text_folder, records, shapes, tasks
from imagen_jax.text import vocabulary


def test_captions_follow_the_grammar_exactly():
  large = shapes.ShapeSpec("gray", "purple", "triangle", "large", "center")
  small = shapes.ShapeSpec("black", "red", "square", "small", "top right")
  assert shapes.caption(large) == "a large purple triangle on a gray background"
  assert shapes.caption(small) == "a small red square in the top right on a black background"
  with pytest.raises(ValueError, match="colour"):
    shapes.caption(shapes.ShapeSpec("gray", "pink", "circle", "large", "center"))
  with pytest.raises(ValueError, match="centred"):
    shapes.caption(shapes.ShapeSpec("gray", "red", "circle", "large", "top left"))


def test_constants_are_the_issue_values():
  assert shapes.BACKGROUNDS == {"white": (255,) * 3, "black": (0,) * 3, "gray": (128,) * 3}
  assert shapes.COLOURS["orange"] == (245, 130, 20) and shapes.COLOURS["blue"] == (30, 70, 220)
  assert shapes.POSITIONS["bottom left"] == (0.25, 0.75)
  assert shapes.SIZES == {"large": (0.55, 0.05), "small": (0.28, 0.03)}


@pytest.mark.parametrize("shape, area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("position", ["center", "top left", "bottom right"])
def test_render_draws_colour_position_and_area(shape, area, position):
  size = "large" if position == "center" else "small"
  spec = shapes.ShapeSpec("white", "green", shape, size, position)
  spec = shapes.resolve_spec(spec, np.random.default_rng(7))  # jittered, off the pixel grid
  res = 64
  image = shapes.render(spec, res).astype(np.float64)
  bg, fg = np.array(shapes.BACKGROUNDS["white"]), np.array(shapes.COLOURS["green"])
  # Corners are background, the shape's centre pixel is exactly the colour.
  np.testing.assert_array_equal(image[0, 0], bg)
  np.testing.assert_array_equal(image[-1, -1], bg)
  cy, cx = int(spec.cy * res), int(spec.cx * res)
  np.testing.assert_array_equal(image[cy, cx], fg)
  # Coverage per pixel, recovered from the blend; its mass and centroid match the geometry.
  cover = ((bg - image) / (bg - fg))[..., 0]
  assert cover.sum() == pytest.approx(area * (spec.extent * res) ** 2, rel=0.03)
  ys, xs = np.mgrid[0:res, 0:res] + 0.5
  centroid_x = (cover * xs).sum() / cover.sum() / res
  centroid_y = (cover * ys).sum() / cover.sum() / res
  assert centroid_x == pytest.approx(spec.cx, abs=0.01)
  # A triangle's centroid is 1/6 of its height below the bbox centre.
  expect_y = spec.cy + (spec.extent / 6 if shape == "triangle" else 0.0)
  assert centroid_y == pytest.approx(expect_y, abs=0.01)
  # Anti-aliased: some partial-coverage pixels on the edge.
  assert ((cover > 0.05) & (cover < 0.95)).any()


def test_triangle_is_upright_with_base_at_bottom():
  spec = shapes.resolve_spec(shapes.ShapeSpec("black", "yellow", "triangle", "large", "center"))
  cover = shapes.shape_mask(spec, 64)
  rows = np.nonzero(cover.sum(1) > 0.5)[0]
  assert cover[rows[-1]].sum() > 5 * cover[rows[0]].sum()  # wide base below a narrow apex


def test_sample_spec_is_deterministic_and_within_jitter():
  specs = [shapes.example_spec(3, "train", i) for i in range(300)]
  assert specs == [shapes.example_spec(3, "train", i) for i in range(300)]
  assert specs != [shapes.example_spec(4, "train", i) for i in range(300)]
  for s in specs:
    nominal, jit = shapes.SIZES[s.size]
    assert abs(s.extent - nominal) <= jit
    px, py = shapes.POSITIONS[s.position]
    assert abs(s.cx - px) <= shapes.CENTRE_JITTER and abs(s.cy - py) <= shapes.CENTRE_JITTER
  # Every grammar value occurs.
  assert {s.colour for s in specs} == set(shapes.COLOURS)
  assert {s.position for s in specs if s.size == "small"} == set(shapes.POSITIONS)


def test_shapes_builder_images_match_captions(tmp_path):
  builder = shapes.build(str(tmp_path), resolution=16, num_train=12, num_validation=4, seed=1)
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 4
  seen = set()
  for ex in tfds.as_numpy(builder.as_dataset(split="train")):
    key = ex["key"].decode()
    index = int(key.split("_")[1])
    spec = shapes.example_spec(1, "train", index)
    assert ex["caption"].decode() == shapes.caption(spec)
    np.testing.assert_array_equal(ex["image"], shapes.render(spec, 16))
    # The caption's words are in the pixels: background corner and colour at the centre.
    words = ex["caption"].decode()
    assert f" {spec.colour} " in words and f"{spec.background} background" in words
    np.testing.assert_array_equal(ex["image"][0, 0], shapes.BACKGROUNDS[spec.background])
    cy, cx = int(spec.cy * 16), int(spec.cx * 16)
    np.testing.assert_array_equal(ex["image"][cy, cx], shapes.COLOURS[spec.colour])
    seen.add(key)
  assert seen == {f"train_{i:08d}" for i in range(12)}


def test_shapes_without_validation_has_only_a_train_split(tmp_path):
  builder = shapes.build(str(tmp_path), resolution=8, num_train=3, num_validation=0)
  assert sorted(builder.info.splits) == ["train"]
  source = records.TfdsSource(os.fspath(builder.data_path), "train")
  assert len(source) == 3 and source.available_splits == ["train"]
  with pytest.raises(ValueError, match=r"split='validation' is not in .* it has \['train'\]"):
    records.TfdsSource(os.fspath(builder.data_path), "validation")
  with pytest.raises(ValueError, match="num_train=0"):
    shapes.build(str(tmp_path), resolution=8, num_train=0, num_validation=2)


def _write_folder(folder):
  os.makedirs(folder)
  for i in range(3):
    Image.fromarray(np.full((20 + i, 24, 3), 40 * i, np.uint8)).save(f"{folder}/im{i}.png")
  Image.fromarray(np.full((18, 18), 9, np.uint8)).save(f"{folder}/gray.jpg")  # 1 channel
  with open(f"{folder}/gray.txt", "w") as f:
    f.write("a gray jpeg\n")
  with open(f"{folder}/broken.png", "wb") as f:
    f.write(b"\x89PNG not really")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f"{folder}/nocaption.png")
  with open(f"{folder}/captions.jsonl", "w") as f:
    for name in ("im0.png", "im1.png", "im2.png", "broken.png"):
      f.write(json.dumps({"file": name, "caption": f"caption of {name}"}) + "\n")


def test_image_text_folder_builds_and_skips_bad_images(tmp_path):
  folder = str(tmp_path / "folder")
  _write_folder(folder)
  with pytest.warns(UserWarning, match="skipped 1 undecodable image.*1 image.*without a caption"):
    builder = image_text_folder.build(folder, str(tmp_path / "tfds"))
  got = {
    ex["key"].decode(): (ex["caption"].decode(), ex["image"])
    for ex in tfds.as_numpy(builder.as_dataset(split="train"))
  }
  assert sorted(got) == ["gray.jpg", "im0.png", "im1.png", "im2.png"]
  assert got["im2.png"][0] == "caption of im2.png"
  assert got["gray.jpg"][0] == "a gray jpeg"
  assert got["im1.png"][1].shape == (21, 24, 3) and (got["im1.png"][1] == 40).all()
  assert got["gray.jpg"][1].shape == (18, 18, 3)  # converted to RGB
  # Nothing half-written: only the finished version directory exists.
  assert not [d for d in os.listdir(tmp_path / "tfds" / "image_text_folder") if "incomplete" in d]


def test_image_text_folder_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    image_text_folder.build(str(tmp_path / "missing"), str(tmp_path / "tfds"))
  os.makedirs(tmp_path / "bad")
  with open(tmp_path / "bad" / "captions.jsonl", "w") as f:
    f.write('{"file": "a.png"}\n')
  with pytest.raises(ValueError, match=r"captions.jsonl:1.*'caption'"):
    image_text_folder.build(str(tmp_path / "bad"), str(tmp_path / "tfds"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no captioned image"):
    image_text_folder.build(str(tmp_path / "empty"), str(tmp_path / "tfds"))


def test_seqio_task_tokenizes_with_eos_kept_and_stable_keys(tmp_path):
  builder = shapes.build(str(tmp_path), resolution=16, num_train=6, num_validation=2, seed=0)
  captions = [shapes.caption(shapes.example_spec(0, "train", i)) for i in range(200)]
  spm = vocabulary.train_sentencepiece(captions, str(tmp_path / "spm"), vocab_size=64)
  vocab = vocabulary.load_vocabulary(spm)
  task = tasks.register_task("shapes_test", os.fspath(builder.data_path), spm)
  full = {ex["key"]: ex for ex in tfds.as_numpy(tasks.get_task_dataset(task, "train", 128))}
  short = {ex["key"]: ex for ex in tfds.as_numpy(tasks.get_task_dataset(task, "train", 5))}
  assert sorted(full) == [f"train_{i:08d}".encode() for i in range(6)]
  for key, ex in full.items():
    caption = ex["caption"].decode()
    expected = vocabulary.tokenize(vocab, [caption], 128)[0]
    n = int((expected > 0).sum())
    np.testing.assert_array_equal(ex["text_tokens"], expected[:n])
    assert n > 5  # so the 5-token version really truncates
    np.testing.assert_array_equal(short[key]["text_tokens"], [*expected[:4], vocabulary.EOS_ID])
    assert ex["image"].shape == (16, 16, 3)
    spec = shapes.example_spec(0, "train", int(key.decode().split("_")[1]))
    np.testing.assert_array_equal(ex["image"], shapes.render(spec, 16))


def test_find_tfds_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    records.find_tfds_dir(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    records.find_tfds_dir(str(tmp_path), "coco_captions")
