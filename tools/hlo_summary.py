#!/usr/bin/env python3
"""Summarise a compiled HLO text (`imagen-jax compile --hlo_out=F`): what the step spends on.

  python tools/hlo_summary.py F [--top=15]

Prints, for the ENTRY computation and every fused/called computation together: instruction
counts per opcode; collectives with their operand bytes; convolutions and dots by element type
(f32 ones run at a fraction of the bf16 peak on TPU); transposes and copies (layout changes);
the bytes written to HBM by element type (results of instructions outside fusions, a loop
body counted once: f32 activations where bf16 would do double a memory-bound step's traffic);
and the largest arrays produced (shape × element size), which is where temporaries go.
Standard library only; a reading aid, not a cost model.
"""

from __future__ import annotations

import argparse
import collections
import math
import re

ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                 "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# "  %name = bf16[16,64,64,512]{3,2,1,0:T(8,128)(2,1)} opcode(operands), attrs"
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (\(?[a-z0-9]+\[[^=]*?\]\S*)\s+([\w\-]+)\(")
INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")
ARRAY = re.compile(r"([a-z0-9]+)\[([\d,]*)\]")
# "%fused_computation.12 (param_0: f32[8]) -> f32[8] {" / "ENTRY %main.3 (...) -> ... {"
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# Results that are no new buffer (views, tuples, inputs, loop state; an async copy counts once,
# at copy-done): left out of the HBM-traffic sums.
NO_BUFFER = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "copy-start",
  "while",
}


def array_bytes(shape_text: str) -> int:
  """Bytes of an HLO shape (tuples summed)."""
  total = 0
  for dtype, dims in ARRAY.findall(shape_text):
    if dtype in ELEMENT_BYTES:
      total += ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def summarise(text: str, top: int) -> str:
  """The report as text."""
  opcodes: collections.Counter = collections.Counter()
  collective_bytes: collections.Counter = collections.Counter()
  by_type: collections.Counter = collections.Counter()
  written: collections.Counter = collections.Counter()  # HBM results by element type
  largest: list[tuple[int, str, str]] = []
  fused = False
  for line in text.splitlines():
    line = INDEX_COMMENT.sub("", line)  # long tuples carry "/*index=5*/": not part of the shape
    if c := COMPUTATION.match(line):
      fused = "fus" in c.group(1)  # a fusion's inner values stay in registers / VMEM
    m = INSTRUCTION.match(line)
    if not m:
      continue
    shape, op = m.group(1), m.group(2)
    opcodes[op] += 1
    size = array_bytes(shape)
    if not fused and op not in NO_BUFFER:
      for dtype, dims in ARRAY.findall(shape):
        written[dtype] += array_bytes(f"{dtype}[{dims}]")
    if any(op.startswith(c) for c in COLLECTIVES):
      collective_bytes[op] += size
    if op in ("convolution", "dot"):
      by_type[(op, shape.split("[")[0].lstrip("("))] += 1
    largest.append((size, op, shape[:80]))
  largest.sort(reverse=True)
  out = ["opcodes (most frequent):"]
  out += [f"  {n:7d}  {op}" for op, n in opcodes.most_common(top)]
  out.append("collectives (count, result GiB summed over instructions):")
  for op in sorted(collective_bytes):
    out.append(f"  {opcodes[op]:7d}  {op:20s} {collective_bytes[op] / 2**30:9.2f} GiB")
  out.append("convolutions / dots by result element type:")
  out += [f"  {n:7d}  {op} {dtype}" for (op, dtype), n in sorted(by_type.items())]
  layout = opcodes["transpose"] + opcodes["copy"]
  out.append(
    f"layout changes: {opcodes['transpose']} transposes, {opcodes['copy']} copies ({layout})"
  )
  total = sum(written.values()) or 1
  out.append("bytes written to HBM per call (results outside fusions, by element type):")
  out += [
    f"  {n / 2**30:9.3f} GiB  {dtype} ({100 * n / total:.0f}%)"
    for dtype, n in written.most_common()
  ]
  out.append("largest results:")
  out += [f"  {size / 2**20:10.1f} MiB  {op:14s} {shape}" for size, op, shape in largest[:top]]
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("hlo")
  parser.add_argument("--top", type=int, default=15)
  args = parser.parse_args()
  with open(args.hlo) as f:
    print(summarise(f.read(), args.top))


if __name__ == "__main__":
  main()
