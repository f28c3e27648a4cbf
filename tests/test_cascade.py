"""Cascade sampling end to end on tiny random-weight stages: shapes, dtypes, seeds, knobs."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import pytest

from imagen_jax import parallel
from imagen_jax.inference import cascade
from imagen_jax.stage import StageConfig
from tests import cascade_helpers

SETTINGS = (
  cascade.StageSampling(num_steps=3),
  cascade.StageSampling(num_steps=2, aug_level=0.1),
  cascade.StageSampling(num_steps=2, sampler="ancestral"),
)
# Both fit the tiny vocabulary's 32 tokens.
PROMPTS = ["a large red circle on a white background", "a large blue square on a gray background"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  enc, vocab = cascade_helpers.tiny_encoder(str(tmp_path_factory.mktemp("vocab")))
  stages = cascade_helpers.random_stages()
  return cascade.Cascade(enc, stages)


@pytest.fixture(scope="module")
def full_run(tiny):
  return tiny.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS)


def test_cascade_shapes_dtypes_and_range(full_run):
  assert full_run.stages_run == [0, 1, 2]
  assert [x.shape for x in full_run.per_stage] == [(2, 16, 16, 3), (2, 32, 32, 3), (2, 64, 64, 3)]
  for x in full_run.per_stage:
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))
    # Dynamic thresholding keeps x̂₀ in [−1, 1].
    assert np.abs(x).max() <= 1.0 + 1e-5
  np.testing.assert_array_equal(full_run.images, full_run.per_stage[-1])
  # Random weights still give different images for different prompts/seeds.
  assert np.abs(full_run.images[0] - full_run.images[1]).mean() > 1e-3


def test_image_depends_only_on_its_prompt_and_seed(tiny, full_run):
  again = tiny.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS)
  np.testing.assert_array_equal(again.images, full_run.images)
  # In the other batch position: the same image (per-image keys; up to batch numerics).
  swapped = tiny.sample(PROMPTS[::-1], seeds=[12, 11], settings=SETTINGS)
  np.testing.assert_allclose(swapped.images[::-1], full_run.images, atol=2e-4)
  other_seed = tiny.sample(PROMPTS, seeds=[99, 12], settings=SETTINGS)
  assert np.abs(other_seed.images[0] - full_run.images[0]).mean() > 1e-3
  np.testing.assert_allclose(other_seed.images[1], full_run.images[1], atol=2e-4)


def test_base_stage_equals_direct_stage_sample(tiny, full_run):
  emb, mask = tiny.encode(PROMPTS[:1])
  base = tiny.stages[0]
  direct = base.stage.sample(
    base.params,
    emb,
    mask,
    jax.random.fold_in(jax.random.PRNGKey(11), 0),
    SETTINGS[0].sampler_config(),
  )
  np.testing.assert_allclose(np.asarray(direct)[0], full_run.per_stage[0][0], atol=1e-5)


def test_stop_after_and_start_from_lowres(tiny, full_run):
  first = tiny.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS, stop_after=1)
  assert first.stages_run == [0] and first.images.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(first.images, full_run.per_stage[0], atol=1e-6)
  # Super-resolving the base output reproduces the rest of the full run (same per-stage keys).
  sr = tiny.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS, lowres=full_run.per_stage[0])
  assert sr.stages_run == [1, 2]
  np.testing.assert_allclose(sr.images, full_run.images, atol=1e-5)


def test_every_program_call_gets_batch_size_images(tiny, full_run, monkeypatch):
  # A caller streaming batches (imagen-jax sample) ends on a smaller one: padded to batch_size,
  # it reuses the compiled program instead of compiling another.
  sizes = []
  real_program = cascade.Cascade._program

  def program(self, index, settings):
    fn = real_program(self, index, settings)

    def call(params, emb, *args):
      sizes.append(emb.shape[0])
      return fn(params, emb, *args)

    return call

  monkeypatch.setattr(cascade.Cascade, "_program", program)
  padded = tiny.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS, stop_after=1, batch_size=3)
  assert sizes == [8]  # 3 rounded up to a multiple of the 8 sampling devices
  np.testing.assert_allclose(padded.images, full_run.per_stage[0], atol=2e-4)
  sizes.clear()
  one = cascade.Cascade(tiny.encoder, tiny.stages, devices=jax.local_devices()[:1])
  one.sample(PROMPTS[:1], seeds=[11], settings=SETTINGS, stop_after=1, batch_size=3)
  assert sizes == [3]


def test_empty_prompt_is_unconditional_and_negative_prompts(tiny, caplog):
  emb, mask = tiny.encode(["", PROMPTS[0]])
  assert not mask[0].any() and np.all(emb[0] == 0)
  assert mask[1].sum() > 3 and np.abs(emb[1]).sum() > 0
  guided = (cascade.StageSampling(num_steps=2, guidance_weight=3.0),) + SETTINGS[1:]
  plain = tiny.sample(PROMPTS, [5, 6], guided, stop_after=1)
  empty_negative = tiny.sample(PROMPTS, [5, 6], guided, negative_prompts="", stop_after=1)
  np.testing.assert_allclose(empty_negative.images, plain.images, atol=1e-6)
  negative = tiny.sample(PROMPTS, [5, 6], guided, negative_prompts=PROMPTS[::-1], stop_after=1)
  assert np.abs(negative.images - plain.images).mean() > 1e-4
  with caplog.at_level(logging.WARNING, logger="imagen_jax.inference.cascade"):
    tiny.encode(["a large red circle " * 20])
  assert "truncated" in caplog.text


def test_bad_input(tiny):
  with pytest.raises(ValueError, match="one seed per image"):
    tiny.sample(PROMPTS, seeds=[1], settings=SETTINGS)
  with pytest.raises(ValueError, match="stop_after=4"):
    tiny.sample(PROMPTS, seeds=[1, 2], settings=SETTINGS, stop_after=4)
  with pytest.raises(ValueError, match="no super-resolution stage takes 8px"):
    tiny.sample(PROMPTS, seeds=[1, 2], settings=SETTINGS, lowres=np.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="one per stage"):
    tiny.sample(PROMPTS, seeds=[1, 2], settings=SETTINGS[:2])
  with pytest.raises(ValueError, match="sampler"):
    cascade.StageSampling(sampler="euler")
  with pytest.raises(ValueError, match=r"guidance_weight=-3\.0 is invalid.*1 = no guidance"):
    cascade.StageSampling(guidance_weight=-3.0)
  with pytest.raises(ValueError, match="guidance_weight=inf"):
    cascade.StageSampling(guidance_weight=float("inf"))
  # PRNG seeds are 32-bit: -1 and 2**32 would silently repeat other seeds' images.
  with pytest.raises(ValueError, match=r"seed -1 is outside \[0, 4294967295\]"):
    tiny.sample(PROMPTS, seeds=[-1, 2], settings=SETTINGS)
  with pytest.raises(ValueError, match="seed 4294967296 is outside"):
    tiny.sample(PROMPTS, seeds=[1, 2**32], settings=SETTINGS)
  with pytest.raises(ValueError, match="batch_size=0"):
    tiny.sample(PROMPTS, seeds=[1, 2], settings=SETTINGS, batch_size=0)
  stages = tiny.stages
  with pytest.raises(ValueError, match="do not chain"):
    cascade.Cascade(None, [stages[0], stages[2]])
  with pytest.raises(ValueError, match="not a super-resolution"):
    cascade.Cascade(None, [stages[0], stages[0]])


def test_stage_spec_round_trip(tiny):
  for s in tiny.stages:
    rebuilt = cascade.stage_from_spec(s.spec)
    assert rebuilt.config == s.config
    assert rebuilt.network == s.stage.network
  bad = dataclasses.replace(tiny.stages[1].config, lowres_resolution=8)
  assert isinstance(bad, StageConfig)


def test_sharded_sampling_equals_one_device(tiny, full_run):
  """The default cascade splits each batch over all 8 devices; one device gives the same images
  (float rounding only: the per-image program is the same, its batch is not)."""
  assert len(tiny.devices) == jax.local_device_count() == 8
  one = cascade.Cascade(tiny.encoder, tiny.stages, devices=jax.local_devices()[:1])
  single = one.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS)
  for a, b in zip(single.per_stage, full_run.per_stage, strict=True):
    np.testing.assert_allclose(a, b, atol=2e-4)
  # The sharded call really ran on every device: params replicated, batch split 8 ways.
  placed = tiny._params_on_devices(0)
  assert len(jax.tree.leaves(placed)[0].sharding.device_set) == 8


def test_fsdp_sharded_sampling_equals_one_device(tiny, full_run):
  """8 devices as data=2 × fsdp=4 (params FSDP-sharded by the training rules, batch split over
  ('data', 'fsdp')) give the one-device images: float rounding only, atol 2e-4 in [−1, 1]."""
  mesh = parallel.MeshConfig(data=2, fsdp=4)
  fsdp = cascade.Cascade(tiny.encoder, tiny.stages, mesh=mesh)
  assert dict(fsdp.mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
  sharded = fsdp.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS, batch_size=3)
  one = cascade.Cascade(tiny.encoder, tiny.stages, devices=jax.local_devices()[:1])
  single = one.sample(PROMPTS, seeds=[11, 12], settings=SETTINGS)
  errs = [float(np.abs(a - b).max()) for a, b in zip(sharded.per_stage, single.per_stage)]
  print("data=2 × fsdp=4 vs 1 device, max |Δ| per stage:", errs)
  assert max(errs) <= 2e-4
  # The params really are FSDP-sharded: big kernels hold a quarter of their rows per device.
  for k in range(3):
    leaves = jax.tree.leaves(fsdp._params_on_devices(k))
    split = [x for x in leaves if x.sharding.shard_shape(x.shape) != x.shape]
    assert split and all(len(x.sharding.device_set) == 8 for x in leaves)
    biggest = max(leaves, key=lambda x: x.size)
    assert np.prod(biggest.sharding.shard_shape(biggest.shape)) * 4 == biggest.size


def test_mesh_flag_parsing():
  assert parallel.parse_mesh_flag("data=2,fsdp=4") == parallel.MeshConfig(data=2, fsdp=4)
  assert parallel.parse_mesh_flag(" fsdp=8 ") == parallel.MeshConfig(fsdp=8)
  for bad, pattern in [
    ("data=2,data=4", "each once"),
    ("pipeline=2", "AXIS=SIZE"),
    ("data=two", "not an integer"),
    ("", "no axis sizes"),
    ("data=0", "size 0"),
  ]:
    with pytest.raises(ValueError, match=pattern):
      parallel.parse_mesh_flag(bad)
