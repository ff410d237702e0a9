"""Load official PyTorch weights (EDM, CTM, openai/sony ADM) into the flax U-Nets.

Torch names are read under their original spelling, with or without a leading `model.` /
`module.`:
  * EDM / CTM-CIFAR-10 names (`model.enc.8x8_block0.qkv.weight`, `model.map_layer0_s.bias`) map
    one to one: `enc.<res>_<blk>` -> flax module `enc_<res>_<blk>`, `weight` -> `kernel` (conv
    OIHW -> HWIO, linear [out, in] -> [in, out]) or `scale` (GroupNorm).
  * openai UNetModel names (guided-diffusion, consistency_models `edm_imagenet64_ema.pt`,
    sony/ctm students: `input_blocks.1.0.in_layers.2.weight`, `time_embed_s.0.weight`) are first
    renamed to the EDM DhariwalUNet names; the attention qkv rows are permuted to EDM's
    per-head interleaved layout.
Every flax parameter must be filled and every torch tensor used; the only tensors skipped are the
constant `resample_filter` buffers (checked against the module's filter).
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax.nets.adm import DhariwalUNet, dhariwal_unet_layout
from ctm_jax.nets.layers import resample_filter2d
from ctm_jax.nets.unet import SongUNet

PathT = Tuple[str, ...]

# ------------------------------------------------------------------------------------------------
# Files.


def load_npz_state_dict(path) -> Dict[str, np.ndarray]:
  """Tensors of an .npz written by `launch/export_torch_weights.py` (or a parity fixture).

  Keys `param/<name>` are returned as `<name>`; a file without such keys is read as a plain
  name -> array mapping (entries `config` and `meta` are skipped).
  """
  from ctm_jax import fileio
  z = fileio.load_npz(path)
  if any(k.startswith('param/') for k in z):
    return {k[len('param/'):]: v for k, v in z.items() if k.startswith('param/')}
  return {k: v for k, v in z.items() if k not in ('config', 'meta')}


def load_npz_config(path) -> Optional[dict]:
  """The constructor kwargs stored as the JSON string `config` in an .npz, or None."""
  from ctm_jax import fileio
  z = fileio.load_npz(path)
  return json.loads(str(z['config'])) if 'config' in z else None


# ------------------------------------------------------------------------------------------------
# Config -> module.

_SONG_KEYS = {'augment_dim', 'model_channels', 'channel_mult', 'channel_mult_emb', 'num_blocks',
              'attn_resolutions', 'dropout', 'label_dropout', 'embedding_type',
              'channel_mult_noise', 'encoder_type', 'decoder_type', 'resample_filter'}
_ADM_KEYS = {'augment_dim', 'model_channels', 'channel_mult', 'channel_mult_emb', 'num_blocks',
             'attn_resolutions', 'dropout', 'label_dropout'}
# Preconditioning-only arguments of EDMPrecond / VPPrecond / VEPrecond / EDMPrecond_CTM.
_PRECOND_KEYS = {'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data', 'beta_d', 'beta_min', 'M',
                 'epsilon_t', 'C_1', 'C_2', 'teacher', 'teacher_model_path'}


# Kim-Dongjun/ctm-cifar10 `SongUNet` defaults (they differ from EDM's: mult 2,2,2, dropout 0.13).
_CTM_SONG_DEFAULTS = dict(model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4,
                          num_blocks=4, attn_resolutions=(16,), dropout=0.13)


def _tuple(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


def module_from_torch_config(cfg: Mapping[str, Any], **overrides):
  """Build the flax network from torch constructor kwargs.

  Accepts (a) EDM precond kwargs (`EDMPrecond(**cfg)`: `model_type` SongUNet | DhariwalUNet plus
  the network kwargs), including CTM-CIFAR-10 `EDMPrecond_CTM` kwargs (`arch`, `training_mode`;
  'ctm' -> use_s), and (b) openai `UNetModel` kwargs or consistency_models / sony-ctm script flags
  (`num_res_blocks`, ...). Unknown keys raise. `overrides` replace fields of the result (e.g.
  dtype, dropout, out_channels).
  """
  cfg = dict(cfg)
  if 'num_res_blocks' in cfg:
    net = _adm_from_openai_config(cfg)
  else:
    net = _from_edm_config(cfg)
  return net.clone(**overrides) if overrides else net


def _from_edm_config(cfg: dict):
  model_type = cfg.pop('model_type', 'DhariwalUNet')
  kw = dict(img_resolution=int(cfg.pop('img_resolution')))
  kw['in_channels'] = int(cfg.pop('img_channels'))
  kw['label_dim'] = int(cfg.pop('label_dim', 0))
  training_mode = str(cfg.pop('training_mode', '') or '')
  arch = cfg.pop('arch', None)
  if cfg.pop('linear_probing', False):
    raise NotImplementedError('CTM linear_probing networks are not ported')
  for k in _PRECOND_KEYS:
    cfg.pop(k, None)
  if model_type == 'SongUNet':
    allowed, cls = _SONG_KEYS, SongUNet
    if arch is not None:  # EDMPrecond_CTM derives these from `arch` and ignores the kwargs
      if arch not in ('ddpmpp', 'ncsnpp'):
        raise ValueError(f'SongUNet with arch={arch!r}')
      ncsn = arch == 'ncsnpp'
      kw.update(resample_filter=(1, 3, 3, 1) if ncsn else (1, 1),
                channel_mult_noise=2 if ncsn else 1,
                encoder_type='residual' if ncsn else 'standard',
                embedding_type='fourier' if ncsn else 'positional')
      for k in ('resample_filter', 'channel_mult_noise', 'encoder_type', 'embedding_type'):
        cfg.pop(k, None)
      for k, v in _CTM_SONG_DEFAULTS.items():  # ctm-cifar10's SongUNet class defaults
        cfg.setdefault(k, v)
  elif model_type == 'DhariwalUNet':
    allowed, cls = _ADM_KEYS, DhariwalUNet
  else:
    raise ValueError(f'unsupported model_type {model_type!r}')
  unknown = set(cfg) - allowed
  if unknown:
    raise ValueError(f'unknown {model_type} config keys: {sorted(unknown)}')
  kw.update({k: _tuple(v) for k, v in cfg.items()})
  kw['use_s'] = training_mode.lower() == 'ctm'
  return cls(**kw)


def _adm_from_openai_config(cfg: dict) -> DhariwalUNet:
  """openai UNetModel kwargs, or the script flags of consistency_models / sony-ctm."""
  flags_style = 'num_channels' in cfg or 'image_size' in cfg and 'model_channels' not in cfg
  res = int(cfg.pop('image_size'))
  if flags_style:
    mc = int(cfg.pop('num_channels'))
    mult = cfg.pop('channel_mult', '')
    if mult in ('', None):
      mult = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
              64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}[res]
    elif isinstance(mult, str):
      mult = tuple(int(c) for c in mult.split(','))
    attn = cfg.pop('attention_resolutions', '32,16,8')
    attn = tuple(int(a) for a in attn.split(',')) if isinstance(attn, str) else tuple(attn)
    label_dim = 1000 if cfg.pop('class_cond', False) else 0
    out = 6 if cfg.pop('learn_sigma', False) else 3
    in_ch = 3
  else:
    mc = int(cfg.pop('model_channels'))
    mult = tuple(cfg.pop('channel_mult', (1, 2, 4, 8)))
    attn = tuple(res // int(ds) for ds in cfg.pop('attention_resolutions'))  # stored as ds
    label_dim = int(cfg.pop('num_classes', None) or 0)
    out = int(cfg.pop('out_channels'))
    in_ch = int(cfg.pop('in_channels', 3))
  if not all(float(m).is_integer() for m in mult):
    raise NotImplementedError(f'fractional channel_mult {mult}')
  head_ch = int(cfg.pop('num_head_channels', -1))
  if head_ch <= 0:
    raise NotImplementedError('only num_head_channels > 0 (channels per head) is supported')
  for k, want in (('use_scale_shift_norm', True), ('resblock_updown', True),
                  ('use_new_attention_order', False), ('dims', 2)):
    if k in cfg and cfg.pop(k) != want:
      raise NotImplementedError(f'{k} must be {want} for the DhariwalUNet port')
  # openai's GroupNorm32 has 32 groups at every width; EDM's rule min(32, C // 4) agrees from 128
  # channels on (every released checkpoint), and is kept there so that the nets compare equal.
  if any(mc * int(m) < 128 for m in mult):
    extra = dict(norm_groups=32)
    if any(mc * int(m) % 32 for m in mult):
      raise ValueError(f'channels {[mc * int(m) for m in mult]}: openai GroupNorm32 needs '
                       f'multiples of 32')
  else:
    extra = {}
  kw = dict(img_resolution=res, in_channels=in_ch, out_channels=out, label_dim=label_dim,
            model_channels=mc, channel_mult=tuple(int(m) for m in mult),
            num_blocks=int(cfg.pop('num_res_blocks')), attn_resolutions=attn,
            dropout=float(cfg.pop('dropout', 0.0)), channels_per_head=head_ch,
            use_s=str(cfg.pop('training_mode', '') or '').lower() == 'ctm', **extra)
  # Flags that do not change the network function.
  for k in ('num_heads', 'num_heads_upsample', 'use_checkpoint', 'use_fp16', 'attention_type',
            'conv_resample'):
    cfg.pop(k, None)
  if cfg:
    raise ValueError(f'unknown UNetModel config keys: {sorted(cfg)}')
  return DhariwalUNet(**kw)


# ------------------------------------------------------------------------------------------------
# Names.


def _strip(name: str) -> str:
  for p in ('module.', 'model.'):
    if name.startswith(p):
      name = name[len(p):]
  return name


def detect_naming(names) -> str:
  """'openai' for UNetModel names (input_blocks / time_embed), else 'edm'."""
  for n in names:
    if re.match(r'(input_blocks|middle_block|output_blocks|time_embed)\.', _strip(n)):
      return 'openai'
  return 'edm'


_RES_SUB = {'in_layers.0': 'norm0', 'in_layers.2': 'conv0', 'emb_layers.1': 'affine',
            'emb_layers_s.1': 'affine_s', 'out_layers.0': 'norm1', 'out_layers.3': 'conv1',
            'skip_connection': 'skip'}
_ATTN_SUB = {'norm': 'norm2', 'qkv': 'qkv', 'proj_out': 'proj'}
_TOP = {'time_embed.0': 'map_layer0', 'time_embed.2': 'map_layer1',
        'time_embed_s.0': 'map_layer0_s', 'time_embed_s.2': 'map_layer1_s',
        'label_emb': 'map_label', 'out.0': 'out_norm', 'out.2': 'out_conv'}


def _openai_module_table(net: DhariwalUNet) -> Dict[str, Tuple[str, str, int]]:
  """openai module prefix -> (EDM module name, role res|attn|conv, attention heads)."""
  enc, dec = dhariwal_unet_layout(net)
  heads = lambda ch: ch // net.channels_per_head
  table = {}
  for i, (name, kind, ch, attn) in enumerate(enc):
    if kind == 'conv':
      table[f'input_blocks.{i}.0'] = (f'enc.{name}', 'conv', 0)
      continue
    table[f'input_blocks.{i}.0'] = (f'enc.{name}', 'res', 0)
    if attn:
      table[f'input_blocks.{i}.1'] = (f'enc.{name}', 'attn', heads(ch))
  (in0, _, ch0, _), (in1, _, _, _) = dec[0], dec[1]
  table['middle_block.0'] = (f'dec.{in0}', 'res', 0)
  table['middle_block.1'] = (f'dec.{in0}', 'attn', heads(ch0))
  table['middle_block.2'] = (f'dec.{in1}', 'res', 0)
  j, pos = -1, 0
  for name, kind, ch, attn in dec[2:]:
    if kind == 'block':
      j += 1
      table[f'output_blocks.{j}.0'] = (f'dec.{name}', 'res', 0)
      pos = 1
      if attn:
        table[f'output_blocks.{j}.1'] = (f'dec.{name}', 'attn', heads(ch))
        pos = 2
    else:  # the up-sampling ResBlock closes the previous output block
      table[f'output_blocks.{j}.{pos}'] = (f'dec.{name}', 'res', 0)
  return table


def _openai_to_edm(name: str, table, qkv_order: str):
  """Rename one openai tensor; returns (edm_name, transform or None)."""
  parts = name.split('.')
  for n in (3, 2, 1):
    prefix = '.'.join(parts[:n])
    if prefix in table:
      (mod, role, heads), rest = table[prefix], parts[n:]
      break
    if prefix in _TOP:
      mod, role, heads, rest = _TOP[prefix], 'top', 0, parts[n:]
      break
  else:
    return None, None
  if not rest:
    return None, None
  leaf = rest[-1]
  sub = '.'.join(rest[:-1])
  transform = None
  if role == 'res':
    if sub not in _RES_SUB:
      return None, None
    mod = f'{mod}.{_RES_SUB[sub]}'
  elif role == 'attn':
    if sub not in _ATTN_SUB:
      return None, None
    mod = f'{mod}.{_ATTN_SUB[sub]}'
    if sub == 'qkv':
      transform = ('qkv', heads, qkv_order)
  elif sub:
    return None, None
  if mod == 'map_label':
    transform = ('transpose',)  # nn.Embedding [classes, emb] -> Linear weight [emb, classes]
  return f'{mod}.{leaf}', transform


def _edm_to_path(name: str) -> Tuple[PathT, str]:
  """EDM name -> (flax module path, torch leaf)."""
  parts = name.split('.')
  if parts[0] in ('enc', 'dec') and len(parts) > 2:
    parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
  return tuple(parts[:-1]), parts[-1]


def _qkv_perm(channels: int, heads: int, order: str) -> np.ndarray:
  """Row permutation taking openai qkv rows to EDM's [head, channel, q|k|v] interleave."""
  d = channels // heads
  h, c, j = np.meshgrid(np.arange(heads), np.arange(d), np.arange(3), indexing='ij')
  if order == 'three_heads':    # flash / sony-ctm / consistency_models: (three, heads, d)
    src = j * channels + h * d + c
  elif order == 'heads_three':  # guided-diffusion QKVAttentionLegacy: (heads, three, d)
    src = h * 3 * d + j * d + c
  else:
    raise ValueError(f'qkv_order {order!r}')
  return src.reshape(-1)  # flattened in EDM order (h, c, j)


def _dummy_inputs(net):
  r, c = net.img_resolution, net.in_channels
  args = (jnp.zeros((1, r, r, c), jnp.float32), jnp.zeros((1,), jnp.float32))
  if net.use_s:
    args = args + (jnp.zeros((1,), jnp.float32),)
  return args


def param_shapes(net) -> Dict[PathT, Tuple[int, ...]]:
  """Flat {path: shape} of `net`'s params via jax.eval_shape (no initialisation is run)."""
  tree = jax.eval_shape(lambda k: net.init(k, *_dummy_inputs(net)), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(tree['params'])
  return {k: tuple(v.shape) for k, v in flat.items()}


def torch_to_flax_names(net, names, naming: str = 'auto',
                        qkv_order: str = 'three_heads') -> Dict[str, Optional[tuple]]:
  """Map torch tensor names to (flax param path, transform); None = ignored buffer / unknown.

  Unknown names map to None as well; `load_torch_state_dict` reports them as unexpected.
  """
  names = list(names)
  if naming == 'auto':
    naming = detect_naming(names)
  if naming == 'openai' and not isinstance(net, DhariwalUNet):
    raise ValueError('openai names only exist for the ADM (DhariwalUNet)')
  table = _openai_module_table(net) if naming == 'openai' else None
  out = {}
  for full in names:
    name = _strip(full)
    transform = None
    if naming == 'openai':
      name, transform = _openai_to_edm(name, table, qkv_order)
      if name is None:
        out[full] = None
        continue
    mod, leaf = _edm_to_path(name)
    out[full] = (mod, leaf, transform)
  return out


def _convert(arr: np.ndarray, leaf: str, transform) -> np.ndarray:
  arr = np.asarray(arr, np.float32)
  if transform and transform[0] == 'transpose':
    arr = arr.T
  if transform and transform[0] == 'qkv':
    _, heads, order = transform
    arr = arr[_qkv_perm(arr.shape[0] // 3, heads, order)]
  if leaf == 'kernel':
    if arr.ndim == 4:    # conv OIHW -> HWIO
      return arr.transpose(2, 3, 1, 0)
    if arr.ndim == 3:    # conv1d [O, I, 1] (openai attention) -> 1x1 HWIO
      return arr.transpose(2, 1, 0)[None]
    if arr.ndim == 2:    # linear [out, in] -> [in, out]
      return arr.T
  return arr


def load_torch_state_dict(net, state_dict: Mapping[str, Any], naming: str = 'auto',
                          qkv_order: str = 'three_heads') -> dict:
  """Torch state dict (name -> array) -> the flax params tree of `net` (plain nested dicts).

  Apply with `net.apply({'params': params}, ...)`.

  naming: 'edm' (EDM / CTM-CIFAR-10 names), 'openai' (UNetModel names), or 'auto'.
  qkv_order (openai names only): 'three_heads' for flash-attention checkpoints (consistency_models,
  sony/ctm), 'heads_three' for guided-diffusion's legacy attention.
  Raises ValueError listing missing flax params, unexpected torch tensors and shape mismatches.
  """
  shapes = param_shapes(net)
  mapping = torch_to_flax_names(net, state_dict.keys(), naming, qkv_order)
  filled, unexpected, mismatched = {}, [], []
  for full, target in mapping.items():
    arr = np.asarray(state_dict[full])
    if full.endswith('resample_filter'):
      _check_filter(net, full, arr)
      continue
    if target is None:
      unexpected.append(full)
      continue
    mod, tleaf, transform = target
    if tleaf == 'weight':
      leaf = 'kernel' if mod + ('kernel',) in shapes else 'scale'
    else:
      leaf = tleaf
    path = mod + (leaf,)
    if path not in shapes:
      unexpected.append(full)
      continue
    value = _convert(arr, leaf, transform)
    if value.shape != shapes[path]:
      mismatched.append(f'{full} {arr.shape} -> {"/".join(path)} expects {shapes[path]}')
      continue
    if path in filled:
      raise ValueError(f'two torch tensors map to {"/".join(path)}')
    filled[path] = value
  missing = sorted('/'.join(p) for p in shapes if p not in filled)
  if missing or unexpected or mismatched:
    lines = []
    if missing:
      lines.append(f'{len(missing)} flax params not filled: {missing}')
    if unexpected:
      lines.append(f'{len(unexpected)} torch tensors not used: {sorted(unexpected)}')
    if mismatched:
      lines.append(f'{len(mismatched)} shape mismatches: {mismatched}')
    raise ValueError('state dict does not match the module:\n' + '\n'.join(lines))
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in filled.items()})


def _check_filter(net, name: str, arr: np.ndarray):
  want = resample_filter2d(getattr(net, 'resample_filter', (1, 1)))
  got = np.asarray(arr, np.float32).reshape(arr.shape[-2:])
  if got.shape != want.shape or not np.allclose(got, want, atol=1e-7):
    raise ValueError(f'{name}: resample filter {got.tolist()} does not match the module '
                     f'resample_filter={tuple(getattr(net, "resample_filter", (1, 1)))}')


# ------------------------------------------------------------------------------------------------
# Teacher -> student.


def copy_matching_params(dst: Mapping, src: Mapping):
  """Copy every leaf of `src` whose path (and shape) exists in `dst` (EDM teacher -> CTM student).

  Both are plain params trees (without the 'params' key). Returns (params, report) with report
  lists 'copied', 'kept' (dst-only leaves, e.g. the CTM s-path layers) and 'unused' (src-only
  leaves, e.g. the teacher's map_augment). A shared path with a different shape raises.
  """
  fd = flax.traverse_util.flatten_dict(dict(dst))
  fs = flax.traverse_util.flatten_dict(dict(src))
  out, copied, kept = {}, [], []
  for path, leaf in fd.items():
    if path in fs:
      if tuple(fs[path].shape) != tuple(leaf.shape):
        raise ValueError(f'{"/".join(path)}: shape {fs[path].shape} vs {leaf.shape}')
      out[path] = fs[path]
      copied.append('/'.join(path))
    else:
      out[path] = leaf
      kept.append('/'.join(path))
  unused = ['/'.join(p) for p in fs if p not in fd]
  return flax.traverse_util.unflatten_dict(out), dict(copied=copied, kept=kept, unused=unused)
