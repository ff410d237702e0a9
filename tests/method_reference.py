"""Direct computations of the CTM training quantities, written out in the tests' own words.

They share with the code under test only the pieces tested on their own elsewhere: the network
with its preconditioning (FlowModel.jump: tests/test_flow_map_and_samplers.py, the parity
fixtures), the time samplers (tests/test_diffusion.py) and DiffAugment (tests/test_diffaug.py).
Everything else (which parameters go where, which dropout key feeds which evaluation, the Heun
steps of the teacher, the adaptive weights, the GAN generator loss) is restated from the paper
and the reference code (Kim-Dongjun/ctm-cifar10 cm/karras_diffusion.py get_CTM_loss,
calculate_adaptive_weight, get_GAN_loss).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import diffusion


def bcast(v, x):
  """(B,) -> (B, 1, ..., 1) against x."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


class Probe(nn.Module):
  """A stand-in network F = w x + a c_noise(t) + b c_noise(s) with one parameter w = 0 at init.

  With a = b = 0 it is the F = 0 stub (D = c_skip x); b != 0 shows which s the caller passed.
  """
  a: float = 0.0
  b: float = 0.0
  use_s: bool = False

  @nn.compact
  def __call__(self, x, cn_t, cn_s=None, class_labels=None, augment_labels=None, train=False):
    w = self.param("w", nn.initializers.zeros, ())
    f = self.a * cn_t + (self.b * cn_s if cn_s is not None else 0.0)
    return w * x + bcast(f, x)


def karras_grid(n, smin, smax, rho):
  """EDM eq. 5 in float64: (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
  g = (smax ** (1 / rho) + np.arange(n) / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
  g[0], g[-1] = smax, smin
  return g


def heun_step(denoise, x, t0, t1):
  """One Heun step (EDM Alg. 1 without churn) of dx/dt = (x - D(x, t)) / t from t0 to t1 > 0
  (per-example times of shape (B,))."""
  a, b = bcast(t0, x), bcast(t1, x)
  d0 = (x - denoise(x, t0)) / a
  x_e = x + (b - a) * d0
  d1 = (x_e - denoise(x_e, t1)) / b
  return x + (b - a) * 0.5 * (d0 + d1)


def grad_norm_at(grads, path):
  node = grads
  for p in path.split("/"):
    node = node[p]
  return float(np.linalg.norm(np.asarray(node, np.float64).ravel()))


def draw_k(method, k_times) -> int:
  """The step's number of teacher steps k (P(k) proportional to k), as a Python int."""
  return int(diffusion.sample_k_proportional(k_times, method.config.ctm.max_k))


def ctm_points(method, frozen, batch, rng, k: int):
  """The step's random points, written out (reference get_CTM_loss; k from draw_k):
    keys = split(rng, 8); (i, j) from keys[7]; t = t_i, u = t_{i+k}, s = t_j on the Karras grid
    x_t = x0 + t z (z from keys[0]);  x_u = Heun_teacher^k(x_t, t -> u), every step a full
    Heun step (the grid ends at sigma_min > 0).
  Eager; the teacher's Heun step is jitted once and applied k times."""
  c, sch = method.config.ctm, method.model.schedule
  x0, labels = batch["x"], method.labels(batch)
  keys = jax.random.split(rng, 8)
  i, j = diffusion.sample_ctm_indices(keys[7], x0.shape[0], c.num_points, k)
  grid = jnp.asarray(karras_grid(c.num_points, sch.sigma_min, sch.sigma_max, sch.rho), jnp.float32)
  x_t = x0 + bcast(grid[i], x0) * jax.random.normal(keys[0], x0.shape, x0.dtype)
  step = jax.jit(lambda tp, x, t0, t1, y: heun_step(
      lambda xx, tt: method.teacher.denoise(tp, xx, tt, y), x, t0, t1))
  x_u = x_t
  for m in range(k):
    x_u = step(frozen["teacher"], x_u, grid[i + m], grid[i + m + 1], labels)
  pts = {"keys": keys, "t": grid[i], "u": grid[i + k], "s": grid[j], "x_t": x_t, "x_u": x_u}
  if c.dsm_weight_mode != "off":         # L_DSM's point: (x_dsm, sigma) from keys[5]
    pts["x_dsm"], pts["sigma"], _ = method.dsm_inputs(x0, keys[5])
  return pts


def student_evals(method, p, pts, labels):
  """The step's evaluations of the student with gradient, written out: (G_theta(x_t, t, s),
  g_theta(x_dsm, sigma, sigma) or None).  With L_DSM on, both come from ONE train-mode call of
  the network on 2B examples, x_t[0], x_dsm[0], x_t[1], x_dsm[1], ... at times (t_i, s_i) and
  (sigma_i, sigma_i), its dropout masks drawn from keys[3] (ctm.py student_pass); without it,
  G_theta(x_t, t, s) alone on keys[3]."""
  model, keys = method.model, pts["keys"]
  x_t, t, s = pts["x_t"], pts["t"], pts["s"]
  if "x_dsm" not in pts:
    return model.jump(p, x_t, t, s, labels, train=True, rng=keys[3]), None
  b = x_t.shape[0]
  even, odd = np.arange(0, 2 * b, 2), np.arange(1, 2 * b, 2)

  def interleave(a, z):
    out = jnp.zeros((2 * b,) + a.shape[1:], a.dtype)
    return out.at[even].set(a).at[odd].set(z)
  lab = None if labels is None else interleave(labels, labels)
  g = model.denoiser(p, interleave(x_t, pts["x_dsm"]), interleave(t, pts["sigma"]),
                     interleave(s, pts["sigma"]), lab, train=True, rng=keys[3])
  r = bcast(s / t, x_t)
  return r * x_t + (1 - r) * g[even], g[odd]          # G = (s/t) x + (1 - s/t) g, s < t here


def dsm_direct(method, pts, labels, x0):
  """L_DSM(theta) = mean_i lambda(sigma_i) mean |g_theta(x_dsm,i, sigma_i, sigma_i) - x0_i|^2
  with EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, g from student_evals."""
  sd = method.model.schedule.sigma_data
  sig = pts["sigma"]
  lam = (sig ** 2 + sd ** 2) / (sig * sd) ** 2

  def l_dsm(p):
    g = student_evals(method, p, pts, labels)[1]
    return jnp.mean(lam * jnp.mean(((g - x0) ** 2).reshape(x0.shape[0], -1), axis=1))
  return l_dsm


def ctm_direct(method, params, target, pts, labels, distance):
  """The CTM loss on the points of ctm_points (jit-able):
    target = sg(G_{theta^-}(G_{sg theta}(x_u, u, s; keys[1]), s, sigma_min; keys[2]))
    est    = G_{theta^-}(G_theta(x_t, t, s; keys[3]), s, sigma_min; keys[4])
  (G_theta(x_t, t, s) from student_evals) with the inner map of the estimate in train mode and
  the other three evaluations in train mode iff ctm.target_train_mode (the reference evaluates
  its target model with dropout on).
  Returns (l_ctm(p), est(p), target) with l_ctm(p) = mean d(est(p), target)."""
  model = method.model
  keys, t, u, s = pts["keys"], pts["t"], pts["u"], pts["s"]
  smin = jnp.full_like(s, model.schedule.sigma_min)
  mode = bool(method.config.ctm.target_train_mode)
  inner_u = model.jump(params, pts["x_u"], u, s, labels, train=mode, rng=keys[1])
  tgt = jax.lax.stop_gradient(model.jump(target, inner_u, s, smin, labels, train=mode, rng=keys[2]))

  def est(p):
    inner = student_evals(method, p, pts, labels)[0]
    return model.jump(target, inner, s, smin, labels, train=mode, rng=keys[4])

  return (lambda p: jnp.mean(distance(est(p), tgt))), est, tgt


def adaptive(g_main, g_other, path, max_value):
  """Reference calculate_adaptive_weight: |grad_W L_main| / (|grad_W L_other| + 1e-4), clamped."""
  return min(grad_norm_at(g_main, path) / (grad_norm_at(g_other, path) + 1e-4), max_value)


def tree_close(a, b, rtol, atol):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def perturbed(params, seed, scale=0.05):
  """params + scale * N(0, 1) per leaf (a target network different from theta)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [np.asarray(v) + scale * rng.standard_normal(np.shape(v)).astype(np.float32)
             for v in leaves])


def check_generator_step(method, params, extra, frozen, batch, rng, k_times, distance):
  """generator_grads(with_gan=False) against ctm_direct + dsm_direct: L_CTM, L_DSM, k,
  lambda_DSM = min(||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4), ctm.adaptive_max) and the
  summed gradient. Returns (metrics, grad L_CTM, grad L_DSM)."""
  cfg = method.config
  labels = method.labels(batch)
  run = jax.jit(lambda p, e, b, r, kt: method.generator_grads(p, e, frozen, b, r, kt,
                                                               with_gan=False)[:2])
  grads, met = jax.device_get(run(params, extra, batch, rng, k_times))
  k = draw_k(method, k_times)
  pts = ctm_points(method, frozen, batch, rng, k)

  @jax.jit
  def direct(p, tp, b, pts):
    l_ctm, _, _ = ctm_direct(method, p, tp, pts, labels, distance)
    l_dsm = dsm_direct(method, pts, labels, b["x"])
    return jax.value_and_grad(l_ctm)(p), jax.value_and_grad(l_dsm)(p)
  (lc, gc), (ld, gd) = jax.device_get(direct(params, extra["target"], batch, pts))
  assert int(met["k"]) == k
  np.testing.assert_allclose(met["loss_ctm"], lc, rtol=1e-5)
  np.testing.assert_allclose(met["loss_dsm"], ld, rtol=1e-5)
  lam = adaptive(gc, gd, method.adaptive_path, cfg.ctm.adaptive_max)
  np.testing.assert_allclose(met["lambda_dsm"], lam, rtol=1e-4)
  tree_close(grads, jax.tree_util.tree_map(lambda a, b: a + lam * b, gc, gd), rtol=2e-4,
             atol=1e-7)
  return met, gc, gd


def gan_generator_direct(method, params, extra, frozen, batch, pts, distance):
  """The generator step with the GAN term on the points of ctm_points, written out (jit-able):
  L_CTM as ctm_direct, L_DSM as dsm_direct,
  L_G(theta) = mean over D's heads of -mean D(DiffAugment(keys[6], est(theta)), y), D in train
  mode with its statistics advanced (flax apply on D's variables, not the library wrapper).
  Returns ((L_CTM, grad), (L_DSM, grad), (L_G, grad), D's updated batch_stats)."""
  from ctm_jax import diffaug
  g = method.config.gan
  labels = method.labels(batch)
  keys = pts["keys"]
  l_ctm, est, _ = ctm_direct(method, params, extra["target"], pts, labels, distance)
  l_dsm = dsm_direct(method, pts, labels, batch["x"])
  gan = method.gan
  d_labels = labels if gan.num_classes else None

  def l_gan(q):
    x = diffaug.diff_augment(keys[6], est(q), g.augment, g.translation_ratio, g.cutout_ratio)
    out, upd = gan.disc.apply({"params": extra["disc"], **extra["disc_state"]}, x, d_labels,
                              train=True, update_stats=True, mutable=["batch_stats"],
                              backbone_params=frozen.get("disc_backbone"))
    return sum(-jnp.mean(o) for o in out) / len(out), upd
  (lg, upd), gg = jax.value_and_grad(l_gan, has_aux=True)(params)
  return (jax.value_and_grad(l_ctm)(params), jax.value_and_grad(l_dsm)(params), (lg, gg),
          upd["batch_stats"])


def check_gan_generator_step(method, params, extra, frozen, batch, rng, k_times, distance,
                             gan_grad_rtol=None):
  """generator_grads(with_gan=True) against gan_generator_direct: the three losses, lambda_DSM,
  lambda_GAN = clip(||grad_W L_CTM|| / (||grad_W L_G|| + 1e-4), gan.weight_min, gan.weight_max)
  (the free value asserted to lie 5% or more away from the clip's ends), the summed gradient
  and D's advanced statistics. Returns (metrics, the free value of lambda_GAN).

  gan_grad_rtol: None compares every gradient entry tightly; a number compares lambda_GAN to
  that relative tolerance and the summed gradient by its global relative error (for networks
  with max pooling, whose input gradient jumps where round-off flips a window's arg-max)."""
  cfg = method.config
  run = jax.jit(lambda p, e, b, r, kt: method.generator_grads(
      p, e, frozen, b, r, kt, with_gan=True, disc_state=e["disc_state"]))
  grads, met, dstate = jax.device_get(run(params, extra, batch, rng, k_times))
  pts = ctm_points(method, frozen, batch, rng, draw_k(method, k_times))
  direct = jax.jit(lambda p, e, b, pts: gan_generator_direct(method, p, e, frozen, b, pts,
                                                             distance))
  (lc, gc), (ld, gd), (lg, gg), stats = jax.device_get(direct(params, extra, batch, pts))
  np.testing.assert_allclose(met["loss_ctm"], lc, rtol=1e-5)
  np.testing.assert_allclose(met["loss_dsm"], ld, rtol=1e-5)
  np.testing.assert_allclose(met["loss_gan_g"], lg, rtol=1e-5, atol=1e-7)
  path = method.adaptive_path
  lam_dsm = adaptive(gc, gd, path, cfg.ctm.adaptive_max)
  free = adaptive(gc, gg, path, np.inf)
  lo, hi = cfg.gan.weight_min, cfg.gan.weight_max
  assert not (lo / 1.05 < free < lo * 1.05 or hi / 1.05 < free < hi * 1.05), free
  lam_gan = min(max(free, lo), hi)
  np.testing.assert_allclose(met["lambda_dsm"], lam_dsm, rtol=1e-4)
  np.testing.assert_allclose(met["lambda_gan"], lam_gan, rtol=gan_grad_rtol or 1e-4)
  ref = jax.tree_util.tree_map(lambda a, b, d: a + lam_dsm * b + lam_gan * d, gc, gd, gg)
  if gan_grad_rtol is None:
    tree_close(grads, ref, rtol=5e-4, atol=1e-6)
  else:
    sq = lambda t: sum(float(np.sum(np.asarray(v, np.float64) ** 2))
                       for v in jax.tree_util.tree_leaves(t))
    err = sq(jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - b, grads, ref))
    assert np.sqrt(err / sq(ref)) < gan_grad_rtol, np.sqrt(err / sq(ref))
  tree_close(dstate["batch_stats"], stats, rtol=1e-5, atol=1e-7)
  return met, free


def check_disc_step(method, state, frozen, batch):
  """One discriminator step (method.make_step('disc')) against a direct computation:
    keys = split(fold_in(rng, step), 8); k from keys[0], (i, j) from keys[1]; x_t = x0 + t z
    (keys[2]); fake = sg(G_{theta^-}(G_theta(x_t, t, s; keys[3]), s, sigma_min; keys[4]));
    L_D = mean_heads mean relu(1 - D(aug(x0; keys[5]))) + mean_heads mean relu(1 + D(aug(fake;
    keys[6]))), D's statistics carried from the real pass to the fake one; then RAdam(gan.lr,
    gan.b1, gan.b2) on D only. Checks L_D, the logit means, |grad|, D's new parameters and
    statistics, and that G, its EMAs and the target stay as they were."""
  import optax
  from ctm_jax import diffaug
  cfg, model = method.config, method.model
  g, c = cfg.gan, cfg.ctm
  step = jax.jit(method.make_step("disc", None))
  new, met = jax.device_get(step(state, batch, frozen))
  x0, labels = batch["x"], method.labels(batch)
  d_labels = labels if method.gan.num_classes else None
  keys = jax.random.split(jax.random.fold_in(state.rng, state.step), 8)
  k = draw_k(method, keys[0])
  sch = model.schedule
  grid = jnp.asarray(karras_grid(c.num_points, sch.sigma_min, sch.sigma_max, sch.rho), jnp.float32)
  extra = state.extra
  backbone = frozen.get("disc_backbone")

  @jax.jit
  def direct(st, b):
    x0 = b["x"]
    i, j = diffusion.sample_ctm_indices(keys[1], x0.shape[0], c.num_points, k)
    t, s = grid[i], grid[j]
    x_t = x0 + bcast(t, x0) * jax.random.normal(keys[2], x0.shape, x0.dtype)
    mode = bool(c.target_train_mode)
    inner = model.jump(st.params, x_t, t, s, labels, train=True, rng=keys[3])
    smin = jnp.full_like(s, sch.sigma_min)
    fake = jax.lax.stop_gradient(model.jump(st.extra["target"], inner, s, smin, labels, train=mode,
                                            rng=keys[4]))
    aug = lambda key, x: diffaug.diff_augment(key, x, g.augment, g.translation_ratio,
                                              g.cutout_ratio)

    def d(params, stats, x):
      return method.gan.disc.apply({"params": params, **stats}, x, d_labels, train=True,
                                   update_stats=True, mutable=["batch_stats"],
                                   backbone_params=backbone)

    def loss(dp):
      real, upd = d(dp, st.extra["disc_state"], aug(keys[5], x0))
      fake_l, upd = d(dp, {**st.extra["disc_state"], **upd}, aug(keys[6], fake))
      l = (sum(jnp.mean(jax.nn.relu(1 - r)) for r in real) / len(real)
           + sum(jnp.mean(jax.nn.relu(1 + f)) for f in fake_l) / len(fake_l))
      means = (sum(jnp.mean(r) for r in real) / len(real),
               sum(jnp.mean(f) for f in fake_l) / len(fake_l))
      return l, (upd, means)
    return jax.value_and_grad(loss, has_aux=True)(st.extra["disc"])
  (l_d, (stats, (m_real, m_fake))), grads = jax.device_get(direct(state, batch))
  np.testing.assert_allclose(met["loss_d"], l_d, rtol=1e-5)
  np.testing.assert_allclose(met["d_logits_real"], m_real, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(met["d_logits_fake"], m_fake, rtol=1e-4, atol=1e-6)
  norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2)
                     for v in jax.tree_util.tree_leaves(grads)))
  np.testing.assert_allclose(met["d_grad_norm"], norm, rtol=1e-4)
  tx = optax.radam(g.lr, b1=g.b1, b2=g.b2)
  upd, _ = tx.update(grads, extra["disc_opt"], extra["disc"])
  tree_close(new.extra["disc"], optax.apply_updates(extra["disc"], upd), rtol=1e-4, atol=1e-6)
  tree_close(new.extra["disc_state"]["batch_stats"], stats["batch_stats"], rtol=1e-5, atol=1e-7)
  for name in ("params", "ema"):
    tree_close(getattr(new, name), getattr(state, name), rtol=0, atol=0)
  tree_close(new.extra["target"], extra["target"], rtol=0, atol=0)
  assert int(new.step) == int(state.step) + 1
  return met
