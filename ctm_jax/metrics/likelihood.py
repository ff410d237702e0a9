"""Log-likelihood through the score head (METHODS.md section 8).

Two quantities, both in nats per example (convert with `bits_per_dim`):

1. `pf_ode_log_likelihood`: the density the probability-flow ODE model gives to x taken as a
   sample at noise level sigma_min (Chen et al. 2018; Song et al. 2021, score_sde):
     log p_{sigma_min}(x) = log N(x_T; 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f(x_t, t) dt,
   with f(x, t) = (x - D(x, t)) / t and x_t the ODE solution from x_{sigma_min} = x up to x_T.
   Integrated in lambda = ln t (dx/dlambda = x - D, d delta/dlambda = div_x (x - D)), as score_sde
   does for its VE SDE, with an adaptive Runge-Kutta method (diffrax Tsit5 / Dopri5, PI step size
   control) under jit; the whole batch is one ODE system, so a fixed batch gives a fixed answer.

2. `sde_elbo`: CTM's "ELBO" (the variational bound of Huang et al. 2021 / Song et al. 2021 on the
   likelihood of the reverse-time SDE model, with a Gaussian decoder at sigma_lo), Monte Carlo
   with ln t uniform, one noise draw and a Hutchinson probe.  A lower bound on log p(x) of a
   different model (the SDE's, not the ODE's); both agree with the data density when D is exact.
"""
from __future__ import annotations

import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SOLVERS = ("tsit5", "dopri5")
TIME_VARIABLES = ("log_sigma", "sigma")
ERROR_NORMS = ("rms", "max")
EXACT_MAX_DIM = 64
# Tsit5 and Dopri5 have 7 stages, the last one reused as the next step's first (FSAL): one
# evaluation to start, then 6 per attempted step (accepted or rejected).
_NEW_STAGES_PER_STEP = 6
# The 7-bit offset: y = 2 v / 256 - 1 maps v in [0, 256)^D (dequantized 8-bit data) onto
# [-1, 1)^D with Jacobian (1/128)^D, so -log2 p(v) = -log2 p(y) + D log2(128).
EIGHT_BIT_OFFSET = math.log2(128.0)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_count(name, value):
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_noise_range(lo_name, lo, sigma_max):
  if not 0.0 < float(lo) < float(sigma_max):
    raise ValueError(f"need 0 < {lo_name} < sigma_max, got {lo_name}={lo}, "
                     f"sigma_max={sigma_max}")


def _check_exact_dim(x):
  d = _event_dim(x)
  if d > EXACT_MAX_DIM:
    raise ValueError(f"divergence='exact' takes one JVP per dimension and is limited to "
                     f"{EXACT_MAX_DIM} dimensions; this input has {d} (shape {x.shape[1:]}): "
                     f"use divergence='hutchinson'")


def _event_dim(x) -> int:
  return int(math.prod(x.shape[1:]))


def _per_example_sum(v):
  return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def _max_norm(tree):
  return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]))


def gaussian_prior_logp(z, sigma_max):
  """log N(z; 0, sigma_max^2 I) per example, z of shape (B, ...)."""
  d = _event_dim(z)
  return (-0.5 * d * jnp.log(2 * jnp.pi * sigma_max ** 2)
          - _per_example_sum(z ** 2) / (2 * sigma_max ** 2))


def draw_probes(key, shape, num_probes: int = 1, probe: str = "rademacher", dtype=jnp.float32):
  """Hutchinson probes of shape (num_probes, *shape) with E[eps eps^T] = I."""
  _check_choice("probe", probe, PROBES)
  full = (num_probes,) + tuple(shape)
  if probe == "rademacher":
    return jax.random.rademacher(key, full, dtype)
  return jax.random.normal(key, full, dtype)


def residual_and_divergence(denoise_fn: DenoiseFn, x, sigma, divergence: str, probes=None):
  """g(x) = x - D(x, sigma) (= sigma f(x, sigma)) and its divergence div_x g = D_dim - div_x D
  per example (the identity's trace is exact; only div D is estimated).

  divergence='exact': the Jacobian trace from one JVP per input dimension (D_dim <= 64);
  'hutchinson': div D by the mean over probes eps of eps^T (dD/dx) eps (Hutchinson 1989;
  FFJORD), through forward-mode JVPs of one linearization.  sigma: scalar or (B,).
  """
  sig = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  den, lin = jax.linearize(lambda y: denoise_fn(y, sig), x)
  d = _event_dim(x)
  if divergence == "exact":
    _check_exact_dim(x)
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    cols = jax.vmap(lin)(jnp.broadcast_to(basis, (d,) + x.shape))     # (d, B, ...) = J e_j
    div_d = jnp.einsum("jbj->b", cols.reshape(d, x.shape[0], d))
  elif divergence == "hutchinson":
    jv = jax.vmap(lin)(probes)                                         # (P, B, ...)
    div_d = jnp.mean(jax.vmap(_per_example_sum)(probes * jv), axis=0)
  else:
    _check_choice("divergence", divergence, DIVERGENCES)
  return x - den, d - div_d


def pf_ode_log_likelihood(denoise_fn: DenoiseFn, x, key, *, sigma_min, sigma_max,
                          divergence: str = "hutchinson", num_probes: int = 1,
                          probe: str = "rademacher", solver: str = "tsit5", rtol: float = 1e-5,
                          atol: float = 1e-5, max_steps: int = 4096,
                          time_variable: str = "log_sigma", norm: str = "rms",
                          dt0=None, throw: bool = True) -> dict:
  """log p_{sigma_min}(x) of the probability-flow ODE model, per example (nats).

  log p_{sigma_min}(x) = log N(x_T; 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f(x_t, t) dt
  along dx/dt = f(x, t) = (x - D(x, t)) / t from x up to t = sigma_max (instantaneous change of
  variables, d log p_t(x_t)/dt = -div f).  The state (x, accumulated divergence per example) of
  the whole batch is one system for the adaptive solver.  norm: how a step's error is measured
  against atol + rtol |y|: 'rms' over the whole state (scipy's and score_sde's choice; an
  outlier's error is averaged with the batch's) or 'max' (every component meets the tolerance:
  per-example error control, more steps).

  key: draws the Hutchinson probes once (shape (num_probes, *x.shape)); they stay fixed along
  the trajectory.  Unused with divergence='exact'.  time_variable: 'log_sigma' integrates in
  ln t (the default), 'sigma' in t itself (the same integral; a cross-check).  dt0: the first
  step in that variable (default 1e-3 of the range).  throw: raise at run time if max_steps is
  reached (diffrax's check, a host callback); False instead returns `solver_failed` (a bool
  scalar) for the caller to check on the host, and the program holds no callback (it then
  lowers for TPU and GPU: ctm_jax.lowering).

  Returns logp, prior_logp, delta_logp (B,), x_T (the latent), nfe (denoiser evaluations, each
  with its JVPs: 1 + 6 per attempted step) and num_steps (attempted steps).  Call under jax.jit.
  """
  for name, value, choices in [("divergence", divergence, DIVERGENCES), ("probe", probe, PROBES),
                               ("solver", solver, SOLVERS), ("norm", norm, ERROR_NORMS),
                               ("time_variable", time_variable, TIME_VARIABLES)]:
    _check_choice(name, value, choices)
  _check_count("num_probes", num_probes)
  _check_noise_range("sigma_min", sigma_min, sigma_max)
  if divergence == "exact":
    _check_exact_dim(x)
  probes = (draw_probes(key, x.shape, num_probes, probe, x.dtype)
            if divergence == "hutchinson" else None)
  log_t = time_variable == "log_sigma"

  def vector_field(tau, state, args):
    del args
    t = jnp.exp(tau) if log_t else tau
    g, div = residual_and_divergence(denoise_fn, state[0], t, divergence, probes)
    if log_t:          # dx/dln t = t f = g
      return g, div
    return g / t, div / t

  t0, t1 = (math.log(sigma_min), math.log(sigma_max)) if log_t else (sigma_min, sigma_max)
  dt0 = 1e-3 * (t1 - t0) if dt0 is None else dt0
  solver_obj = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}[solver]()
  y0 = (x, jnp.zeros(x.shape[:1], x.dtype))
  norm_kw = {"norm": _max_norm} if norm == "max" else {}   # diffrax's default is the RMS norm
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(vector_field), solver_obj, t0, t1, dt0, y0,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, **norm_kw),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=throw)
  x_t, delta = sol.ys[0][-1], sol.ys[1][-1]
  prior = gaussian_prior_logp(x_t, sigma_max)
  num_steps = sol.stats["num_steps"]
  out = dict(logp=prior + delta, prior_logp=prior, delta_logp=delta, x_T=x_t,
             nfe=1 + _NEW_STAGES_PER_STEP * num_steps, num_steps=num_steps)
  if not throw:
    out["solver_failed"] = sol.result != diffrax.RESULTS.successful
  return out


# ---------------------------------------------------------------------------------- images

def _check_uint8(images):
  if not jnp.issubdtype(images.dtype, jnp.integer):
    raise ValueError(f"images must be integers in 0..255 (uint8), got dtype {images.dtype}")


def dequantize(key, images_uint8):
  """Uniform dequantization to [-1, 1): y = ((x + u) / 256) * 2 - 1, u ~ U[0, 1)^D (float32)."""
  _check_uint8(images_uint8)
  u = jax.random.uniform(key, images_uint8.shape, jnp.float32)
  return (images_uint8.astype(jnp.float32) + u) / 256.0 * 2.0 - 1.0


def pixel_centres(images_uint8):
  """The bin centres ((x + 0.5) / 256) * 2 - 1 (no dequantization noise)."""
  _check_uint8(images_uint8)
  return (images_uint8.astype(jnp.float32) + 0.5) / 256.0 * 2.0 - 1.0


def bits_per_dim(logp_nats, dim: int, offset_bits: float = EIGHT_BIT_OFFSET):
  """bpd = -log p(y) / (dim ln 2) + offset_bits.

  With y in [-1, 1] the uniformly dequantized 8-bit data, offset_bits = log2(128) = 7 turns the
  density of y into that of v = 128 (y + 1) in [0, 256)^D, whose bits/dim upper-bounds the
  discrete NLL of the 256-level data (Theis et al. 2016).  offset_bits=0 gives the density of y.
  """
  return -jnp.asarray(logp_nats) / (dim * math.log(2.0)) + offset_bits


def _image_inputs(images_uint8, key, dequant: bool):
  k_deq, k_est = jax.random.split(key)
  y = dequantize(k_deq, images_uint8) if dequant else pixel_centres(images_uint8)
  return y, k_est


def image_nll(denoise_fn: DenoiseFn, images_uint8, key, *, sigma_min, sigma_max,
              dequantize: bool = True, offset_bits: float = EIGHT_BIT_OFFSET, **ode_kwargs) -> dict:
  """PF-ODE bits/dim of 8-bit images (B, H, W, C), per example.

  dequantize=True: y = uniform dequantization of the images (the standard, an upper bound on
  the discrete NLL); False: the pixel centres (x + 0.5)/256 (a point estimate, no bound).  y is
  treated as a sample at sigma_min.  key is split into (dequantization, probes).  ode_kwargs go
  to `pf_ode_log_likelihood`.  Returns bpd (B,) and that function's outputs.
  """
  y, k_probe = _image_inputs(images_uint8, key, dequantize)
  out = pf_ode_log_likelihood(denoise_fn, y, k_probe, sigma_min=sigma_min, sigma_max=sigma_max,
                              **ode_kwargs)
  out["bpd"] = bits_per_dim(out["logp"], _event_dim(y), offset_bits)
  return out


# ---------------------------------------------------------------------------------- ELBO

def ctm_elbo_sigma_lo(sigma_min=0.002, sigma_max=80.0, rho=7.0, t_min=1e-3):
  """The ELBO's lower noise level in CTM's eval_bpd.py: the Karras curve at position t_min,
  (sigma_min^(1/rho) + t_min (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho (2.051e-3 by default)."""
  a, b = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (a + t_min * (b - a)) ** rho


ELBO_FORMS = ("implicit", "dsm")


def _elbo_sample(denoise_fn, x, key, sigma_lo, sigma_max, probe, form):
  """One Monte Carlo draw of the diffusion and decoder terms of `sde_elbo` per example."""
  b, d = x.shape[0], _event_dim(x)
  k_t, k_z, k_e, k_0 = jax.random.split(key, 4)
  span = math.log(sigma_max / sigma_lo)
  t = sigma_lo * jnp.exp(span * jax.random.uniform(k_t, (b,), x.dtype))   # ln t ~ U
  tb = t.reshape((b,) + (1,) * (x.ndim - 1))
  x_t = x + tb * jax.random.normal(k_z, x.shape, x.dtype)
  # Each integrand times 1/p(t) = t span, with s = (D - x_t)/t^2:
  if form == "implicit":
    # 2 t div s + t |s|^2  ->  span [2 (div D - d) + |D - x_t|^2 / t^2], div D by Hutchinson.
    eps = draw_probes(k_e, x.shape, 1, probe, x.dtype)[0]
    den, jv = jax.jvp(lambda y: denoise_fn(y, t), (x_t,), (eps,))
    rate = span * (2.0 * (_per_example_sum(eps * jv) - d)
                   + _per_example_sum((den - x_t) ** 2) / t ** 2)
  else:
    # t |s + (x_t - x)/t^2|^2 - t E|(x_t - x)/t^2|^2 = |D - x|^2 / t^3 - d / t.
    den = denoise_fn(x_t, t)
    rate = span * (_per_example_sum((den - x) ** 2) / t ** 2 - d)
  x_lo = x + sigma_lo * jax.random.normal(k_0, x.shape, x.dtype)
  den_lo = denoise_fn(x_lo, jnp.full((b,), sigma_lo, x.dtype))
  decoder = 0.5 * d - _per_example_sum((x - den_lo) ** 2) / (2.0 * sigma_lo ** 2)
  return -rate, decoder


def sde_elbo(denoise_fn: DenoiseFn, x, key, *, sigma_lo, sigma_max, num_samples: int = 1,
             probe: str = "rademacher", form: str = "implicit") -> dict:
  """A Monte Carlo estimate of a lower bound on log p(x) (nats, per example) of the reverse-SDE
  model dx = -2t s(x, t) dt + sqrt(2t) dw_bar from N(0, sigma_max^2 I) down to sigma_lo, followed
  by the decoder N(x; D(x_lo, sigma_lo), sigma_lo^2 I) (Huang et al. 2021, Thm. 3 / Song et al.
  2021 "Maximum likelihood training", Thm. 2; the estimator of CTM's eval_bpd.py `elbo`):

    log p(x) >= E[log N(x_T; 0, sigma_max^2 I)]
                - int_{sigma_lo}^{sigma_max} E[2 t div s(x_t, t) + t |s(x_t, t)|^2] dt
                + E[log N(x; D(x_lo, sigma_lo), sigma_lo^2 I)] + H[N(x, sigma_lo^2 I)],

  x_t = x + t z, x_lo = x + sigma_lo z', s = (D - x)/t^2.  The prior term is taken in closed
  form (-D/2 ln(2 pi sigma_max^2) - (|x|^2 + D sigma_max^2) / (2 sigma_max^2)); the integral by
  importance sampling with ln t ~ U[ln sigma_lo, ln sigma_max] and div s by one Hutchinson probe
  (`probe`); the decoder term by one draw.  Each of the num_samples draws uses
  fold_in(key, j), split into (t, z, probe, z').  Unbiased for the bound; with the exact
  denoiser the bound is tight up to the decoder's O(sigma_lo^4) gap and the prior mismatch.

  Returns elbo, prior, diffusion, decoder (B,) (sample means), elbo_std (B,) (the spread over
  the samples), nfe (2 denoiser evaluations per sample, one with a JVP).  Call under jax.jit.
  """
  _check_choice("probe", probe, PROBES)
  _check_choice("form", form, ELBO_FORMS)
  _check_count("num_samples", num_samples)
  _check_noise_range("sigma_lo", sigma_lo, sigma_max)
  d = _event_dim(x)
  prior = (-0.5 * d * jnp.log(2 * jnp.pi * sigma_max ** 2)
           - (_per_example_sum(x ** 2) + d * sigma_max ** 2) / (2 * sigma_max ** 2))

  def body(carry, j):
    diff, dec = _elbo_sample(denoise_fn, x, jax.random.fold_in(key, j), sigma_lo, sigma_max,
                             probe, form)
    tot = diff + dec
    return (carry[0] + diff, carry[1] + dec, carry[2] + tot, carry[3] + tot ** 2), None

  zeros = jnp.zeros(x.shape[:1], x.dtype)
  (diff, dec, tot, tot2), _ = jax.lax.scan(body, (zeros,) * 4, jnp.arange(num_samples))
  n = float(num_samples)
  mean = tot / n
  std = jnp.sqrt(jnp.maximum(tot2 / n - mean ** 2, 0.0) * n / max(n - 1.0, 1.0))
  return dict(elbo=prior + mean, prior=prior, diffusion=diff / n, decoder=dec / n,
              elbo_std=std, nfe=2 * num_samples)


def image_elbo(denoise_fn: DenoiseFn, images_uint8, key, *, sigma_lo, sigma_max,
               num_samples: int = 1, probe: str = "rademacher", form: str = "implicit",
               dequantize: bool = True, offset_bits: float = EIGHT_BIT_OFFSET) -> dict:
  """`sde_elbo` of 8-bit images in bits/dim: bpd (B,) is an upper bound (in expectation) on the
  SDE model's bits/dim.  key is split into (dequantization, ELBO draws); see `image_nll`."""
  y, k_est = _image_inputs(images_uint8, key, dequantize)
  out = sde_elbo(denoise_fn, y, k_est, sigma_lo=sigma_lo, sigma_max=sigma_max,
                 num_samples=num_samples, probe=probe, form=form)
  out["bpd"] = bits_per_dim(out["elbo"], _event_dim(y), offset_bits)
  return out
