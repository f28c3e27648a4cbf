"""Throughput accounting: FLOPs from XLA's cost analysis, device peaks, MFU, progress display."""

from __future__ import annotations

import time
from typing import Any

import jax

from imagen_jax import tpu_slices

# Peak dense bf16 FLOP/s per device: TPUs from the slice table (by `device_kind`, e.g. 'TPU v5
# lite', and by generation name, e.g. 'TPU v5e'), H100/H200 SXM dense from NVIDIA's figures.
PEAK_BF16_FLOPS: dict[str, float] = {
  **{g.device_kind: g.peak_bf16_flops for g in tpu_slices.GENERATIONS.values()},
  **{f"TPU {g.name}": g.peak_bf16_flops for g in tpu_slices.GENERATIONS.values()},
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
}


def peak_flops_per_device(device: jax.Device) -> float | None:
  """The device's peak bf16 FLOP/s, or None when unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def compiled_flops(compiled: Any) -> float | None:
  """Total FLOPs of one call of a compiled program (all devices), from `cost_analysis()`."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, list | tuple):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  # XLA reports the per-device (SPMD partition) program's FLOPs.
  return float(analysis["flops"]) * compiled_num_devices(compiled)


def compiled_num_devices(compiled: Any) -> int:
  try:
    shardings = jax.tree.leaves(compiled.input_shardings)
    return max(len(s.device_set) for s in shardings) if shardings else 1
  except Exception:
    return 1


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled program: arguments, outputs, temporaries, total."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0)),
  }
  out["total_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  )
  return out


def throughput_scalars(
  metrics: dict,
  steps: int,
  seconds: float,
  global_batch: int,
  num_devices: int,
  flops_per_step: float | None,
  peak_per_device: float | None,
) -> dict[str, float | None]:
  """Loss metrics plus steps/s, images/s per device, TFLOP/s per device and MFU."""
  out = {k: float(v) for k, v in metrics.items()}
  steps_per_s = steps / max(seconds, 1e-9)
  out["steps_per_sec"] = steps_per_s
  out["images_per_sec_per_device"] = steps_per_s * global_batch / num_devices
  if flops_per_step:
    achieved = flops_per_step * steps_per_s / num_devices
    out["tflops_per_sec_per_device"] = achieved / 1e12
    out["mfu"] = achieved / peak_per_device if peak_per_device else None
  else:
    out["tflops_per_sec_per_device"] = None
    out["mfu"] = None
  return out


class Progress:
  """A tqdm bar over training steps showing loss and images/s (process 0 only)."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self._bar = None
    self._t0 = time.time()
    if enabled:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, scalars: dict) -> None:
    if self._bar is None:
      return
    self._bar.n = step
    mfu = scalars.get("mfu")
    self._bar.set_postfix(
      loss=f"{scalars.get('loss', float('nan')):.4f}",
      img_s_dev=f"{scalars.get('images_per_sec_per_device', 0):.1f}",
      mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%",
      refresh=False,
    )
    self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
