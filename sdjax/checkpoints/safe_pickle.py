"""Reading PyTorch pickles (`.ckpt`, `.pt`, `.bin`) without torch and without running their code.

A pickle names the callables that rebuild its objects, and `pickle.load` imports and calls
whatever it names: a model file can run any code on load. `SafeUnpickler.find_class` instead
answers every name from a fixed allowlist of our own stand-ins (tensor rebuilders that return
numpy arrays, storage types that name a dtype, `OrderedDict`, a few inert helpers) and refuses any
other name with an `UnsafePickleError` naming it. Tensor data never passes through pickle: it is
read from the torch zip archive (`<archive>/data/<key>`) or, for the legacy format, from the raw
storage records after the pickle.

`load(path)` returns the file's object with every tensor as a numpy array (bfloat16 as
`ml_dtypes.bfloat16`); `load_state_dict(path)` unwraps a Lightning `{"state_dict": ...}`.
"""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np


class UnsafePickleError(ValueError):
  """A pickle that names a forbidden global, or is not a readable torch file."""


# torch storage classes -> element dtype. `UntypedStorage` holds raw bytes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
# torch dtype objects, as some pickles name them directly.
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "int64": np.int64, "int32": np.int32, "int16": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  """Stand-in for a torch storage class: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Inert:
  """Stand-in for a harmless non-tensor class some checkpoints carry (e.g. Lightning callback
  state): it records the pickled state and never calls anything."""

  def __init__(self, *args):
    self.args = args

  def __setstate__(self, state):
    self.state = state


class _TensorType:
  """Stand-in for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""


def _check_int_tuple(name: str, value) -> tuple[int, ...]:
  if not isinstance(value, tuple | list) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise UnsafePickleError(f"tensor {name} {value!r} is not a tuple of non-negative ints")
  return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2`: a strided view of a storage, copied into a numpy array."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise UnsafePickleError("a tensor's storage is not a storage record of the file")
  size = _check_int_tuple("size", size)
  stride = _check_int_tuple("stride", stride)
  offset = storage_offset
  if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
    raise UnsafePickleError(f"bad tensor layout: offset {offset!r}, size {size}, stride {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if last >= storage.size:  # as_strided does not check bounds: never read outside the storage
    raise UnsafePickleError(
        f"tensor of size {size} reaches element {last} of a storage of {storage.size}: "
        "the file is truncated or corrupt")
  item = storage.itemsize
  # strided over unsigned ints of the same width: as_strided cannot build ml_dtypes' float8
  bits = storage.view(f"u{item}") if item in (1, 2, 4, 8) else storage
  view = np.lib.stride_tricks.as_strided(
      bits[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view).view(storage.dtype)  # contiguous copy, independent of the storage


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *unused) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v3`, as torch saves dtypes without a typed storage class
  (float8): an untyped storage's bytes read as `dtype`, then `_rebuild_tensor`."""
  del requires_grad, hooks, unused
  if not isinstance(dtype, np.dtype):
    raise UnsafePickleError(f"a tensor's dtype {str(dtype)[:40]} is not one of torch's")
  if not isinstance(storage, np.ndarray) or storage.ndim != 1 or storage.dtype != np.uint8 or (
      storage.size % dtype.itemsize):
    raise UnsafePickleError("a tensor's storage is not an untyped storage record of the file")
  return _rebuild_tensor(storage.view(dtype), storage_offset, size, stride)


def _skip_tensor(*unused) -> None:
  del unused


def _rebuild_parameter(data, *unused) -> np.ndarray:
  del unused  # requires_grad, backward hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state) -> np.ndarray:
  del new_type, state  # a Tensor/Parameter subclass's Python attributes are not weights
  return func(*args)


def _latin1_encode(text, encoding="latin1"):
  """`_codecs.encode`, as protocol-2 pickles spell bytes; only the latin1 codec is allowed."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError(f"forbidden codec call _codecs.encode({encoding!r})")
  return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
  """`numpy.core.multiarray.scalar`: a numpy scalar from its dtype and raw bytes."""
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafePickleError("forbidden numpy scalar (object dtype or no raw bytes)")
  return np.frombuffer(data, dtype, count=1)[0]


class _NdarrayType:
  """Stand-in for `numpy.ndarray` as the class argument of `_reconstruct`."""


class _PickledArray:
  """A numpy array as pickle spells it (`_reconstruct` + BUILD state), rebuilt from raw bytes by
  our code instead of `ndarray.__setstate__`; replaced by the array after unpickling."""

  array: np.ndarray | None = None

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) == 5):
      raise UnsafePickleError("bad numpy array state")
    _, shape, dtype, fortran, raw = state
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(raw, bytes):
      raise UnsafePickleError("forbidden numpy array (object dtype or no raw bytes)")
    shape = _check_int_tuple("shape", shape)
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
      raise UnsafePickleError("numpy array data does not match its shape")
    self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_reconstruct(cls, shape, typecode):
  del shape, typecode
  if cls is not _NdarrayType:
    raise UnsafePickleError("forbidden numpy _reconstruct of a non-ndarray class")
  return _PickledArray()


def _unwrap_arrays(obj):
  """Replaces `_PickledArray`s by their arrays, in place through dicts, lists and tuples."""
  if isinstance(obj, _PickledArray):
    if obj.array is None:
      raise UnsafePickleError("numpy array without data")
    return obj.array
  if isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _unwrap_arrays(value)
  elif isinstance(obj, list):
    obj[:] = [_unwrap_arrays(v) for v in obj]
  elif isinstance(obj, tuple):
    return tuple(_unwrap_arrays(v) for v in obj)
  elif isinstance(obj, _Inert) and hasattr(obj, "state"):
    obj.state = _unwrap_arrays(obj.state)
  return obj


def _numpy_dtype(spec, align=False, copy=False):
  del align, copy
  if not isinstance(spec, str):
    raise UnsafePickleError(f"forbidden numpy dtype spec {spec!r}")
  dtype = np.dtype(spec)
  if dtype.hasobject:
    raise UnsafePickleError(f"forbidden numpy dtype {spec!r} (object)")
  return dtype


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"): _Inert,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")  # (with v3)
_ALLOWED.update({("torch", name): np.dtype(dt) for name, dt in _TORCH_DTYPES.items()})


class SafeUnpickler(pickle.Unpickler):
  """An unpickler that resolves globals only from `_ALLOWED` and storages via `load_storage`.

  Args:
    file: the pickle stream.
    load_storage: `(dtype, key, numel) -> 1-D numpy array` for a persistent storage id.
  """

  def __init__(self, file, load_storage, *, rebuild_tensors: bool = True):
    super().__init__(file)
    self._load_storage = load_storage
    self._rebuild_tensors = rebuild_tensors
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    try:
      found = _ALLOWED[(module, name)]
    except (KeyError, TypeError):
      raise UnsafePickleError(
          f"refusing to load: the file names the global {module}.{name}, which a weights file "
          "does not need (it could run code)") from None
    if (found is _rebuild_tensor or found is _rebuild_tensor_v3) and not self._rebuild_tensors:
      return _skip_tensor
    return found

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy adds view metadata at the end.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)):
      raise UnsafePickleError(f"unsupported persistent id {str(pid)[:80]}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if key not in self._storages:
      self._storages[key] = self._load_storage(storage_type.dtype, key, numel)
    storage = self._storages[key]
    if len(pid) == 6 and pid[5] is not None:  # legacy view: (view key, offset, size)
      _, start, count = pid[5]
      storage = storage[start:start + count]
    return storage


def _storage_from_bytes(data: bytes, dtype: np.dtype, numel: int, what: str) -> np.ndarray:
  if numel < 0 or len(data) < numel * dtype.itemsize:
    raise UnsafePickleError(f"storage {what} has {len(data)} bytes, expected "
                            f"{numel * dtype.itemsize}: the file is truncated or corrupt")
  return np.frombuffer(data, dtype, count=numel)


def _stored_member(raw, info: zipfile.ZipInfo, path: str):
  """An uncompressed zip member's bytes as a view into `raw` (no copy), else None."""
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  header = bytes(raw[info.header_offset:info.header_offset + 30])
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise UnsafePickleError(f"{path}: bad zip entry {info.filename}")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  start = info.header_offset + 30 + name_len + extra_len
  if start + info.file_size > len(raw):
    raise UnsafePickleError(f"{path}: {info.filename} lies outside the file (truncated?)")
  return memoryview(raw)[start:start + info.file_size]


def _load_zip(path: str, archive: zipfile.ZipFile, raw) -> Any:
  """torch's zip format; storages are read as views into `raw` (the whole file) when stored."""
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise UnsafePickleError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
  root = pickles[0][: -len("data.pkl")]
  names = set(archive.namelist())
  byteorder = "little"
  if root + "byteorder" in names:
    byteorder = archive.read(root + "byteorder").decode("ascii", "replace").strip()

  def load_storage(dtype, key, numel):
    name = f"{root}data/{key}"
    if name not in names:
      raise UnsafePickleError(f"{path} has no storage record {name}")
    member = _stored_member(raw, archive.getinfo(name), path)
    data = _storage_from_bytes(archive.read(name) if member is None else member, dtype, numel,
                               name)
    return data.byteswap() if byteorder == "big" else data

  with archive.open(pickles[0]) as f:
    return _unwrap_arrays(SafeUnpickler(f, load_storage).load())


def _load_legacy(path: str, f) -> Any:
  """The pre-1.6 format: magic, protocol, sys info, the object pickle, storage keys, raw data.

  The raw storage data follows the object pickle, so it is parsed twice: once to learn each
  storage's dtype and size and where the data starts, then again with the storages read.
  """
  header = SafeUnpickler(f, None)
  if header.load() != _LEGACY_MAGIC:
    raise UnsafePickleError(f"{path} is neither a torch zip checkpoint nor a legacy torch file")
  header.load()  # protocol version
  header.load()  # sys info: byte order, type sizes
  start = f.tell()
  specs: dict[str, tuple[np.dtype, int]] = {}

  def record_storage(dtype, key, numel):
    specs[key] = (dtype, numel)
    return np.empty(0, dtype)

  SafeUnpickler(f, record_storage, rebuild_tensors=False).load()
  keys = SafeUnpickler(f, None).load()
  if not isinstance(keys, list):
    raise UnsafePickleError(f"{path}: bad legacy storage key list")
  storages = {}
  for key in keys:
    if key not in specs:
      raise UnsafePickleError(f"{path}: storage {key!r} is not used by the pickle")
    dtype, numel = specs[key]
    (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\0"))
    if count != numel:
      raise UnsafePickleError(f"{path}: storage {key!r} holds {count} elements, expected {numel}")
    storages[key] = _storage_from_bytes(f.read(numel * dtype.itemsize), dtype, numel, key)
  f.seek(start)

  def load_storage(dtype, key, numel):
    if key not in storages or storages[key].dtype != dtype:
      raise UnsafePickleError(f"{path}: no data for storage {key!r}")
    return storages[key]

  return _unwrap_arrays(SafeUnpickler(f, load_storage).load())


def load(path: str) -> Any:
  """The object a torch pickle file holds, tensors as numpy arrays, with no code from it run.

  Raises:
    UnsafePickleError: a forbidden global (named), or a truncated / unreadable file.
  """

  def read():
    if zipfile.is_zipfile(path):
      with open(path, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      with zipfile.ZipFile(path) as archive:
        return _load_zip(path, archive, raw)
    with open(path, "rb") as f:
      return _load_legacy(path, f)

  return _guarded(path, read)


def _guarded(name: str, read) -> Any:
  """Runs `read`, turning anything a corrupt file makes the parsers raise into one line."""
  try:
    return read()
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{name}: {e}" if name not in str(e) else str(e)) from None
  except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, OSError,
          ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
    raise UnsafePickleError(f"cannot read {name} as a torch pickle (truncated or corrupt?): "
                            f"{type(e).__name__}: {e}") from None


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A checkpoint's flat `name -> array` dict (unwrapping Lightning's `state_dict` entry)."""
  obj = load(path)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise UnsafePickleError(f"{path} does not hold a state dict (found {type(obj).__name__})")
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def loads(data: bytes) -> Any:
  """`load` for in-memory bytes (tests, archives within archives)."""

  def read():
    buf = io.BytesIO(data)
    if zipfile.is_zipfile(buf):
      with zipfile.ZipFile(buf) as archive:
        return _load_zip("<bytes>", archive, data)
    buf.seek(0)
    return _load_legacy("<bytes>", buf)

  return _guarded("<bytes>", read)


__all__ = ["SafeUnpickler", "UnsafePickleError", "load", "load_state_dict", "loads"]
