"""What a compiled program costs per chip: memory against HBM, FLOPs, a roofline step time.

`imagen-jax compile` compiles the training job's own step (and, with `--sample`, the sampling
loop) for a TPU topology without devices, then reports through `CompileReport`:
  - per-chip bytes from `memory_analysis()`: arguments, outputs, temporaries, code, minus what
    donation aliases; compared with the chip's HBM and a required headroom (XLA's runtime and
    fragmentation need some: a program at 99% of HBM does not run). The TPU compiler trades
    time for memory (rematerialisation) until a program fits its limit, so a program fits with
    headroom only if it compiles under a limit lowered by that headroom: `compile_or_explain`;
  - FLOPs and bytes accessed per chip from `cost_analysis()`;
  - a roofline bound on the step time, max(FLOPs / peak, bytes / HBM bandwidth), and the
    compiler's own `optimal_seconds` only where it is positive and not below the roofline
    (XLA has returned negative values for large steps);
  - images/s per chip and an MFU bound implied by that time.
Collectives over ICI/DCN are not in the roofline; the estimate is a lower bound on step time.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
from typing import Any

from imagen_jax import tpu_slices

GIB = 2**30


def peak_host_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports KiB)."""
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per device
    cost = cost[0] if cost else {}
  return dict(cost or {})


def program_costs(compiled: Any) -> dict[str, float | int]:
  """Per-chip memory (bytes) and cost (FLOPs, bytes accessed, optimal_seconds) of a program."""
  mem = compiled.memory_analysis()
  out: dict[str, float | int] = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "alias_bytes": int(getattr(mem, "alias_size_in_bytes", 0)),
    "code_bytes": int(getattr(mem, "generated_code_size_in_bytes", 0)),
  }
  out["total_bytes"] = (
    out["argument_bytes"]
    + out["output_bytes"]
    - out["alias_bytes"]
    + out["temp_bytes"]
    + out["code_bytes"]
  )
  cost = _cost(compiled)
  out["flops"] = float(cost.get("flops", 0.0))
  out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
  out["optimal_seconds"] = float(cost.get("optimal_seconds", float("nan")))
  return out


def fit_advice(num_microbatches: int) -> str:
  """What to try when a step does not fit (the same global batch, less live memory)."""
  return (
    f"try --gin.train.train.num_microbatches={2 * num_microbatches} (same global batch) or the "
    "network's remat = True"
  )


class DoesNotFit(Exception):
  """The TPU compiler itself refused the program for lack of HBM."""


# libtpu's cap on the HBM one program may use (MiB). The compiler rematerialises and reorders
# until a program fits under its limit, so a program compiled at the full limit always sits near
# it: headroom can only be shown by compiling under a lower one. The cap never raises the
# compiler's own default limit (30.75 GiB of a v4's 32: 32768 MiB still reports 30.75G).
HBM_LIMIT_FLAG = "xla_tpu_max_hbm_size_mib"
MIB = 2**20


def hbm_limit_bytes(hbm_bytes: int, headroom: float) -> int:
  """The per-chip limit a program must compile under to leave `headroom` of HBM free."""
  return int((1.0 - headroom) * hbm_bytes) // MIB * MIB


# The two forms of libtpu's CompileTimeHbmOom: a peak found before scheduling, and one after.
_NEED = re.compile(r"required for ([^(]+)\(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)")
_USED = re.compile(r"Used ([\d.]+\w?) of ([\d.]+\w?) hbm")


def _oom_detail(text: str) -> str:
  if need := _NEED.search(text):
    return (
      f"the TPU compiler needs {need.group(2)} for {need.group(1).strip()} alone and "
      f"{need.group(3)} of HBM is available"
    )
  if used := _USED.search(text):
    return f"the TPU compiler needs {used.group(1)} and {used.group(2)} of HBM is available"
  return text.splitlines()[0]


def _compile(lowered: Any, limit_bytes: int | None, where: str, advice: str) -> Any:
  options = {} if limit_bytes is None else {HBM_LIMIT_FLAG: str(limit_bytes // MIB)}
  try:
    return lowered.compile(compiler_options=options)
  except Exception as e:  # XlaRuntimeError; its text is all the compiler gives
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
      raise
    raise DoesNotFit(f"does not fit{where}: {_oom_detail(text)}; {advice}") from None


def compile_or_explain(
  lowered: Any, num_microbatches: int, limit_bytes: int | None = None, where: str = ""
) -> Any:
  """Compiles (under `limit_bytes` of HBM per chip when given: TPU targets only); a program the
  TPU compiler cannot place becomes one DoesNotFit line (`where` names the limit in it).

  The compiler's limit covers arguments and temporaries (measured: "Used 19.56M" = arguments
  2.9 + temporaries 16.7 MiB), not the program's code, which also lives in HBM: when the code
  pushes a program that met the limit past it, the program is compiled once more under the
  limit less the code (the code's size did not change with the limit in our compiles; no test
  reaches this second compile: where the step lands near a small limit varies between runs).
  """
  advice = fit_advice(num_microbatches)
  compiled = _compile(lowered, limit_bytes, where, advice)
  if limit_bytes is None:
    return compiled
  costs = program_costs(compiled)
  if costs["total_bytes"] > limit_bytes:
    compiled = _compile(lowered, limit_bytes - costs["code_bytes"], where, advice)
  return compiled


@dataclasses.dataclass
class CompileReport:
  """One compiled program on one target, with what it implies per chip."""

  program: str  # 'train_step' or 'sample'
  stage: str
  target: str  # e.g. 'v4-256', '2 × v5p-128', 'cpu'
  compiled_on: str  # the slice actually compiled for (a data=1 sub-slice, or the target)
  chips: int
  hosts: int
  mesh: dict[str, int]
  global_batch: int
  per_device_batch: int
  num_microbatches: int
  params: int
  costs: dict[str, float | int]
  compile_s: float
  peak_host_rss_bytes: int
  fingerprint: str
  generation: tpu_slices.TpuGeneration | None = None
  headroom: float = 0.10
  # How often the costed program body runs per call: XLA's cost analysis counts a loop body
  # once, so a sampling loop's FLOPs are one denoising step's and its time is loop_steps × that.
  loop_steps: int = 1
  notes: list[str] = dataclasses.field(default_factory=list)

  # --- derived -------------------------------------------------------------------------------

  @property
  def hbm_bytes(self) -> int | None:
    return self.generation.hbm_bytes if self.generation else None

  @property
  def limit_bytes(self) -> int | None:
    """The per-chip HBM the program was compiled under: all of HBM less the headroom."""
    return hbm_limit_bytes(self.hbm_bytes, self.headroom) if self.hbm_bytes else None

  @property
  def fits(self) -> bool | None:
    """Whether the per-chip total leaves the required headroom (None off TPU)."""
    if self.hbm_bytes is None:
      return None
    return self.costs["total_bytes"] <= self.limit_bytes

  @property
  def flops(self) -> float:
    """Per-chip FLOPs of a call: the model's (counted from the jaxpr) when known, else XLA's.

    XLA's own count is reported beside it but not relied on: for a program with a loop (the
    gradient-accumulation scan) the TPU compiler's count came out between once and every
    iteration of the body, depending on the program.
    """
    return float(self.costs.get("model_flops") or self.costs["flops"])

  @property
  def compute_s(self) -> float | None:
    return self.flops / self.generation.peak_bf16_flops if self.generation else None

  @property
  def memory_s(self) -> float | None:
    if not self.generation:
      return None
    return self.costs["bytes_accessed"] / self.generation.hbm_bytes_per_s

  @property
  def roofline_s(self) -> float | None:
    if not self.generation:
      return None
    return max(self.compute_s, self.memory_s)

  @property
  def compiler_estimate_s(self) -> float | None:
    """XLA's optimal_seconds when plausible: positive and not faster than the roofline."""
    est = self.costs.get("optimal_seconds")
    roof = self.roofline_s
    if est is None or roof is None or not est > 0 or est < 0.999 * roof:
      return None
    return float(est)

  @property
  def step_s(self) -> float | None:
    """The estimated step time: the compiler's estimate when plausible, else the roofline."""
    return self.compiler_estimate_s or self.roofline_s

  @property
  def images_per_s_per_chip(self) -> float | None:
    return self.per_device_batch / (self.step_s * self.loop_steps) if self.step_s else None

  @property
  def mfu_bound(self) -> float | None:
    return self.compute_s / self.step_s if self.step_s else None

  def verdict(self) -> str:
    """One line: fits (with headroom) or does not fit (with what to try)."""
    total = self.costs["total_bytes"] / GIB
    if self.fits is None:
      return f"{total:.2f} GiB per device (no HBM figure for this platform)"
    hbm = self.hbm_bytes / GIB
    share = self.costs["total_bytes"] / self.hbm_bytes
    if self.fits:
      return (
        f"fits: {total:.2f} GiB of {hbm:.0f} GiB per chip ({100 * (1 - share):.0f}% headroom; "
        f"compiled under {self.limit_bytes / GIB:.2f} GiB)"
      )
    return (
      f"does not fit: {total:.2f} GiB of {hbm:.0f} GiB per chip, {100 * self.headroom:.0f}% "
      f"headroom required; {fit_advice(self.num_microbatches)}"
    )

  def _flops_text(self) -> str:
    xla = self.costs["flops"] / 1e12
    if not self.costs.get("model_flops"):
      return f"{xla:.2f} TFLOP (XLA's count)"
    return (
      f"{self.costs['model_flops'] / 1e12:.2f} TFLOP of convs and matmuls (the model's, used "
      f"below; XLA counts {xla:.2f})"
    )

  def to_text(self) -> str:
    """The human-readable report."""
    c = self.costs
    mesh = " × ".join(f"{k}={v}" for k, v in self.mesh.items())
    lines = [
      f"{self.program} of stage {self.stage} on {self.target}",
      f"  compiled for: {self.compiled_on} ({self.chips} chips, {self.hosts} hosts), mesh {mesh}",
      f"  batch: {self.global_batch} global, {self.per_device_batch} per device, "
      f"{self.num_microbatches} microbatch(es); {self.params:,} params",
      f"  memory per chip: arguments {c['argument_bytes'] / GIB:.2f} GiB, outputs "
      f"{c['output_bytes'] / GIB:.2f} GiB (aliased {c['alias_bytes'] / GIB:.2f}), temporaries "
      f"{c['temp_bytes'] / GIB:.2f} GiB, code {c['code_bytes'] / GIB:.3f} GiB, total "
      f"{c['total_bytes'] / GIB:.2f} GiB",
      f"  {self.verdict()}",
      f"  per chip per {'denoising ' if self.loop_steps > 1 else ''}step: {self._flops_text()}, "
      f"{c['bytes_accessed'] / GIB:.1f} GiB accessed",
    ]
    if self.generation:
      gen = self.generation
      est = self.compiler_estimate_s
      lines += [
        f"  roofline ({gen.name}: {gen.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{gen.hbm_bytes_per_s / 1e12:.2f} TB/s HBM): compute {self.compute_s:.3f} s, memory "
        f"{self.memory_s:.3f} s -> step >= {self.roofline_s:.3f} s",
        "  compiler optimal_seconds: "
        + (
          f"{est:.3f} s"
          if est
          else f"{c['optimal_seconds']:.4g} (not plausible: ignored; roofline used)"
        ),
        f"  estimate: {self.step_s:.3f} s/step"
        + (f" x {self.loop_steps} steps" if self.loop_steps > 1 else "")
        + f", {self.images_per_s_per_chip:.3g} images/s per chip, MFU <= "
        f"{100 * self.mfu_bound:.0f}%",
      ]
    lines += [
      f"  compile: {self.compile_s:.1f} s, peak host memory {self.peak_host_rss_bytes / GIB:.1f} GiB",
      f"  program sha256: {self.fingerprint}",
    ]
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    """Everything as plain JSON values (derived figures included)."""
    out = dataclasses.asdict(self)
    out["generation"] = self.generation.name if self.generation else None
    for key in (
      "flops",
      "hbm_bytes",
      "limit_bytes",
      "fits",
      "compute_s",
      "memory_s",
      "roofline_s",
      "compiler_estimate_s",
      "step_s",
      "images_per_s_per_chip",
      "mfu_bound",
    ):
      out[key] = getattr(self, key)
    out["verdict"] = self.verdict()
    return json.loads(json.dumps(out, default=str))
