"""The paper-setting configs (CIFAR-10, ImageNet 64x64) are complete: they validate, build the
full networks and state under eval_shape, and (marked slow: minutes of compile on a CPU) run
real training steps at a tiny batch on one device."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ctm_jax import config_lib, data, parallel, teacher as teacher_lib, train
from ctm_jax.nets import lpips

CONFIGS = [("cifar10_edm", ""), ("cifar10_edm", "cond"), ("cifar10_ctm", ""),
           ("cifar10_ctm", "cond"), ("cifar10_ctm", "gan"), ("cifar10_ctm", "cond_gan"),
           ("imagenet64_edm", ""), ("imagenet64_ctm", ""), ("imagenet64_ctm", "gan"),
           ("cifar10_cd", ""), ("cifar10_ict", ""), ("cifar10_ct", ""), ("cifar10_meanflow", ""),
           ("cifar10_sct", ""), ("cifar10_scd", "")]

# Student / teacher parameter counts: layer-by-layer counts of the torch constructors
# (tests/test_nets.py derives them independently; EDM reports 56M for DDPM++ and ~296M for ADM).
PARAMS = {("cifar10_edm", ""): 55_733_891, ("cifar10_edm", "cond"): 55_735_299,
          ("cifar10_ctm", ""): 60_395_267, ("cifar10_ctm", "cond"): 60_396_675,
          ("cifar10_ctm", "gan"): 60_395_267, ("cifar10_ctm", "cond_gan"): 60_396_675,
          ("imagenet64_edm", ""): 295_899_267, ("imagenet64_ctm", ""): 324_100_611,
          ("imagenet64_ctm", "gan"): 324_100_611,
          # CD: the teacher's DDPM++; iCT: NCSN++ without augment labels
          # (tests/test_nets.py _torch_count_song(cmn=2, enc='residual')).
          ("cifar10_cd", ""): 55_733_891, ("cifar10_ict", ""): 56_395_651,
          # MeanFlow: CTM's DDPM++ with the s path (carrying t - r), no augment labels; sCT: the
          # DDPM++ without them; sCD: the teacher's DDPM++.
          ("cifar10_meanflow", ""): 60_395_267, ("cifar10_sct", ""): 55_733_891 - 9 * 128,
          ("cifar10_scd", ""): 55_733_891,
          ("cifar10_ct", ""): 56_395_651}          # CT: iCT's NCSN++ (the Fourier scale has no weights)


def load(name, arg):
  mod = importlib.import_module(f"configs.{name}")
  return mod.get_config(arg) if arg else mod.get_config()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("weights")
  path = str(d / "lpips_random.npz")
  lpips.random_lpips_npz(path, seed=0)          # full VGG16 widths, random values
  return path


def _fill_paths(cfg, lpips_path):
  cfg.unlock()
  if cfg.method == "ctm":
    cfg.ctm.lpips_weights = lpips_path
    cfg.gan.feature_weights = lpips_path
    cfg.teacher.npz_path = cfg.teacher.path = "teacher.file"
  if cfg.method in ("cd", "ct"):
    cfg[cfg.method].lpips_weights = lpips_path
  if cfg.method == "cd":
    cfg.teacher.npz_path = cfg.teacher.path = "teacher.file"
  if cfg.method == "scd":
    cfg.teacher.npz_path = cfg.teacher.path = "teacher.file"
  return cfg


@pytest.fixture
def zeros_teacher(monkeypatch):
  """For the shape checks, which read only shapes: zeros cost nothing to allocate (the torch
  loader itself is tested on the fixtures)."""
  monkeypatch.setattr(teacher_lib.Teacher, "_load", lambda self: jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), self.param_shapes()))


@pytest.fixture
def random_teacher(monkeypatch):
  """Teacher weights of the right shapes, N(0, 0.02^2) (source 'random')."""
  monkeypatch.setattr(teacher_lib.Teacher, "_load", lambda self: self.random_params(0))


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_paper_config_validates_and_shape_checks(name, arg, weight_files, zeros_teacher):
  cfg = _fill_paths(load(name, arg), weight_files)
  train.validate_config(cfg, num_devices=8, process_count=1)
  exp = train.Experiment(cfg)                   # eval_shape of the whole TrainState
  st = exp.abstract_state
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(st.params))
  assert n == PARAMS[(name, arg)]
  assert sorted(st.ema) == sorted(
      [f"rate_{repr(float(r)).replace('.', 'p')}" for r in cfg.ema.rates] +
      (["halflife"] if cfg.ema.halflife_kimg > 0 else []))
  if cfg.method == "ctm":
    assert jax.tree_util.tree_structure(st.extra["target"]) == jax.tree_util.tree_structure(st.params)
    assert ("disc" in st.extra) == bool(cfg.gan.enabled)
  if cfg.method in ("cd", "ict"):
    assert st.extra == {}                       # mu = 0 (CD, official) / no EMA target (iCT)
  if cfg.method == "ct":                        # the EMA target theta^- (mu0 = 0.9)
    assert jax.tree_util.tree_structure(st.extra["target"]) == jax.tree_util.tree_structure(st.params)
  info = data.dataset_info(cfg.data.dataset)
  x = jax.ShapeDtypeStruct((2,) + info.shape, jnp.float32)
  out = jax.eval_shape(lambda p, x: exp.model.denoiser(p, x, jnp.ones((2,)), None,
                                                      jnp.zeros((2,), jnp.int32)
                                                      if cfg.data.class_conditional else None),
                       st.params, x)
  assert out.shape == x.shape


def test_paper_settings_values():
  """Spot checks against PAPER_SETTINGS.md / the reference commands."""
  c = load("cifar10_ctm", "")
  assert (c.ctm.num_points, c.ctm.max_k, c.ctm.distance, c.optim.name, c.optim.lr) == (18, 17, "lpips", "radam", 4e-4)
  assert tuple(c.ema.rates) == (0.999, 0.9999) and c.ctm.target_ema == 0.999 and c.model.dropout == 0.13
  g = load("cifar10_ctm", "gan")
  assert g.gan.enabled and (g.gan.lr, g.gan.b1, g.gan.b2, g.gan.g_every) == (2e-3, 0.5, 0.9, 2)
  assert (g.gan.weight_min, g.gan.weight_max) == (0.01, 10.0) and g.training.batch_size == 528
  i = load("imagenet64_ctm", "")
  assert (i.ctm.num_points, i.ctm.max_k, i.model.arch, i.model.model_channels) == (40, 39, "adm", 192)
  assert i.diffusion.c_noise == "250log" and i.data.class_conditional and i.training.batch_size == 1440
  e = load("cifar10_edm", "")
  assert (e.training.batch_size, e.optim.lr, e.ema.halflife_kimg, e.model.dropout) == (512, 1e-3, 500.0, 0.13)
  d = load("cifar10_cd", "")       # openai/consistency_models_cifar10 configs/cifar10_ve_cd.py
  assert (d.cd.num_points, d.cd.distance, d.cd.teacher_solver, d.cd.weighting, d.cd.target_ema) == (
      18, "lpips", "heun", "uniform", 0.0)
  assert (d.optim.name, d.optim.lr, d.optim.warmup_steps, d.training.batch_size) == (
      "radam", 4e-4, 0, 512)
  assert d.training.num_train_steps == 800_000 and d.ema.rates == (0.9999,) and d.model.dropout == 0
  assert d.cd.lpips_pooling == "max"        # jcm/models/lpips.py: flaxmodels VGG16, max pools
  t = load("cifar10_ct", "")       # openai/consistency_models_cifar10 configs/cifar10_ve_ct_adaptive.py
  assert (t.ct.s0, t.ct.s1, t.ct.mu0, t.ct.mu_form, t.ct.distance, t.ct.lpips_pooling) == (
      2, 150, 0.9, "code", "lpips", "max")
  assert (t.optim.name, t.optim.lr, t.optim.warmup_steps, t.optim.grad_clip, t.training.batch_size) == (
      "radam", 2e-4, 0, 0.0, 512)
  assert t.training.num_train_steps == 800_000 and t.ema.rates == (0.9999,) and t.model.dropout == 0
  assert (t.model.embedding_type, t.model.fourier_scale, t.data.random_flip) == ("fourier", 16.0, True)
  assert "teacher" not in t and t.ct.curriculum_steps == 0
  i = load("cifar10_ict", "")      # Song & Dhariwal 2023
  assert (i.ict.s0, i.ict.s1, i.ict.p_mean, i.ict.p_std, i.ict.distance, i.ict.weighting) == (
      10, 1280, -1.1, 2.0, "pseudo_huber", "ict")
  assert (i.model.dropout, i.model.fourier_scale, i.training.batch_size, i.optim.lr) == (
      0.3, 0.02, 1024, 1e-4)
  assert i.training.num_train_steps == 400_000 and "teacher" not in i
  # Data flips: the CTM loaders flip (load_data(random_flip=True)); EDM's CIFAR-10 runs flip only
  # inside the augment pipe (--xflip False, AugmentPipe xflip=1e8 at p = 0.12), ImageNet not at all.
  # Adaptive weights per reference microbatch (--microbatch 16 / 11 / 18 / 11); D unconditional.
  ctm_runs = {("cifar10_ctm", ""): 16, ("cifar10_ctm", "cond"): 16, ("cifar10_ctm", "gan"): 11,
              ("cifar10_ctm", "cond_gan"): 11, ("imagenet64_ctm", ""): 18, ("imagenet64_ctm", "gan"): 11}
  for (name, arg), group in ctm_runs.items():
    r = load(name, arg)
    assert r.data.random_flip is True and r.ctm.adaptive_group_size == group, (name, arg)
    assert r.gan.conditional is False and r.teacher.config.data.random_flip is False
  for arg in ("", "cond"):
    e = load("cifar10_edm", arg)
    assert e.data.random_flip is False and (e.edm.augment.p, e.edm.augment.xflip) == (0.12, 1e8)
  e = load("imagenet64_edm", "")
  assert e.data.random_flip is False and e.edm.augment.p == 0.0
  m = load("cifar10_meanflow", "")  # Gsunshine/py-meanflow's CIFAR-10 script
  assert (m.meanflow.p_mean_t, m.meanflow.p_std_t, m.meanflow.p_mean_r, m.meanflow.p_std_r) == (
      -0.6, 1.6, -4.0, 1.6)
  assert (m.meanflow.ratio, m.meanflow.norm_p, m.model.dropout, m.optim.lr) == (0.75, 0.75, 0.2, 6e-4)
  for name, pm, ps in (("cifar10_sct", -1.0, 1.4), ("cifar10_scd", -0.8, 1.6)):   # Lu & Song 2024
    s = load(name, "")
    b = s[s.method]
    assert (b.p_mean, b.p_std, b.tangent_c, b.warmup_steps) == (pm, ps, 0.1, 10_000)
    assert b.adaptive_weighting and b.init_from_teacher == (name == "cifar10_scd")
    assert b.time_input == ("c_noise" if name == "cifar10_scd" else "trigflow")
    np.testing.assert_allclose(np.arctan(b.sample_times[0] / s.diffusion.sigma_data), 1.1, rtol=1e-6)


@pytest.mark.parametrize("name,arg", [("cifar10_ctm", "cond_gan"), ("imagenet64_ctm", "gan")])
def test_discriminator_is_unconditional_unless_asked(name, arg, weight_files):
  """The reference's D is MultiScaleD(cond=0) in the class-conditional runs too: no label heads
  by default; gan.conditional=True adds them (and needs labelled data)."""
  from ctm_jax.methods import ctm_gan
  cfg = _fill_paths(load(name, arg), weight_files)
  assert cfg.data.class_conditional and cfg.gan.enabled and cfg.gan.conditional is False
  info = data.dataset_info(cfg.data.dataset)
  for conditional in (False, True):
    cfg.gan.conditional = conditional
    gan = ctm_gan.GAN(cfg, info.shape, info.num_classes)
    frozen = gan.frozen()
    shapes = jax.eval_shape(lambda k: gan.init(k, frozen), jax.random.PRNGKey(0))
    names = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes["disc"])[0]]
    heads = [n for n in names if "embed" in n]
    assert bool(heads) == conditional, heads
    assert gan.num_classes == (info.num_classes if conditional else 0)
  train.validate_config(cfg, num_devices=8, process_count=1)          # conditional on labels: ok
  cfg.data.class_conditional = False
  with pytest.raises(config_lib.ConfigError, match=r"gan\.conditional"):
    train.validate_config(cfg, num_devices=8, process_count=1)


def _one_device_steps(cfg, batch_size=2):
  cfg.training.batch_size = batch_size
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  exp = train.Experiment(cfg, mesh=mesh)
  state = exp.init_state()
  frozen, fns = exp.step_functions()
  info = exp.info
  rng = np.random.default_rng(0)
  local = {"x": rng.uniform(-1, 1, (batch_size,) + info.shape).astype(np.float32)}
  if cfg.data.class_conditional:
    local["label"] = rng.integers(0, info.num_classes, batch_size).astype(np.int32)
  batch = parallel.global_batch(local, mesh)
  out = {}
  for step in range(len(exp.method.step_kinds)):
    kind = exp.method.step_kind(step) if cfg.method != "ctm" or not cfg.gan.enabled else \
        exp.method.step_kinds[step]
    state, met = fns[kind](state, batch, frozen)
    out[kind] = {k: float(v) for k, v in jax.device_get(met).items()}
  for kind, met in out.items():
    assert all(np.isfinite(v) for v in met.values()), (kind, met)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", [("cifar10_edm", ""), ("cifar10_ctm", ""), ("cifar10_ctm", "gan"),
                                      ("imagenet64_edm", ""), ("imagenet64_ctm", ""),
                                      ("cifar10_cd", ""), ("cifar10_ict", ""), ("cifar10_ct", ""),
                                      ("cifar10_meanflow", ""), ("cifar10_sct", ""),
                                      ("cifar10_scd", "")])
def test_paper_config_trains_a_step_at_tiny_batch(name, arg, weight_files, random_teacher):
  cfg = _fill_paths(load(name, arg), weight_files)
  if cfg.method == "ctm":
    cfg.ema.rates = cfg.ema.rates[:1]          # memory: one evaluation EMA is enough here
    cfg.ctm.adaptive_group_size = 1            # per-example lambdas: the tiny batch in groups
  print(name, arg, _one_device_steps(cfg, batch_size=1 if name.startswith("imagenet") else 2))


@pytest.mark.parametrize("name,lr", [("cifar10_cd", 4e-4), ("cifar10_ct", 2e-4)])
def test_cm_paper_optimizer_is_the_reference_radam_path(name, lr):
  """jcm/losses.py get_optimizer, RAdam: optax.chain(scale_by_radam(b1, b2, eps), scale(-lr)),
  no warm-up: the same updates from the first step on."""
  import optax
  from ctm_jax import train_state
  cfg = load(name, "")
  ours = train_state.make_optimizer(cfg.optim)
  ref = optax.chain(optax.scale_by_radam(b1=0.9, b2=0.999, eps=1e-8), optax.scale(-lr))
  p = {"w": jnp.arange(6.0).reshape(2, 3)}
  s_o, s_r = ours.init(p), ref.init(p)
  for k in range(8):
    g = {"w": jnp.sin(p["w"] * (k + 1.0))}
    u_o, s_o = ours.update(g, s_o, p)
    u_r, s_r = ref.update(g, s_r, p)
    np.testing.assert_allclose(u_o["w"], u_r["w"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["mnist_edm", "mnist_ctm"])
def test_mnist_configs_validate_and_build_without_the_data(name, random_teacher):
  """The MNIST pair validates and builds its state under eval_shape from the static data set
  description alone (no MNIST files are read), with the parameter count derived layer by layer
  from the torch SongUNet constructor (tests/test_nets.py), and its eval block validates for
  on 8 devices."""
  from test_nets import _torch_count_song
  from configs import base
  from ctm_jax.evaljob import settings
  cfg = load(name, "")
  train.validate_config(cfg, num_devices=8, process_count=1)
  exp = train.Experiment(cfg)
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(exp.abstract_state.params))
  assert n == _torch_count_song(res=28, mc=32, mult=(1, 2, 2), nb=2, attn=(7,), cin=1,
                                s=cfg.method == "ctm")
  assert data.dataset_info(cfg.data.dataset).shape == (28, 28, 1)
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  out = jax.eval_shape(lambda p, x: exp.model.denoiser(p, x, jnp.ones((2,)), None, None),
                       exp.abstract_state.params, x)
  assert out.shape == x.shape
  ev = settings.merge_eval(base.eval_block(), cfg, {})
  assert ev.num_samples >= 10000          # the minimum for the MNIST FID
  for mode in ("sample", "nll"):        # fid / fid_stats also need the Inception weights file
    settings.validate(ev, cfg, mode=mode, num_devices=8, process_count=1)


@pytest.mark.parametrize("name,arg", [("cifar10_ctm", "cond"), ("imagenet64_ctm", "")])
def test_class_conditional_torch_teacher_must_state_its_label_order(name, arg):
  """Official class-conditional weights know classes by index: a torch_npz teacher whose
  class order is not stated is refused (it would condition on another class's label)."""
  cfg = load(name, arg)
  assert cfg.teacher.label_order == "standard" and cfg.teacher.config.data.class_conditional
  cfg.unlock()
  cfg.teacher.npz_path = cfg.teacher.path = "teacher.file"
  teacher_lib.validate_teacher_config(cfg)
  cfg.teacher.label_order = ""
  with pytest.raises(config_lib.ConfigError, match=r"config\.teacher\.label_order = ''"):
    teacher_lib.validate_teacher_config(cfg)
  cfg.teacher.config.data.class_conditional = False          # unconditional: no labels, no order
  teacher_lib.validate_teacher_config(cfg)
