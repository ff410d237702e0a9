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
  """EDM eq. 5 in float64: (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, exact ends."""
  g = (smax ** (1 / rho) + np.arange(n) / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
  g[0], g[-1] = smax, smin
  return g


def heun_teacher(denoise, x, grid, i, k: int):
  """k Heun steps (EDM Alg. 1 without churn) of dx/dt = (x - D(x, t)) / t along the grid from
  index i (per example), every step a full Heun step (the grid ends at sigma_min > 0)."""
  for m in range(k):
    t0, t1 = bcast(grid[i + m], x), bcast(grid[i + m + 1], x)
    d0 = (x - denoise(x, grid[i + m])) / t0
    x_e = x + (t1 - t0) * d0
    d1 = (x_e - denoise(x_e, grid[i + m + 1])) / t1
    x = x + (t1 - t0) * 0.5 * (d0 + d1)
  return x


def grad_norm_at(grads, path):
  node = grads
  for p in path.split("/"):
    node = node[p]
  return float(np.linalg.norm(np.asarray(node, np.float64).ravel()))


def draw_k(method, k_times) -> int:
  """The step's number of teacher steps k (P(k) proportional to k), as a Python int."""
  return int(diffusion.sample_k_proportional(k_times, method.config.ctm.max_k))


def ctm_direct(method, params, target, frozen, batch, rng, k: int, distance):
  """The CTM generator step's losses, written out (reference get_CTM_loss):

    keys = split(rng, 8); k (draw_k); (i, j) from keys[7]; x_t = x0 + t z (z from keys[0])
    x_u    = sg(Heun_teacher^k(x_t, t -> u))
    target = sg(G_{theta^-}(G_{sg theta}(x_u, u, s; keys[1]), s, sigma_min; keys[2]))
    est    = G_{theta^-}(G_theta(x_t, t, s; keys[3]), s, sigma_min; keys[4])
  with the inner map of the estimate in train mode and the other three evaluations in train
  mode iff ctm.target_train_mode (the reference evaluates its target model with dropout on).

  Returns (l_ctm(p), est(p), target array, keys) with l_ctm(p) = mean d(est(p), target);
  jit-able (k is a Python int).
  """
  cfg, model = method.config, method.model
  c = cfg.ctm
  x0, labels = batch["x"], method.labels(batch)
  keys = jax.random.split(rng, 8)
  i, j = diffusion.sample_ctm_indices(keys[7], x0.shape[0], c.num_points, k)
  sch = model.schedule
  grid = jnp.asarray(karras_grid(c.num_points, sch.sigma_min, sch.sigma_max, sch.rho), jnp.float32)
  t, u, s = grid[i], grid[i + k], grid[j]
  x_t = x0 + bcast(t, x0) * jax.random.normal(keys[0], x0.shape, x0.dtype)
  teacher = lambda x, tt: method.teacher.denoise(frozen["teacher"], x, tt, labels)
  x_u = heun_teacher(teacher, x_t, grid, i, k)
  smin = jnp.full_like(s, sch.sigma_min)
  mode = bool(c.target_train_mode)
  inner_u = model.jump(params, x_u, u, s, labels, train=mode, rng=keys[1])
  tgt = jax.lax.stop_gradient(model.jump(target, inner_u, s, smin, labels, train=mode, rng=keys[2]))

  def est(p):
    inner = model.jump(p, x_t, t, s, labels, train=True, rng=keys[3])
    return model.jump(target, inner, s, smin, labels, train=mode, rng=keys[4])

  l_ctm = lambda p: jnp.mean(distance(est(p), tgt))
  return l_ctm, est, tgt, keys


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
