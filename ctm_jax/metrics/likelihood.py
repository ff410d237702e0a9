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

import dataclasses
import math
from typing import Callable, Optional

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
                          dt0=None, probes=None, throw: bool = True) -> dict:
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
  step in that variable (default 1e-3 of the range).  probes: given Hutchinson probes of shape
  (num_probes, *x.shape) instead of drawing them from key.  throw: raise at run time if max_steps
  is reached (diffrax's check, a host callback); False instead returns `solver_failed` (a bool
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
  if divergence == "hutchinson" and probes is None:
    probes = draw_probes(key, x.shape, num_probes, probe, x.dtype)
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


def training_values(images_uint8):
  """The values the models are trained on, v / 127.5 - 1 (v = 0 -> -1, v = 255 -> 1; no
  dequantization noise): the `point` input, where a density is evaluated without a bound."""
  _check_uint8(images_uint8)
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


INPUTS = ("uniform", "training")


def image_inputs(images_uint8, key, inputs: str = "uniform"):
  """The model input of 8-bit images: 'uniform' = `dequantize(key, .)`, 'training' =
  `training_values(.)` (key unused)."""
  _check_choice("inputs", inputs, INPUTS)
  return dequantize(key, images_uint8) if inputs == "uniform" else training_values(images_uint8)


def bits_per_dim(logp_nats, dim: int, offset_bits: float = EIGHT_BIT_OFFSET):
  """bpd = -log p(y) / (dim ln 2) + offset_bits.

  With y in [-1, 1] the uniformly dequantized 8-bit data, offset_bits = log2(128) = 7 turns the
  density of y into that of v = 128 (y + 1) in [0, 256)^D, whose bits/dim upper-bounds the
  discrete NLL of the 256-level data (Theis et al. 2016).  offset_bits=0 gives the density of y.
  """
  return -jnp.asarray(logp_nats) / (dim * math.log(2.0)) + offset_bits


def _image_inputs(images_uint8, key, dequant: bool):
  k_deq, k_est = jax.random.split(key)
  return image_inputs(images_uint8, k_deq, "uniform" if dequant else "training"), k_est


def image_nll(denoise_fn: DenoiseFn, images_uint8, key, *, sigma_min, sigma_max,
              dequantize: bool = True, offset_bits: float = EIGHT_BIT_OFFSET, **ode_kwargs) -> dict:
  """PF-ODE bits/dim of 8-bit images (B, H, W, C), per example.

  dequantize=True: y = uniform dequantization of the images (the standard, an upper bound on
  the discrete NLL); False: the training values v/127.5 - 1 (a point value, no bound).  y is
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
  return ctm_decoder_sigma_as_written(sigma_min, sigma_max, rho, t_min) ** rho


def ctm_decoder_sigma_as_written(sigma_min=0.002, sigma_max=80.0, rho=7.0, t_min=1e-3):
  """The decoder's noise level in CTM's eval_bpd.py `residual()`: sigma(t_min) without the
  `** rho`, sigma_min^(1/rho) + t_min (sigma_max^(1/rho) - sigma_min^(1/rho)) = 0.41302 by
  default (its `elbo` integrates down to this value ** rho = 2.05e-3, so the script's decoder
  does not meet its diffusion term)."""
  a, b = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return a + t_min * (b - a)


ELBO_FORMS = ("implicit", "dsm")
ELBO_PRIORS = ("closed_form", "sample")


def _denoise(denoise_fn, y, t, key, dropout: bool):
  """denoise_fn(y, t), or denoise_fn(y, t, key) for a train-mode (dropout) network."""
  return denoise_fn(y, t, key) if dropout else denoise_fn(y, t)


def gaussian_decoder_logp(denoise_fn, x, z, sigma, *, key=None, dropout: bool = False):
  """log N(x; D(x + sigma z, sigma), sigma^2 I) + H[N(x, sigma^2 I)]
  = D/2 - |x - D(x + sigma z, sigma)|^2 / (2 sigma^2) per example: one draw of the decoder term
  of `sde_elbo` (minus the `residual()` of CTM's eval_bpd.py at the same sigma)."""
  b = x.shape[0]
  den = _denoise(denoise_fn, x + sigma * z, jnp.full((b,), sigma, x.dtype), key, dropout)
  return 0.5 * _event_dim(x) - _per_example_sum((x - den) ** 2) / (2.0 * sigma ** 2)


def elbo_draws(key, x, probe: str = "rademacher") -> dict:
  """The random inputs of one ELBO draw: u (B,) ~ U[0, 1) (ln t = ln sigma_lo + u span), noises
  z, z_lo, z_prior ~ N(0, I) like x, the probe eps, and two dropout keys."""
  k_t, k_z, k_e, k_0, k_p, k_d = jax.random.split(key, 6)
  return dict(u=jax.random.uniform(k_t, x.shape[:1], x.dtype),
              z=jax.random.normal(k_z, x.shape, x.dtype),
              eps=draw_probes(k_e, x.shape, 1, probe, x.dtype)[0],
              z_lo=jax.random.normal(k_0, x.shape, x.dtype),
              z_prior=jax.random.normal(k_p, x.shape, x.dtype),
              dropout=jax.random.split(k_d))


def elbo_terms(denoise_fn, x, draws: dict, *, sigma_lo, sigma_max, decoder_sigma=None,
               form: str = "implicit", prior: str = "closed_form", dropout: bool = False):
  """(prior, diffusion, decoder) per example of one ELBO draw (`elbo_draws`); see `sde_elbo`.

  t = sigma_lo (sigma_max / sigma_lo)^u; decoder_sigma (default sigma_lo) is the decoder's noise
  level; prior 'closed_form' is E log N(x + sigma_max z; 0, sigma_max^2 I), 'sample' that term
  at z = z_prior (CTM's eval_bpd.py)."""
  b, d = x.shape[0], _event_dim(x)
  span = math.log(sigma_max / sigma_lo)
  t = sigma_lo * jnp.exp(span * draws["u"])
  tb = t.reshape((b,) + (1,) * (x.ndim - 1))
  x_t = x + tb * draws["z"]
  k1, k2 = draws["dropout"][0], draws["dropout"][1]
  # Each integrand times 1/p(t) = t span, with s = (D - x_t)/t^2:
  if form == "implicit":
    # 2 t div s + t |s|^2  ->  span [2 (div D - |eps|^2) + |D - x_t|^2 / t^2], div D by
    # Hutchinson (|eps|^2 = d for a Rademacher probe; its own value for a Gaussian one).
    eps = draws["eps"]
    den, jv = jax.jvp(lambda y: _denoise(denoise_fn, y, t, k1, dropout), (x_t,), (eps,))
    rate = span * (2.0 * (_per_example_sum(eps * jv) - _per_example_sum(eps * eps))
                   + _per_example_sum((den - x_t) ** 2) / t ** 2)
  else:
    # t |s + (x_t - x)/t^2|^2 - t E|(x_t - x)/t^2|^2 = |D - x|^2 / t^3 - d / t.
    den = _denoise(denoise_fn, x_t, t, k1, dropout)
    rate = span * (_per_example_sum((den - x) ** 2) / t ** 2 - d)
  decoder = gaussian_decoder_logp(denoise_fn, x, draws["z_lo"],
                                  sigma_lo if decoder_sigma is None else decoder_sigma,
                                  key=k2, dropout=dropout)
  if prior == "closed_form":
    p = (-0.5 * d * jnp.log(2 * jnp.pi * sigma_max ** 2)
         - (_per_example_sum(x ** 2) + d * sigma_max ** 2) / (2 * sigma_max ** 2))
  else:
    p = gaussian_prior_logp(x + sigma_max * draws["z_prior"], sigma_max)
  return p, -rate, decoder


def sde_elbo(denoise_fn: DenoiseFn, x, key, *, sigma_lo, sigma_max, num_samples: int = 1,
             probe: str = "rademacher", form: str = "implicit", decoder_sigma=None,
             prior: str = "closed_form", dropout: bool = False) -> dict:
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
  `elbo_draws(fold_in(key, j))`.  Unbiased for the bound; with the exact denoiser the bound is
  tight up to the decoder's O(sigma_lo^4) gap and the prior mismatch.

  CTM's eval_bpd.py as written: decoder_sigma = `ctm_decoder_sigma_as_written()` (0.413, not
  sigma_lo: no longer a bound of one model), prior='sample' (one draw of the prior term),
  dropout=True (train mode: denoise_fn(x, t, key), a fresh key per network call).

  Returns elbo, prior, diffusion, decoder (B,) (sample means), elbo_std (B,) (the spread over
  the samples), nfe (2 denoiser evaluations per sample, one with a JVP).  Call under jax.jit.
  """
  _check_choice("probe", probe, PROBES)
  _check_choice("form", form, ELBO_FORMS)
  _check_choice("prior", prior, ELBO_PRIORS)
  _check_count("num_samples", num_samples)
  _check_noise_range("sigma_lo", sigma_lo, sigma_max)
  if decoder_sigma is not None and not float(decoder_sigma) > 0.0:
    raise ValueError(f"decoder_sigma must be > 0, got {decoder_sigma}")

  def body(carry, j):
    draws = elbo_draws(jax.random.fold_in(key, j), x, probe)
    pr, diff, dec = elbo_terms(denoise_fn, x, draws, sigma_lo=sigma_lo, sigma_max=sigma_max,
                               decoder_sigma=decoder_sigma, form=form, prior=prior,
                               dropout=dropout)
    tot = pr + diff + dec
    return tuple(c + v for c, v in zip(carry, (pr, diff, dec, tot, tot ** 2))), None

  zeros = jnp.zeros(x.shape[:1], x.dtype)
  (pr, diff, dec, tot, tot2), _ = jax.lax.scan(body, (zeros,) * 5, jnp.arange(num_samples))
  n = float(num_samples)
  mean = tot / n
  std = jnp.sqrt(jnp.maximum(tot2 / n - mean ** 2, 0.0) * n / max(n - 1.0, 1.0))
  return dict(elbo=mean, prior=pr / n, diffusion=diff / n, decoder=dec / n,
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


# ---------------------------------------------------------------------------------- protocols

def score_sde_vp_sigma(eps=1e-5, beta_min=0.1, beta_max=20.0):
  """score_sde's likelihood starts its ODE at t = eps of the VP SDE; in the EDM frame
  (x / alpha = x_0 + sigma z) that is sigma(eps) = sqrt(exp(beta_min eps + (beta_max - beta_min)
  eps^2 / 2) - 1) = 1.0005e-3 at its defaults (eps 1e-5, beta 0.1 .. 20), on data in [-1, 1]."""
  return math.sqrt(math.expm1(beta_min * eps + 0.5 * (beta_max - beta_min) * eps ** 2))


@dataclasses.dataclass(frozen=True)
class Protocol:
  """Everything a likelihood number depends on besides the model (config.eval.nll_protocol).

  inputs: `image_inputs` kind; split: '' = the data set's eval split; flips: a random horizontal
  flip per example; train_mode: the network in train mode (dropout); ode_start: 'schedule'
  (sigma_min of the run), 'ctm' (`ctm_elbo_sigma_lo`, the ODE started from x + sigma z) or
  'score_sde' (`score_sde_vp_sigma`, from x itself); ode_tol / ode_solver: None = the
  config.eval fields; decoder: 'sigma_lo' or 'ctm_as_written' (`ctm_decoder_sigma_as_written`),
  and whether the ODE number has that decoder's residual subtracted (ode_residual);
  elbo_prior: `sde_elbo`'s prior."""
  name: str
  label: str
  inputs: str = "uniform"
  split: str = ""
  flips: bool = False
  train_mode: bool = False
  ode_start: str = "schedule"
  ode_tol: Optional[float] = None
  ode_solver: Optional[str] = None
  ode_residual: bool = False
  decoder: str = "sigma_lo"
  elbo_prior: str = "closed_form"


PROTOCOLS = {p.name: p for p in (
    Protocol("dequantized", "uniform dequantization y = (v + u)/128 - 1, the eval split, eval "
             "mode, the ODE from y at sigma_min: an upper bound on the discrete NLL"),
    Protocol("point", "no dequantization, the training values v/127.5 - 1, the eval split, eval "
             "mode: a point value of the density, not a bound", inputs="training"),
    Protocol("score_sde", "score_sde's likelihood.py: uniform dequantization, the test split, "
             "RK45 (Dormand-Prince) at rtol = atol = 1e-5, the ODE from y at its VP sigma(1e-5) "
             "= 1.0e-3 (EDM frame), eval mode", ode_start="score_sde", ode_tol=1e-5,
             ode_solver="dopri5"),
    Protocol("ctm", "CTM's eval_bpd.py as written: no dequantization, x = v/127.5 - 1, the train "
             "split with random flips, train mode (dropout on), decoder at sigma 0.41302 "
             "(sigma(t_min) without ** rho) in both numbers, one-draw prior in the ELBO, the ODE "
             "from x + 2.05e-3 z at RK45 rtol = atol = 1e-3, +7 bits: not a bound of one model",
             inputs="training", split="train", flips=True, train_mode=True, ode_start="ctm",
             ode_tol=1e-3, ode_solver="dopri5", ode_residual=True, decoder="ctm_as_written",
             elbo_prior="sample"),
)}


def protocol(name: str) -> Protocol:
  _check_choice("protocol", name, tuple(PROTOCOLS))
  return PROTOCOLS[name]


def protocol_noise_levels(p: Protocol, sigma_min, sigma_max, rho) -> dict:
  """The noise levels a protocol uses for a schedule: ode_start (the ODE's lower end),
  elbo_sigma_lo (the ELBO's diffusion term's lower end) and decoder_sigma."""
  lo = ctm_elbo_sigma_lo(sigma_min, sigma_max, rho)
  start = {"schedule": sigma_min, "ctm": lo, "score_sde": score_sde_vp_sigma()}[p.ode_start]
  dec = lo if p.decoder == "sigma_lo" else ctm_decoder_sigma_as_written(sigma_min, sigma_max, rho)
  return dict(ode_start=float(start), elbo_sigma_lo=float(lo), decoder_sigma=float(dec))


def protocol_inputs(p: Protocol, images_uint8, key):
  """The model input of a batch of 8-bit images (B, H, W, C) under a protocol: `image_inputs`
  with key, then (flips) a horizontal flip of each example with probability 1/2 drawn from
  fold_in(key, 1)."""
  y = image_inputs(images_uint8, key, p.inputs)
  if p.flips:
    flip = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, y.shape[:1]).reshape((-1,) + (1,) * (y.ndim - 1))
    y = jnp.where(flip, y[:, :, ::-1], y)
  return y


def protocol_ode_logp(denoise_fn: DenoiseFn, x, key, p: Protocol, *, sigma_min, sigma_max, rho,
                      draws: Optional[dict] = None, **ode_kwargs) -> dict:
  """The PF-ODE number of a protocol, per example (nats; see `pf_ode_log_likelihood`).

  The ODE runs from sigma_start = protocol_noise_levels(p)['ode_start'] to sigma_max, from x
  itself, or (ode_start 'ctm', eval_bpd.py `likelihood(mode='correct')`) from x + sigma_start z;
  with ode_residual the decoder term `gaussian_decoder_logp(x, z_dec, decoder_sigma)` is added
  (eval_bpd.py subtracts its `residual()`).  key splits into (z, probes, z_dec); draws may give
  them instead ({'z', 'probes', 'z_dec'}).  p.ode_tol / p.ode_solver override ode_kwargs'
  rtol, atol and solver.  Returns that function's outputs, logp including the decoder term,
  and decoder (B,) (zeros without ode_residual)."""
  lv = protocol_noise_levels(p, sigma_min, sigma_max, rho)
  k_z, k_p, k_d = jax.random.split(key, 3)
  draws = dict(draws or {})
  z = draws.get("z")
  z = jax.random.normal(k_z, x.shape, x.dtype) if z is None else z
  z_dec = draws.get("z_dec")
  z_dec = jax.random.normal(k_d, x.shape, x.dtype) if z_dec is None else z_dec
  if p.ode_tol is not None:
    ode_kwargs.update(rtol=p.ode_tol, atol=p.ode_tol)
  if p.ode_solver is not None:
    ode_kwargs["solver"] = p.ode_solver
  x0 = x + lv["ode_start"] * z if p.ode_start == "ctm" else x
  out = pf_ode_log_likelihood(denoise_fn, x0, k_p, sigma_min=lv["ode_start"],
                              sigma_max=sigma_max, probes=draws.get("probes"), **ode_kwargs)
  dec = (gaussian_decoder_logp(denoise_fn, x, z_dec, lv["decoder_sigma"]) if p.ode_residual
         else jnp.zeros(x.shape[:1], x.dtype))
  return dict(out, logp=out["logp"] + dec, decoder=dec)
