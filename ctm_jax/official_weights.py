"""Official PyTorch weights, read without torch and without running anything from the file.

* EDM network pickles (NVlabs/edm `network-snapshot-*.pkl`, `edm-cifar10-32x32-uncond-vp.pkl`,
  ...): plain pickles of `dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)` in
  which `torch_utils.persistence` stores each module as
  `_reconstruct_persistent_obj(dict(type='class', version, module_src, class_name, state))` and
  each tensor storage as `torch.storage._load_from_bytes(<a nested torch.save>)`.
  `EdmPickleUnpickler` replaces those globals by stand-ins: a persistent object becomes a
  `PersistentObject` holding its class name and state (the embedded `module_src` is kept as text
  only, never compiled), storages are parsed by `torch_archive`, and any global outside the
  allowed set (os.system, builtins.exec, ...) or any persistent class that EDM does not define is
  refused with its name.  `read_edm_pickle(path)` gives the class name, `init_kwargs` and
  state dict of one entry; `edm_pickle_network(path)` the flax network and its parameters.
* CTM / consistency-model / LPIPS / VGG `.pt`/`.pth` files (`torch.save` of a state dict) are read
  by `torch_archive.read_torch_archive`; `load_state_dict_file` also takes the .npz export.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Dict, Optional

import numpy as np

from ctm_jax import torch_archive as ta

# The persistent classes NVlabs/edm defines (training/networks.py, loss.py, augment.py).
EDM_PERSISTENT_CLASSES = frozenset({
    'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding',
    'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond',
    'VPLoss', 'VELoss', 'EDMLoss', 'AugmentPipe'})
# Network classes whose preconditioning the project implements (EDM's, Karras et al. 2022 Tab. 1).
SUPPORTED_PRECOND = ('EDMPrecond',)
# numpy scalar dtypes a pickled attribute may carry (e.g. skip_scale = np.sqrt(0.5)).
_NUMPY_SCALARS = frozenset({'f2', 'f4', 'f8', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8',
                            'b1', 'float16', 'float32', 'float64', 'int32', 'int64', 'bool'})


class PersistentObject(ta.TorchScriptObject):
  """Stand-in for a `torch_utils.persistence` object: its class name and state, nothing run."""

  torch_class = 'torch_utils.persistence'

  def __init__(self, class_name: str, state: dict, module_src: str):
    self.class_name = class_name
    self.torch_class = f'persistence:{class_name}'
    self.attributes = dict(state)
    self.module_src_chars = len(module_src)   # the source itself is dropped, never compiled

  def __repr__(self):
    return f'<PersistentObject {self.class_name}>'


class _TorchModule(ta.TorchScriptObject):
  """Stand-in for torch.nn.ModuleDict / ModuleList / Sequential: its __dict__ as attributes."""


def _module_class(name):
  return type(name, (_TorchModule,), {'torch_class': f'torch.nn.{name}'})


class _EasyDict(dict):
  """Stand-in for dnnlib.util.EasyDict (a dict)."""


class _NumpyDType:
  """Stand-in for numpy.dtype(name, align, copy) with its __setstate__; only plain scalars."""

  def __init__(self, name, *unused):
    if str(name) not in _NUMPY_SCALARS:
      raise ta.UnsafePickleError(f'numpy dtype {name!r} is not a plain numeric scalar type')
    self.dtype = np.dtype(str(name))

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1 and state[1] == '>':
      self.dtype = self.dtype.newbyteorder('>')


def _numpy_scalar(dtype, raw=None):
  if not isinstance(dtype, _NumpyDType) or not isinstance(raw, bytes):
    raise ta.TorchArchiveError('numpy scalar with an unexpected dtype or payload')
  return np.frombuffer(raw, dtype.dtype, count=1)[0].item()


def _load_from_bytes(raw):
  """torch.storage._load_from_bytes: a nested torch.save of one storage, parsed torch-free."""
  storage = ta.load_torch_archive(bytes(raw))
  if not isinstance(storage, ta._Storage):
    raise ta.TorchArchiveError(f'_load_from_bytes holds a {type(storage).__name__}, not a storage')
  return storage


class EdmPickleUnpickler(ta.SafeUnpickler):
  """`torch_archive.SafeUnpickler` plus the globals an EDM network pickle needs (stand-ins)."""

  def __init__(self, file, source: str):
    super().__init__(file, source)
    self.persistent_classes = []

  def _reconstruct(self, meta):
    if not isinstance(meta, dict) or meta.get('type') != 'class':
      raise ta.UnsafePickleError(f'{self.source}: persistence record of type '
                                 f'{meta.get("type") if isinstance(meta, dict) else meta!r}')
    name = meta.get('class_name')
    if name not in EDM_PERSISTENT_CLASSES:
      raise ta.UnsafePickleError(
          f'{self.source}: persistent class {name!r} is not one NVlabs/edm defines; refusing it '
          f'(its embedded source is never run; known: {sorted(EDM_PERSISTENT_CLASSES)})')
    state = meta.get('state')
    if not isinstance(state, dict):
      raise ta.TorchArchiveError(f'{self.source}: {name} has no state dict')
    self.persistent_classes.append(name)
    return PersistentObject(name, state, str(meta.get('module_src', '')))

  def find_class(self, module, name):
    table = {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'): self._reconstruct,
        ('torch.storage', '_load_from_bytes'): _load_from_bytes,
        ('dnnlib.util', 'EasyDict'): _EasyDict,
        ('numpy', 'dtype'): _NumpyDType,
        ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
        ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
        ('builtins', 'set'): set,
    }
    if (module, name) in table:
      return table[(module, name)]
    if module == 'torch.nn.modules.container' and name in ('ModuleDict', 'ModuleList',
                                                           'Sequential'):
      return _module_class(name)
    return super().find_class(module, name)


def load_edm_pickle(path) -> Dict[str, Any]:
  """The top-level dict of an EDM network pickle, modules as `PersistentObject`s, arrays numpy."""
  name = os.fspath(path)
  from ctm_jax import fileio
  if not fileio.isfile(name):
    raise FileNotFoundError(f'{name}: no such EDM network pickle')
  tree = EdmPickleUnpickler(io.BytesIO(fileio.read_bytes(name)), name).load()
  tree = ta._resolve(tree)
  if not isinstance(tree, dict):
    raise ta.TorchArchiveError(f'{name}: an EDM network pickle holds a dict, found '
                               f'{type(tree).__name__}')
  return tree


def module_state_dict(obj: ta.TorchScriptObject) -> Dict[str, np.ndarray]:
  """torch `state_dict()` of a rebuilt module: parameters, then persistent buffers, per module."""
  out: Dict[str, np.ndarray] = {}

  def walk(mod, prefix):
    attrs = getattr(mod, 'attributes', {})
    skip = set(attrs.get('_non_persistent_buffers_set') or ())
    for k, v in (attrs.get('_parameters') or {}).items():
      if v is not None:
        out[prefix + k] = np.asarray(v)
    for k, v in (attrs.get('_buffers') or {}).items():
      if v is not None and k not in skip:
        out[prefix + k] = np.asarray(v)
    for k, v in (attrs.get('_modules') or {}).items():
      if v is not None:
        walk(v, f'{prefix}{k}.')

  walk(obj, '')
  return out


@dataclasses.dataclass
class EdmNetwork:
  """One network of an EDM pickle: class name, constructor kwargs and state dict (numpy)."""
  class_name: str
  init_kwargs: Dict[str, Any]
  state_dict: Dict[str, np.ndarray]
  inner_class: Optional[str]


def read_edm_pickle(path, key: str = 'ema') -> EdmNetwork:
  """Entry `key` of an EDM network pickle (default: the EMA network used for sampling)."""
  tree = load_edm_pickle(path)
  if key not in tree:
    raise KeyError(f'{os.fspath(path)}: no entry {key!r}; entries: {sorted(tree)}')
  obj = tree[key]
  if not isinstance(obj, PersistentObject):
    raise ta.TorchArchiveError(f'{os.fspath(path)}[{key!r}] is a {type(obj).__name__}, not a '
                               f'persistent network')
  attrs = obj.attributes
  if attrs.get('_init_args'):
    raise ValueError(f'{os.fspath(path)}[{key!r}]: {obj.class_name} was built with positional '
                     f'arguments {attrs["_init_args"]!r}; only keyword arguments are read')
  kwargs = attrs.get('_init_kwargs')
  if not isinstance(kwargs, dict):
    raise ValueError(f'{os.fspath(path)}[{key!r}]: {obj.class_name} has no recorded init_kwargs')
  inner = (attrs.get('_modules') or {}).get('model')
  return EdmNetwork(obj.class_name, dict(kwargs), module_state_dict(obj),
                    inner.class_name if isinstance(inner, PersistentObject) else None)


def edm_network_module(net: EdmNetwork, **overrides):
  """The flax network (SongUNet / DhariwalUNet) for an EDM pickle's EDMPrecond entry, and the
  preconditioning constants {sigma_data, sigma_min, sigma_max, label_dim}."""
  from ctm_jax.nets import torch_port
  if net.class_name not in SUPPORTED_PRECOND:
    raise ValueError(f'EDM pickle network class {net.class_name!r}: only {SUPPORTED_PRECOND} '
                     f'(EDM preconditioning, c_noise = ln(sigma)/4) is supported')
  kw = dict(net.init_kwargs)
  model_type = kw.get('model_type', 'DhariwalUNet')
  if net.inner_class is not None and net.inner_class != model_type:
    raise ValueError(f'init_kwargs model_type {model_type!r} but the pickled inner network is a '
                     f'{net.inner_class}')
  precond = dict(sigma_data=float(kw.get('sigma_data', 0.5)),
                 sigma_min=float(kw.get('sigma_min', 0.0)),
                 sigma_max=float(kw.get('sigma_max', float('inf'))),
                 label_dim=int(kw.get('label_dim', 0)))
  module = torch_port.module_from_torch_config(kw, **overrides)
  return module, precond


def edm_pickle_network(path, key: str = 'ema', **overrides):
  """(flax module, params, preconditioning constants) of an EDM network pickle, torch-free."""
  from ctm_jax.nets import torch_port
  net = read_edm_pickle(path, key)
  module, precond = edm_network_module(net, **overrides)
  return module, torch_port.load_torch_state_dict(module, net.state_dict), precond


def load_state_dict_file(path) -> Dict[str, np.ndarray]:
  """{torch name: array} from a `torch.save` state dict (.pt/.pth, the official CTM / CM /
  LPIPS / VGG checkpoints) or from an .npz export (`param/<name>` keys)."""
  from ctm_jax.nets import torch_port
  name = os.fspath(path)
  if name.endswith('.npz'):
    return torch_port.load_npz_state_dict(name)
  try:
    tree = ta.load_torch_archive(name)
  except ta.UnsafePickleError as e:
    if 'torch_utils.persistence' in str(e):
      raise ta.UnsafePickleError(f'{e}. This is an NVlabs/edm network pickle: read it with '
                                 f'read_edm_pickle (teacher.source = edm_pkl)') from None
    raise
  flat = ta.flatten_arrays(tree)
  if not flat:
    raise ta.TorchArchiveError(f'{name}: holds no tensors')
  return flat
