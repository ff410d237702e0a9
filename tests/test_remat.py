"""Rematerialization of the U-Net blocks (config.model.remat, nets/layers.unet_block_class):
the same parameters, the same loss and gradients as plain autodiff (dropout on), less XLA
temporary memory, and the setting checked at start-up and carried through launch.bench."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_edm
from ctm_jax import config_lib, train
from ctm_jax.nets import REMAT_MODES, adm, unet
from launch_utils import ROOT, set_fields, subprocess_env

NETS = {"songunet": lambda **kw: unet.tiny(use_s=True, **kw),
        "adm": lambda **kw: adm.tiny_adm(use_s=True, **kw)}

# CI runs the ADM case of each check (the same call_block wrapper); the DDPM++ case of each,
# 30-70 s apiece on a 2-core machine, is marked slow.
ARCHS = [pytest.param("songunet", marks=pytest.mark.slow), "adm"]


def _inputs(b=4, res=8):
  x = jax.random.normal(jax.random.PRNGKey(0), (b, res, res, 3))
  t = jnp.linspace(-1.0, 1.0, b)
  return x, t, t - 0.5


def _perturbed_params(net, x, t, s):
  """The net's init, every leaf moved by N(0, 0.05^2): the zero-initialised output layers
  then pass a signal, so the gradients of every block are non-zero."""
  p = net.init({"params": jax.random.PRNGKey(1)}, x, t, s)["params"]
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


@pytest.mark.parametrize("arch", ARCHS)
def test_param_tree_is_the_same_with_and_without_remat(arch):
  x, t, s = _inputs()
  trees = {m: NETS[arch](remat=m).init({"params": jax.random.PRNGKey(1)}, x, t, s)
           for m in REMAT_MODES}
  ref = trees["none"]
  for m, tree in trees.items():
    assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(ref), m
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == [jax.tree_util.keystr(k)
                     for k, _ in jax.tree_util.tree_leaves_with_path(ref)], m
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_array_equal(a, b)
  assert any("enc_8x8_block0" in p and "conv0" in p for p in paths)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_plain_autodiff_with_dropout(arch):
  x, t, s = _inputs()
  p = _perturbed_params(NETS[arch](), x, t, s)
  out = {}
  for m in REMAT_MODES:
    net = NETS[arch](remat=m, dropout=0.3)

    def loss(p, key, train=True):
      f = net.apply({"params": p}, x, t, s, train=train, rngs={"dropout": key})
      return jnp.mean((f - x) ** 2)
    out[m] = jax.jit(jax.value_and_grad(loss))(p, jax.random.PRNGKey(3))
    if m == "blocks":
      # Dropout is on and the key matters: eval mode and another key give other losses.
      assert abs(float(loss(p, jax.random.PRNGKey(3), False)) - float(out[m][0])) > 1e-4
      assert abs(float(loss(p, jax.random.PRNGKey(4))) - float(out[m][0])) > 1e-4
  l0, g0 = out["none"]
  gmax = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
  assert gmax > 1e-3
  for m in REMAT_MODES[1:]:
    l, g = out[m]
    np.testing.assert_allclose(float(l), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * gmax)


@pytest.mark.parametrize("arch", ARCHS)
def test_remat_lowers_xla_temporary_memory_of_forward_backward(arch):
  """XLA's buffer assignment of the compiled gradient (no timing): keeping only the blocks'
  inputs needs fewer temporary bytes than keeping every activation, on XLA:CPU too."""
  x, t, s = _inputs(b=16)
  temp = {}
  for m in ("none", "blocks"):
    net = NETS[arch](remat=m, dropout=0.1)
    p = jax.eval_shape(lambda: net.init({"params": jax.random.PRNGKey(1)}, x, t, s))["params"]

    def loss(p, key):
      return jnp.mean(net.apply({"params": p}, x, t, s, train=True, rngs={"dropout": key}) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(p, jax.random.PRNGKey(0)).compile()
    temp[m] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["blocks"] < 0.8 * temp["none"], temp


def test_bad_remat_is_refused_at_start_up():
  c = set_fields(digits_edm.get_config(), {"model.remat": "layers"})
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.remat must be one of "
                     r"\('none', 'blocks', 'blocks_save_dots'\), got 'layers'"):
    train.validate_config(c, num_devices=8, process_count=1)
  with pytest.raises(ValueError, match="remat must be one of"):
    NETS["songunet"](remat="all").init({"params": jax.random.PRNGKey(1)}, *_inputs())


@pytest.mark.slow      # two compiles of the digits step: 111 s on the loaded 2-core machine
def test_launch_bench_carries_remat_into_the_step_and_json(tmp_path):
  out = tmp_path / "b.json"
  args = [sys.executable, "-m", "launch.bench", "--config=configs/digits_edm.py", "--batch=8",
          "--compile_only", f"--out={out}"]
  runs = {}
  for m in ("none", "blocks"):
    proc = subprocess.run(args + [f"--config.model.remat={m}"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[m] = json.loads(out.read_text())["variants"]["float32"]
    assert runs[m]["remat"] == m
    assert "network remat" in proc.stdout
  # The flag reaches the compiled step: rematerialization recomputes the blocks' forward in
  # the backward pass, so XLA counts more FLOPs for the same step.
  assert runs["blocks"]["step_flops_xla"] > runs["none"]["step_flops_xla"]
  bad = subprocess.run(args + ["--config.model.remat=all"], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "config.model.remat must be one of" in bad.stderr, \
      bad.stderr[-2000:]
