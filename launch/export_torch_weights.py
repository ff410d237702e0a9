"""Export official PyTorch diffusion weights to an .npz that ctm_jax reads without torch.

Run on a machine with torch installed (and, for EDM network pickles, the NVlabs/edm checkout on
PYTHONPATH, because those pickles import `dnnlib` and `torch_utils`):

  # EDM teacher (network pickle; the 'ema' entry, constructor kwargs included):
  PYTHONPATH=/path/to/edm python launch/export_torch_weights.py \
      --source edm-cifar10-32x32-uncond-vp.pkl --out edm_cifar10_uncond_vp.npz

  # openai / sony-ctm / consistency_models checkpoint (a state dict; pass the network flags):
  python launch/export_torch_weights.py --source edm_imagenet64_ema.pt --out edm_in64.npz \
      --config '{"image_size": 64, "num_channels": 192, "num_res_blocks": 3,
                 "attention_resolutions": "32,16,8", "num_head_channels": 64,
                 "class_cond": true, "use_scale_shift_norm": true, "resblock_updown": true}'

The .npz holds `param/<torch name>` (every state_dict tensor, floating point as float32),
`config` (JSON constructor kwargs, when known) and `meta` (JSON provenance). Read it with
`ctm_jax.nets.torch_port.load_npz_state_dict` / `load_npz_config`, build the network with
`module_from_torch_config` and convert with `load_torch_state_dict`.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Mapping

import numpy as np

STATE_DICT_KEYS = ('ema', 'model', 'state_dict', 'model_state_dict', 'ema_model', 'net')


def _jsonable(value):
  """Constructor kwargs (EasyDict, tuples, numpy scalars) as plain JSON values."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f'cannot store {type(value).__name__} {value!r} in the JSON config')


def _is_state_dict(obj, torch) -> bool:
  return isinstance(obj, Mapping) and len(obj) > 0 and all(
      isinstance(v, torch.Tensor) for v in obj.values())


def _from_pickle(path, key):
  """EDM network pickle: `pickle.load(f)[key]` is a torch.nn.Module with `init_kwargs`."""
  with open(path, 'rb') as f:
    data = pickle.load(f)
  net = data[key] if isinstance(data, Mapping) else data
  config = getattr(net, 'init_kwargs', None)
  if getattr(net, 'init_args', ()):
    print(f'warning: {type(net).__name__} was built with positional args; config omitted',
          file=sys.stderr)
    config = None
  return net.state_dict(), (_jsonable(dict(config)) if config is not None else None)


def _from_checkpoint(path, key, torch, allow_pickle):
  """A .pt/.pth file holding a state dict, a module, or a dict containing a state dict."""
  obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  if isinstance(obj, torch.nn.Module):
    return obj.state_dict()
  if _is_state_dict(obj, torch):
    return obj
  if isinstance(obj, Mapping):
    for k in ((key,) if key else ()) + STATE_DICT_KEYS:
      inner = obj.get(k)
      if isinstance(inner, torch.nn.Module):
        return inner.state_dict()
      if _is_state_dict(inner, torch):
        return inner
  raise ValueError(f'{path}: no state dict found (top-level keys: '
                   f'{list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__})')


def _parse_config(text):
  if text is None:
    return None
  if os.path.isfile(text):
    with open(text) as f:
      text = f.read()
  cfg = json.loads(text)
  if not isinstance(cfg, dict):
    raise ValueError('--config must be a JSON object')
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', required=True, help='EDM .pkl network pickle or .pt checkpoint')
  parser.add_argument('--out', required=True, help='output .npz path')
  parser.add_argument('--key', default='ema',
                      help="entry of a pickle / checkpoint dict holding the network ('ema')")
  parser.add_argument('--config', default=None,
                      help='constructor kwargs as JSON (or a JSON file); overrides the pickle one')
  parser.add_argument('--allow_pickle', action='store_true',
                      help='torch.load with weights_only=False (only for trusted .pt files)')
  args = parser.parse_args(argv)

  import torch  # only here: the project itself does not depend on torch

  if args.source.endswith('.pkl'):
    state, config = _from_pickle(args.source, args.key)
  else:
    state, config = _from_checkpoint(args.source, args.key, torch, args.allow_pickle), None
  user_config = _parse_config(args.config)
  if user_config is not None:
    config = user_config

  arrays = {}
  for name, tensor in state.items():
    t = tensor.detach().cpu()
    if t.is_floating_point():
      t = t.float()
    arrays[f'param/{name}'] = t.numpy()
  meta = dict(source=os.path.abspath(args.source), key=args.key,
              torch_version=torch.__version__, num_tensors=len(arrays),
              num_elements=int(sum(a.size for a in arrays.values())),
              names=list(state.keys()))
  if config is not None:
    arrays['config'] = np.asarray(json.dumps(config))
  arrays['meta'] = np.asarray(json.dumps(meta))
  from ctm_jax import fileio
  fileio.save_npz(args.out, **arrays)            # a local path or a URL (gs://...)
  print(f'wrote {args.out}: {meta["num_tensors"]} tensors, {meta["num_elements"]:,} values, '
        f'config {"included" if config is not None else "absent"}')


if __name__ == '__main__':
  main()
