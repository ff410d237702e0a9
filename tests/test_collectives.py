"""The collectives of a compiled training step on 8 fake devices match the sharding design
(docs/performance.md "Collectives"): a data-parallel step all-reduces one gradient (plus a few
scalars and the per-group adaptive-weight gradients at W, one layer's kernel per group) and
gathers nothing; under FSDP the step adds one all-gather of each split weight (the student,
its EMA target) and reduce-scatters the gradient (XLA:CPU writes that as all-reduces), and
nothing else: no all-to-all or permute of activations.

The model is the toy CTM MLP at widths where its large kernels are split under FSDP, with
adaptive lambda groups of 8 examples spanning 4 devices (2 examples per device)."""
import importlib

import jax
import pytest

from ctm_jax import lowering, parallel, train
from ctm_jax.methods import adaptive_groups

BATCH, GROUP = 16, 8


def _compiled_step(data, fsdp):
  cfg = importlib.import_module("configs.toy_ctm").get_config()
  cfg.unlock()
  cfg.model.hidden, cfg.model.num_blocks, cfg.model.emb_dim = 256, 2, 128
  cfg.training.batch_size, cfg.ctm.adaptive_group_size = BATCH, GROUP
  cfg.mesh.data, cfg.mesh.fsdp = data, fsdp
  exp = train.Experiment(cfg)
  assert exp.mesh.size == 8
  frozen, fns = exp.abstract_step_functions()
  state = exp.restore_target()
  compiled = fns["ctm"].lower(state, exp.abstract_batch(BATCH), frozen).compile()
  return exp, state, lowering.collectives(compiled.as_text())


def _split_bytes(exp, tree):
  """Bytes of the leaves the FSDP rule splits (what the step must gather whole)."""
  return sum(lowering.tree_bytes([a]) for a, s in zip(
      jax.tree_util.tree_leaves(tree),
      jax.tree_util.tree_leaves(parallel.tree_shardings(exp.mesh, tree)))
      if not s.is_fully_replicated)


def test_collectives_parse_hlo_text():
  """The parser on hand-written HLO lines: sync and async forms, tuples, dtypes."""
  hlo = "\n".join([
      "  %a = f32[256,128]{1,0} all-reduce(f32[256,128]{1,0} %x), replica_groups={}",
      "  %b = (f32[4]{0}, bf16[8,2]{1,0}) all-reduce(%p, %q), channel_id=2",
      "  %c = (f32[2,3]{1,0}, f32[16,3]{1,0}) all-gather-start(f32[2,3]{1,0} %y), dimensions={0}",
      "  %d = f32[16,3]{1,0} all-gather-done(%c)",
      "  %e = s32[16]{0} all-to-all(s32[16]{0} %z), dimensions={0}",
      "  %f = f32[7]{0} add(f32[7]{0} %u, f32[7]{0} %v)"])
  got = lowering.summarize(lowering.collectives(hlo))
  assert got == {"all-reduce": {"count": 2, "bytes": 256 * 128 * 4 + 4 * 4 + 16 * 2},
                 "all-gather": {"count": 1, "bytes": 16 * 3 * 4},
                 "all-to-all": {"count": 1, "bytes": 64}}


def test_data_parallel_step_all_reduces_one_gradient_and_gathers_nothing():
  exp, state, colls = _compiled_step(8, 1)
  grad = lowering.tree_bytes(state.params)
  assert set(colls) == {"all-reduce"}, lowering.summarize(colls)
  # One gradient, plus the per-group W-gradients (2 groups x 2 terms x one kernel) and scalars.
  w = exp.method.adaptive_path
  kernel = lowering.tree_bytes([adaptive_groups.find_param(state.params, w)])
  extra = colls["all-reduce"]["bytes"] - grad
  assert 0 <= extra <= 2 * (BATCH // GROUP) * kernel + 64, (extra, kernel)


@pytest.mark.slow
def test_fsdp_step_gathers_each_split_weight_once_and_reduces_one_gradient():
  exp, state, colls = _compiled_step(4, 2)
  assert set(colls) <= {"all-reduce", "all-gather", "reduce-scatter"}, lowering.summarize(colls)
  split = _split_bytes(exp, state.params) + _split_bytes(exp, state.extra)
  assert split > 0.8 * (lowering.tree_bytes(state.params) + lowering.tree_bytes(state.extra))
  assert colls["all-gather"]["bytes"] == split, (colls["all-gather"]["bytes"], split)
  # The gradient: reduce-scattered over fsdp and all-reduced over data (XLA:CPU: an all-reduce
  # of the whole gradient, then one of the fsdp shard) -> at most (1 + 1/fsdp) gradients.
  grad = lowering.tree_bytes(state.params)
  reduced = sum(colls.get(k, {"bytes": 0})["bytes"] for k in ("all-reduce", "reduce-scatter"))
  assert grad / 2 <= reduced <= 1.5 * grad + 2 * (BATCH // GROUP) * lowering.tree_bytes(
      [adaptive_groups.find_param(state.params, exp.method.adaptive_path)]) + 64, (reduced, grad)
