"""Export bundles: round trip to identical samples, the portable StableHLO step, bad input."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from imagen_jax.inference import bundle as export
from imagen_jax.inference import cascade
from tests import cascade_helpers

SETTINGS = (
  cascade.StageSampling(num_steps=3),
  cascade.StageSampling(num_steps=2, aug_level=0.1),
  cascade.StageSampling(num_steps=2, sampler="ancestral"),
)
PROMPTS = ["a large red circle on a white background", "a large blue square on a gray background"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  enc, vocab = cascade_helpers.tiny_encoder(str(root))
  stages = cascade_helpers.random_stages()
  bundle = str(root / "bundle")
  manifest = export.export_bundle(stages, enc.identity(), vocab, bundle)
  return cascade.Cascade(enc, stages), bundle, manifest


def test_manifest_lists_every_file_with_its_hash(exported):
  _, bundle, manifest = exported
  assert manifest["format_version"] == export.FORMAT_VERSION
  assert manifest["package_versions"]["jax"] == jax.__version__
  on_disk = {
    os.path.relpath(os.path.join(r, n), bundle) for r, _, ns in os.walk(bundle) for n in ns
  }
  assert on_disk - {"manifest.json"} == set(manifest["files"])
  for stage_dir in ("0_base16", "1_sr32", "2_sr64"):
    for f in ("stage.json", "ema_params.msgpack", "denoise_step.jaxexport"):
      assert f"stages/{stage_dir}/{f}" in manifest["files"]
  with open(os.path.join(bundle, "text_encoder", "encoder.json")) as f:
    enc = json.load(f)
  assert enc["size"] == "tiny" and enc["checkpoint"] == "random:0"
  assert os.path.isfile(os.path.join(bundle, "text_encoder", enc["vocab_file"]))


def test_bundle_samples_equal_direct_samples(exported):
  direct, bundle, _ = exported
  loaded = export.load_bundle(bundle)
  for a, b in zip(direct.stages, loaded.stages, strict=True):
    assert a.config == b.config and a.stage.network == b.stage.network
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  want = direct.sample(PROMPTS, [3, 4], SETTINGS)
  got = loaded.sample(PROMPTS, [3, 4], SETTINGS)
  np.testing.assert_array_equal(got.images, want.images)


def test_portable_step_reloads_with_jax_alone(exported):
  direct, bundle, _ = exported
  rng = np.random.default_rng(0)
  for k, st in enumerate(direct.stages):
    sdir = os.path.join(bundle, "stages", export.stage_dir_name(k, st))
    with open(os.path.join(sdir, "denoise_step.jaxexport"), "rb") as f:
      step = jax.export.deserialize(f.read())
    with open(os.path.join(sdir, "denoise_step.json")) as f:
      inputs = json.load(f)["inputs"]
    batch = 3  # the batch dimension is symbolic
    args = []
    for spec in inputs:
      shape = [batch if d == "b" else d for d in spec["shape"]]
      if spec["dtype"] == "bool":
        args.append(np.arange(np.prod(shape)).reshape(shape) % 5 < 3)
      else:
        args.append(rng.standard_normal(shape).astype(np.float32))
    got = step.call(*args)
    names = [s["name"] for s in inputs]
    kw = dict(zip(names, args, strict=True))
    cond = {n: kw[n] for n in names if n not in ("z", "log_snr")}
    want = st.stage.model_fn(st.params, kw["z"], kw["log_snr"], cond)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


def test_bfloat16_params(exported, tmp_path):
  direct, bundle, _ = exported
  ref, vocab = export.load_encoder_reference(bundle)
  out = str(tmp_path / "bf16")
  export.export_bundle(direct.stages, ref, vocab, out, param_dtype="bfloat16", portable_step=False)
  stages = export.load_stages(out)
  leaf = jax.tree.leaves(stages[0].params)[0]
  assert leaf.dtype == jax.numpy.bfloat16
  assert os.path.getsize(os.path.join(out, "stages/0_base16/ema_params.msgpack")) < 0.6 * (
    os.path.getsize(os.path.join(bundle, "stages/0_base16/ema_params.msgpack"))
  )


def test_refusals_leave_everything_untouched(exported, tmp_path):
  direct, bundle, manifest = exported
  ref, vocab = export.load_encoder_reference(bundle)
  before = os.path.getmtime(os.path.join(bundle, "manifest.json"))
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export_bundle(direct.stages, ref, vocab, bundle)
  assert os.path.getmtime(os.path.join(bundle, "manifest.json")) == before
  with pytest.raises(ValueError, match="do not chain"):
    export.export_bundle([direct.stages[0], direct.stages[2]], ref, vocab, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
  # A bundle from the future.
  future = tmp_path / "future"
  future.mkdir()
  (future / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
  with pytest.raises(ValueError, match="format_version 99, newer"):
    export.load_bundle(str(future))
  # A corrupted file is caught by its hash.
  tampered = tmp_path / "tampered"
  export.export_bundle(direct.stages[:1], ref, vocab, str(tampered), portable_step=False)
  with open(tampered / "stages/0_base16/stage.json", "a") as f:
    f.write(" ")
  with pytest.raises(ValueError, match="sha256"):
    export.load_stages(str(tampered))
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    export.load_bundle(str(tmp_path))


def test_rerun_removes_the_temp_dir_of_a_killed_export(exported, tmp_path, caplog):
  import logging
  import signal
  import subprocess
  import sys

  direct, bundle, _ = exported
  ref, vocab = export.load_encoder_reference(bundle)
  out = str(tmp_path / "bundle")
  # A real export process creates its temporary bundle (as mid-write) and is SIGKILLed.
  code = (
    "import sys, time; from imagen_jax.inference import bundle as export; "
    "d = export.make_temp_dir(sys.argv[1]); open(d + '/half', 'w').write('x'); "
    "print(d, flush=True); time.sleep(600)"
  )
  killed = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
  stale = killed.stdout.readline().strip()
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  # One of a writer that is still running stays.
  alive = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
  try:
    live = alive.stdout.readline().strip()
    assert os.path.isdir(stale) and os.path.isdir(live)
    with caplog.at_level(logging.WARNING):
      export.export_bundle(direct.stages[:1], ref, vocab, out, portable_step=False)
    assert not os.path.exists(stale)
    assert f"removed {stale}, left by export process {killed.pid}" in caplog.text
    assert os.path.isdir(live), "a live writer's directory is not ours to remove"
  finally:
    alive.kill()
    alive.wait()
  export.read_manifest(out)  # complete: every file present with its sha256
  left = [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert left == [os.path.basename(live)]
