"""Every program lowers for TPU and GPU (jax.export with platforms=('tpu', 'cuda')), from
abstract shapes only (no weights, nothing run): the training steps of the paper configs, the
evaluation's sampler functions, the Inception feature function and the NLL estimators.  A
host callback or a custom call that exists only on CPU (or is not one jax.export guarantees
stable) fails (ctm_jax.lowering.check_portable).

The default set lowers the CIFAR-10 CTM step (the largest program CI can afford, ~20 s) and
the evaluation's functions on a small network; the full sweep of every step kind of every
paper config is marked slow (docs/performance.md lists its times)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ctm_jax import evaluate, lowering, teacher as teacher_lib, train
from ctm_jax.evaljob import jobs, nll
from ctm_jax.nets import inception, lpips

BATCH = 2
PAPER_STEPS = [("cifar10_edm", "", "train"), ("cifar10_edm", "cond", "train"),
               ("cifar10_ctm", "", "ctm"), ("cifar10_ctm", "cond", "ctm"),
               ("cifar10_ctm", "gan", "ctm"), ("cifar10_ctm", "gan", "ctm_gan"),
               ("cifar10_ctm", "gan", "disc"), ("cifar10_ctm", "cond_gan", "ctm_gan"),
               ("cifar10_ctm", "cond_gan", "disc"),
               ("imagenet64_edm", "", "train"), ("imagenet64_ctm", "", "ctm"),
               ("imagenet64_ctm", "gan", "ctm_gan"), ("imagenet64_ctm", "gan", "disc"),
               ("cifar10_cd", "", "train"), ("cifar10_ict", "", "train")]


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("weights") / "lpips_random.npz")
  lpips.random_lpips_npz(path, seed=0)          # full VGG16 shapes; only shapes are read
  return path


@pytest.fixture
def zeros_teacher(monkeypatch):
  """Teacher 'weights' of the right shapes (zeros: free to allocate; only shapes are used)."""
  monkeypatch.setattr(teacher_lib.Teacher, "_load", lambda self: jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), self.param_shapes()))


def _config(name, arg, lpips_path):
  mod = importlib.import_module(f"configs.{name}")
  cfg = mod.get_config(arg) if arg else mod.get_config()
  cfg.unlock()
  for sec, field in (("ctm", "lpips_weights"), ("gan", "feature_weights"), ("cd", "lpips_weights")):
    if sec in cfg and field in cfg[sec]:
      cfg[sec][field] = lpips_path
  if "teacher" in cfg:
    cfg.teacher.npz_path = "teacher.npz"        # never read: zeros_teacher
  cfg.training.batch_size = BATCH
  if cfg.method == "ctm":
    cfg.ctm.adaptive_group_size = 1
  return cfg


def _one_device_mesh():
  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


def export_step(cfg, kind):
  """jax.export of the jitted training step `kind` (exactly the jit, shardings and donation
  training uses) for TPU and CUDA on abstract state, batch and frozen networks."""
  exp = train.Experiment(cfg, mesh=_one_device_mesh())
  frozen, fns = exp.abstract_step_functions()
  args = (exp.restore_target(), exp.abstract_batch(BATCH), frozen)
  return lowering.export_for(fns[kind], args, what=f"{cfg.method} step {kind!r}")


def _assert_exported(exported, counts):
  assert tuple(exported.platforms) == lowering.PLATFORMS
  text = exported.mlir_module()
  assert "stablehlo" in text and counts == lowering.check_portable(text)


# ----------------------------------------------------------------------------- the checker

def test_check_portable_refuses_host_callbacks_and_cpu_only_calls():
  """The checker on real lowerings: a jax.pure_callback and a CPU LAPACK solve (lowered for
  CPU, where jnp.linalg.cholesky is a lapack custom call) are refused; the same solve lowered
  for TPU / CUDA is not a CPU call."""
  x = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  cb = jax.jit(lambda a: jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct(a.shape, a.dtype), a))
  text = cb.lower(x).as_text()
  with pytest.raises(lowering.NotPortableError, match="host callback"):
    lowering.check_portable(text)
  chol = jax.jit(jnp.linalg.cholesky)
  cpu_text = jax.export.export(chol, platforms=("cpu",))(x).mlir_module()
  assert any(t.startswith("lapack_") for t in lowering.custom_call_targets(cpu_text))
  with pytest.raises(lowering.NotPortableError, match="only on XLA:CPU"):
    lowering.check_portable(cpu_text, ("cpu",))
  with pytest.raises(lowering.NotPortableError, match="not a stable"):
    lowering.check_portable('%0 = stablehlo.custom_call @my_kernel(%arg0)')
  assert lowering.check_portable('stablehlo.custom_call @Sharding(%a)') == {"Sharding": 1}


# ----------------------------------------------------------------------------- training steps

def test_cifar10_ctm_step_lowers_for_tpu_and_gpu(lpips_file, zeros_teacher):
  exported, counts = export_step(_config("cifar10_ctm", "", lpips_file), "ctm")
  _assert_exported(exported, counts)
  # The exported module holds the step's whole signature: state, batch, frozen in and out.
  assert len(exported.in_avals) > 100 and len(exported.out_avals) > 100


@pytest.mark.slow
@pytest.mark.parametrize("name,arg,kind", PAPER_STEPS)
def test_every_paper_step_lowers_for_tpu_and_gpu(name, arg, kind, lpips_file, zeros_teacher):
  exported, counts = export_step(_config(name, arg, lpips_file), kind)
  _assert_exported(exported, counts)


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope="module")
def small_job():
  """An evaluation job on the digits CTM network (8x8 images, the s input): the samplers' and
  NLL estimators' jitted functions are built by the evaluation's own code from it."""
  cfg = importlib.import_module("configs.digits_ctm").get_config()
  cfg.unlock()
  cfg.teacher.source = "random"
  cfg.eval.batch_size = BATCH
  model = train.build_model(cfg)
  from ctm_jax import data
  job = jobs.Job(workdir="", config=cfg, ev=cfg.eval, mode="sample", mesh=_one_device_mesh(),
                 info=data.dataset_info(cfg.data.dataset), model=model, invocation="test")
  params = jax.eval_shape(lambda k: model.init(k, train.example_input(cfg),
                                               train.example_labels(cfg)),
                          jax.random.PRNGKey(0))
  return job, params


@pytest.mark.parametrize("spec", ["onestep", "gamma:0.5:3", "cm:2", "heun:4"])
def test_samplers_lower_for_tpu_and_gpu(spec, small_job):
  job, params = small_job
  sampler = evaluate.sampler_fn(job.model, evaluate.parse_sampler(spec),
                                evaluate.generator_kind(job.config))
  fn = jobs.make_batch_sampler(job, sampler)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  exported, counts = lowering.export_for(fn, (params, key, None), what=f"sampler {spec}")
  _assert_exported(exported, counts)
  assert exported.out_avals[0].shape == (BATCH,) + tuple(job.info.shape)
  assert exported.out_avals[0].dtype == jnp.uint8


@pytest.mark.parametrize("kind", ["ode", "elbo"])
def test_nll_estimators_lower_for_tpu_and_gpu(kind, small_job):
  job, params = small_job
  fn = nll.estimator(job, kind)
  x = jax.ShapeDtypeStruct((BATCH,) + tuple(job.info.shape), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  exported, counts = lowering.export_for(fn, (params, x, key, None), what=f"NLL {kind}")
  _assert_exported(exported, counts)
  assert (BATCH,) in [a.shape for a in exported.out_avals]


def test_inception_features_lower_for_tpu_and_gpu():
  images = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.uint8)
  params = jax.eval_shape(lambda k, x: inception.InceptionV3().init(
      k, inception.preprocess(x))["params"], jax.random.PRNGKey(0), images)
  exported, counts = lowering.export_for(inception.forward, (params, images),
                                         what="Inception features")
  _assert_exported(exported, counts)
  assert exported.out_avals[0].shape == (BATCH, inception.FEATURE_DIM)
