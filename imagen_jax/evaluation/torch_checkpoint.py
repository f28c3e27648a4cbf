"""Reads PyTorch `torch.save(state_dict)` files into numpy arrays, without importing torch.

Two layouts exist:
  zip (torch >= 1.6): a zip holding `<prefix>/data.pkl` (the pickled dict, tensors referring
    to storages by key), `<prefix>/data/<key>` (raw little-endian storage bytes) and
    `<prefix>/byteorder`;
  legacy (older): back-to-back pickles of a magic number, protocol version and system info,
    then the dict, then the list of storage keys, then per storage an int64 element count and
    its raw bytes.
The pickles are unpickled with a whitelist: tensors (`torch._utils._rebuild_tensor_v2`),
`collections.OrderedDict` and the typed storage classes; anything else is refused, so a
checkpoint cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from imagen_jax import errors

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _storage_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # comes with jax; numpy has no bfloat16

  return {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
  }


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for `torch.FloatStorage` etc. in the pickle: only its dtype matters."""

  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """One storage; `data` is filled once its bytes are read (legacy files store them last)."""

  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _LazyTensor:
  """A tensor waiting for its storage bytes: `_rebuild_tensor_v2`'s arguments."""

  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused) -> _LazyTensor:
  # Trailing arguments are requires_grad, backward hooks and (newer torch) metadata.
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
  """Whitelisted unpickler; `persistent_load` turns storage ids into `_Storage`s."""

  def __init__(self, file: BinaryIO, source: str, dtypes: dict[str, np.dtype]):
    super().__init__(file)
    self.source = source
    self.dtypes = dtypes
    self.storages: dict[str, _Storage] = {}
    self.views: dict[str, tuple[str, int, int]] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in self.dtypes:
      return _StorageType(name, self.dtypes[name])
    raise errors.UserError(
      f"{self.source}: refusing to unpickle {module}.{name}: only state_dicts of plain tensors "
      "are read (save one with torch.save(model.state_dict(), path))"
    )

  def persistent_load(self, pid: Any) -> _Storage:
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise errors.UserError(f"{self.source}: unsupported persistent id {pid!r} in the pickle")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise errors.UserError(f"{self.source}: unsupported storage type {storage_type!r}")
    key = str(key)
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, storage_type.dtype, int(numel))
    view = pid[5] if len(pid) > 5 else None
    if view is None:
      return storage
    # Legacy files may refer to a slice of a storage: (view key, element offset, size).
    view_key, view_offset, view_size = view
    viewed = _Storage(str(view_key), storage.dtype, int(view_size))
    self.views[viewed.key] = (key, int(view_offset), int(view_size))
    self.storages.setdefault(viewed.key, viewed)
    return self.storages[viewed.key]


class _NoGlobals(pickle.Unpickler):
  """For the legacy header pickles (ints, strs, dicts): no class may be loaded."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def _not_a_checkpoint(path: str, why: str) -> errors.UserError:
  return errors.UserError(
    f"{path} is not a PyTorch state_dict file ({why}): pass the .pth written by torch.save, "
    "e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
  )


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: numpy array} from a `torch.save(state_dict)` file (zip or legacy layout).

  Raises:
    UserError: the file is missing, not a PyTorch checkpoint, holds something other than a
      state_dict of tensors, or is truncated.
  """
  if not os.path.isfile(path):
    raise errors.UserError(f"{path}: no such file: pass an existing PyTorch .pth file")
  dtypes = _storage_dtypes()
  try:
    if zipfile.is_zipfile(path):
      result = _load_zip(path, dtypes)
    else:
      with open(path, "rb") as f:
        result = _load_legacy(f, path, dtypes)
  except errors.UserError:
    raise
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as e:
    raise _not_a_checkpoint(path, f"{type(e).__name__}: {e}") from e
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
    # Malformed pickles surface as these (a short persistent id, a missing record, ...).
    raise _not_a_checkpoint(path, f"{type(e).__name__}: {e}") from e
  if isinstance(result, Mapping) and set(result) == {"state_dict"}:
    result = result["state_dict"]
  if not isinstance(result, Mapping):
    raise _not_a_checkpoint(path, f"it holds a {type(result).__name__}, not a dict")
  out = {}
  for name, value in result.items():
    if not isinstance(value, _LazyTensor):
      raise _not_a_checkpoint(path, f"entry {name!r} is a {type(value).__name__}, not a tensor")
    out[str(name)] = _materialise(value, path, str(name))
  return out


def _load_zip(path: str, dtypes: dict[str, np.dtype]) -> Any:
  with zipfile.ZipFile(path) as zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise _not_a_checkpoint(path, "a zip without one <prefix>/data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in zf.namelist():
      big_endian = zf.read(prefix + "byteorder").decode().strip() == "big"
    unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, dtypes)
    result = unpickler.load()
    for storage in unpickler.storages.values():
      dtype = storage.dtype.newbyteorder(">") if big_endian else storage.dtype
      raw = zf.read(f"{prefix}data/{storage.key}")
      storage.data = _as_array(raw, dtype, storage, path)
  return result


def _load_legacy(f: BinaryIO, path: str, dtypes: dict[str, np.dtype]) -> Any:
  magic = _NoGlobals(f).load()
  if magic != LEGACY_MAGIC:
    raise _not_a_checkpoint(path, "no zip archive and no legacy magic number")
  protocol = _NoGlobals(f).load()
  if protocol != LEGACY_PROTOCOL:
    raise _not_a_checkpoint(path, f"legacy protocol {protocol}, expected {LEGACY_PROTOCOL}")
  sys_info = _NoGlobals(f).load()
  little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
  unpickler = _Unpickler(f, path, dtypes)
  result = unpickler.load()
  keys = [str(k) for k in _NoGlobals(f).load()]
  for key in keys:
    storage = unpickler.storages.get(key)
    if storage is None:
      raise _not_a_checkpoint(path, f"storage {key!r} is listed but never used")
    (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
    raw = f.read(numel * storage.dtype.itemsize)
    dtype = storage.dtype if little else storage.dtype.newbyteorder(">")
    storage.data = _as_array(raw, dtype, dataclasses.replace(storage, numel=numel), path)
  for view_key, (root_key, offset, size) in unpickler.views.items():
    root = unpickler.storages[root_key]
    if root.data is None or offset + size > root.data.size:
      raise _not_a_checkpoint(path, f"storage view {view_key!r} lies outside its storage")
    unpickler.storages[view_key].data = root.data[offset : offset + size]
  return result


def _as_array(raw: bytes, dtype: np.dtype, storage: _Storage, path: str) -> np.ndarray:
  if len(raw) != storage.numel * dtype.itemsize:
    raise _not_a_checkpoint(
      path,
      f"storage {storage.key!r} has {len(raw)} bytes, expected "
      f"{storage.numel * dtype.itemsize} (truncated file?)",
    )
  return np.frombuffer(raw, dtype=dtype)


def _materialise(t: _LazyTensor, path: str, name: str) -> np.ndarray:
  data = t.storage.data
  if data is None:
    raise _not_a_checkpoint(path, f"tensor {name!r} refers to storage {t.storage.key!r}, absent")
  if any(s == 0 for s in t.shape):
    return np.zeros(t.shape, data.dtype.newbyteorder("="))
  # The last element the strides reach must lie inside the storage (as_strided does not check).
  last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
  if t.offset < 0 or min(t.stride, default=0) < 0 or last >= data.size:
    raise _not_a_checkpoint(path, f"tensor {name!r} reaches past its storage")
  view = np.lib.stride_tricks.as_strided(
    data[t.offset :], shape=t.shape, strides=[s * data.itemsize for s in t.stride]
  )
  return np.array(view, dtype=data.dtype.newbyteorder("="))


def to_flax_variables(
  state_dict: Mapping[str, np.ndarray],
  names: Mapping[str, tuple[tuple[str, ...], tuple[int, ...]]],
  is_unused: Callable[[str], bool] = lambda name: False,
  source: str = "",
) -> dict:
  """Nested Flax variables from a state_dict.

  Args:
    state_dict: PyTorch name -> array.
    names: PyTorch name -> (Flax variable path (collection, *modules, leaf), PyTorch shape).
      Leaves named "kernel" are conv kernels, OIHW -> HWIO.
    is_unused: keys present in the file that the network ignores.
    source: the file, for messages.

  Raises:
    UserError: one line naming the first unexpected or missing key, or a shape mismatch.
  """
  from flax import traverse_util

  where = source or "state_dict"
  hint = "use pytorch-fid's pt_inception-2015-12-05-6726825d.pth (FID Inception weights)"
  unknown = [k for k in state_dict if k not in names and not is_unused(k)]
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise errors.UserError(f"{where}: unexpected key {unknown[0]!r}{more}: {hint}")
  missing = [k for k in names if k not in state_dict]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise errors.UserError(f"{where}: missing key {missing[0]!r}{more}: {hint}")
  flat = {}
  for name, (path, shape) in names.items():
    value = np.asarray(state_dict[name])
    if tuple(value.shape) != tuple(shape):
      raise errors.UserError(
        f"{where}: key {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}: {hint}"
      )
    if path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    flat[path] = np.ascontiguousarray(value, dtype=np.float32)
  return traverse_util.unflatten_dict(flat)
