r"""Export VGG16 + LPIPS heads to the .npz read by `ctm_jax.nets.lpips.load_lpips_params`.

Without torch, from the original files (read by ctm_jax.torch_archive, nothing in them is run):

  python -m launch.export_lpips_weights --out lpips_vgg16.npz \
      --vgg_pth vgg16-397923af.pth --heads_pth vgg.pth           # or piq's lpips_weights.pt

(`vgg16-397923af.pth`: torchvision's IMAGENET1K_V1 VGG16 weights; `vgg.pth`: the lpips package's
`lpips/weights/v0.1/vgg.pth`.)  Optionally, on a machine with torch, torchvision and the `lpips`
package, and internet access for torchvision's download (or its weights already in the torch hub
cache):

  python -m launch.export_lpips_weights --out lpips_vgg16.npz
  python -m launch.export_lpips_weights --out lpips_vgg16.npz --heads piq   # piq's head file

Writes `features.<i>.weight|bias` (torchvision `vgg16(weights=IMAGENET1K_V1).features`, OIHW) and
`lin<l>.model.1.weight` ([1, C, 1, 1]). --heads lpips (default) takes the LPIPS v0.1 'vgg' heads
shipped inside the lpips package (`lpips/weights/v0.1/vgg.pth`); --heads piq downloads the file
piq's LPIPS loads (photosynthesis.metrics release v0.4.0 `lpips_weights.pt`), which CTM used
through piq 0.7.0. With --check, and piq installed, the JAX distance on random images is
compared with `piq.LPIPS(replace_pooling=True, reduction='none')` (CTM's call) and printed.
"""
from __future__ import annotations

import argparse
import os

PIQ_LPIPS_URL = ('https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/'
                 'v0.4.0/lpips_weights.pt')


def _vgg16_features_state_dict():
  import torchvision
  try:
    vgg = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
  except AttributeError:                        # torchvision < 0.13
    vgg = torchvision.models.vgg16(pretrained=True)
  return {f'features.{k}': v.detach().cpu().numpy() for k, v in vgg.features.state_dict().items()}


def _lpips_heads():
  import lpips
  import torch
  path = os.path.join(os.path.dirname(lpips.__file__), 'weights', 'v0.1', 'vgg.pth')
  sd = torch.load(path, map_location='cpu')
  return {k: v.detach().cpu().numpy() for k, v in sd.items() if k.startswith('lin')}


def _piq_heads():
  import torch
  weights = torch.hub.load_state_dict_from_url(PIQ_LPIPS_URL, progress=False, map_location='cpu')
  return {f'lin{l}.model.1.weight': w.detach().cpu().numpy().reshape(1, -1, 1, 1)
          for l, w in enumerate(weights)}


def _check_against_piq(path):
  import numpy as np
  import piq
  import torch
  import torch.nn.functional as F
  import jax.numpy as jnp
  from ctm_jax.nets import lpips as jlpips

  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1).astype(np.float32)
  metric = piq.LPIPS(replace_pooling=True, reduction='none')
  ta, tb = (torch.from_numpy(v).permute(0, 3, 1, 2) for v in (a, b))
  ta, tb = (F.interpolate(v, size=224, mode='bilinear') for v in (ta, tb))  # as get_CTM_loss
  ref = metric((ta + 1) / 2, (tb + 1) / 2).detach().numpy()
  ours = np.asarray(jlpips.lpips_distance(jlpips.load_lpips_params(path), jnp.asarray(a),
                                          jnp.asarray(b)))
  print('piq  :', ref)
  print('jax  :', ours)
  print('max relative difference:', float(np.max(np.abs(ours - ref) / np.abs(ref))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output .npz path')
  parser.add_argument('--heads', choices=('lpips', 'piq'), default='lpips',
                      help="LPIPS v0.1 'vgg' heads from the lpips package, or piq's head file")
  parser.add_argument('--vgg_pth', default=None,
                      help="torchvision's VGG16 state dict file; with --heads_pth: no torch needed")
  parser.add_argument('--heads_pth', default=None,
                      help="LPIPS heads: lpips' weights/v0.1/vgg.pth or piq's lpips_weights.pt")
  parser.add_argument('--check', action='store_true',
                      help='compare with piq.LPIPS(replace_pooling=True) on random images')
  args = parser.parse_args(argv)

  import numpy as np
  from ctm_jax.nets import lpips as jlpips

  if (args.vgg_pth is None) != (args.heads_pth is None):
    parser.error('--vgg_pth and --heads_pth go together')
  if args.vgg_pth:
    sd = jlpips.lpips_state_dict_from_torch_files(args.vgg_pth, args.heads_pth)
    source = f'{args.vgg_pth} + {args.heads_pth}'
  else:
    sd = _vgg16_features_state_dict()
    sd.update(_lpips_heads() if args.heads == 'lpips' else _piq_heads())
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    jlpips.lpips_params_from_state_dict(sd)       # names, shapes and non-negative heads
    source = f'torchvision + {args.heads}'
  from ctm_jax import fileio
  if fileio.exists(args.out):
    parser.error(f'--out {args.out} exists; not overwriting it')
  fileio.save_npz(args.out, **sd)                # a local path or a URL (gs://...)
  print(f'wrote {args.out}: {len(sd)} arrays, from {source}')
  if args.check:
    _check_against_piq(args.out)


if __name__ == '__main__':
  main()
