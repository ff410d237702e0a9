"""Export official PyTorch diffusion weights to an .npz, without torch and without running the file.

Optional: the teachers and evaluations read the original files directly
(--config.teacher.source=edm_pkl|torch_pt --config.teacher.path=FILE, launch.eval --checkpoint=FILE).
The .npz is for tools that want plain arrays (`np.load(..., allow_pickle=False)`).

  # EDM network pickle (the 'ema' entry; its constructor kwargs become the .npz config):
  python -m launch.export_torch_weights --source edm-cifar10-32x32-uncond-vp.pkl \
      --out edm_cifar10_uncond_vp.npz

  # a torch.save state dict (CTM ema_*.pt, consistency_models edm_imagenet64_ema.pt): pass the
  # network's constructor kwargs or script flags as --config to store them with the weights:
  python -m launch.export_torch_weights --source edm_imagenet64_ema.pt --out in64.npz \
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

import numpy as np


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
  parser.add_argument('--source', required=True,
                      help='EDM .pkl network pickle, or a .pt/.pth torch.save state dict')
  parser.add_argument('--out', required=True, help='output .npz path (must not exist)')
  parser.add_argument('--key', default='ema', help="entry of an EDM pickle holding the network")
  parser.add_argument('--config', default=None,
                      help='constructor kwargs as JSON (or a JSON file); overrides the pickle one')
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    parser.error(f'--out {args.out} exists; not overwriting it')
  user_config = _parse_config(args.config)

  from ctm_jax import official_weights
  if args.source.endswith('.pkl'):
    net = official_weights.read_edm_pickle(args.source, args.key)
    state, config = net.state_dict, net.init_kwargs
    extra = dict(key=args.key, class_name=net.class_name, inner_class=net.inner_class)
  else:
    state, config, extra = official_weights.load_state_dict_file(args.source), None, {}
  if user_config is not None:
    config = user_config

  as_saved = lambda a: np.asarray(a) if np.asarray(a).dtype.kind in 'iub' else np.asarray(
      a, np.float32)                      # floating point (half, bfloat16 too) as float32
  arrays = {f'param/{name}': as_saved(a) for name, a in state.items()}
  meta = dict(source=os.path.basename(args.source), num_tensors=len(arrays),
              num_elements=int(sum(a.size for a in arrays.values())), names=list(state),
              **extra)
  if config is not None:
    arrays['config'] = np.asarray(json.dumps(config))
  arrays['meta'] = np.asarray(json.dumps(meta))
  from ctm_jax import fileio
  fileio.save_npz(args.out, **arrays)            # a local path or a URL (gs://...)
  print(f'wrote {args.out}: {meta["num_tensors"]} tensors, {meta["num_elements"]:,} values, '
        f'config {"included" if config is not None else "absent"}')


if __name__ == '__main__':
  main()
