"""The COCO-30K prompts and the report of `imagen-jax eval coco`.

The protocol of the papers (Imagen, Parti, eDiff-I: zero-shot FID-30K on MS-COCO 2014 val):
draw 30,000 random images of the validation set and one random caption of each, sample one
image per caption, and score FID against the real images' statistics and CLIP score against
the captions. The draw here is a seeded hash, not a NumPy stream: the same (file, --num, seed)
picks the same prompts on every machine and NumPy version, which is what lets a killed run resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from imagen_jax import errors

WHERE_TO_GET = (
  "COCO's captions_val2014.json (annotations_trainval2014.zip from cocodataset.org) or a text "
  "file with one prompt per line"
)


def _clean(caption: str) -> str:
  # COCO captions carry stray newlines and double spaces; a prompt is one line (prompts.txt).
  return " ".join(caption.split())


def read_captions(path: str) -> list[tuple[str, list[str]]]:
  """(image key, its captions) in file order, from a COCO annotation json or a text file.

  A COCO `captions_*.json` groups its {"image_id", "caption"} annotations by image; a text
  file gives each non-empty line its own key ("line N", 1-based) and caption.
  """
  if not os.path.isfile(path):
    raise errors.UserError(f"--captions={path!r} is not a file: pass {WHERE_TO_GET}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json") or text.lstrip().startswith("{"):
    groups = _annotation_groups(path, text)
  else:
    groups = {
      f"line {n}": [_clean(line)] for n, line in enumerate(text.splitlines(), 1) if line.strip()
    }
  if not groups:
    raise errors.UserError(f"--captions={path!r} holds no captions: pass {WHERE_TO_GET}")
  return list(groups.items())


def _annotation_groups(path: str, text: str) -> dict[str, list[str]]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise errors.UserError(
      f"--captions={path!r} is not valid JSON ({e}): pass {WHERE_TO_GET}"
    ) from e
  annotations = data.get("annotations") if isinstance(data, dict) else None
  if not isinstance(annotations, list):
    raise errors.UserError(
      f'--captions={path!r} has no "annotations" list: pass {WHERE_TO_GET} '
      '({"annotations": [{"image_id": ..., "caption": ...}, ...]})'
    )
  groups: dict[str, list[str]] = {}
  for i, a in enumerate(annotations):
    if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
      raise errors.UserError(
        f'--captions={path!r}: annotations[{i}] lacks an "image_id" or a "caption" string'
      )
    caption = _clean(a["caption"])
    if caption:
      groups.setdefault(str(a["image_id"]), []).append(caption)
  return groups


def _rank(seed: int, *parts: str) -> int:
  text = "/".join([str(seed), *parts])
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def select(
  groups: list[tuple[str, list[str]]], num: int, seed: int, path: str = "--captions"
) -> list[dict[str, str]]:
  """`num` random images, one random caption each: [{"image_id", "caption"}], seeded.

  Images are ordered by a seeded hash of their key (a permutation that a longer --num extends),
  and each image's caption is picked by another hash, so the choice depends on nothing else.
  """
  if num < 1:
    raise errors.UserError(f"--num={num} must be at least 1 (the protocol's is 30000)")
  if num > len(groups):
    raise errors.UserError(
      f"--num={num} but {path} has only {len(groups)} images (caption groups); pass "
      f"--num={len(groups)} or fewer, or a larger captions file"
    )
  chosen = sorted(groups, key=lambda g: (_rank(seed, g[0]), g[0]))[:num]
  return [
    {"image_id": key, "caption": captions[_rank(seed, key, "caption") % len(captions)]}
    for key, captions in chosen
  ]


def markdown(report: dict[str, Any]) -> str:
  """report.md: the headline numbers and the settings they were measured with."""
  settings = report["settings"]
  lines = [
    "# imagen-jax eval coco",
    "",
    "| metric | value |",
    "| --- | --- |",
    f"| FID | {report['fid']:.4f} |",
    f"| CLIP score | {report['clip_score']:.4f} |",
    f"| images | {report['num_images']} |",
    f"| reference images | {report['num_reference_images'] or 'unknown'} |",
    "",
    f"CLIP score: {report['clip_definition']}.",
    "",
    "## Settings",
    "",
  ]
  lines += [f"- {k}: `{json.dumps(v)}`" for k, v in settings.items()]
  if report["warnings"]:
    lines += ["", "## Warnings", "", *(f"- {w}" for w in report["warnings"])]
  return "\n".join(lines) + "\n"
