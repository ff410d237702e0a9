"""Official weight files read torch-free (ctm_jax.official_weights), and pickles that must be refused.

Fixtures (tests/fixtures/README.md; made by tests/fixtures/make_official_weights_fixtures.py with
the reference code): EDM network pickles written as NVlabs/edm's training loop writes them, a CTM
student state dict written as Kim-Dongjun/ctm-cifar10 writes `ema_*.pt`, each with the reference
network's outputs on fixed inputs. Pass criterion: max|ours - ref| <= 1e-5 max|ref|.
The refusal cases are pickles built here; each payload would create a file, and the test checks
that the payload really runs under `pickle.loads` and that the file is absent after our reader.
"""
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from ctm_jax import official_weights as ow
from ctm_jax import torch_archive as ta
from ctm_jax.nets import torch_port

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
NHWC = lambda a: np.asarray(a).transpose(0, 2, 3, 1)


def _rel_err(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize('tag', ['uncond', 'cond'])
def test_edm_pickle_matches_reference_forward(tag):
  pkl = FIXTURES / f'edm_songunet_tiny_{tag}.pkl'
  z = np.load(FIXTURES / f'edm_songunet_tiny_{tag}.npz')
  meta = json.loads(str(z['meta']))
  net = ow.read_edm_pickle(pkl)
  assert (net.class_name, net.inner_class) == ('EDMPrecond', 'SongUNet')
  assert net.init_kwargs == meta['init_kwargs']
  module, params, pre = ow.edm_pickle_network(pkl)
  assert pre == dict(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0,
                     label_dim=meta['init_kwargs']['label_dim'])
  assert module.augment_dim == 9 and module.model_channels == 8
  n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
  assert n_params == {'uncond': 48347, 'cond': 48435}[tag]      # torch's count (fixture script)
  # EDM preconditioning (Karras et al. 2022, Table 1), written out here.
  x, sigma = z['x'].astype(np.float64), z['sigma'].astype(np.float64)
  sd = pre['sigma_data']
  c_in = 1 / np.sqrt(sigma ** 2 + sd ** 2)
  c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2)
  bc = lambda a: a[:, None, None, None]
  labels = z['class_labels'] if 'class_labels' in z.files else None
  f = module.apply({'params': params}, NHWC(bc(c_in) * x).astype(np.float32),
                   np.log(sigma).astype(np.float32) / 4, class_labels=labels)
  d = bc(c_skip) * NHWC(x) + bc(c_out) * np.asarray(f, np.float64)
  err = _rel_err(d, NHWC(z['D']))
  print(f'{tag}: D rel err {err:.2e}')
  assert err <= 1e-5


def test_edm_pickle_other_entries_and_key_errors():
  tree = ow.load_edm_pickle(FIXTURES / 'edm_songunet_tiny_uncond.pkl')
  assert sorted(tree) == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
  assert tree['loss_fn'].class_name == 'EDMLoss'
  assert tree['augment_pipe'].class_name == 'AugmentPipe'
  assert tree['augment_pipe'].attributes['p'] == pytest.approx(0.12)
  assert tree['dataset_kwargs']['resolution'] == 32
  with pytest.raises(KeyError, match="no entry 'net'"):
    ow.read_edm_pickle(FIXTURES / 'edm_songunet_tiny_uncond.pkl', key='net')
  with pytest.raises(ValueError, match="'EDMLoss'"):
    ow.edm_network_module(ow.read_edm_pickle(FIXTURES / 'edm_songunet_tiny_uncond.pkl',
                                             key='loss_fn'))


def test_edm_pickle_unsupported_fields_are_named():
  net = ow.read_edm_pickle(FIXTURES / 'edm_songunet_tiny_uncond.pkl')
  for field, value, match in (('channel_mult_noise', 2, None), ('frobnicate', 1, 'frobnicate')):
    bad = ow.EdmNetwork(net.class_name, {**net.init_kwargs, field: value}, net.state_dict,
                        net.inner_class)
    if match is None:   # a supported field with another value builds another network
      module, _ = ow.edm_network_module(bad)
      assert module.channel_mult_noise == 2
    else:
      with pytest.raises(ValueError, match=match):
        ow.edm_network_module(bad)
  vp = ow.EdmNetwork('VPPrecond', net.init_kwargs, net.state_dict, net.inner_class)
  with pytest.raises(ValueError, match="'VPPrecond'"):
    ow.edm_network_module(vp)


# ------------------------------------------------------------------------------------------------
# Refusals: the payload of each pickle creates `marker`.


def _call_pickle(module, name, *args):
  """The pickle of {'ema': module.name(*args)}, opcode by opcode (args pickled by pickle)."""
  args_body = pickle.dumps(tuple(args), protocol=3)[2:-1]
  return (b'\x80\x03}X\x03\x00\x00\x00ema' + f'c{module}\n{name}\n'.encode() + args_body
          + b'Rs.')


def _write_src(marker):
  """Python source that creates `marker` when run, defining the class names EDM uses."""
  return f'open({str(marker)!r}, "w").write("ran")\nclass SongUNet: pass\nclass Evil: pass\n'


def _persistence_meta(class_name, module_src):
  return dict(type='class', version=6, module_src=module_src, class_name=class_name,
              state=dict(_init_args=(), _init_kwargs={}))


def _nested_save(pickle_bytes):
  """A zip-format torch.save whose data.pkl is `pickle_bytes`."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle_bytes)
  return buf.getvalue()


@pytest.mark.parametrize('case', ['os.system', 'builtins.exec', 'storage bytes', 'unknown class'])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path, case):
  marker = tmp_path / 'ran'
  if case == 'os.system':
    data, match = _call_pickle(os.system.__module__, 'system', f'touch {marker}'), 'system'
  elif case == 'builtins.exec':
    data, match = _call_pickle('builtins', 'exec', _write_src(marker)), 'builtins.exec'
  elif case == 'storage bytes':   # the "storage" bytes are a torch.save whose pickle calls exec
    inner = pickle.dumps(_Call(exec, _write_src(marker)), protocol=2)
    data, match = _call_pickle('torch.storage', '_load_from_bytes', _nested_save(inner)), 'exec'
  else:                           # a persistence record of a class EDM does not define
    data = _call_pickle('torch_utils.persistence', '_reconstruct_persistent_obj',
                        _persistence_meta('Evil', _write_src(marker)))
    match = "persistent class 'Evil'"
  path = tmp_path / 'evil.pkl'
  path.write_bytes(data)
  with pytest.raises(ta.UnsafePickleError, match=match):
    ow.load_edm_pickle(path)
  assert not marker.exists()
  if case in ('os.system', 'builtins.exec'):   # the payload is real: plain pickle runs it
    pickle.loads(data)
    assert marker.exists()


def test_persistence_source_is_never_compiled(tmp_path):
  """A known class name whose embedded source would create a file: read, the source ignored."""
  marker = tmp_path / 'ran'
  path = tmp_path / 'src.pkl'
  path.write_bytes(_call_pickle('torch_utils.persistence', '_reconstruct_persistent_obj',
                                _persistence_meta('SongUNet', _write_src(marker))))
  obj = ow.load_edm_pickle(path)['ema']
  assert isinstance(obj, ow.PersistentObject) and obj.class_name == 'SongUNet'
  assert not hasattr(obj, 'module_src') and not marker.exists()


class _Call:
  """Pickles as a call of func(*args) (what a malicious file does)."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args
