"""Small file helpers shared by manifests, bundles and evaluation reports."""

from __future__ import annotations

import hashlib


def sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes, read in chunks (identifies a file in manifests)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()
