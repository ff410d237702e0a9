"""Official weight files read torch-free (ctm_jax.official_weights), and pickles that must be refused.

Fixtures (tests/fixtures/README.md; made by tests/fixtures/make_official_weights_fixtures.py with
the reference code): EDM network pickles written as NVlabs/edm's training loop writes them, a CTM
student state dict written as Kim-Dongjun/ctm-cifar10 writes `ema_*.pt`, an openai
consistency_models UNetModel state dict, each with the reference network's outputs on fixed
inputs, and VGG16 / LPIPS head files in torchvision / lpips / piq layouts with their arrays.
Pass criterion: max|ours - ref| <= 1e-5 max|ref|.
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


def _edm_denoise(module, params, z, sigma_data=0.5):
  """D(x, sigma) of the fixture's inputs with EDM's preconditioning (Karras et al. 2022,
  Table 1) written out here around the flax network; NHWC, float64."""
  x, sigma = z['x'].astype(np.float64), z['sigma'].astype(np.float64)
  c_in = 1 / np.sqrt(sigma ** 2 + sigma_data ** 2)
  c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
  c_out = sigma * sigma_data / np.sqrt(sigma ** 2 + sigma_data ** 2)
  bc = lambda a: a[:, None, None, None]
  labels = z['class_labels'] if 'class_labels' in z.files else None
  f = module.apply({'params': params}, NHWC(bc(c_in) * x).astype(np.float32),
                   np.log(sigma).astype(np.float32) / 4, class_labels=labels)
  return bc(c_skip) * NHWC(x) + bc(c_out) * np.asarray(f, np.float64)


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
  err = _rel_err(_edm_denoise(module, params, z, pre['sigma_data']), NHWC(z['D']))
  print(f'{tag}: D rel err {err:.2e}')
  assert err <= 1e-5


def test_edm_pickle_other_entries_and_key_errors():
  tree = ow.load_edm_pickle(FIXTURES / 'edm_songunet_tiny_uncond.pkl')
  assert sorted(tree) == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
  assert tree['loss_fn'].class_name == 'EDMLoss'
  assert tree['augment_pipe'].class_name == 'AugmentPipe'
  assert tree['augment_pipe'].attributes['p'] == pytest.approx(0.12)
  assert tree['dataset_kwargs']['resolution'] == 32
  with pytest.raises(ta.UnsafePickleError, match=r'NVlabs/edm network pickle.*edm_pkl'):
    ow.load_state_dict_file(FIXTURES / 'edm_songunet_tiny_uncond.pkl')   # read as a .pt
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
  other = ow.EdmNetwork(net.class_name, {**net.init_kwargs, 'sigma_data': 0.6, 'sigma_max': 40},
                        net.state_dict, net.inner_class)
  assert ow.edm_network_module(other)[1] == dict(sigma_data=0.6, sigma_min=0.002, sigma_max=40.0,
                                                 label_dim=0)
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


# ------------------------------------------------------------------------------------------------
# teacher.source = 'edm_pkl': the pickle loads as a run's teacher, checked against the config.


@pytest.fixture
def fixture8(monkeypatch):
  from ctm_jax import data
  monkeypatch.setitem(data.DATASETS, 'fixture8',
                      data.DatasetInfo('fixture8', 'fixture8', 'image', (8, 8, 3), 10, 1, 1,
                                       'test', True))


def _edm_pkl_ctm_config(tag, **teacher_model):
  """A CTM config on 'fixture8' whose teacher is the EDM pickle fixture (edm_pkl)."""
  from configs import digits_ctm, digits_edm
  t = digits_edm.get_config()
  t.data.dataset, t.data.class_conditional = 'fixture8', tag == 'cond'
  t.model.model_channels, t.model.augment_dim = 8, 9
  for k, v in teacher_model.items():
    t.model[k] = v
  c = digits_ctm.get_config()
  c.data.dataset, c.data.class_conditional = 'fixture8', tag == 'cond'
  c.teacher.config = t
  c.teacher.source, c.teacher.path = 'edm_pkl', str(FIXTURES / f'edm_songunet_tiny_{tag}.pkl')
  if tag == 'cond':
    c.teacher.label_order = 'standard'      # the fixture's labels are fixture8's own order
  return c


@pytest.mark.parametrize('tag,source', [('uncond', 'edm_pkl'), ('cond', 'edm_pkl'),
                                        ('uncond', 'torch_pt')])
def test_file_teacher_reproduces_the_reference(fixture8, tag, source):
  """edm_pkl: the pickle; torch_pt: torch.save(ema.state_dict()) of the same network."""
  from ctm_jax import teacher as teacher_lib
  cfg = _edm_pkl_ctm_config(tag)
  if source == 'torch_pt':
    cfg.teacher.source, cfg.teacher.path = 'torch_pt', str(FIXTURES / f'edm_songunet_tiny_{tag}.pt')
  teacher_lib.validate_teacher_config(cfg)
  teacher = teacher_lib.Teacher(cfg)
  z = np.load(FIXTURES / f'edm_songunet_tiny_{tag}.npz')
  labels = np.argmax(z['class_labels'], 1) if tag == 'cond' else None
  d = np.asarray(jax.jit(teacher.denoise)(teacher.params(), NHWC(z['x']), z['sigma'], labels))
  err = _rel_err(d, NHWC(z['D']))
  print(f'{source} teacher {tag}: D rel err {err:.2e}')
  assert err <= 1e-5


def test_edm_pkl_teacher_config_errors(fixture8, tmp_path):
  from ctm_jax import config_lib, teacher as teacher_lib
  cfg = _edm_pkl_ctm_config('uncond')
  cfg.teacher.path = ''
  with pytest.raises(config_lib.ConfigError, match='config.teacher.path must name'):
    teacher_lib.validate_teacher_config(cfg)
  cfg.teacher.path = str(tmp_path / 'missing.pkl')
  teacher_lib.validate_teacher_config(cfg)
  with pytest.raises(FileNotFoundError, match='missing.pkl: no such EDM network pickle'):
    teacher_lib.Teacher(cfg).params()
  cfg = _edm_pkl_ctm_config('uncond', num_blocks=2, attn_resolutions=(8,))
  with pytest.raises(config_lib.ConfigError, match=r'num_blocks: file 1, config 2; '
                                                   r'attn_resolutions: file \(4,\), config \(8,\)'):
    teacher_lib.Teacher(cfg).params()
  cfg = _edm_pkl_ctm_config('uncond')
  cfg.teacher.config.diffusion.sigma_data = 1.0
  with pytest.raises(config_lib.ConfigError, match='sigma_data 0.5'):
    teacher_lib.Teacher(cfg).params()


# ------------------------------------------------------------------------------------------------
# CTM student checkpoints (cm/train_util.py: torch.save(model.state_dict())).

CTM_PT = FIXTURES / 'ctm_songunet_tiny.pt'


def _ctm_fixture():
  z = np.load(FIXTURES / 'ctm_songunet_tiny_outputs.npz')
  return z, json.loads(str(z['meta']))['init_kwargs']


def _paper_student_at_fixture_size(augment_dim=None):
  """configs/cifar10_ctm.py's student network with only the sizes set to the fixture's."""
  from configs import cifar10_ctm
  from ctm_jax import nets
  _, kw = _ctm_fixture()
  m = cifar10_ctm.get_config().model
  m.unlock()
  for k in ('model_channels', 'channel_mult', 'num_blocks', 'attn_resolutions',
            'channel_mult_emb'):
    m[k] = tuple(kw[k]) if isinstance(kw[k], list) else kw[k]
  if augment_dim is not None:
    m.augment_dim = augment_dim
  return nets.build_net(m, use_s=True, label_dim=0, data_shape=(8, 8, 3))


def test_ctm_checkpoint_loads_into_the_paper_student_and_matches_the_reference():
  sd = ow.load_state_dict_file(CTM_PT)
  z, kw = _ctm_fixture()
  assert kw['augment_dim'] == 0 and not any('map_augment' in k for k in sd)
  assert 'model.map_layer0_s.weight' in sd and 'model.enc.8x8_block0.affine_s.weight' in sd
  net = _paper_student_at_fixture_size()
  params = torch_port.load_torch_state_dict(net, sd)   # every tensor used, every param filled
  assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)) == 53843
  f = net.apply({'params': params}, NHWC(z['F_in']), z['c_noise_t'], z['c_noise_s'])
  err = _rel_err(np.asarray(f), NHWC(z['F_x']))
  print(f'CTM .pt: F rel err {err:.2e}')
  assert err <= 1e-5
  # The teacher's 9-dim augment input (the paper config before) has no tensor in the file.
  with pytest.raises(ValueError, match='map_augment/kernel'):
    torch_port.load_torch_state_dict(_paper_student_at_fixture_size(augment_dim=9), sd)


def _ctm_eval_config(**model):
  from configs import digits_ctm
  _, kw = _ctm_fixture()
  c = digits_ctm.get_config()
  c.data.dataset = 'fixture8'
  for k in ('model_channels', 'channel_mult', 'num_blocks', 'attn_resolutions',
            'channel_mult_emb', 'augment_dim'):
    c.model[k] = tuple(kw[k]) if isinstance(kw[k], list) else kw[k]
  for k, v in model.items():
    c.model[k] = v
  return c


def test_eval_of_an_official_ctm_checkpoint(fixture8, tmp_path):
  from configs import base
  from ctm_jax import config_lib, runs, samplers
  from ctm_jax.evaljob import jobs, settings
  config = _ctm_eval_config()
  ev = settings.merge_eval(base.eval_block(), config, {
      'eval.samplers': 'onestep', 'eval.num_samples': 8, 'eval.batch_size': 8,
      'eval.shard_size': 8})
  wd = str(tmp_path / 'official')
  summary = jobs.run(wd, 'sample', ev, config, checkpoint_file=str(CTM_PT))
  rec = [r for r in summary['records'] if r.get('samples')][0]
  assert (rec['step'], rec['ema']) == (0, 'file-ctm_songunet_tiny')
  assert rec['checkpoint_file'] == str(CTM_PT)
  x = np.concatenate([np.load(f)['x'] for f in sorted(Path(rec['samples']).glob('shard_*.npz'))])
  # Shard 0, batch 0: x_T = sigma_max N(key), one jump G(x_T, T, sigma_min) with the file's
  # parameters loaded directly.
  model = runs.build_model(config)
  params = torch_port.load_torch_state_dict(model.net, ow.load_state_dict_file(CTM_PT))
  k_x, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0))
  x_T = 80.0 * jax.random.normal(k_x, (8, 8, 8, 3))
  want = np.asarray(jax.jit(lambda p, x: samplers.to_uint8(samplers.onestep(
      model.jump_fn(p), x, model.schedule)))(params, x_T))
  assert np.abs(x.astype(int) - want.astype(int)).max() <= 1
  # A config whose network the file does not hold: refused before any sampling.
  bad = _ctm_eval_config(augment_dim=9)
  with pytest.raises(config_lib.ConfigError, match='map_augment'):
    jobs.run(str(tmp_path / 'bad'), 'sample', ev, bad, checkpoint_file=str(CTM_PT))


# ------------------------------------------------------------------------------------------------
# VGG16 (torchvision layout) and LPIPS heads (lpips / piq layouts), torch-free.


@pytest.mark.parametrize('heads', ['lpips_heads_tiny.pth', 'piq_lpips_heads_tiny.pt'])
def test_lpips_export_from_torch_files(tmp_path, heads):
  from launch import export_lpips_weights
  from ctm_jax.nets import lpips
  want = np.load(FIXTURES / 'lpips_tiny_values.npz')
  out = tmp_path / 'lpips.npz'
  export_lpips_weights.main(['--out', str(out), '--vgg_pth', str(FIXTURES / 'vgg16_tiny.pth'),
                             '--heads_pth', str(FIXTURES / heads)])
  with np.load(out) as z:
    got = {k: z[k] for k in z.files}
  feats = sorted(k[4:] for k in want.files if k.startswith('vgg/features.'))
  assert sorted(k for k in got if k.startswith('features.')) == feats   # classifier.* dropped
  for k in feats:
    np.testing.assert_array_equal(got[k], want['vgg/' + k])
  for l in range(5):
    ref = (want[f'heads/lin{l}.model.1.weight'] if heads.startswith('lpips')
           else want[f'piq/{l}'].reshape(1, -1, 1, 1))
    np.testing.assert_array_equal(got[f'lin{l}.model.1.weight'], ref)
  params = lpips.load_lpips_params(out)
  assert lpips.lpips_widths(params) == (4, 8, 8, 16, 16)
  with pytest.raises(SystemExit):            # an existing output is never overwritten
    export_lpips_weights.main(['--out', str(out), '--vgg_pth', str(FIXTURES / 'vgg16_tiny.pth'),
                               '--heads_pth', str(FIXTURES / heads)])


def test_export_of_an_edm_pickle_to_npz_reproduces_the_reference(tmp_path):
  from launch import export_torch_weights
  out = tmp_path / 'edm.npz'
  export_torch_weights.main(['--source', str(FIXTURES / 'edm_songunet_tiny_cond.pkl'),
                             '--out', str(out)])
  net = ow.read_edm_pickle(FIXTURES / 'edm_songunet_tiny_cond.pkl')
  sd = torch_port.load_npz_state_dict(out)
  assert list(sd) == list(net.state_dict)
  for k, v in net.state_dict.items():
    np.testing.assert_array_equal(sd[k], v)
  assert torch_port.load_npz_config(out) == net.init_kwargs
  module = torch_port.module_from_torch_config(torch_port.load_npz_config(out))
  params = torch_port.load_torch_state_dict(module, sd)
  z = np.load(FIXTURES / 'edm_songunet_tiny_cond.npz')
  assert _rel_err(_edm_denoise(module, params, z), NHWC(z['D'])) <= 1e-5
  with pytest.raises(SystemExit):            # an existing output is never overwritten
    export_torch_weights.main(['--source', str(FIXTURES / 'ctm_songunet_tiny.pt'),
                               '--out', str(out)])
  assert list(torch_port.load_npz_state_dict(out)) == list(net.state_dict)


# ------------------------------------------------------------------------------------------------
# openai consistency_models checkpoints (openai UNetModel names, flash-attention qkv layout).


def test_consistency_models_checkpoint_matches_the_reference():
  z = np.load(FIXTURES / 'cm_unet_tiny_outputs.npz')
  flags = json.loads(str(z['config']))
  net = torch_port.module_from_torch_config(flags)
  sd = ow.load_state_dict_file(FIXTURES / 'cm_unet_tiny.pt')
  assert torch_port.detect_naming(sd) == 'openai' and 'middle_block.1.qkv.weight' in sd
  params = torch_port.load_torch_state_dict(net, sd)  # every tensor used, every param filled
  assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params)) == 123139
  np.testing.assert_allclose(z['rescaled_t'], 250 * np.log(z['sigma'].astype(np.float64)),
                             rtol=1e-6)
  f = net.apply({'params': params}, NHWC(z['F_in']), z['rescaled_t'])
  err = _rel_err(np.asarray(f), NHWC(z['F_x']))
  print(f'consistency_models .pt: F rel err {err:.2e}')
  assert err <= 1e-5
  # guided-diffusion's (head, q|k|v) order is another function of the same file (2 heads here).
  legacy = torch_port.load_torch_state_dict(net, sd, qkv_order='heads_three')
  assert _rel_err(np.asarray(net.apply({'params': legacy}, NHWC(z['F_in']), z['rescaled_t'])),
                  NHWC(z['F_x'])) > 1e-3
