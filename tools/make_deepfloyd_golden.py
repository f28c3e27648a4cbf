"""Writes tests/golden/deepfloyd/: tiny random DeepFloyd-IF U-Nets (diffusers layout) + outputs.

Needs torch + diffusers==0.42.1 + safetensors (NOT test dependencies); run it from a separate venv:

  python3.12 -m venv /tmp/ifvenv
  /tmp/ifvenv/bin/pip install torch diffusers==0.42.1 safetensors numpy
  /tmp/ifvenv/bin/python tools/make_deepfloyd_golden.py

Writes, per stage ('stage_I', 'stage_II'), `<stage>/unet/config.json` and its weights
(stage I: `diffusion_pytorch_model.safetensors` in float32; stage II: the fp16 variant
`diffusion_pytorch_model.fp16.safetensors`, its outputs computed in float32 from the fp16-rounded
weights), plus `<stage>_io.npz` (inputs and the U-Net's output) and `ddim_trajectory.npz`: diffusers'
DDIMScheduler with IF's training schedule (squaredcos_cap_v2, 1000 steps) run for 10 steps on
the stage-I network's ε (its first three output channels), without and with IF's dynamic
thresholding percentile (95).

The configs follow diffusers' own IF pipeline tests (tests/pipelines/deepfloyd_if/__init__.py),
narrowed so both stages stay well under 1 MB: ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D /
UNetMidBlock2DSimpleCrossAttn, addition_embed_type='text', encoder_hid_dim, group-norm'd added K/V,
scale-shift residual blocks, GELU, 6 output channels; stage II adds class_embed_type='timestep' for
the augmentation level and IF-II's output scale factors and skipped time activation.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

OUT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "golden", "deepfloyd"
)

COMMON = dict(
  sample_size=8,
  block_out_channels=[8, 16],
  down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
  mid_block_type="UNetMidBlock2DSimpleCrossAttn",
  up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
  out_channels=6,
  norm_num_groups=4,
  cross_attention_dim=32,
  encoder_hid_dim=24,
  attention_head_dim=8,
  addition_embed_type="text",
  addition_embed_type_num_heads=2,
  cross_attention_norm="group_norm",
  resnet_time_scale_shift="scale_shift",
  act_fn="gelu",
)
STAGE_I = dict(COMMON, in_channels=3, layers_per_block=1)
STAGE_II = dict(
  COMMON,
  in_channels=6,
  layers_per_block=[1, 2],
  class_embed_type="timestep",
  mid_block_scale_factor=1.414,
  resnet_out_scale_factor=1.414,
  resnet_skip_time_act=True,
  time_embedding_act_fn="gelu",
)
TEXT_LEN = 7


def build(config: dict, seed: int, fp16_weights: bool) -> UNet2DConditionModel:
  """The diffusers U-Net with random weights (every tensor, not only the default init)."""
  torch.manual_seed(seed)
  unet = UNet2DConditionModel(**config).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      # Norm scales near 1, the rest O(1/sqrt(fan_in)): every weight matters, nothing is zero.
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else p.numel()
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(fan_in))
      if fp16_weights:
        p.copy_(p.half().float())
  return unet


def save(unet: UNet2DConditionModel, stage_dir: str, fp16: bool) -> None:
  """Saves the diffusers layout: unet/config.json + (fp16 variant) safetensors."""
  if fp16:
    unet.half().save_pretrained(os.path.join(stage_dir, "unet"), variant="fp16")
    unet.float()
  else:
    unet.save_pretrained(os.path.join(stage_dir, "unet"))


def stage_io(unet: UNet2DConditionModel, config: dict, seed: int, sr: bool) -> dict:
  """Random inputs and the network's output (float32, NCHW as diffusers takes them)."""
  rng = np.random.default_rng(seed)
  b, s = 2, config["sample_size"]
  x = rng.standard_normal((b, config["in_channels"], s, s)).astype(np.float32)
  t = np.array([981.0, 137.25], np.float32)  # a fractional timestep too (our samplers need it)
  text = rng.standard_normal((b, TEXT_LEN, config["encoder_hid_dim"])).astype(np.float32)
  io = {"sample": x, "timestep": t, "encoder_hidden_states": text}
  kwargs = {}
  if sr:
    io["class_labels"] = np.array([250.0, 20.0], np.float32)
    kwargs["class_labels"] = torch.from_numpy(io["class_labels"])
  with torch.no_grad():
    out = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(text), **kwargs).sample
  io["output"] = out.numpy()
  return io


def _ddim(threshold: bool) -> DDIMScheduler:
  return DDIMScheduler(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    clip_sample=False,
    thresholding=threshold,
    # IF's percentile (its scheduler config: ratio 0.95); our dynamic thresholding has no upper
    # bound on s, so the golden lifts diffusers' sample_max_value (IF: 1.5) out of the way.
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1e6,
    set_alpha_to_one=True,  # the last step lands on x̂₀, as our sampler loop's does
    timestep_spacing="trailing",  # t = 999, 899, ...: the first step starts from pure noise
    prediction_type="epsilon",
  )


def ddim_trajectory(unet: UNet2DConditionModel, config: dict, num_steps: int = 10) -> dict:
  """DDIM (η = 0) with IF's schedule on the stage-I network, without and with IF's dynamic
  thresholding (p = 95): the timesteps, and x after every step (x[0] is the initial noise)."""
  rng = np.random.default_rng(7)
  s = config["sample_size"]
  x_init = rng.standard_normal((2, 3, s, s)).astype(np.float32)
  text = torch.from_numpy(
    rng.standard_normal((2, TEXT_LEN, config["encoder_hid_dim"])).astype(np.float32)
  )
  out = {"encoder_hidden_states": text.numpy()}
  for key, threshold in (("x", False), ("x_thresholded", True)):
    sched = _ddim(threshold)
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_init)
    xs = [x.numpy()]
    with torch.no_grad():
      for t in sched.timesteps:
        eps = unet(x, t.expand(2).float(), text).sample[:, :3]
        x = sched.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
        xs.append(x.numpy())
    out[key] = np.stack(xs)
  out["timesteps"] = sched.timesteps.numpy()
  out["alphas_cumprod"] = sched.alphas_cumprod.numpy()
  return out


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  torch.set_num_threads(1)
  unet_i = build(STAGE_I, seed=0, fp16_weights=False)
  save(unet_i, os.path.join(OUT, "stage_I"), fp16=False)
  np.savez(os.path.join(OUT, "stage_I_io.npz"), **stage_io(unet_i, STAGE_I, 1, sr=False))
  unet_ii = build(STAGE_II, seed=10, fp16_weights=True)
  save(unet_ii, os.path.join(OUT, "stage_II"), fp16=True)
  np.savez(os.path.join(OUT, "stage_II_io.npz"), **stage_io(unet_ii, STAGE_II, 11, sr=True))
  np.savez(os.path.join(OUT, "ddim_trajectory.npz"), **ddim_trajectory(unet_i, STAGE_I))
  sizes = {
    os.path.relpath(os.path.join(d, f), OUT): os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(OUT)
    for f in fs
  }
  print(json.dumps(sizes, indent=1), "total", sum(sizes.values()))


if __name__ == "__main__":
  main()
