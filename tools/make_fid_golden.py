"""Regenerates the FID parity golden files in tests/golden/ with pytorch-fid 0.3.0 on CPU.

Needs torch, torchvision, pytorch-fid==0.3.0, numpy, scipy<1.16 and pillow, which the project
venv does not carry (the tests that read the golden files need none of them); pytorch-fid 0.3.0
calls scipy's sqrtm(disp=False), which newer scipy no longer accepts. Run it from a throwaway
venv, e.g.

  python3.12 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch torchvision pytorch-fid==0.3.0 numpy "scipy<1.16" pillow
  /tmp/torchvenv/bin/python tools/make_fid_golden.py

The FID network's weights are random but reproducible without torch: `random_state_dict`
derives every tensor from (seed, name, shape) with numpy, and the test calls it too, so the
~95 MB weight file is never committed. pytorch-fid's own `InceptionV3([3])` is built with those
weights (its strict `load_state_dict` proves the names and shapes are the real file's).

It writes
  tests/golden/fid_parity.npz: `images` uint8 [2, 64, 64, 3] (seeded noise), `features`
    [2, 2048] from pytorch-fid's `get_activations` on those images saved as PNGs, the
    state_dict's `names` and `shapes` (JSON), bilinear-resize cases `resize_in_<i>` /
    `resize_out_<i>` from F.interpolate(align_corners=False), Fréchet-distance cases
    (`frechet_*`) from pytorch-fid's calculate_frechet_distance, and the versions used;
  tests/golden/fid_reader_zip.pth, fid_reader_legacy.pth: a few KB of tensors (dtypes, a
    strided view, a storage offset, shared storage, 0-d and empty) written by torch.save in
    the zip and the legacy layout, and fid_reader_expected.npz with their values;
  optionally (--pth) the full random-weight .pth, for trying the CLI by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zlib
from collections.abc import Iterable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
IMAGE_SHAPE = (2, 64, 64, 3)
# (input shape [N, C, H, W], output size (H, W)): up, down (no antialias), non-square.
RESIZE_CASES = (((1, 3, 7, 11), (13, 5)), ((2, 3, 40, 30), (9, 7)), ((1, 2, 5, 5), (5, 5)))


def random_tensor(name: str, shape: Iterable[int], seed: int = SEED) -> np.ndarray:
  """A float32 tensor for state_dict entry `name`, a pure function of (seed, name, shape).

  Uniform doubles from PCG64 are scaled per role so activations keep an O(1) scale through
  the network: conv kernels He-uniform over their fan-in, BatchNorm scales and variances in
  [0.5, 1.5), biases and means in [-0.2, 0.2).
  """
  shape = tuple(int(s) for s in shape)
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  u = rng.random(shape)
  if name.endswith("conv.weight"):
    fan_in = int(np.prod(shape[1:]))
    value = (2.0 * u - 1.0) * np.sqrt(6.0 / fan_in)
  elif name.endswith(("bn.weight", "running_var")):
    value = 0.5 + u
  elif name.endswith(("bn.bias", "running_mean")):
    value = 0.2 * (2.0 * u - 1.0)
  else:  # the unused classifier (fc.*)
    value = 0.01 * (2.0 * u - 1.0)
  return value.astype(np.float32)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict:
  """{name: random_tensor(name, shape)} for the float entries of a state_dict."""
  return {name: random_tensor(name, shape, seed) for name, shape in shapes.items()}


def noise_images(seed: int = SEED) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)


def _fid_network_shapes(torch, torchvision, pfid_inception) -> dict[str, tuple[int, ...]]:
  # The modules fid_inception_v3 builds (it patches torchvision's Inception the same way);
  # only names and shapes are read here, pytorch-fid's own constructor runs below.
  net = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  net.Mixed_5b = pfid_inception.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfid_inception.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfid_inception.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfid_inception.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfid_inception.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfid_inception.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfid_inception.FIDInceptionE_1(1280)
  net.Mixed_7c = pfid_inception.FIDInceptionE_2(2048)
  return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _reader_cases(torch) -> dict:
  """Small tensors exercising the reader: dtypes, views, offsets, shared storage."""
  g = torch.Generator().manual_seed(SEED)
  base = torch.randn(4, 6, generator=g)
  cases = {
    "conv.weight": torch.randn(2, 3, 3, 3, generator=g),
    "transposed": base.t(),  # strides (1, 6): not contiguous
    "offset_rows": base[1:3],  # storage offset 6, shares base's storage
    "base": base,
    "float64": torch.randn(3, generator=g, dtype=torch.float64),
    "float16": torch.randn(5, generator=g).half(),
    "bfloat16": torch.randn(5, generator=g).bfloat16(),
    "int64": torch.arange(7, dtype=torch.int64) - 3,
    "uint8": torch.arange(250, 256, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "bn.num_batches_tracked": torch.tensor(17),
  }
  return dict(cases)


def _expected(t) -> np.ndarray:
  import torch

  if t.dtype == torch.bfloat16:
    return t.float().numpy()  # exact: every bfloat16 is a float32
  return t.numpy().copy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.path.join(REPO, "tests", "golden"))
  parser.add_argument("--pth", default=None, help="also write the full random-weight .pth here")
  args = parser.parse_args()

  import collections

  import pytorch_fid
  import scipy
  import torch
  import torchvision
  from PIL import Image
  from pytorch_fid import fid_score
  from pytorch_fid import inception as pfid_inception

  torch.set_num_threads(2)
  shapes = _fid_network_shapes(torch, torchvision, pfid_inception)
  state_dict = collections.OrderedDict()
  for name, shape in shapes.items():
    if name.endswith("num_batches_tracked"):
      state_dict[name] = torch.tensor(0, dtype=torch.int64)
    else:
      state_dict[name] = torch.from_numpy(random_tensor(name, shape))
  # pytorch-fid downloads its weights here; hand it ours. Its load_state_dict is strict.
  pfid_inception.load_state_dict_from_url = lambda *a, **k: state_dict
  model = pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  model.eval()
  if args.pth:
    torch.save(state_dict, args.pth)

  images = noise_images()
  with tempfile.TemporaryDirectory() as tmp:
    files = []
    for i, image in enumerate(images):
      files.append(os.path.join(tmp, f"{i}.png"))
      Image.fromarray(image).save(files[-1])
    features = fid_score.get_activations(files, model, batch_size=len(files), device="cpu")

  out = {
    "images": images,
    "features": features.astype(np.float32),
    "names": np.array(list(shapes)),
    "shapes": np.array(json.dumps({k: list(v) for k, v in shapes.items()})),
    "versions": np.array(
      json.dumps(
        dict(
          torch=torch.__version__,
          torchvision=torchvision.__version__,
          pytorch_fid=pytorch_fid.__version__,
          numpy=np.__version__,
          scipy=scipy.__version__,
        )
      )
    ),
  }
  g = torch.Generator().manual_seed(SEED + 1)
  for i, (in_shape, size) in enumerate(RESIZE_CASES):
    x = torch.rand(*in_shape, generator=g)
    y = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out[f"resize_in_{i}"] = x.numpy()
    out[f"resize_out_{i}"] = y.numpy()

  rng = np.random.default_rng(SEED + 2)
  # A full-rank case and a few-samples (singular covariance) case.
  for tag, (n, d) in {"full": (64, 8), "few": (4, 8)}.items():
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5
    b = rng.standard_normal((n, d)) * 1.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    out[f"frechet_{tag}_a"], out[f"frechet_{tag}_b"] = a, b
    out[f"frechet_{tag}_value"] = np.float64(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
  os.makedirs(args.out_dir, exist_ok=True)
  np.savez_compressed(os.path.join(args.out_dir, "fid_parity.npz"), **out)

  cases = _reader_cases(torch)
  torch.save(cases, os.path.join(args.out_dir, "fid_reader_zip.pth"))
  torch.save(
    cases,
    os.path.join(args.out_dir, "fid_reader_legacy.pth"),
    _use_new_zipfile_serialization=False,
  )
  np.savez(
    os.path.join(args.out_dir, "fid_reader_expected.npz"),
    **{k: _expected(v) for k, v in cases.items()},
  )
  print("features: mean", features.mean(), "std", features.std(), "max", features.max())
  for name in sorted(os.listdir(args.out_dir)):
    if name.startswith("fid_"):
      print(name, os.path.getsize(os.path.join(args.out_dir, name)), "bytes")


if __name__ == "__main__":
  main()
