"""ctm_jax.torch_archive: torch-free reading of torch.save / TorchScript files, and its refusals.

The positive cases are files written by torch itself (tests/fixtures/inception_fid.npz, made by
tests/fixtures/make_inception_fixture.py: a zip-format and a legacy-format torch.save of tensors
with transposed strides, storage offsets, shared storages and 8 dtypes, with their values).
The refusal cases are pickles written opcode by opcode here (never loaded by `pickle`).
"""
import io
import os
import struct
import zipfile

import numpy as np
import pytest

from ctm_jax import torch_archive as ta

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'inception_fid.npz')


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_reads_torch_written_checkpoint(fixture, fmt):
  got = ta.read_torch_archive(fixture[f'ckpt/{fmt}'].tobytes())
  expected = {k[len('expected/'):]: v for k, v in fixture.items() if k.startswith('expected/')}
  assert sorted(got) == sorted(expected)
  for name, want in expected.items():
    have = got[name]
    if name == 'state.bfloat16':
      assert str(have.dtype) == 'bfloat16'
      have = have.astype(np.float32)
    else:
      assert have.dtype == want.dtype, name
    assert have.shape == want.shape, name
    np.testing.assert_array_equal(have, want, err_msg=name)
    assert have.flags.writeable and have.flags.c_contiguous


# ------------------------------------------------------------------------------------------------
# Hand-written pickles (protocol 2 opcodes).


def _global(module, name):
  return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _str(s):
  b = s.encode()
  return b'X' + struct.pack('<I', len(b)) + b


def _int(n):
  return b'J' + struct.pack('<i', n)


def _tuple(*items):
  return b'(' + b''.join(items) + b't'


def _tensor(key, numel, offset, size, stride):
  """What torch.save writes for one float32 tensor (_rebuild_tensor_v2 on a persistent storage)."""
  pid = _tuple(_str('storage'), _global('torch', 'FloatStorage'), _str(key), _str('cpu'), _int(numel))
  return (_global('torch._utils', '_rebuild_tensor_v2') +
          _tuple(pid + b'Q', _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride)),
                 b'\x89', _global('collections', 'OrderedDict') + b')R') + b'R')


def _state_dict_pickle(entries):
  body = b''.join(_str(name) + obj for name, obj in entries.items())
  return b'\x80\x02' + _global('collections', 'OrderedDict') + b')R' + b'(' + body + b'u.'


def _zip(pickle_bytes, storages=None):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle_bytes)
    zf.writestr('archive/version', '3\n')
    for key, arr in (storages or {}).items():
      zf.writestr(f'archive/data/{key}', np.asarray(arr, '<f4').tobytes())
  return buf.getvalue()


def test_hand_written_archive_reads_offsets_and_strides():
  storage = np.arange(20, dtype=np.float32)
  data = _zip(_state_dict_pickle({
      'a': _tensor('0', 20, 3, (2, 3), (1, 4)),        # a transposed view at offset 3
      'b': _tensor('0', 20, 19, (), ()),               # a 0-d tensor (the last element)
  }), {'0': storage})
  got = ta.read_torch_archive(data)
  np.testing.assert_array_equal(got['a'], np.array([[3, 7, 11], [4, 8, 12]], np.float32))
  assert got['b'].shape == () and got['b'] == 19


def test_refuses_out_of_bounds_tensor():
  data = _zip(_state_dict_pickle({'a': _tensor('0', 8, 2, (3, 3), (3, 1))}), {'0': np.zeros(8)})
  with pytest.raises(ta.TorchArchiveError, match='reads element 10 of storage'):
    ta.read_torch_archive(data)


def test_refuses_wrong_storage_size():
  data = _zip(_state_dict_pickle({'a': _tensor('0', 8, 0, (8,), (1,))}), {'0': np.zeros(7)})
  with pytest.raises(ta.TorchArchiveError, match="storage '0' has 28 bytes"):
    ta.read_torch_archive(data)


@pytest.mark.parametrize('module,name', [('os', 'system'), ('builtins', 'eval'),
                                         ('torch.nn.modules.conv', 'Conv2d')])
def test_refuses_foreign_globals(tmp_path, module, name):
  marker = tmp_path / 'ran'
  call = _global(module, name) + _tuple(_str(f'touch {marker}')) + b'R'
  payload = b'\x80\x02' + call + b'.'
  for data in (_zip(payload), payload):        # zip archive and legacy (bare pickle) file
    with pytest.raises(ta.UnsafePickleError, match=f'global {module}.{name}'):
      ta.read_torch_archive(data)
  assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'x.pt'
  path.write_bytes(b'plain text, not a checkpoint')
  with pytest.raises(ta.TorchArchiveError, match='x.pt: not a PyTorch checkpoint'):
    ta.read_torch_archive(path)
  with pytest.raises(ta.TorchArchiveError, match='no such file'):
    ta.read_torch_archive(tmp_path / 'absent.pt')


def test_nested_archive_in_zip(fixture):
  """A zip (like a wheel) holding one .pt member is read from memory."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as zf:
    zf.writestr('pkg/__init__.py', '')
    zf.writestr('pkg/weights.pt', fixture['ckpt/zip'].tobytes())
  got = ta.read_torch_archive(buf.getvalue())
  np.testing.assert_array_equal(got['state.transposed'], fixture['expected/state.transposed'])
