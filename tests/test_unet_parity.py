"""Parity of the flax SongUNet with the official PyTorch networks (EDM teacher, CTM student).

Fixtures (tests/fixtures, provenance in tests/fixtures/README.md): torch weights under their
original names, the constructor kwargs, the exact SongUNet input F_in = c_in x, the c_noise
values, and the torch outputs F_x, D (EDM) and denoised / G (CTM). Pass criterion from the README:
max|ours - ref| <= 1e-4 max|ref| (1e-5 on F_x, which also catches a wrong GroupNorm eps).
"""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ctm_jax.nets import torch_port

FIXTURES = Path(__file__).resolve().parent / 'fixtures'   # see tests/fixtures/README.md
SIGMA_DATA = 0.5


def _load(name):
  path = FIXTURES / f'{name}.npz'
  assert path.is_file(), f'parity fixture {path} is missing (it is part of the repository)'
  with np.load(path, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  meta = json.loads(str(data['meta']))
  net = torch_port.module_from_torch_config(torch_port.load_npz_config(path))
  state = torch_port.load_npz_state_dict(path)
  return data, meta, net, state


@pytest.fixture(scope='module', params=['edm_ddpmpp_tiny', 'ctm_ddpmpp_tiny'])
def case(request):
  data, meta, net, state = _load(request.param)
  variables = {'params': torch_port.load_torch_state_dict(net, state)}
  nhwc = lambda a: np.asarray(a).transpose(0, 2, 3, 1)
  labels = (data['c_noise'],) if 'c_noise' in data else (data['c_noise_t'], data['c_noise_s'])
  f_x = np.asarray(jax.jit(net.apply)(variables, nhwc(data['F_in']), *labels)).transpose(0, 3, 1, 2)
  return request.param, data, meta, net, state, variables, f_x


def _err(ours, ref):
  abs_err = float(np.max(np.abs(ours - ref)))
  return abs_err, abs_err / float(np.max(np.abs(ref)))


def test_every_torch_param_is_used_and_every_flax_param_filled(case):
  name, data, meta, net, state, variables, _ = case
  assert sorted(state) == sorted(meta['param_names'] + meta['buffer_names'])
  mapping = torch_port.torch_to_flax_names(net, meta['param_names'])
  assert all(mapping[n] is not None for n in meta['param_names'])
  flat = jax.tree_util.tree_leaves(variables['params'])
  assert sum(int(np.prod(x.shape)) for x in flat) == meta['num_params']
  assert len(flat) == len(meta['param_names'])
  assert all(n.endswith('resample_filter') for n in meta['buffer_names'])
  assert net.use_s == name.startswith('ctm')


def test_raw_network_output_F_x(case):
  name, data, _, _, _, _, f_x = case
  abs_err, rel_err = _err(f_x, data['F_x'])
  print(f'{name}: F_x max abs err {abs_err:.3g}, rel {rel_err:.3g}')
  assert rel_err <= 1e-5


def test_preconditioned_outputs(case):
  name, data, _, _, _, _, f_x = case
  x = data['x'].astype(np.float64)
  t = (data['sigma'] if name.startswith('edm') else data['t']).astype(np.float64)
  # EDM preconditioning (Karras et al. 2022, Table 1), computed here, checked against the file.
  c_in = 1 / np.sqrt(t ** 2 + SIGMA_DATA ** 2)
  c_skip = SIGMA_DATA ** 2 / (t ** 2 + SIGMA_DATA ** 2)
  c_out = t * SIGMA_DATA / np.sqrt(t ** 2 + SIGMA_DATA ** 2)
  for k, v in (('c_in', c_in), ('c_skip', c_skip), ('c_out', c_out)):
    np.testing.assert_allclose(data[k], v, rtol=1e-6)
  np.testing.assert_allclose(data['F_in'], c_in[:, None, None, None] * x, rtol=1e-5, atol=1e-7)
  bc = lambda a: a[:, None, None, None]
  denoised = bc(c_skip) * x + bc(c_out) * f_x
  if name.startswith('edm'):
    np.testing.assert_allclose(data['c_noise'], np.log(t) / 4, rtol=1e-6)
    checks = {'D': denoised}
  else:
    s = data['s'].astype(np.float64)
    np.testing.assert_allclose(data['c_noise_t'], np.log(t) / 4, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(data['c_noise_s'], np.log(s) / 4, rtol=1e-6, atol=1e-7)
    g = bc(s / t) * x + bc(1 - s / t) * denoised  # CTM jump G(x, t, s)
    np.testing.assert_array_equal(g[1], x[1])     # s == t: G is the identity
    checks = {'denoised': denoised, 'G': g}
  for key, ours in checks.items():
    abs_err, rel_err = _err(ours, data[key])
    print(f'{name}: {key} max abs err {abs_err:.3g}, rel {rel_err:.3g}')
    assert rel_err <= 1e-4


def test_student_initialised_from_teacher_by_name():
  _, _, teacher_net, teacher_state = _load('edm_ddpmpp_tiny')
  _, _, student_net, student_state = _load('ctm_ddpmpp_tiny')
  teacher = torch_port.load_torch_state_dict(teacher_net, teacher_state)
  student = torch_port.load_torch_state_dict(student_net, student_state)
  params, report = torch_port.copy_matching_params(student, teacher)
  assert report['unused'] == ['map_augment/kernel']  # the teacher's augmentation conditioning
  assert report['kept'] and all(k.split('/')[-2].endswith('_s') for k in report['kept'])
  assert len(report['copied']) + len(report['kept']) == len(jax.tree_util.tree_leaves(student))
  flat = lambda p: {jax.tree_util.keystr(k): v
                    for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
  fp, ft, fs = flat(params), flat(teacher), flat(student)
  for k, v in fp.items():
    np.testing.assert_array_equal(v, ft[k] if k in ft else fs[k])
