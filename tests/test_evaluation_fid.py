"""FID: the Flax FID Inception against pytorch-fid on random weights, the torch-free checkpoint
reader, the Fréchet distance, and `imagen-jax eval fid|reference`.

Golden files come from tools/make_fid_golden.py (pytorch-fid 0.3.0 on CPU). The random network
weights are not committed: `make_fid_golden.random_tensor` derives each from (seed, name,
shape) with numpy, and `_write_torch_zip` below writes them in torch's zip layout.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from imagen_jax import cli, errors
from imagen_jax.evaluation import fid, inception, torch_checkpoint
from tests import cli_helpers
from tools import make_fid_golden

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def _golden() -> np.lib.npyio.NpzFile:
  return np.load(os.path.join(GOLDEN, "fid_parity.npz"))


# ---- a tiny writer of torch's zip layout (tests only; reading is what the package does) ----

_STORAGE_NAMES = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.float64): "DoubleStorage",
  np.dtype(np.int64): "LongStorage",
}


def _pickle_tensors(entries: list[tuple[str, str, str, int, tuple[int, ...]]]) -> bytes:
  """Protocol-2 opcodes of OrderedDict{name: _rebuild_tensor_v2(storage, 0, shape, stride)}.

  Written opcode by opcode because `pickle` would import torch to check the globals.
  """
  out = io.BytesIO()
  w = out.write

  def glob(module: str, name: str) -> None:
    w(pickle.GLOBAL + f"{module}\n{name}\n".encode())

  def text(s: str) -> None:
    b = s.encode()
    w(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

  def ints(values) -> None:
    w(pickle.MARK)
    for v in values:
      w(pickle.BININT + struct.pack("<i", v))
    w(pickle.TUPLE)

  w(pickle.PROTO + b"\x02")
  glob("collections", "OrderedDict")
  w(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK)
  for name, storage, key, numel, shape in entries:
    strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    text(name)
    glob("torch._utils", "_rebuild_tensor_v2")
    w(pickle.MARK + pickle.MARK)
    text("storage")
    glob("torch", storage)
    text(key)
    text("cpu")
    w(pickle.BININT + struct.pack("<i", numel) + pickle.TUPLE + pickle.BINPERSID)
    w(pickle.BININT + struct.pack("<i", 0))
    ints(shape)
    ints(strides)
    w(pickle.NEWFALSE)
    glob("collections", "OrderedDict")
    w(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
  w(pickle.SETITEMS + pickle.STOP)
  return out.getvalue()


def _write_torch_zip(path: str, state_dict: dict[str, np.ndarray], pickled: bytes | None = None):
  entries = []
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for i, (name, value) in enumerate(state_dict.items()):
      value = np.ascontiguousarray(value)
      zf.writestr(f"archive/data/{i}", value.tobytes())
      entries.append((name, _STORAGE_NAMES[value.dtype], str(i), value.size, value.shape))
    zf.writestr("archive/data.pkl", _pickle_tensors(entries) if pickled is None else pickled)
    zf.writestr("archive/byteorder", "little")
    zf.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def random_weights() -> dict[str, np.ndarray]:
  """The golden network's state_dict (fc and step counters included), rebuilt with numpy."""
  shapes = json.loads(str(_golden()["shapes"]))
  out = {}
  for name, shape in shapes.items():
    if name.endswith("num_batches_tracked"):
      out[name] = np.zeros((), np.int64)
    else:
      out[name] = make_fid_golden.random_tensor(name, shape)
  return out


@pytest.fixture(scope="module")
def weights_file(random_weights, tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("fid_weights") / "pt_inception-random.pth")
  _write_torch_zip(path, random_weights)
  return path


# ---- the reader ----


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_reader_matches_torch_written_file(layout):
  # Written by torch.save: dtypes, a transposed view, a storage offset, shared storage, 0-d.
  got = torch_checkpoint.load_state_dict(os.path.join(GOLDEN, f"fid_reader_{layout}.pth"))
  expected = np.load(os.path.join(GOLDEN, "fid_reader_expected.npz"))
  assert set(got) == set(expected.files)
  for name in expected.files:
    assert got[name].shape == expected[name].shape, name
    if name == "bfloat16":
      assert str(got[name].dtype) == "bfloat16"
    else:
      assert got[name].dtype == expected[name].dtype, name
    np.testing.assert_array_equal(np.asarray(got[name], expected[name].dtype), expected[name])


def test_reader_refuses_code_and_non_checkpoints(tmp_path):
  evil = tmp_path / "evil.pth"
  payload = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"os\nsystem\n" + pickle.STOP
  _write_torch_zip(str(evil), {}, pickled=payload)
  with pytest.raises(errors.UserError, match=r"refusing to unpickle os\.system"):
    torch_checkpoint.load_state_dict(str(evil))
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"definitely not a checkpoint")
  with pytest.raises(errors.UserError, match="is not a PyTorch state_dict file"):
    torch_checkpoint.load_state_dict(str(junk))
  # A storage shorter than its tensor (truncated download).
  truncated = tmp_path / "truncated.pth"
  entries = [("w", "FloatStorage", "0", 6, (2, 3))]
  with zipfile.ZipFile(truncated, "w") as zf:
    zf.writestr("archive/data.pkl", _pickle_tensors(entries))
    zf.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
  with pytest.raises(errors.UserError, match="truncated"):
    torch_checkpoint.load_state_dict(str(truncated))
  # A persistent id of the wrong arity is a malformed file, not a crash.
  short = tmp_path / "short.pth"
  bad_pid = pickle.PROTO + b"\x02" + pickle.MARK + pickle.BININT1 + b"\x01" + pickle.TUPLE
  _write_torch_zip(str(short), {}, pickled=bad_pid + pickle.BINPERSID + pickle.STOP)
  with pytest.raises(errors.UserError, match="unsupported persistent id"):
    torch_checkpoint.load_state_dict(str(short))
  assert "torch" not in sys.modules  # the reader never needs it


def test_state_dict_names_and_shapes_are_pytorch_fids():
  golden_shapes = json.loads(str(_golden()["shapes"]))
  ours = inception.torch_names()
  used = {k: tuple(v) for k, v in golden_shapes.items() if not inception.is_unused(k)}
  assert {k: shape for k, (_, shape) in ours.items()} == used
  assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in
             set(golden_shapes) - set(ours))  # fmt: skip


def test_mapping_refuses_unknown_missing_and_misshapen_keys(random_weights):
  variables = inception.variables_from_state_dict(random_weights)
  kernel = variables["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
  np.testing.assert_array_equal(
    kernel, random_weights["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
    random_weights["Conv2d_1a_3x3.bn.running_var"],
  )
  # pytorch-fid's InceptionV3 module names the same tensors blocks.<i>.<j>.*.
  aliases = {v: k for k, v in inception.BLOCK_ALIASES.items()}
  nested = {}
  for name, value in random_weights.items():
    head, _, rest = name.partition(".")
    nested[f"{aliases[head]}.{rest}" if head in aliases else name] = value
  again = inception.variables_from_state_dict(nested)
  np.testing.assert_array_equal(again["params"]["Mixed_5b"]["branch1x1"]["conv"]["kernel"],
                                variables["params"]["Mixed_5b"]["branch1x1"]["conv"]["kernel"])  # fmt: skip

  extra = dict(random_weights, **{"AuxLogits.conv0.conv.weight": np.zeros(1, np.float32)})
  with pytest.raises(errors.UserError, match=r"unexpected key 'AuxLogits\.conv0\.conv\.weight'"):
    inception.variables_from_state_dict(extra, source="w.pth")
  missing = {k: v for k, v in random_weights.items() if k != "Mixed_6a.branch3x3.bn.bias"}
  with pytest.raises(
    errors.UserError, match=r"w\.pth: missing key 'Mixed_6a\.branch3x3\.bn\.bias'"
  ):
    inception.variables_from_state_dict(missing, source="w.pth")
  bad = dict(random_weights, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
  with pytest.raises(errors.UserError, match=r"shape \(32, 3, 5, 5\), expected \(32, 3, 3, 3\)"):
    inception.variables_from_state_dict(bad)


# ---- the network ----


def test_resize_matches_torch_bilinear():
  g = _golden()
  for i in range(len(make_fid_golden.RESIZE_CASES)):
    x = g[f"resize_in_{i}"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    want = g[f"resize_out_{i}"].transpose(0, 2, 3, 1)
    got = np.asarray(inception.resize_bilinear(x, *want.shape[1:3]))
    # A few float32 ulps: the two-tap sums may round in a different order.
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)


def test_features_match_pytorch_fid(weights_file):
  """pool3 of 2 noise images (64 px, resized to 299) against pytorch-fid's get_activations.

  Tolerance: both sides are float32 through ~20 sequential convolutions with different
  summation orders; measured max |diff| is ~3e-5 on features up to ~48 (6e-7 of the largest),
  so atol = 1e-5 of the largest feature plus rtol 1e-4 leaves a ~10x margin, while a wrong
  BatchNorm eps (1e-3 vs 1e-5, ~1e-3 relative) or a pooling quirk (border pixels) fails it.
  """
  g = _golden()
  _, variables = inception.load(weights_file)
  import jax

  extractor = fid.FeatureExtractor(variables, batch_size=2)
  # Batches are split over every local device (8 here): 2 rounds up to one image per device.
  assert len(extractor.devices) == jax.local_device_count() == 8 and extractor.batch_size == 8
  got = extractor(g["images"])
  want = g["features"]
  assert got.shape == want.shape == (2, inception.FEATURE_DIM)
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  one = fid.FeatureExtractor(variables, batch_size=2, devices=jax.local_devices()[:1])
  np.testing.assert_allclose(one(g["images"]), got, rtol=1e-5, atol=1e-6 * scale)


# ---- statistics and the Fréchet distance ----


def test_streaming_stats_equal_np_cov():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((37, 5)) * 3.0 + 1e4  # a large offset: no cancellation
  stats = fid.FeatureStats(5)
  for lo, hi in ((0, 1), (1, 11), (11, 11), (11, 37)):
    stats.update(x[lo:hi])
  assert stats.count == 37
  np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
  with pytest.raises(errors.UserError, match="at least 2 images"):
    _ = fid.FeatureStats(3).sigma


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_closed_forms(method):
  rng = np.random.default_rng(1)
  a = rng.standard_normal((50, 6))
  mu, sigma = fid.statistics(a)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9
  # Diagonal covariances: ||mu1 - mu2||² + sum (sqrt(s1) - sqrt(s2))².
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
  assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("tag", ["full", "few"])
def test_frechet_matches_pytorch_fid_and_numpy(tag, method):
  g = _golden()
  a, b = g[f"frechet_{tag}_a"], g[f"frechet_{tag}_b"]
  mu1, s1 = fid.statistics(a)
  mu2, s2 = fid.statistics(b)
  got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
  assert got == pytest.approx(float(g[f"frechet_{tag}_value"]), rel=1e-8, abs=1e-8)
  # Directly: Tr sqrt(S1 S2) is the sum of the square roots of the product's eigenvalues.
  lam = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum()
  assert got == pytest.approx(direct, rel=1e-6, abs=1e-6)


def test_frechet_singular_fallback_and_errors():
  d, eps = 3, 1e-6
  mu1, mu2 = np.zeros(d), np.full(d, 0.5)
  # Identical images give zero covariances; scipy's Schur root of the 3x3 zero matrix has
  # infinities (0/0 in its recurrence), so eps·I is added, as pytorch-fid does.
  zeros = np.zeros((d, d))
  with pytest.warns(fid.FIDWarning, match="singular"):
    got = fid.frechet_distance(mu1, zeros, mu2, zeros, eps=eps)
  # sqrt((eps I)(eps I)) = eps I, so pytorch-fid's value is ||diff||² - 2 d eps.
  assert got == pytest.approx(d * 0.25 - 2 * d * eps, rel=1e-12)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the eigh route needs no fallback
    assert fid.frechet_distance(mu1, zeros, mu2, zeros, method="eigh") == pytest.approx(d * 0.25)
  # Not PSD: the root of -I is imaginary.
  with pytest.raises(errors.UserError, match="imaginary part"):
    fid.frechet_distance(mu1, -np.eye(d), mu1, np.eye(d))
  with pytest.raises(errors.UserError, match="not positive semi-definite"):
    fid.frechet_distance(mu1, -np.eye(d), mu1, np.eye(d), method="eigh")
  with pytest.raises(errors.UserError, match="statistics do not match"):
    fid.frechet_distance(mu1, zeros, np.zeros(2), np.zeros((2, 2)))


def test_stats_files_pytorch_fid_and_clean_fid_layouts(tmp_path):
  rng = np.random.default_rng(2)
  feats = rng.standard_normal((20, 3))
  mu, sigma = fid.statistics(feats)
  ours = str(tmp_path / "ours.npz")
  fid.save_stats(ours, mu, sigma, num_images=20)
  with np.load(ours) as f:  # pytorch-fid reads exactly these two keys
    np.testing.assert_array_equal(f["mu"], mu)
    np.testing.assert_array_equal(f["sigma"], sigma)
  assert fid.load_stats(ours)[2] == 20
  np.savez(tmp_path / "pfid.npz", mu=mu, sigma=sigma)
  m, s, n = fid.load_stats(str(tmp_path / "pfid.npz"))
  np.testing.assert_array_equal(s, sigma)
  assert n is None
  np.savez(tmp_path / "cfid_kid.npz", feats=feats)  # clean-fid's KID files: raw features
  m, s, n = fid.load_stats(str(tmp_path / "cfid_kid.npz"))
  np.testing.assert_allclose(s, np.cov(feats, rowvar=False), rtol=1e-12)
  assert n == 20
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(errors.UserError, match=r"need keys 'mu' and 'sigma'.*\['mean'\]"):
    fid.load_stats(str(tmp_path / "bad.npz"))


# ---- the CLI ----


def _write_images(directory, images) -> None:
  os.makedirs(directory, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(directory, f"{i:03d}.png"))


def test_cli_reference_then_fid(tmp_path, weights_file, capsys):
  images = _golden()["images"]  # 2 x 64 px: the parity test's compiled shape is reused
  src = str(tmp_path / "images")
  _write_images(src, images)
  stats_path = str(tmp_path / "ref" / "stats.npz")
  argv = ["eval", "reference", f"--source={src}", f"--inception={weights_file}"]
  assert cli.main([*argv, f"--out={stats_path}", "--batch_size=2"]) == 0
  mu, sigma, n = fid.load_stats(stats_path)
  assert n == 2 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
  np.testing.assert_allclose(mu, _golden()["features"].mean(0), rtol=1e-4, atol=1e-4)

  common = [f"--images={src}", f"--inception={weights_file}", "--batch_size=2"]
  report_path = str(tmp_path / "report.json")
  capsys.readouterr()
  # --matrix_sqrt=eigh: scipy's sqrtm at 2048-d costs ~45 CPU-s (the methods agree above).
  argv = ["eval", "fid", *common, f"--reference={stats_path}", f"--out={report_path}"]
  assert cli.main([*argv, "--matrix_sqrt=eigh"]) == 0
  out = capsys.readouterr()
  assert "FID: " in out.out
  assert "rank-deficient" in out.err  # 2 images cannot give a full-rank covariance
  with open(report_path) as f:
    report = json.load(f)
  # A set against itself: 0 up to round-off (each null eigenvalue e adds sqrt(e)).
  assert abs(report["fid"]) < 1e-5 * float(np.trace(sigma))
  assert report["num_images"] == 2 and report["num_reference_images"] == 2
  assert report["reference"] == os.path.abspath(stats_path)
  assert report["inception"] == os.path.abspath(weights_file)
  assert report["matrix_sqrt"] == "eigh"


def test_cli_fid_against_an_image_folder(tmp_path, weights_file, monkeypatch):
  """--reference=DIR computes its statistics with the same network (the distance is stubbed:
  it is tested above, and a 2048-d one costs seconds)."""
  src = str(tmp_path / "images")
  _write_images(src, _golden()["images"])
  seen = {}

  def fake_distance(mu1, sigma1, mu2, sigma2, method="sqrtm"):
    seen.update(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2, method=method)
    return 1.5

  monkeypatch.setattr(fid, "frechet_distance", fake_distance)
  report_path = str(tmp_path / "report.json")
  argv = ["eval", "fid", f"--images={src}", f"--reference={src}", f"--inception={weights_file}"]
  assert cli.main([*argv, "--batch_size=2", f"--out={report_path}"]) == 0
  np.testing.assert_array_equal(seen["mu1"], seen["mu2"])
  np.testing.assert_array_equal(seen["sigma1"], seen["sigma2"])
  np.testing.assert_allclose(seen["mu1"], _golden()["features"].mean(0), rtol=1e-4, atol=1e-4)
  assert seen["method"] == "sqrtm"  # the default: pytorch-fid's numbers
  with open(report_path) as f:
    report = json.load(f)
  assert report["fid"] == 1.5 and report["num_reference_images"] == 2


def test_cli_bad_inputs(tmp_path, capsys, weights_file):
  src = str(tmp_path / "images")
  _write_images(src, _golden()["images"][:1])
  weights = f"--inception={weights_file}"
  empty = tmp_path / "empty"
  empty.mkdir()
  stats = str(tmp_path / "s.npz")
  np.savez(stats, mu=np.zeros(64), sigma=np.eye(64))
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not torch")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cases = [
    (["eval", "fid", f"--images={tmp_path}/nope", f"--reference={stats}", weights], "not a directory"),
    (["eval", "fid", f"--images={empty}", f"--reference={stats}", weights], "holds no images"),
    (["eval", "fid", f"--images={src}", f"--reference={tmp_path}/x.npz", weights], "neither a statistics"),
    (["eval", "fid", f"--images={src}", f"--reference={stats}", weights], "64-d statistics"),
    (["eval", "fid", f"--images={src}", f"--reference={src}", "--inception=/no/such.pth"], "is not a file"),
    (["eval", "fid", f"--images={src}", f"--reference={src}", f"--inception={junk}"], "not a PyTorch state_dict"),
    (["eval", "reference", f"--source={src}", weights, f"--out={blocker}/sub/s.npz"], "--out.*is not a writable directory"),
    (["eval", "reference", f"--source={src}", weights, f"--out={src}", "--batch_size=0"], "--batch_size=0"),
  ]  # fmt: skip
  lines = [cli_helpers.user_error(capsys, argv, pattern) for argv, pattern in cases]
  assert len(set(lines)) == len(cases), lines  # each bad input gets its own message


def test_reference_from_shards_and_tfds_equals_the_same_images_as_a_folder(
  tmp_path, weights_file, capsys
):
  """`eval reference --source=` precomputed shards or their TFDS build: the same statistics as
  the same images written out as a folder of PNGs (one image per record)."""
  from imagen_jax.data import records
  from imagen_jax.evaluation import image_sources
  from tests import train_helpers

  data = train_helpers.build_precomputed_shapes(
    str(tmp_path / "work"), num_examples=4, resolution=16, examples_per_shard=2
  )
  tfds_dir = records.find_tfds_dir(str(tmp_path / "work" / "tfds"))
  tfds = records.TfdsSource(tfds_dir, "train")
  pngs = [image_sources.decode_image(tfds.pairs(i)[0][2], "test") for i in range(len(tfds))]
  folder = str(tmp_path / "folder")
  _write_images(folder, pngs)
  stats = {}
  for name, source in [("folder", folder), ("shards", data), ("tfds", str(tmp_path / "work"))]:
    out = str(tmp_path / f"{name}.npz")
    argv = ["eval", "reference", f"--source={source}", f"--inception={weights_file}"]
    assert cli.main([*argv, "--split=train", f"--out={out}", "--batch_size=4"]) == 0
    assert f"4 images ({name if name != 'shards' else 'precomputed'}:" in capsys.readouterr().out
    stats[name] = fid.load_stats(out)
  for name in ("shards", "tfds"):
    np.testing.assert_allclose(stats[name][0], stats["folder"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats[name][1], stats["folder"][1], rtol=1e-5, atol=1e-7)
    assert stats[name][2] == 4
  cli_helpers.user_error(
    capsys,
    [
      "eval",
      "reference",
      f"--source={data}",
      "--split=test",
      f"--inception={weights_file}",
      f"--out={tmp_path / 'x.npz'}",
    ],
    r"--source=.*has no split 'test'; it has \['train'\]; pass --split=NAME",
  )
