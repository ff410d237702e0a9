"""Tests of the flax U-Nets (SongUNet, DhariwalUNet) and the openai-name ADM port.

References are independent of the code under test: NumPy re-implementations of torch's
conv2d / conv_transpose2d semantics and of the openai UNetModel forward (sony/ctm `cm/unet.py`
structure, flash-attention qkv layout), and parameter counts derived layer by layer from the
torch constructors (checked against the torch counts stored in the parity fixtures).
"""
import functools
import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ctm_jax.nets import adm, layers, torch_port, unet

B = 8  # one sample per fake device
FIXTURES = Path(__file__).resolve().parent / 'fixtures'   # see tests/fixtures/README.md


def _random_params(net, seed):
  """Random params with `net`'s tree (from jax.eval_shape, so no slow RNG-heavy init compiles).

  Kernels ~ N(0, 1/fan_in), biases ~ 0.05 N, GroupNorm scales ~ 1 + 0.05 N: every layer,
  including the zero-initialised output convolutions, contributes (as in the torch fixtures).
  """
  r = np.random.default_rng(seed)
  shapes = torch_port.param_shapes(net)
  out = {}
  for path, shape in shapes.items():
    leaf = path[-1]
    if leaf == 'kernel':
      v = r.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif leaf == 'scale':
      v = 1 + 0.05 * r.standard_normal(shape)
    elif leaf == 'freqs':
      v = 16 * r.standard_normal(shape)
    else:
      v = 0.05 * r.standard_normal(shape)
    out[path] = jnp.asarray(v, jnp.float32)
  return {'params': flax.traverse_util.unflatten_dict(out)}


def _inputs(seed, res=8, ch=3):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal((B, res, res, ch)), jnp.float32)
  t = jnp.asarray(np.log(np.geomspace(0.002, 80, B)) / 4, jnp.float32)
  s = jnp.asarray(np.log(np.geomspace(0.002, 80, B)[::-1] * 0.5) / 4, jnp.float32)
  y = jnp.asarray(r.integers(0, 10, B), jnp.int32)
  return x, t, s, y


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ------------------------------------------------------------------------------------------------
# SongUNet (tiny preset, CTM s-path, class conditional, dropout 0.2).

@pytest.fixture(scope='module')
def song():
  net = unet.tiny(use_s=True, label_dim=10, dropout=0.2)
  variables = _random_params(net, 1)
  apply_eval = jax.jit(functools.partial(net.apply, train=False))
  apply_train = jax.jit(functools.partial(net.apply, train=True))
  return net, variables, apply_eval, apply_train


def test_song_shapes_s_and_labels(song):
  net, v, apply_eval, _ = song
  x, t, s, y = _inputs(0)
  out = apply_eval(v, x, t, s, y)
  assert out.shape == (B, 8, 8, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  scale = float(np.max(np.abs(out)))
  assert scale > 1e-2
  # s enters the network: changing only s changes F.
  assert np.max(np.abs(apply_eval(v, x, t, t, y) - out)) > 1e-3 * scale
  # class labels enter the network; int labels and their one-hot rows are the same input.
  assert np.max(np.abs(apply_eval(v, x, t, s, (y + 1) % 10) - out)) > 1e-3 * scale
  np.testing.assert_array_equal(layers.as_label_matrix(y, 10, B), jax.nn.one_hot(y, 10))
  # Every block has the s-projection; the s mapping MLP exists; no s-layers elsewhere.
  p = v['params']
  blocks = [k for k in p if k.startswith(('enc_', 'dec_')) and 'affine' in p[k]]
  assert blocks and all('affine_s' in p[k] for k in blocks)
  assert {'map_layer0_s', 'map_layer1_s', 'map_label'} <= set(p)


def test_song_s_required_and_no_s_variant(song):
  net, v, _, _ = song
  x, t, s, y = _inputs(0)
  with pytest.raises(ValueError, match='noise_labels_s'):
    net.apply(v, x, t, None, y)
  plain = unet.tiny(use_s=False)
  pv = jax.eval_shape(lambda k: plain.init(k, x, t), jax.random.PRNGKey(0))
  out = jax.eval_shape(plain.apply, pv, x, t)
  assert out.shape == (B, 8, 8, 3) and out.dtype == jnp.float32
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(pv)[0]]
  assert not any('affine_s' in n or 'map_layer0_s' in n or 'map_layer1_s' in n for n in names)
  with pytest.raises(ValueError, match='use_s=False'):
    jax.eval_shape(plain.apply, pv, x, t, s)


def test_song_dropout_only_in_train(song):
  net, v, apply_eval, apply_train = song
  x, t, s, y = _inputs(0)
  # rbg keys: dropout masks from threefry make this compile several times slower on CPU.
  k1, k2 = (jax.random.key(i, impl='unsafe_rbg') for i in (1, 2))
  e1 = apply_eval(v, x, t, s, y, rngs={'dropout': k1})
  e2 = apply_eval(v, x, t, s, y, rngs={'dropout': k2})
  np.testing.assert_array_equal(e1, e2)
  a1 = apply_train(v, x, t, s, y, rngs={'dropout': k1})
  a1b = apply_train(v, x, t, s, y, rngs={'dropout': k1})
  a2 = apply_train(v, x, t, s, y, rngs={'dropout': k2})
  np.testing.assert_array_equal(a1, a1b)
  scale = float(np.max(np.abs(e1)))
  assert np.max(np.abs(a1 - a2)) > 1e-3 * scale
  assert np.max(np.abs(a1 - e1)) > 1e-3 * scale


def test_song_bf16_compute_close_to_fp32(song):
  net, v, apply_eval, _ = song
  x, t, s, y = _inputs(0)
  ref = apply_eval(v, x, t, s, y)
  out = jax.jit(net.clone(dtype=jnp.bfloat16).apply)(v, x, t, s, y)
  assert out.dtype == jnp.float32
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v))
  assert _rel(out, ref) < 5e-2
  assert _rel(out, ref) > 0  # really computed in bf16


def test_song_batch_sharded_matches_unsharded(song):
  net, v, apply_eval, _ = song
  assert len(jax.devices()) == 8
  x, t, s, y = _inputs(3)
  ref = apply_eval(v, x, t, s, y)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  data, repl = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  vs = jax.device_put(v, repl)
  args = [jax.device_put(a, data) for a in (x, t, s, y)]
  out = apply_eval(vs, *args)
  assert out.sharding.is_equivalent_to(data, out.ndim)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0,
                             atol=1e-5 * float(np.max(np.abs(ref))))


@pytest.mark.parametrize('kw', [
    dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
         decoder_type='skip', resample_filter=(1, 3, 3, 1)),  # NCSN++
    dict(encoder_type='skip', decoder_type='skip'),
], ids=['ncsnpp', 'skip_skip'])
def test_song_variants(kw):
  net = unet.tiny(use_s=True, **kw)
  x, t, s, _ = _inputs(0)
  v = _random_params(net, 1)
  f = jax.jit(net.apply)
  out = f(v, x, t, s)
  assert out.shape == (B, 8, 8, 3) and np.all(np.isfinite(out))
  assert np.max(np.abs(f(v, x, t, t) - out)) > 1e-3 * float(np.max(np.abs(out)))
  p = v['params']
  if kw['encoder_type'] == 'residual':
    assert 'enc_4x4_aux_residual' in p and p['map_noise']['freqs'].shape == (16,)
  else:
    assert 'enc_4x4_aux_skip' in p
  assert 'dec_4x4_aux_conv' in p and 'dec_8x8_aux_conv' in p


# ------------------------------------------------------------------------------------------------
# EDM initialisation (training/networks.py weight_init) of one block of each family.

def _bound_ok(w, bound):
  w = np.abs(np.asarray(w))
  return w.max() <= bound * (1 + 1e-6) and w.max() > 0.9 * bound


def test_edm_init_of_blocks():
  cin, cout, emb = 16, 32, 64
  x, e = jnp.ones((2, 4, 4, cin)), jnp.ones((2, emb))
  song_block = layers.UNetBlock(
      out_channels=cout, attention=True, num_heads=1, skip_scale=float(np.sqrt(0.5)), eps=1e-6,
      resample_proj=True, adaptive_scale=False, use_s=True, init_kw=unet._INIT,
      init_zero_kw=unet._INIT_ZERO, init_attn_kw=unet._INIT_ATTN)
  key = lambda seed: jax.random.key(seed, impl='unsafe_rbg')  # cheap to compile
  p = jax.jit(song_block.init)(key(0), x, e, e)['params']
  xavier = lambda fi, fo: np.sqrt(6 / (fi + fo))
  assert _bound_ok(p['conv0']['kernel'], xavier(9 * cin, 9 * cout))
  assert _bound_ok(p['conv1']['kernel'], 1e-5 * xavier(9 * cout, 9 * cout))
  assert _bound_ok(p['skip']['kernel'], xavier(cin, cout))
  assert _bound_ok(p['qkv']['kernel'], np.sqrt(0.2) * xavier(cout, 3 * cout))
  assert _bound_ok(p['affine']['kernel'], xavier(emb, cout))
  assert _bound_ok(p['affine_s']['kernel'], xavier(emb, cout))  # fresh, not zero (CTM)
  assert not np.allclose(p['affine']['kernel'], p['affine_s']['kernel'])
  assert all(not np.any(p[m]['bias']) for m in ('conv0', 'conv1', 'affine', 'affine_s', 'qkv'))
  assert all(np.all(p[m]['scale'] == 1) for m in ('norm0', 'norm1', 'norm2'))

  adm_block = layers.UNetBlock(
      out_channels=cout, attention=True, channels_per_head=16, use_s=True, init_kw=adm._INIT,
      init_zero_kw=adm._INIT_ZERO)
  p = jax.jit(adm_block.init)(key(1), x, e, e)['params']
  assert adm_block.heads == 2
  kaiming = lambda fi: 1 / np.sqrt(fi)  # sqrt(3 / fan_in) * sqrt(1/3)
  assert _bound_ok(p['conv0']['kernel'], kaiming(9 * cin))
  assert _bound_ok(p['affine']['kernel'], kaiming(emb))
  assert p['affine']['kernel'].shape == (emb, 2 * cout)
  assert np.abs(p['affine_s']['bias']).max() <= kaiming(emb) and np.any(p['affine_s']['bias'])
  assert not np.any(p['conv1']['kernel']) and not np.any(p['proj']['kernel'])


# ------------------------------------------------------------------------------------------------
# EDM Conv2d resampling against torch conv2d / conv_transpose2d semantics (NumPy).

def _np_conv2d(x, w, stride=1, pad=0, groups=1):
  """torch.nn.functional.conv2d (cross-correlation), x [B,C,H,W], w [O, C/groups, k, k]."""
  bsz, c, h, wd = x.shape
  o, cg, k, _ = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
  out = np.zeros((bsz, o, ho, wo))
  og = o // groups
  for oc in range(o):
    g = oc // og
    for i in range(ho):
      for j in range(wo):
        patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + k, j * stride:j * stride + k]
        out[:, oc, i, j] = np.einsum('bcij,cij->b', patch, w[oc])
  return out


def _np_conv_transpose2d(x, w, stride, pad, groups):
  """torch conv_transpose2d, x [B,C,H,W], w [C, O/groups, k, k]."""
  bsz, c, h, wd = x.shape
  _, og, k, _ = w.shape
  cg = c // groups
  full = np.zeros((bsz, og * groups, (h - 1) * stride + k, (wd - 1) * stride + k))
  for ic in range(c):
    g = ic // cg
    for i in range(h):
      for j in range(wd):
        full[:, g * og:(g + 1) * og, i * stride:i * stride + k, j * stride:j * stride + k] += (
            x[:, ic, i, j][:, None, None, None] * w[ic][None])
  return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad]


def _np_edm_conv(x, w, b, up, down, filt, fused):
  """NumPy EDM Conv2d.forward (x NCHW, w OIHW or None)."""
  f = np.asarray(filt, np.float64)
  f = np.outer(f, f)[None, None] / f.sum() ** 2
  c = x.shape[1]
  w_pad = w.shape[-1] // 2 if w is not None else 0
  f_pad = (f.shape[-1] - 1) // 2
  if fused and down and w is not None:
    x = _np_conv2d(x, w, pad=w_pad + f_pad)
    x = _np_conv2d(x, np.tile(f, (w.shape[0], 1, 1, 1)), stride=2, groups=w.shape[0])
  else:
    if up:
      x = _np_conv_transpose2d(x, np.tile(4 * f, (c, 1, 1, 1)), 2, f_pad, c)
    if down:
      x = _np_conv2d(x, np.tile(f, (c, 1, 1, 1)), stride=2, pad=f_pad, groups=c)
    if w is not None:
      x = _np_conv2d(x, w, pad=w_pad)
  if b is not None:
    x = x + b[None, :, None, None]
  return x


@pytest.mark.parametrize('filt,kernel,up,down,fused', [
    ((1, 3, 3, 1), 3, True, False, False),
    ((1, 3, 3, 1), 3, False, True, False),
    ((1, 3, 3, 1), 3, False, True, True),
    ((1, 3, 3, 1), 0, True, False, False),
    ((1, 3, 3, 1), 0, False, True, False),
    ((1, 1), 1, True, False, False),
    ((1, 1), 1, False, True, False),
    ((1, 1), 3, False, True, True),
])
def test_conv2d_resampling_matches_torch_semantics(filt, kernel, up, down, fused):
  r = np.random.default_rng(7)
  x = r.standard_normal((2, 8, 8, 3))
  conv = layers.Conv2d(5 if kernel else 3, kernel, up=up, down=down, resample_filter=filt,
                       fused_resample=fused)
  w_t = b = None
  params = {}
  if kernel:
    w_t = r.standard_normal((5, 3, kernel, kernel))
    b = r.standard_normal(5)
    params = {'kernel': jnp.asarray(w_t.transpose(2, 3, 1, 0), jnp.float32),
              'bias': jnp.asarray(b, jnp.float32)}
  out = conv.apply({'params': params}, jnp.asarray(x, jnp.float32))
  ref = _np_edm_conv(x.transpose(0, 3, 1, 2), w_t, b, up, down, filt, fused).transpose(0, 2, 3, 1)
  assert out.shape == ref.shape
  assert _rel(out, ref) < 1e-5


# ------------------------------------------------------------------------------------------------
# DhariwalUNet (tiny ADM, CTM s-path) and the openai-name port vs a NumPy UNetModel forward.

@pytest.fixture(scope='module')
def tiny_adm():
  net = adm.tiny_adm(use_s=True, label_dim=10)
  return net, _random_params(net, 2), jax.jit(net.apply)


def test_adm_shapes_and_s(tiny_adm):
  net, v, f = tiny_adm
  x, t, s, y = _inputs(0)
  t, s = 1000 * t, 1000 * s  # c_noise = 250 ln(sigma)
  out = f(v, x, t, s, y)
  assert out.shape == (B, 8, 8, 3) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
  scale = float(np.max(np.abs(out)))
  assert np.max(np.abs(f(v, x, t, t, y) - out)) > 1e-3 * scale
  p = v['params']
  assert p['map_label']['kernel'].shape == (10, 512)
  assert {'map_layer0_s', 'map_layer1_s'} <= set(p)
  assert all('affine_s' in p[k] for k in p if k.startswith(('enc_', 'dec_')) and 'affine' in p[k])
  with pytest.raises(ValueError, match='noise_labels_s'):
    net.apply(v, x, t, None, y)


def _openai_tiny_state_dict(rng, mc=128, nb=1, mult=(1, 1), attn_ds=(2,), head_ch=64,
                            classes=10, in_ch=3, out_ch=3):
  """Random tensors under openai UNetModel names (training_mode='ctm', scale-shift, updown)."""
  sd = {}
  emb = 4 * mc

  def lin(name, i, o):
    sd[f'{name}.weight'] = rng.standard_normal((o, i)) / np.sqrt(i)
    sd[f'{name}.bias'] = 0.1 * rng.standard_normal(o)

  def conv(name, i, o, k=3, dims=2):
    shape = (o, i, k, k) if dims == 2 else (o, i, 1)
    sd[f'{name}.weight'] = rng.standard_normal(shape) / np.sqrt(i * k * k)
    sd[f'{name}.bias'] = 0.1 * rng.standard_normal(o)

  def norm(name, c):
    sd[f'{name}.weight'] = 1 + 0.1 * rng.standard_normal(c)
    sd[f'{name}.bias'] = 0.1 * rng.standard_normal(c)

  def res(name, i, o):
    norm(f'{name}.in_layers.0', i)
    conv(f'{name}.in_layers.2', i, o)
    lin(f'{name}.emb_layers.1', emb, 2 * o)
    lin(f'{name}.emb_layers_s.1', emb, 2 * o)
    norm(f'{name}.out_layers.0', o)
    conv(f'{name}.out_layers.3', o, o)
    if i != o:
      conv(f'{name}.skip_connection', i, o, k=1)

  def attn(name, c):
    norm(f'{name}.norm', c)
    conv(f'{name}.qkv', c, 3 * c, k=1, dims=1)
    conv(f'{name}.proj_out', c, c, k=1, dims=1)

  lin('time_embed.0', mc, emb)
  lin('time_embed.2', emb, emb)
  lin('time_embed_s.0', mc, emb)
  lin('time_embed_s.2', emb, emb)
  sd['label_emb.weight'] = rng.standard_normal((classes, emb))
  ch = mult[0] * mc
  conv('input_blocks.0.0', in_ch, ch)
  chans, ds, k = [ch], 1, 1
  for level, m in enumerate(mult):
    for _ in range(nb):
      res(f'input_blocks.{k}.0', ch, m * mc)
      ch = m * mc
      if ds in attn_ds:
        attn(f'input_blocks.{k}.1', ch)
      chans.append(ch)
      k += 1
    if level != len(mult) - 1:
      res(f'input_blocks.{k}.0', ch, ch)
      chans.append(ch)
      ds *= 2
      k += 1
  res('middle_block.0', ch, ch)
  attn('middle_block.1', ch)
  res('middle_block.2', ch, ch)
  k = 0
  for level, m in list(enumerate(mult))[::-1]:
    for i in range(nb + 1):
      res(f'output_blocks.{k}.0', ch + chans.pop(), m * mc)
      ch = m * mc
      j = 1
      if ds in attn_ds:
        attn(f'output_blocks.{k}.1', ch)
        j = 2
      if level and i == nb:
        res(f'output_blocks.{k}.{j}', ch, ch)
        ds //= 2
      k += 1
  norm('out.0', ch)
  conv('out.2', ch, out_ch)
  return sd


def _np_openai_forward(sd, x, t, s, y, mc=128, nb=1, mult=(1, 1), attn_ds=(2,), head_ch=64):
  """NumPy float64 forward of the openai UNetModel (sony/ctm), NCHW."""
  silu = lambda a: a / (1 + np.exp(-a))

  def gn(a, name, groups=32, eps=1e-5):
    bsz, c, h, w = a.shape
    g = a.reshape(bsz, groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(a.shape) * sd[f'{name}.weight'][None, :, None, None] + \
        sd[f'{name}.bias'][None, :, None, None]

  def conv(a, name):
    w = sd[f'{name}.weight']
    if w.ndim == 3:
      w = w[..., None]
    k = w.shape[-1]
    p = k // 2
    ap = np.pad(a, ((0, 0), (0, 0), (p, p), (p, p)))
    h, wd = a.shape[2:]
    out = sum(np.einsum('oc,bchw->bohw', w[:, :, i, j], ap[:, :, i:i + h, j:j + wd])
              for i in range(k) for j in range(k))
    return out + sd[f'{name}.bias'][None, :, None, None]

  lin = lambda a, name: a @ sd[f'{name}.weight'].T + sd[f'{name}.bias']

  def temb(v):
    half = mc // 2
    freqs = np.exp(-np.log(10000) * np.arange(half) / half)
    args = v[:, None] * freqs[None]
    return np.concatenate([np.cos(args), np.sin(args)], axis=1)

  def res(a, name, emb, emb_s, up=False, down=False):
    h = silu(gn(a, f'{name}.in_layers.0'))
    if up:
      h, a = (z.repeat(2, 2).repeat(2, 3) for z in (h, a))
    if down:
      h, a = (z.reshape(z.shape[0], z.shape[1], z.shape[2] // 2, 2, z.shape[3] // 2, 2)
              .mean((3, 5)) for z in (h, a))
    h = conv(h, f'{name}.in_layers.2')
    e = lin(silu(emb), f'{name}.emb_layers.1') + lin(silu(emb_s), f'{name}.emb_layers_s.1')
    scale, shift = np.split(e[:, :, None, None], 2, axis=1)
    h = gn(h, f'{name}.out_layers.0') * (1 + scale) + shift
    h = conv(silu(h), f'{name}.out_layers.3')
    skip = conv(a, f'{name}.skip_connection') if f'{name}.skip_connection.weight' in sd else a
    return skip + h

  def attn(a, name):
    bsz, c, hh, ww = a.shape
    heads = c // head_ch
    qkv = conv(gn(a, f'{name}.norm'), f'{name}.qkv').reshape(bsz, 3, heads, head_ch, hh * ww)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    sc = 1 / np.sqrt(np.sqrt(head_ch))
    w = np.einsum('bhct,bhcs->bhts', q * sc, k * sc)
    w = np.exp(w - w.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum('bhts,bhcs->bhct', w, v).reshape(bsz, c, hh, ww)
    return a + conv(out, f'{name}.proj_out')

  emb = lin(silu(lin(temb(t), 'time_embed.0')), 'time_embed.2') + sd['label_emb.weight'][y]
  emb_s = lin(silu(lin(temb(s), 'time_embed_s.0')), 'time_embed_s.2')
  hs = []
  h = conv(x, 'input_blocks.0.0')
  hs.append(h)
  ds, k = 1, 1
  for level, m in enumerate(mult):
    for _ in range(nb):
      h = res(h, f'input_blocks.{k}.0', emb, emb_s)
      if ds in attn_ds:
        h = attn(h, f'input_blocks.{k}.1')
      hs.append(h)
      k += 1
    if level != len(mult) - 1:
      h = res(h, f'input_blocks.{k}.0', emb, emb_s, down=True)
      hs.append(h)
      ds *= 2
      k += 1
  h = res(h, 'middle_block.0', emb, emb_s)
  h = attn(h, 'middle_block.1')
  h = res(h, 'middle_block.2', emb, emb_s)
  k = 0
  for level, m in list(enumerate(mult))[::-1]:
    for i in range(nb + 1):
      h = res(np.concatenate([h, hs.pop()], axis=1), f'output_blocks.{k}.0', emb, emb_s)
      j = 1
      if ds in attn_ds:
        h = attn(h, f'output_blocks.{k}.1')
        j = 2
      if level and i == nb:
        h = res(h, f'output_blocks.{k}.{j}', emb, emb_s, up=True)
        ds //= 2
      k += 1
  return conv(silu(gn(h, 'out.0')), 'out.2')


def test_adm_openai_port_matches_numpy_unetmodel(tiny_adm):
  net, _, f = tiny_adm
  sd = _openai_tiny_state_dict(np.random.default_rng(5))
  sd = {('model.' if i % 2 else '') + k: v for i, (k, v) in enumerate(sd.items())}  # mixed prefix
  assert torch_port.detect_naming(sd) == 'openai'
  variables = {'params': torch_port.load_torch_state_dict(net, sd)}
  x, t, s, y = _inputs(4)
  t, s = 1000 * t, 1000 * s
  out = f(variables, x, t, s, y)
  plain = {k.removeprefix('model.'): v for k, v in sd.items()}
  ref = _np_openai_forward(plain, np.asarray(x, np.float64).transpose(0, 3, 1, 2),
                           np.asarray(t, np.float64), np.asarray(s, np.float64), np.asarray(y))
  assert _rel(out, ref.transpose(0, 2, 3, 1)) < 1e-4
  # The legacy (heads, three, d) qkv order is a different function of the same tensors.
  legacy = {'params': torch_port.load_torch_state_dict(net, sd, qkv_order='heads_three')}
  assert _rel(f(legacy, x, t, s, y), ref.transpose(0, 2, 3, 1)) > 1e-2


def test_port_reports_missing_and_unexpected(tiny_adm):
  net, _, _ = tiny_adm
  sd = _openai_tiny_state_dict(np.random.default_rng(6))
  sd.pop('time_embed_s.0.bias')
  sd['input_blocks.1.0.extra.weight'] = np.zeros(3)
  with pytest.raises(ValueError) as e:
    torch_port.load_torch_state_dict(net, sd)
  msg = str(e.value)
  assert 'map_layer0_s/bias' in msg and 'input_blocks.1.0.extra.weight' in msg


# ------------------------------------------------------------------------------------------------
# Parameter counts (jax.eval_shape: no initialisation runs).

def _torch_count_song(res=32, mc=128, mult=(2, 2, 2), nb=4, attn=(16,), label=0, aug=0,
                      cmn=1, s=False, enc='standard', dec='standard', cin=3, emb_mult=4):
  """Parameter count of EDM/CTM SongUNet, derived layer by layer from the torch constructor."""
  lin = lambda i, o, b=True: i * o + (o if b else 0)
  conv = lambda i, o, k: i * o * k * k + o
  emb, nc = mc * emb_mult, mc * cmn

  def block(ci, co, att):
    n = 2 * ci + conv(ci, co, 3) + lin(emb, co) * (2 if s else 1) + 2 * co + conv(co, co, 3)
    n += conv(ci, co, 1) if (ci != co or att == 'resample') else 0
    n += (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1)) if att is True else 0
    return n

  n = lin(nc, emb) + lin(emb, emb) + (lin(nc, emb) + lin(emb, emb) if s else 0)
  n += (lin(label, nc) if label else 0) + (lin(aug, nc, False) if aug else 0)
  n += nc // 2 if cmn == 2 else 0  # the NCSN++ Fourier freqs buffer, a parameter here
  skips, c, caux = [], cin, cin
  for lvl, m in enumerate(mult):
    r = res >> lvl
    if lvl == 0:
      n, c = n + conv(c, mc, 3), mc
    else:
      n += block(c, c, 'resample')
      n += conv(caux, c, 1) if enc == 'skip' else 0
      if enc == 'residual':
        n, caux = n + conv(caux, c, 3), c
    skips.append(c)
    for _ in range(nb):
      n, c = n + block(c, mc * m, r in attn), mc * m
      skips.append(c)
  for lvl, m in reversed(list(enumerate(mult))):
    r = res >> lvl
    n += block(c, c, True) + block(c, c, False) if lvl == len(mult) - 1 else block(c, c, 'resample')
    for i in range(nb + 1):
      ci = c + skips.pop()
      n, c = n + block(ci, mc * m, i == nb and r in attn), mc * m
    if dec == 'skip' or lvl == 0:
      n += 2 * c + conv(c, cin, 3)
  return n


def _torch_count_adm(res=64, mc=192, mult=(1, 2, 3, 4), nb=3, attn=(32, 16, 8), label=1000,
                     s=False, cin=3):
  """Parameter count of EDM DhariwalUNet / openai UNetModel (+ CTM s-layers), layer by layer."""
  lin = lambda i, o, b=True: i * o + (o if b else 0)
  conv = lambda i, o, k: i * o * k * k + o
  emb = 4 * mc

  def block(ci, co, att):
    n = 2 * ci + conv(ci, co, 3) + lin(emb, 2 * co) * (2 if s else 1) + 2 * co + conv(co, co, 3)
    n += conv(ci, co, 1) if ci != co else 0
    n += (2 * co + conv(co, 3 * co, 1) + conv(co, co, 1)) if att else 0
    return n

  n = (lin(mc, emb) + lin(emb, emb)) * (2 if s else 1) + (lin(label, emb, False) if label else 0)
  skips, c = [], cin
  for lvl, m in enumerate(mult):
    r = res >> lvl
    if lvl == 0:
      n, c = n + conv(c, mc * m, 3), mc * m
    else:
      n += block(c, c, False)
    skips.append(c)
    for _ in range(nb):
      n, c = n + block(c, mc * m, r in attn), mc * m
      skips.append(c)
  for lvl, m in reversed(list(enumerate(mult))):
    r = res >> lvl
    n += block(c, c, True) + block(c, c, False) if lvl == len(mult) - 1 else block(c, c, False)
    for _ in range(nb + 1):
      ci = c + skips.pop()
      n, c = n + block(ci, mc * m, r in attn), mc * m
  return n + 2 * c + conv(c, cin, 3)


def _count(net):
  return int(sum(np.prod(s) for s in torch_port.param_shapes(net).values()))


def test_torch_count_formulas_match_fixture_counts():
  tiny = dict(res=16, mc=16, mult=(1, 2, 2), nb=1, attn=(8,))
  for name, kw in (('edm_ddpmpp_tiny', dict(aug=9)), ('ctm_ddpmpp_tiny', dict(s=True))):
    with np.load(FIXTURES / f'{name}.npz') as z:
      meta = json.loads(str(z['meta']))
    assert _torch_count_song(**tiny, **kw) == meta['num_params']


def test_param_counts_cifar10_presets():
  # EDM DDPM++ CIFAR-10 teacher, the quoted 55.7M (augment_dim=9 -> map_augment 9x128).
  teacher = _count(unet.cifar10_ddpmpp(use_s=False))
  assert teacher == _torch_count_song(aug=9) == 55_733_891
  # s-path by hand: map_layer0_s + map_layer1_s + one affine_s (512 -> C_out, with bias) per block.
  net = unet.cifar10_ddpmpp(use_s=True)
  n_blocks = 3 * 4 + 2 + 4 + 3 * 5  # enc blocks, enc downs, in0/in1 + 2 ups, dec blocks (33)
  s_extra = (128 * 512 + 512) + (512 * 512 + 512) + n_blocks * (512 * 256 + 256)
  no_aug = teacher - 9 * 128
  assert _count(net) == no_aug + s_extra == _torch_count_song(s=True) == 60_395_267
  assert _count(unet.cifar10_ddpmpp(use_s=True, label_dim=10)) == 60_395_267 + 10 * 128 + 128
  assert _count(unet.cifar10_ncsnpp(use_s=False)) == _torch_count_song(aug=9, cmn=2,
                                                                       enc='residual')


def test_param_counts_imagenet64_adm():
  teacher = _count(adm.imagenet64_adm(use_s=False))
  assert teacher == _torch_count_adm() == 295_899_267  # EDM / CM ImageNet-64 ADM, ~296M
  student = _count(adm.imagenet64_adm(use_s=True))
  assert student == _torch_count_adm(s=True) == 324_100_611


def test_module_from_openai_flags():
  flags = dict(image_size=64, num_channels=192, num_res_blocks=3, channel_mult='',
               attention_resolutions='32,16,8', num_head_channels=64, num_heads=4,
               num_heads_upsample=-1, class_cond=True, learn_sigma=False, dropout=0.0,
               use_scale_shift_norm=True, resblock_updown=True, use_fp16=True,
               use_new_attention_order=False, training_mode='ctm', use_checkpoint=False)
  net = torch_port.module_from_torch_config(flags)
  assert net == adm.imagenet64_adm(use_s=True, dropout=0.0, out_channels=3)
  with pytest.raises(NotImplementedError):
    torch_port.module_from_torch_config(dict(flags, use_scale_shift_norm=False))


def test_module_from_edm_and_ctm_configs():
  # EDMPrecond kwargs of EDM's CIFAR-10 DDPM++ (train.py: --arch=ddpmpp, augment -> augment_dim 9).
  edm_cfg = dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False,
                 model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                 decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                 model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
  edm_net = torch_port.module_from_torch_config(edm_cfg)
  assert edm_net == unet.cifar10_ddpmpp(use_s=False)
  # ctm-cifar10 EDMPrecond_CTM: `arch` fixes the DDPM++ options, its SongUNet defaults apply.
  ctm_cfg = dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet',
                 arch='ddpmpp', training_mode='ctm', teacher=False, sigma_data=0.5)
  assert torch_port.module_from_torch_config(ctm_cfg) == unet.cifar10_ddpmpp(True, label_dim=10)
  with pytest.raises(ValueError, match='unknown'):
    torch_port.module_from_torch_config(dict(edm_cfg, bogus=1))
