"""Ours vs imagen-pytorch at a matched 32 px base U-Net: train-step and sampling speed, FLOPs.

  python benchmarks/peer_sampling.py [--peer_python=VENV/bin/python] [--rounds=3]
      [--steps=64] [--train_batch=8] [--sample_batch=2] [--out_dir=benchmarks/results]

imagen-pytorch is optional and never imported here: it runs in its own python (`--peer_python`,
a venv with `torch` and `imagen-pytorch==2.1.0`); without it only our numbers are measured.
Every measurement is one worker process (this script with `--worker=ours|peer`), and the
workers alternate ours/peer, ours/peer, ... for `--rounds` rounds so that drifting machine load
hits both alike; reported are medians over rounds and the ratios ours/peer. Both workers get
the same thread count (`--threads`, default all cores). FLOPs use one rule for both: 2 x the
multiply-accumulates of every convolution and matrix multiply in one forward pass at batch 1
(ours: summed over the jaxpr's `conv_general_dilated`/`dot_general`; the peer:
`torch.utils.flop_counter.FlopCounterMode`). Writes `<out_dir>/peer.md` and `peer.json`.

The peer's T5 config lookup (done at import time by imagen-pytorch, from Hugging Face) is
patched to a fixed width and it gets precomputed random text embeddings, so nothing is
downloaded and no T5 is built.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SKIP_LINE = "imagen-pytorch not available (pass --peer_python=...): ours only"
PEER_VERSION = "2.1.0"
# The key under which the worker registers the matched network in benchmarks/run.py's table.
MATCH_KEY = "peer_match"

# ================================================================================================
# The matched network
# ================================================================================================


def network_fields(args: argparse.Namespace) -> dict[str, Any]:
  """Our base U-Net's fields at the benchmark size (the paper's layout, narrower and at 32 px)."""
  return dict(
    image_size=args.image_size,
    channels=args.width,
    channel_mult=(1, 2, 3, 4),
    num_res_blocks=args.res_blocks,
    attention_resolutions=tuple(args.image_size // d for d in (1, 2, 4)),
    text_attention=True,
    head_dim=args.head_dim,
    emb_dim=4 * args.width,
    text_dim=args.text_dim,
    norm_groups=32,
    dropout=0.0,
  )


def peer_unet_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  """imagen-pytorch `Unet` arguments closest to `network_fields` (see MISMATCHES)."""
  return dict(
    dim=args.width,
    dim_mults=(1, 2, 3, 4),
    # Per level the peer runs one (init) res block plus `num_resnet_blocks`; ours runs
    # `num_res_blocks` going down: the same count down, one fewer going up.
    num_resnet_blocks=max(args.res_blocks - 1, 0),
    layer_attns=(True, True, True, False),  # attention at 32, 16, 8 px (x image_size/32)
    layer_attns_depth=args.res_blocks,  # as many attention layers per level as ours going down
    layer_cross_attns=False,  # ours conditions attention on text by K/V concatenation only
    layer_attns_add_text_cond=True,  # = ours' self_text: text tokens join the keys/values
    attn_heads=max(2, 2 * args.width // args.head_dim),  # the peer requires >= 2 heads
    attn_dim_head=args.head_dim,
    cond_dim=4 * args.width,  # ours: text projected to emb_dim = 4 x width
    text_embed_dim=args.text_dim,
    init_cross_embed=False,  # ours: a plain 3x3 stem conv
    init_conv_kernel_size=3,
    use_global_context_attn=False,
    final_resnet_block=False,
    pixel_shuffle_upsample=False,  # nearest + 3x3 conv, as ours upsamples
    memory_efficient=False,
    dropout=0.0,
  )


MISMATCHES = [
  "down path widths (default width 64): the peer's level i runs at its incoming width "
  "(dims[i] = 64, 64, 128, 192 at 32/16/8/4 px) and widens in its downsample; ours at 64, 128, "
  "192, 256. Middle and up path widths are the same (256 | 256, 192, 128, 64).",
  "res blocks per level (default 3): the peer runs 1 + num_resnet_blocks both ways (3 down, 3 "
  "up); ours 3 down and 4 up, plus a BigGAN resampling res block at each level change (the "
  "peer resamples with a pixel-unshuffle 1x1 conv down and nearest + 3x3 conv up).",
  "attention: ours after every res block at 32/16/8 px (+ middle), 1/2/3/4 heads of 64 "
  "(heads = width / 64), no MLP; the peer one TransformerBlock of depth 3 at the end of each "
  "such level (attention + GELU MLP of 2x width), multi-query attention (one K/V head) with the "
  "same 2 heads of 64 at every level (it asserts >= 2 heads), qk l2-norm and a learned null "
  "K/V. Text tokens join the keys/values in both.",
  "the peer's middle res blocks always carry text cross-attention (not switchable); its res "
  "blocks use RMS-norm and FiLM on the second conv only, ours GroupNorm(32) and scale-shift.",
  "text conditioning: ours LayerNorm + projection + attention pooling into the embedding; the "
  "peer a projection, a 2-layer Perceiver resampler (32 latents), mean-pooled text + time "
  "tokens. Output head: ours GN + SiLU + 3x3 conv, the peer a 3x3 conv.",
  "training step: both clip at global norm 1, run Adafactor and an EMA, but the optimisers "
  "differ in detail (optax adafactor, no parameter scaling, vs torch.optim.Adafactor); the "
  "peer's loss has min-SNR weighting. Both are a negligible share of the step's FLOPs.",
  "parameters differ (the widths, MLPs and conditioning above); FLOPs are within ~6%, so "
  "GFLOP/s is the size-independent comparison.",
]


# ================================================================================================
# Workers
# ================================================================================================


def _sampling_record(args: argparse.Namespace, t: dict[str, float]) -> dict[str, Any]:
  """The settings and per-image seconds (median, min, max) of one timed sampling batch."""
  b = args.sample_batch
  return dict(
    steps=args.num_steps,
    guidance=args.guidance,
    batch=b,
    s_per_image=t["median_s"] / b,
    s_per_image_min=t["min_s"] / b,
    s_per_image_max=t["max_s"] / b,
  )


def _median_timed(fn: Any, repeats: int, warmup: int) -> dict[str, float]:
  """Median/min/max seconds of `fn()` (blocking) over `repeats` calls after `warmup` calls:
  benchmarks/run.py's timer (stdlib only at import, so the peer's venv can use it too)."""
  if HERE not in sys.path:
    sys.path.insert(0, HERE)
  import run as bench_run

  return bench_run._timed(fn, repeats, warmup)


def _ours_stage(args: argparse.Namespace):
  """Our stage at the matched size, registered in benchmarks/run.py's train table."""
  sys.path.insert(0, HERE)
  sys.path.insert(0, REPO)
  import run as bench_run

  fields = network_fields(args)
  overrides = {k: v for k, v in fields.items()}
  stage_kwargs = dict(name="base", resolution=args.image_size)
  bench_run.TRAIN_CONFIGS[MATCH_KEY] = (
    "base64",
    overrides,
    stage_kwargs,
    "adafactor",
    args.text_len,
  )
  stage, _, _ = bench_run._stage(MATCH_KEY, "float32", False)
  return bench_run, stage


def ours_worker(args: argparse.Namespace) -> dict[str, Any]:
  """One measurement of ours: 'info' (params, FLOPs), 'train' or 'sample'."""
  import jax
  import numpy as np
  from flax import linen as nn

  from imagen_jax.flop_count import forward_flops
  from imagen_jax.info import count_params

  bench_run, stage = _ours_stage(args)
  net = stage.network
  out: dict[str, Any] = {"framework": "ours", "measure": args.measure}
  if args.measure == "info":
    env = bench_run.environment()
    out.update(
      params=count_params(net, args.text_len),
      gflop_per_image=forward_flops(net, 1, args.text_len) / 1e9,
      network=type(net).__name__,
      fields={k: list(v) if isinstance(v, tuple) else v for k, v in network_fields(args).items()},
      versions={k: env[k] for k in ("jax", "jaxlib", "flax", "optax", "python")},
      backend=env["backend"],
      device_kind=env["device_kind"],
      num_devices=env["num_devices"],
    )
  elif args.measure == "train":
    row = bench_run.bench_train_step(
      MATCH_KEY, "float32", False, args.train_batch, args.train_steps, {}, num_devices=1
    )
    out.update(
      images_per_s=row["images_per_s_per_device"],
      step_s=row["step_s"],
      step_s_min=row["step_s_min"],
      step_s_max=row["step_s_max"],
      compile_s=row["compile_s"],
      batch=args.train_batch,
      timed_steps=args.train_steps,
      optimizer=row["optimizer"],
    )
  else:
    from imagen_jax.diffusion import samplers

    shapes = stage.dummy_batch(1, args.text_len, net.text_dim)
    abstract = nn.unbox(jax.eval_shape(stage.init_params, jax.random.PRNGKey(0), shapes))
    rng = np.random.default_rng(0)
    # Random N(0, 0.02) weights from numpy: speed does not depend on the values, and XLA:CPU
    # takes longer to compile the real initialiser (20-60 s) than this whole measurement.
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    emb = rng.standard_normal((args.sample_batch, args.text_len, net.text_dim)).astype(np.float32)
    mask = np.ones((args.sample_batch, args.text_len), bool)
    cfg = samplers.SamplerConfig(
      sampler=args.sampler, num_steps=args.num_steps, guidance_weight=args.guidance
    )

    def call():
      jax.block_until_ready(stage.sample(params, emb, mask, jax.random.PRNGKey(1), cfg))

    t0 = time.perf_counter()
    call()  # compiles (and runs once): the timed calls below reuse the executable
    first_s = time.perf_counter() - t0
    t = _median_timed(call, args.sample_repeats, warmup=0)
    out.update(sampler=args.sampler, **_sampling_record(args, t), first_call_s=first_s)
  return out


def _import_peer(text_dim: int):
  """Imports imagen_pytorch with its Hugging Face T5 config lookup answered offline."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  import transformers

  # imagen-pytorch evaluates get_encoded_dim(DEFAULT_T5_NAME) as a default argument at import
  # time, which fetches a T5 config from the Hub: answer with a config of the given width.
  def offline_config(cls, name, *a, **k):
    return transformers.T5Config(d_model=text_dim)

  transformers.T5Config.from_pretrained = classmethod(offline_config)
  import imagen_pytorch
  from imagen_pytorch import t5

  t5.get_encoded_dim = lambda name: text_dim
  return imagen_pytorch


def peer_worker(args: argparse.Namespace) -> dict[str, Any]:
  """One measurement of imagen-pytorch: 'info' (params, FLOPs), 'train' or 'sample'."""
  import torch

  torch.set_num_threads(args.threads)
  imagen_pytorch = _import_peer(args.text_dim)
  torch.manual_seed(0)
  unet = imagen_pytorch.Unet(**peer_unet_kwargs(args))
  imagen = imagen_pytorch.Imagen(
    unets=unet,
    image_sizes=args.image_size,
    timesteps=args.num_steps,
    cond_drop_prob=0.1,
    text_embed_dim=args.text_dim,
  )
  unet = imagen.unets[0]
  gen = torch.Generator().manual_seed(0)
  out: dict[str, Any] = {"framework": "peer", "measure": args.measure}
  size, length = args.image_size, args.text_len

  def text(batch):
    return torch.randn(batch, length, args.text_dim, generator=gen)

  if args.measure == "info":
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, generator=gen)
    unet.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
      unet(x, torch.rand(1), text_embeds=text(1), text_mask=torch.ones(1, length, dtype=bool))
    out.update(
      params=int(sum(p.numel() for p in unet.parameters())),
      gflop_per_image=counter.get_total_flops() / 1e9,
      network="imagen_pytorch.Unet",
      fields={k: list(v) if isinstance(v, tuple) else v for k, v in peer_unet_kwargs(args).items()},
      versions={
        "torch": torch.__version__,
        "imagen_pytorch": getattr(imagen_pytorch, "__version__", PEER_VERSION),
        "python": platform.python_version(),
      },
      torch_threads=torch.get_num_threads(),
      torch_interop_threads=torch.get_num_interop_threads(),
    )
  elif args.measure == "train":
    imagen.train()
    images = torch.rand(args.train_batch, 3, size, size, generator=gen)  # [0, 1]: auto-normalised
    emb = text(args.train_batch)
    mask = torch.ones(args.train_batch, length, dtype=bool)
    params = [p for p in unet.parameters() if p.requires_grad]
    # Ours' base-stage step: clip at global norm 1, Adafactor, EMA of the parameters.
    opt = torch.optim.Adafactor(params, lr=1e-4)
    ema = [p.detach().clone() for p in params]

    def step():
      loss = imagen(images, text_embeds=emb, text_masks=mask, unet_number=1)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      with torch.no_grad():
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.9999)

    t = _median_timed(step, args.train_steps, warmup=2)
    out.update(
      images_per_s=args.train_batch / t["median_s"],
      step_s=t["median_s"],
      step_s_min=t["min_s"],
      step_s_max=t["max_s"],
      batch=args.train_batch,
      timed_steps=args.train_steps,
      optimizer="torch Adafactor",
    )
  else:
    imagen.eval()
    emb = text(args.sample_batch)
    mask = torch.ones(args.sample_batch, length, dtype=bool)

    def call():
      imagen.sample(text_embeds=emb, text_masks=mask, cond_scale=args.guidance, use_tqdm=False)

    with torch.no_grad():  # warm-up: one guided network evaluation (threads, allocator)
      x = torch.randn(args.sample_batch, 3, size, size, generator=gen)
      unet.forward_with_cond_scale(
        x, torch.rand(args.sample_batch), text_embeds=emb, text_mask=mask, cond_scale=3.0
      )
    t = _median_timed(call, args.sample_repeats, warmup=0)
    out.update(
      sampler=f"imagen-pytorch DDPM ancestral (GaussianDiffusionContinuousTimes, {args.num_steps} "
      "steps, cosine)",
      **_sampling_record(args, t),
    )
  return out


# ================================================================================================
# Orchestration (runs under our venv; imports neither jax nor torch)
# ================================================================================================

SHARED_FLAGS = (
  "image_size",
  "width",
  "res_blocks",
  "head_dim",
  "text_dim",
  "text_len",
  "guidance",
  "train_batch",
  "train_steps",
  "sample_batch",
  "sample_repeats",
  "threads",
)


def has_peer(python: str) -> bool:
  """Whether `python` can import imagen_pytorch (found by spec: importing it would hit the Hub)."""
  code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('imagen_pytorch') is None)"
  try:
    return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def worker_env(threads: int, cache_dir: str) -> dict[str, str]:
  """The environment of both workers: the same thread count, one CPU device for ours."""
  env = dict(os.environ)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    env[var] = str(threads)
  # Simulated multi-device CPUs (as the tests set) would split ours across fake devices.
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  flags += ["--xla_cpu_multi_thread_eigen=true", f"intra_op_parallelism_threads={threads}"]
  env["XLA_FLAGS"] = " ".join(flags)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # Non-partitionable threefry compiles the train step's initialiser ~2.5x faster on CPU.
  env.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
  # Rounds after the first reuse ours' compiled programs (compile time is never timed).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("PYTHONPATH", "")
  return env


def run_worker(
  python: str,
  framework: str,
  measure: str,
  args: argparse.Namespace,
  env: dict[str, str],
  workdir: str,
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Runs one worker process; returns its JSON result, or {'error': ...} if it failed."""
  extra = extra or {}
  json_out = os.path.join(workdir, f"{framework}_{measure}_{time.time_ns()}.json")
  cmd = [python, os.path.abspath(__file__), f"--worker={framework}", f"--measure={measure}"]
  cmd += [f"--{k}={getattr(args, k)}" for k in SHARED_FLAGS]
  cmd += [f"--{k}={v}" for k, v in extra.items()]
  cmd += [f"--json_out={json_out}"]
  _log(f"{framework} {measure} {' '.join(f'{k}={v}' for k, v in extra.items())}")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(
      cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=args.worker_timeout
    )
  except subprocess.TimeoutExpired:
    return {"framework": framework, "measure": measure, "error": "timed out", **extra}
  wall = time.perf_counter() - t0
  if proc.returncode != 0 or not os.path.exists(json_out):
    tail = (proc.stdout + proc.stderr)[-2000:]
    print(tail, file=sys.stderr)
    return {"framework": framework, "measure": measure, "error": tail[-500:], **extra}
  with open(json_out) as f:
    res = json.load(f)
  res["process_wall_s"] = wall
  return res


def _log(msg: str) -> None:
  print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _portable(text: str) -> str:
  """`text` with an absolute path (or a --flag=PATH) outside the repo shortened to its venv part
  (`.../bin/python` and the directory above): results must not name this machine's paths."""
  flag, eq, value = text.partition("=") if text.startswith("--") else ("", "", text)
  if os.path.isabs(value):
    inside = os.path.abspath(value).startswith(REPO + os.sep)
    parts = value.rstrip(os.sep).split(os.sep)
    value = os.path.relpath(value, REPO) if inside else os.path.join("VENV", *parts[-2:])
  return f"{flag}{eq}{value}"


def _machine() -> dict[str, Any]:
  """nproc, `free -g`, load, and whether a background `cli compile` was running."""

  def sh(cmd: list[str]) -> str:
    try:
      return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.rstrip()
    except (OSError, subprocess.SubprocessError):
      return ""

  # Only the count: the command lines name this machine's paths.
  compiles = len([ln for ln in sh(["pgrep", "-f", "cli compile"]).splitlines() if ln.strip()])
  return {
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "nproc": sh(["nproc"]) or str(os.cpu_count()),
    "free_g": sh(["free", "-g"]),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "loadavg": list(os.getloadavg()),
    "background_compiles": compiles,
  }


def _median(rows: list[dict], key: str) -> float | None:
  vals = [r[key] for r in rows if "error" not in r and r.get(key) is not None]
  return statistics.median(vals) if vals else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
  """Medians over rounds, GFLOP/s and the ratios ours/peer."""
  rounds = res["rounds"]
  info = res["info"]

  def pick(framework, measure, sampler=None):
    return [
      r
      for rnd in rounds
      for r in rnd
      if r["framework"] == framework
      and r["measure"] == measure
      and (sampler is None or r.get("sampler_flag") == sampler)
    ]

  out: dict[str, Any] = {}
  steps, w = res["settings"]["steps"], res["settings"]["guidance"]
  forwards = 2 if w != 1.0 else 1  # cond + uncond evaluations per step with guidance
  for fw in ("ours", "peer"):
    gf = info.get(fw, {}).get("gflop_per_image")
    train = pick(fw, "train")
    ips = _median(train, "images_per_s")
    sample = pick(fw, "sample", "ddim" if fw == "ours" else None)
    spi = _median(sample, "s_per_image")
    out[fw] = {
      "params": info.get(fw, {}).get("params"),
      "gflop_per_image": gf,
      "train_images_per_s": ips,
      "train_images_per_s_all": [r.get("images_per_s") for r in train],
      # The fastest timed step of each round: less sensitive to other jobs on a shared CPU.
      "train_images_per_s_best": _median(
        [{"v": r["batch"] / r["step_s_min"]} for r in train if "error" not in r], "v"
      ),
      # forward + backward = 3 forwards' FLOPs (the usual rule)
      "train_gflop_per_s": 3 * gf * ips if gf and ips else None,
      "sample_s_per_image": spi,
      "sample_s_per_image_all": [r.get("s_per_image") for r in sample],
      "sample_gflop_per_s": forwards * steps * gf / spi if gf and spi else None,
    }
  fast = pick("ours", "sample", "dpmpp_2m")
  spi = _median(fast, "s_per_image")
  gf = out["ours"]["gflop_per_image"]
  dpm_steps = res["settings"]["dpm_steps"]
  out["ours_dpmpp_2m"] = {
    "steps": dpm_steps,
    "sample_s_per_image": spi,
    "sample_s_per_image_all": [r.get("s_per_image") for r in fast],
    "sample_gflop_per_s": forwards * dpm_steps * gf / spi if gf and spi else None,
  }
  o, p = out["ours"], out["peer"]

  def ratio(a, b):
    return a / b if a and b else None

  out["ratios"] = {
    "train_images_per_s_ours_over_peer": ratio(o["train_images_per_s"], p["train_images_per_s"]),
    "train_images_per_s_best_ours_over_peer": ratio(
      o["train_images_per_s_best"], p["train_images_per_s_best"]
    ),
    "train_gflop_per_s_ours_over_peer": ratio(o["train_gflop_per_s"], p["train_gflop_per_s"]),
    "sample_s_per_image_ours_over_peer": ratio(o["sample_s_per_image"], p["sample_s_per_image"]),
    "sample_gflop_per_s_ours_over_peer": ratio(o["sample_gflop_per_s"], p["sample_gflop_per_s"]),
    "sample_s_per_image_dpmpp_over_peer": ratio(spi, p["sample_s_per_image"]),
    "gflop_per_image_ours_over_peer": ratio(o["gflop_per_image"], p["gflop_per_image"]),
    "params_ours_over_peer": ratio(o["params"], p["params"]),
  }
  return out


def _f(x: Any, fmt: str = ".3g") -> str:
  if x is None:
    return "n/a"
  if isinstance(x, float):
    return format(x, fmt)
  if isinstance(x, int):
    return f"{x:,}"
  return str(x)


def render_markdown(res: dict[str, Any]) -> str:
  """peer.md: setup, machine, the table of medians and ratios, what could not be matched."""
  s, m, sm = res["settings"], res["machine"], res["summary"]
  o, p, d, r = sm["ours"], sm["peer"], sm["ours_dpmpp_2m"], sm["ratios"]
  oi, pi = res["info"].get("ours", {}), res["info"].get("peer", {})
  peer_on = res["peer_available"]
  lines = [
    "# Ours vs imagen-pytorch at a matched network",
    "",
    f"- date (UTC): {m['date_utc']}; command: `{res['command']}`",
    f"- machine: {m['nproc']} CPUs ({m['processor']}, {m['platform']}); `free -g` at start:",
    "",
    "```",
    m["free_g"],
    "```",
    "",
    f"- load average at start {[round(x, 2) for x in m['loadavg']]}, at end "
    f"{[round(x, 2) for x in res['loadavg_end']]}"
    + (
      f"; **a background TPU compile (`imagen_jax.cli compile`) was running** during the run "
      f"({m['background_compiles']} process(es)): absolute numbers are pessimistic and "
      "drift, the A/B alternation makes the ratios the figures to read"
      if m["background_compiles"]
      else "; no background compile was running"
    ),
    f"- threads: {s['threads']} for both (torch.set_num_threads + OMP/MKL_NUM_THREADS; XLA "
    f"`{res['worker_xla_flags']}`); ours on one CPU device (jax {oi.get('versions', {}).get('jax', '?')}, "
    f"flax {oi.get('versions', {}).get('flax', '?')}), the peer imagen-pytorch "
    f"{pi.get('versions', {}).get('imagen_pytorch', 'n/a')} on torch "
    f"{pi.get('versions', {}).get('torch', 'n/a')}, float32 both",
    f"- {s['rounds']} round(s), each: ours train, peer train, ours sample (DDIM), peer sample, "
    f"ours sample (DPM-Solver++ 2M at {s['dpm_steps']} steps); one process per measurement; "
    "medians over rounds",
    f"- network: {s['image_size']} px, width {s['width']}, mults (1, 2, 3, 4), "
    f"{s['res_blocks']} res blocks, attention at {s['image_size']}/{s['image_size'] // 2}/"
    f"{s['image_size'] // 4} px + middle, head dim {s['head_dim']}, text {s['text_len']} tokens x "
    f"{s['text_dim']} (random embeddings, no T5)",
    f"- train: batch {s['train_batch']}, median of {s['train_steps']} timed steps after 2 "
    "warm-up steps (ours: the full compiled step of benchmarks/run.py, loss + grads + clip + "
    "Adafactor + EMA; the peer: `Imagen.forward` loss, backward, clip, torch Adafactor, EMA "
    "lerp); compile time excluded",
    f"- sampling: batch {s['sample_batch']}, {s['steps']} steps, guidance {s['guidance']}, "
    f"median of {s['sample_repeats']} call(s) after warm-up. Ours: `Stage.sample`, DDIM (eta 0) "
    "with dynamic thresholding, cond + uncond in one batched network call, random N(0, 0.02) "
    "weights (speed does not depend on them). The peer: "
    "`Imagen.sample(text_embeds=..., cond_scale=...)`, its own sampler: ancestral DDPM "
    "posterior steps on its continuous-time cosine schedule (`timesteps=steps`; it has no "
    "DDIM), dynamic thresholding, cond and uncond as two network calls",
    "- FLOPs: one rule for both, 2 x multiply-accumulates of every conv and matmul in one "
    "forward pass at batch 1 (ours: jaxpr `conv_general_dilated` + `dot_general`; the peer: "
    "`torch.utils.flop_counter.FlopCounterMode`). train GFLOP/s = 3 x forward GFLOP x img/s; "
    "sampling GFLOP/s = forwards per image (steps x 2 with guidance) x GFLOP / (s/image)",
    "",
  ]
  if not peer_on:
    lines += [f"**{SKIP_LINE}**", ""]
  lines += [
    "| | ours | imagen-pytorch | ours / peer |",
    "|---|---|---|---|",
    f"| parameters | {_f(o['params'])} | {_f(p['params'])} | {_f(r['params_ours_over_peer'])} |",
    f"| forward GFLOP / image | {_f(o['gflop_per_image'])} | {_f(p['gflop_per_image'])} | "
    f"{_f(r['gflop_per_image_ours_over_peer'])} |",
    f"| train img/s (median) | {_f(o['train_images_per_s'])} | {_f(p['train_images_per_s'])} | "
    f"{_f(r['train_images_per_s_ours_over_peer'])} |",
    f"| train img/s (all rounds) | {', '.join(_f(x) for x in o['train_images_per_s_all'])} | "
    f"{', '.join(_f(x) for x in p['train_images_per_s_all']) or 'n/a'} | |",
    f"| train img/s, fastest step of each round (median) | {_f(o['train_images_per_s_best'])} | "
    f"{_f(p['train_images_per_s_best'])} | {_f(r['train_images_per_s_best_ours_over_peer'])} |",
    f"| train GFLOP/s | {_f(o['train_gflop_per_s'])} | {_f(p['train_gflop_per_s'])} | "
    f"{_f(r['train_gflop_per_s_ours_over_peer'])} |",
    f"| sampling s / image, {s['steps']} steps (median) | {_f(o['sample_s_per_image'])} | "
    f"{_f(p['sample_s_per_image'])} | {_f(r['sample_s_per_image_ours_over_peer'])} |",
    f"| sampling s / image (all rounds) | "
    f"{', '.join(_f(x) for x in o['sample_s_per_image_all'])} | "
    f"{', '.join(_f(x) for x in p['sample_s_per_image_all']) or 'n/a'} | |",
    f"| sampling GFLOP/s | {_f(o['sample_gflop_per_s'])} | {_f(p['sample_gflop_per_s'])} | "
    f"{_f(r['sample_gflop_per_s_ours_over_peer'])} |",
    f"| ours DPM-Solver++(2M), {d['steps']} steps: s / image | {_f(d['sample_s_per_image'])} "
    f"({', '.join(_f(x) for x in d['sample_s_per_image_all'])}) | | "
    f"{_f(r['sample_s_per_image_dpmpp_over_peer'])} (vs peer at {s['steps']} steps) |",
    "",
    "Ratios: ours / peer, from the medians; for img/s and GFLOP/s above 1 means ours is faster, "
    "for s/image below 1 means ours is faster.",
    "",
    *(
      [
        "With another job on the CPU, both frameworks' threads compete with it; torch's "
        "OpenMP threads spin-wait at every parallel region, so a descheduled thread stalls "
        "the rest and the peer degrades far more than XLA's thread pool (watch the spread of "
        "its rounds and its fastest step). Rerun on an idle machine, or with "
        "OMP_WAIT_POLICY=PASSIVE, before reading the peer's absolute numbers.",
        "",
      ]
      if m["background_compiles"]
      else []
    ),
    "## What could not be matched",
    "",
    *[f"- {x}" for x in MISMATCHES],
    "",
    "## Networks",
    "",
    f"- ours `{oi.get('network', '?')}`: `{json.dumps(oi.get('fields', {}))}`",
    f"- peer `{pi.get('network', 'imagen_pytorch.Unet')}`: "
    f"`{json.dumps(pi.get('fields', res['peer_unet_kwargs']))}`",
    "",
  ]
  errors = [r for rnd in res["rounds"] for r in rnd if "error" in r]
  errors += [v for v in res["info"].values() if "error" in v]
  if errors:
    lines += ["## Failed measurements", ""]
    lines += [f"- {e['framework']} {e['measure']}: {e['error'][-300:]!r}" for e in errors] + [""]
  return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
  """Runs the alternating rounds and writes peer.md / peer.json."""
  start = time.perf_counter()
  machine = _machine()
  peer_on = has_peer(args.peer_python)
  if not peer_on:
    print(SKIP_LINE, flush=True)
  with tempfile.TemporaryDirectory(prefix="peer_bench_") as workdir:
    env = worker_env(args.threads, os.path.join(workdir, "jax_cache"))
    ours_py = sys.executable
    info = {"ours": run_worker(ours_py, "ours", "info", args, env, workdir, {"num_steps": 1})}
    if peer_on:
      info["peer"] = run_worker(args.peer_python, "peer", "info", args, env, workdir)
    for fw, i in info.items():
      if "error" not in i:
        _log(f"{fw}: {i['params']:,} params, {i['gflop_per_image']:.3g} GFLOP/image forward")
    rounds = []
    dpm_steps = max(1, args.steps // 4)
    for k in range(args.rounds):
      _log(f"round {k + 1}/{args.rounds}")
      rnd = []
      for measure in ("train", "sample"):
        sampler = {"sampler": "ddim", "num_steps": args.steps} if measure == "sample" else {}
        r = run_worker(ours_py, "ours", measure, args, env, workdir, sampler)
        rnd.append({**r, "sampler_flag": "ddim" if measure == "sample" else None})
        if peer_on:
          steps = {"num_steps": args.steps}
          rnd.append(run_worker(args.peer_python, "peer", measure, args, env, workdir, steps))
      fast = {"sampler": "dpmpp_2m", "num_steps": dpm_steps}
      r = run_worker(ours_py, "ours", "sample", args, env, workdir, fast)
      rnd.append({**r, "sampler_flag": "dpmpp_2m"})
      for r in rnd:
        if "error" in r:
          _log(f"{r['framework']} {r['measure']} FAILED")
        elif r["measure"] == "train":
          _log(f"{r['framework']} train {r['images_per_s']:.3g} img/s")
        else:
          _log(f"{r['framework']} sample {r.get('sampler')}: {r['s_per_image']:.3g} s/image")
      rounds.append(rnd)
  res: dict[str, Any] = {
    "command": " ".join(["python", os.path.relpath(__file__, REPO), *map(_portable, sys.argv[1:])]),
    "machine": machine,
    "peer_available": peer_on,
    "peer_python": _portable(args.peer_python),
    "settings": {
      **{k: getattr(args, k) for k in SHARED_FLAGS},
      "rounds": args.rounds,
      "steps": args.steps,
      "dpm_steps": dpm_steps,
    },
    "worker_xla_flags": env["XLA_FLAGS"],
    "peer_unet_kwargs": {
      k: list(v) if isinstance(v, tuple) else v for k, v in peer_unet_kwargs(args).items()
    },
    "mismatches": MISMATCHES,
    "info": info,
    "rounds": rounds,
  }
  res["summary"] = summarize(res)
  res["loadavg_end"] = list(os.getloadavg())
  res["total_s"] = time.perf_counter() - start
  os.makedirs(args.out_dir, exist_ok=True)
  md = render_markdown(res)
  with open(os.path.join(args.out_dir, "peer.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(args.out_dir, "peer.json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
  print(md)
  return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags (the orchestrator's and the workers')."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--peer_python",
    default=sys.executable,
    help="python of a venv with torch + imagen-pytorch (default: this one; skipped if absent)",
  )
  parser.add_argument("--rounds", type=int, default=3, help="A/B rounds")
  parser.add_argument("--steps", type=int, default=64, help="sampling steps (DPM++: a quarter)")
  parser.add_argument("--guidance", type=float, default=3.0)
  parser.add_argument("--train_batch", type=int, default=8)
  parser.add_argument("--train_steps", type=int, default=5, help="timed steps after 2 warm-up")
  parser.add_argument("--sample_batch", type=int, default=2)
  parser.add_argument("--sample_repeats", type=int, default=1, help="timed sampling calls")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--width", type=int, default=64, help="base width (paper: 512)")
  parser.add_argument("--res_blocks", type=int, default=3, help="res blocks per level (paper: 3)")
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--text_dim", type=int, default=256)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--worker_timeout", type=float, default=1800.0, help="seconds per worker")
  parser.add_argument("--out_dir", default=os.path.join(HERE, "results"))
  # Worker-only flags.
  parser.add_argument("--worker", choices=("ours", "peer"), default=None, help=argparse.SUPPRESS)
  parser.add_argument("--measure", choices=("info", "train", "sample"), default="info")
  parser.add_argument("--sampler", default="ddim", help=argparse.SUPPRESS)
  parser.add_argument("--num_steps", type=int, default=64, help=argparse.SUPPRESS)
  parser.add_argument("--json_out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for k in ("rounds", "steps", "train_batch", "train_steps", "sample_batch", "sample_repeats"):
    if getattr(args, k) < 1:
      parser.error(f"--{k}={getattr(args, k)} must be >= 1")
  if args.image_size % 8:
    parser.error(f"--image_size={args.image_size} must be divisible by 8 (4 levels)")
  return args


def main(argv: list[str] | None = None) -> int:
  """Orchestrator by default; with --worker, one measurement written to --json_out."""
  args = parse_args(argv)
  if args.worker is None:
    return orchestrate(args)
  res = ours_worker(args) if args.worker == "ours" else peer_worker(args)
  with open(args.json_out, "w") as f:
    json.dump(res, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  sys.exit(main())
