"""Log-likelihood (PF-ODE density and SDE ELBO) against closed forms.

References: the Gaussian-mixture oracle's exact log-density of the noised mixture
(`GaussianMixture.log_prob(x, t)`), scipy's multivariate normal, scipy quadrature of the ELBO's
integrand for Gaussian data, and hand-computed dequantization / bits-per-dim values.
"""
import math
from dataclasses import replace as dataclasses_replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from ctm_jax import oracle
from ctm_jax.metrics import likelihood as lk

SMIN, SMAX = 0.002, 80.0


def _ode(denoise_fn, **kw):
  kw = {"sigma_min": SMIN, "sigma_max": SMAX, **kw}
  return jax.jit(lambda x, key: lk.pf_ode_log_likelihood(denoise_fn, x, key, **kw))


def _points_2d():
  gm = oracle.toy_mixture_2d()
  x = gm.sample(jax.random.PRNGKey(0), 60)
  # Four points between components / off the ring (3 to 5 stds away), then everything taken
  # at sigma_min.  (Far outliers, log p ~ -300, make the flow stiff near sigma_min.)
  ang = np.pi / 8 + np.pi / 4 * np.arange(4)
  rad = np.array([1.0, 1.15, 0.85, 1.0])
  x = jnp.concatenate([x, jnp.asarray(np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1),
                                      x.dtype)])
  return gm, x + SMIN * jax.random.normal(jax.random.PRNGKey(1), x.shape)


# ------------------------------------------------------------------------------ PF-ODE

def test_ode_exact_trace_matches_mixture_density_2d():
  gm, x = _points_2d()
  out = _ode(gm.denoise, divergence="exact")(x, jax.random.PRNGKey(2))
  ref = np.asarray(gm.log_prob(x, SMIN))
  logp, prior, delta = (np.asarray(out[k], np.float64) for k in ("logp", "prior_logp", "delta_logp"))
  x_T = np.asarray(out["x_T"], np.float64)
  # Decomposition: logp = log N(x_T; 0, sigma_max^2 I) + delta.
  np.testing.assert_allclose(logp, prior + delta, rtol=1e-6)
  np.testing.assert_allclose(prior, stats.multivariate_normal(np.zeros(2), SMAX ** 2 * np.eye(2))
                             .logpdf(x_T), rtol=1e-5)
  # Sign: the integral of div f is the log-density gained from sigma_max down to sigma_min,
  # exactly log p_{sigma_min}(x) - log p_{sigma_max}(x_T) for the exact flow (~ +10 nats here).
  exact_delta = ref - np.asarray(gm.log_prob(out["x_T"], SMAX), np.float64)
  assert exact_delta.mean() > 10
  gap_delta = np.abs(delta - exact_delta).max()
  # The model's prior N(0, sigma_max^2 I) is not exactly p_{sigma_max}: known, small mismatch.
  mismatch = np.asarray(gm.log_prob(out["x_T"], SMAX), np.float64) - prior
  gap = np.abs(logp - ref)
  print(f"2-D exact trace, rtol=atol=1e-5, float32: max |logp - closed form| = {gap.max():.2e} "
        f"nats (mean {gap.mean():.2e}); integrator alone {gap_delta:.2e}; prior mismatch "
        f"{np.abs(mismatch).max():.2e}; nfe {int(out['nfe'])}")
  # Tolerance: an adaptive solver's global error is not bounded by rtol, and the RMS error norm
  # over the whole batch lets the hardest examples (between components) carry more error than
  # the average.  At rtol = atol = 1e-5 in float32 we allow a mean gap of 1e-3 nats (100 x tol;
  # 1.3e-4 is seen) and a max of 1e-2 (5e-3 is seen), plus the prior mismatch (<= 4e-4).
  assert gap.mean() < 1e-3 and gap_delta < 1e-2
  assert np.all(gap < 1e-2 + np.abs(mismatch))
  assert np.abs(mismatch).max() < 1e-3
  # The max norm controls every example's error: then every gap is within 5e-4 (6.6e-5 seen).
  out_max = _ode(gm.denoise, divergence="exact", norm="max")(x, None)
  gap_max = np.abs(np.asarray(gm.log_prob(out_max["x_T"], SMAX)) + np.asarray(out_max["delta_logp"])
                   - ref)
  print(f"  norm='max': max gap {gap_max.max():.2e} nats, nfe {int(out_max['nfe'])}")
  assert gap_max.max() < 5e-4
  assert int(out["num_steps"]) > 0 and int(out["nfe"]) == 1 + 6 * int(out["num_steps"])


def test_ode_tighter_tolerance_approaches_closed_form_x64():
  """In float64, with the prior error removed (exact p_{sigma_max} at x_T), the gap shrinks as
  rtol = atol tightens; integrating in t with Dopri5 instead of in ln t with Tsit5 agrees."""
  with jax.enable_x64(True):
    gm, x = _points_2d()
    x = x[-16:].astype(jnp.float64)   # 12 samples and the 4 points between components
    ref = np.asarray(gm.log_prob(x, SMIN))

    def gap_fn(**kw):
      fn = jax.jit(lambda x, tol: lk.pf_ode_log_likelihood(
          gm.denoise, x, None, sigma_min=SMIN, sigma_max=SMAX, divergence="exact", rtol=tol,
          atol=tol, max_steps=20000, norm="max", **kw))

      def gap(tol):   # one compilation serves every tolerance
        out = fn(x, jnp.float64(tol))
        corrected = np.asarray(gm.log_prob(out["x_T"], SMAX)) + np.asarray(out["delta_logp"])
        return np.abs(corrected - ref).max(), int(out["nfe"])
      return gap

    gaps = [gap_fn()(tol) for tol in (1e-3, 1e-5, 1e-7)]
    print("float64 gaps (nats, nfe) at tol 1e-3, 1e-5, 1e-7:", gaps)
    assert gaps[0][0] > gaps[1][0] > gaps[2][0]
    assert gaps[0][1] < gaps[1][1] < gaps[2][1]
    assert gaps[2][0] < 1e-5
    # A second time variable (t itself) with the other solver reaches the same answer.
    assert gap_fn(time_variable="sigma", solver="dopri5")(1e-7)[0] < 1e-5


def _mixture_16d():
  gm = oracle.random_mixture(3, dim=16, num_components=4)
  return gm, gm.sample(jax.random.PRNGKey(0), 64)


@pytest.mark.parametrize("probe,num_probes", [("rademacher", 2), ("gaussian", 1)])
def test_ode_hutchinson_matches_mixture_density_16d(probe, num_probes):
  gm, x = _mixture_16d()
  out = _ode(gm.denoise, divergence="hutchinson", probe=probe, num_probes=num_probes)(
      x, jax.random.PRNGKey(4))
  ref = np.asarray(gm.log_prob(x, SMIN), np.float64)
  # Remove the known prior mismatch (up to ~0.07 nats here) so only probe noise and
  # integrator error remain.
  corrected = np.asarray(gm.log_prob(out["x_T"], SMAX), np.float64) + np.asarray(out["delta_logp"])
  err = corrected - ref
  se = err.std(ddof=1) / math.sqrt(len(err))
  print(f"16-D Hutchinson ({probe}, {num_probes} probes): mean gap {err.mean():+.3f} nats, "
        f"per-example std {err.std(ddof=1):.2f}, SE {se:.3f}, nfe {int(out['nfe'])}")
  # The estimate is unbiased, each example's error has the spread of the probe noise along its
  # path; the mean over 64 examples must sit within 4 standard errors (+ 5e-3 integrator slack).
  assert abs(err.mean()) < 4 * se + 5e-3
  # ... and the noise is not so large that the check is empty (|log p| is ~10 nats here).
  assert se < 5.0
  # Same key, same batch: the same numbers (probes fixed, one ODE system).
  again = _ode(gm.denoise, divergence="hutchinson", probe=probe, num_probes=num_probes)(
      x, jax.random.PRNGKey(4))
  np.testing.assert_array_equal(np.asarray(again["logp"]), np.asarray(out["logp"]))


def test_ode_exact_trace_16d():
  gm, x = _mixture_16d()
  out = _ode(gm.denoise, divergence="exact")(x[:16], None)
  corrected = np.asarray(gm.log_prob(out["x_T"], SMAX)) + np.asarray(out["delta_logp"])
  gap = np.abs(corrected - np.asarray(gm.log_prob(x[:16], SMIN)))
  print(f"16-D exact trace: max gap {gap.max():.2e} nats")
  assert gap.max() < 2e-2   # float32 on |delta| ~ 100 nats


def test_nfe_counts_denoiser_evaluations():
  gm, x = _points_2d()
  calls = []

  def counted(y, t):
    jax.debug.callback(lambda _: calls.append(1), t[0])
    return gm.denoise(y, t)

  out = _ode(counted, divergence="exact", rtol=1e-4, atol=1e-4)(x[:8], None)
  jax.block_until_ready(out)
  assert int(out["nfe"]) == len(calls) > 10


def test_jitted_call_compiles_once():
  gm, x = _points_2d()
  traces = []

  def traced(y, t):
    traces.append(1)
    return gm.denoise(y, t)

  f = _ode(traced, divergence="hutchinson")
  a = f(x[:8], jax.random.PRNGKey(0))
  b = f(x[8:16], jax.random.PRNGKey(1))
  jax.block_until_ready((a, b))
  n = len(traces)
  f(x[16:24], jax.random.PRNGKey(2))
  assert len(traces) == n   # the third call retraced nothing
  assert not np.allclose(np.asarray(a["logp"]), np.asarray(b["logp"]))


def test_bad_options_are_refused():
  gm, x = _points_2d()
  img = jnp.zeros((2, 8, 8, 2))
  with pytest.raises(ValueError, match="hutchinson"):
    lk.pf_ode_log_likelihood(lambda y, t: y, img, None, sigma_min=SMIN, sigma_max=SMAX,
                             divergence="exact")
  for kw, name in [({"divergence": "trace"}, "divergence"), ({"probe": "uniform"}, "probe"),
                   ({"solver": "rk4"}, "solver"), ({"num_probes": 0}, "num_probes"),
                   ({"sigma_min": 1.0, "sigma_max": 0.5}, "sigma_min"),
                   ({"time_variable": "t"}, "time_variable"), ({"norm": "l2"}, "norm")]:
    kw = {"sigma_min": SMIN, "sigma_max": SMAX, **kw}
    with pytest.raises(ValueError, match=name):
      lk.pf_ode_log_likelihood(gm.denoise, x, jax.random.PRNGKey(0), **kw)
  # Running out of steps raises (no silent half-integrated answer).
  with pytest.raises(Exception, match="maximum number of solver steps"):
    jax.block_until_ready(_ode(gm.denoise, divergence="exact", max_steps=5)(x[:4], None))
  # throw=False (the evaluation's form, no host callback): the failure is returned instead.
  for steps, failed in ((5, True), (20000, False)):
    out = _ode(gm.denoise, divergence="exact", max_steps=steps, throw=False)(x[:4], None)
    assert bool(out["solver_failed"]) is failed and out["solver_failed"].shape == ()
  with pytest.raises(ValueError, match="uint8"):
    lk.dequantize(jax.random.PRNGKey(0), jnp.zeros((2, 4), jnp.float32))


# ------------------------------------------------------------------------------ images

def test_dequantize_and_bits_per_dim_by_hand():
  imgs = jnp.array([[0, 1, 127, 128, 254, 255]], jnp.uint8)
  y = np.asarray(lk.dequantize(jax.random.PRNGKey(0), imgs), np.float64)
  lo = np.array([0, 1, 127, 128, 254, 255]) / 128.0 - 1.0
  assert np.all(y >= lo) and np.all(y < lo + 1 / 128)
  # The training values (the `point` input): 0 -> -1, 255 -> +1, v/127.5 - 1 in between.
  np.testing.assert_allclose(np.asarray(lk.training_values(imgs))[0],
                             [-1.0, 1 / 127.5 - 1, 127 / 127.5 - 1, 128 / 127.5 - 1,
                              254 / 127.5 - 1, 1.0], atol=1e-7)
  # Many draws average to the bin centres (u ~ U[0, 1): mean 1/2, sd 1/sqrt(12) bins).
  big = jnp.broadcast_to(imgs, (20000, 6))
  mean = np.asarray(lk.dequantize(jax.random.PRNGKey(1), big)).mean(0)
  np.testing.assert_allclose(mean, lo + 1 / 256, atol=5 * (1 / 128) / math.sqrt(12 * 20000))
  # The uniform density on [-1, 1]^D (log p = -D ln 2) is the uniform over 256 levels:
  # exactly 8 bits per dimension with the 7-bit offset, 1 bit without.
  d = 3072
  assert float(lk.bits_per_dim(-d * math.log(2.0), d)) == pytest.approx(8.0, abs=1e-9)
  assert float(lk.bits_per_dim(-d * math.log(2.0), d, offset_bits=0.0)) == pytest.approx(1.0)
  assert lk.EIGHT_BIT_OFFSET == 7.0


def _gaussian_denoiser(mean, var):
  """The exact denoiser for data N(mean, var I): mean + var / (t^2 + var) (x - mean)."""
  def fn(x, t):
    t = t.reshape((-1,) + (1,) * (x.ndim - 1))
    return mean + var / (t ** 2 + var) * (x - mean)
  return fn


@pytest.mark.parametrize("dequant", [False, True])
def test_image_nll_gaussian_images_closed_form(dequant):
  """For 'images' modelled by N(0, v I) the ODE density at sigma_min is N(0, (v + sigma_min^2) I);
  dD/dx = c I, so a Rademacher probe gives the trace exactly and the answer is deterministic."""
  v = 0.25
  imgs = jax.random.randint(jax.random.PRNGKey(0), (4, 8, 8, 1), 0, 256).astype(jnp.uint8)
  key = jax.random.PRNGKey(7)
  out = jax.jit(lambda im, k: lk.image_nll(_gaussian_denoiser(0.0, v), im, k, sigma_min=SMIN,
                                           sigma_max=SMAX, dequantize=dequant))(imgs, key)
  # The documented key use: split(key) = (dequantization, probes).
  y = (lk.dequantize(jax.random.split(key)[0], imgs) if dequant
       else np.asarray(imgs, np.float64) / 127.5 - 1.0)
  y = np.asarray(y, np.float64).reshape(4, -1)
  logp = stats.multivariate_normal(np.zeros(64), (v + SMIN ** 2) * np.eye(64)).logpdf(y)
  # Prior mismatch: N(0, (v + 80^2) I) vs N(0, 80^2 I) at x_T; small but removed here.
  x_T = np.asarray(out["x_T"], np.float64).reshape(4, -1)
  mismatch = (stats.multivariate_normal(np.zeros(64), (v + SMAX ** 2) * np.eye(64)).logpdf(x_T)
              - np.asarray(out["prior_logp"]))
  bpd_ref = -(logp - mismatch) / (64 * math.log(2.0)) + 7.0
  np.testing.assert_allclose(np.asarray(out["bpd"]), bpd_ref, atol=1e-4)
  assert out["bpd"].shape == (4,)


# ------------------------------------------------------------------------------ ELBO

def _gaussian_elbo_reference(x, mean, var_model, sigma_lo, sigma_max):
  """E[bound] for a data point x under the exact denoiser of N(mean, var_model I): the prior
  and decoder terms in closed form, the integral of E[2 t div s + t |s|^2] by quadrature."""
  d = x.shape[-1]
  r2 = float(np.sum((x - mean) ** 2))

  def integrand(t):
    u = t ** 2 + var_model
    return 2 * t * (-d / u) + t * (r2 + d * t ** 2) / u ** 2   # E|s|^2 with x_t = x + t z

  integral, _ = integrate.quad(integrand, sigma_lo, sigma_max, limit=400,
                               points=[1e-2, 1e-1, 1.0, 10.0], epsabs=1e-10)
  prior = -0.5 * d * math.log(2 * math.pi * sigma_max ** 2) - (np.sum(x ** 2) + d * sigma_max ** 2) \
      / (2 * sigma_max ** 2)
  u0 = sigma_lo ** 2 + var_model
  err2 = r2 * sigma_lo ** 4 / u0 ** 2 + d * var_model ** 2 * sigma_lo ** 2 / u0 ** 2
  return prior - integral + 0.5 * d - err2 / (2 * sigma_lo ** 2)


@pytest.mark.parametrize("form", ["implicit", "dsm"])
def test_sde_elbo_gaussian_closed_form(form):
  """Data N(m, 0.3 I) in 4-D; models: the exact denoiser (bound tight: = log N(x; m, 0.3 I) up to
  2e-4) and a wrong one (variance 1.0: the bound is ~1 nat lower).  The Monte Carlo mean
  over 128 examples x 128 draws must sit within 4 standard errors of the expected bound."""
  d, v = 4, 0.3
  m = np.linspace(-1.0, 1.0, d)
  x = (m + math.sqrt(v) * np.random.default_rng(0).standard_normal((128, d))).astype(np.float32)
  slo = lk.ctm_elbo_sigma_lo()
  assert slo == pytest.approx(2.0501e-3, rel=1e-4)
  true = stats.multivariate_normal(m, v * np.eye(d)).logpdf(x)
  for var_model, key in [(v, 0), (1.0, 1)]:
    ref = np.array([_gaussian_elbo_reference(xi.astype(np.float64), m, var_model, slo, SMAX)
                    for xi in x])
    if var_model == v:
      assert np.abs(ref - true).max() < 1e-3       # the bound is tight for the exact model
    else:
      assert np.mean(true - ref) > 0.5             # and ~1 nat below for a wrong one
    fn = _gaussian_denoiser(jnp.asarray(m, jnp.float32), var_model)
    out = jax.jit(lambda x, k: lk.sde_elbo(fn, x, k, sigma_lo=slo, sigma_max=SMAX,
                                           num_samples=128, form=form))(
        jnp.asarray(x), jax.random.PRNGKey(key))
    est = np.asarray(out["elbo"], np.float64)
    se = math.sqrt(np.mean(np.asarray(out["elbo_std"], np.float64) ** 2) / (128 * 128))
    print(f"ELBO {form}, model var {var_model}: mean(est - expected) {np.mean(est - ref):+.3f} "
          f"nats, SE {se:.3f}, expected gap to log p {np.mean(true - ref):.3f}")
    assert abs(np.mean(est - ref)) < 4 * se
    assert se < 0.4
    np.testing.assert_allclose(np.asarray(out["elbo"]), np.asarray(out["prior"] + out["diffusion"]
                                                                  + out["decoder"]), atol=1e-4)
    assert int(out["nfe"]) == 256


def test_sde_elbo_mixture_exact_denoiser_is_tight():
  """With the exact score the SDE bound equals log p_0(x) of the mixture (data density at t=0)."""
  gm, x = _points_2d()
  x = x[:60]
  out = jax.jit(lambda x, k: lk.sde_elbo(gm.denoise, x, k, sigma_lo=SMIN, sigma_max=SMAX,
                                         num_samples=512))(x, jax.random.PRNGKey(3))
  err = np.asarray(out["elbo"], np.float64) - np.asarray(gm.log_prob(x, 0.0), np.float64)
  se = math.sqrt(np.mean(np.asarray(out["elbo_std"], np.float64) ** 2) / (60 * 512))
  print(f"2-D mixture ELBO - log p_0: {err.mean():+.3f} nats, SE {se:.3f}")
  assert abs(err.mean()) < 4 * se + 0.02   # + the decoder's O(sigma_lo^2 / 0.04^2) gap
  assert se < 0.3


# ------------------------------------------------------------------------------ protocols

def test_protocol_noise_levels_and_inputs_by_hand():
  """The named noise levels (CTM's decoder quirk 0.41302 = sigma(t_min) without ** rho, its ELBO
  / ODE start 2.0501e-3, score_sde's VP sigma(1e-5) = 1.0005e-3) and each protocol's input."""
  a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  levels = {n: lk.protocol_noise_levels(p, 0.002, 80.0, 7.0) for n, p in lk.PROTOCOLS.items()}
  assert levels["ctm"]["decoder_sigma"] == pytest.approx(a + 1e-3 * (b - a), rel=1e-12)
  assert levels["ctm"]["decoder_sigma"] == pytest.approx(0.41302, abs=1e-5)
  assert levels["ctm"]["ode_start"] == pytest.approx((a + 1e-3 * (b - a)) ** 7, rel=1e-12)
  assert levels["score_sde"]["ode_start"] == pytest.approx(
      math.sqrt(math.exp(0.1 * 1e-5 + 0.5 * 19.9 * 1e-10) - 1), rel=1e-9)
  assert levels["dequantized"]["ode_start"] == levels["point"]["ode_start"] == 0.002
  for n in ("dequantized", "point", "score_sde"):
    assert levels[n]["decoder_sigma"] == levels[n]["elbo_sigma_lo"] == levels["ctm"]["ode_start"]
  assert (lk.PROTOCOLS["ctm"].split, lk.PROTOCOLS["score_sde"].split) == ("train", "")
  imgs = jax.random.randint(jax.random.PRNGKey(0), (64, 2, 3, 1), 0, 256).astype(jnp.uint8)
  key = jax.random.PRNGKey(5)
  v = np.asarray(imgs, np.float64)
  u = np.asarray(jax.random.uniform(key, imgs.shape), np.float64)
  flip = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (64,)))
  want = {"dequantized": (v + u) / 128 - 1, "score_sde": (v + u) / 128 - 1,
          "point": v / 127.5 - 1,
          "ctm": np.where(flip[:, None, None, None], (v / 127.5 - 1)[:, :, ::-1], v / 127.5 - 1)}
  assert 10 < flip.sum() < 54
  for n, p in lk.PROTOCOLS.items():
    np.testing.assert_allclose(np.asarray(lk.protocol_inputs(p, imgs, key)), want[n], atol=1e-6,
                               err_msg=n)
  with pytest.raises(ValueError, match="protocol must be one of"):
    lk.protocol("ddpm")


# ~40 s each on the loaded 2-core CPU: slow (the fixture test covers 'ctm' in CI, and
# test_image_nll_gaussian_images_closed_form the dequantized / training-value inputs).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dequantized", "point", "score_sde", "ctm"])
def test_protocol_ode_gaussian_closed_form(name):
  """Data N(0, v I), its exact denoiser: the ODE density at the protocol's start sigma_s is
  N(0, (v + sigma_s^2) I) at the ODE's starting point (y, or y + sigma_s z for 'ctm', whose
  number also adds the decoder term D/2 - |y - D(y + 0.41302 z', 0.41302)|^2 / (2 0.41302^2),
  written out here in numpy) on the protocol's inputs, in bits/dim with the 7-bit offset.
  Solved at 1e-5 ('ctm' fixes the script's 1e-3, whose error here is 3e-3 bits/dim)."""
  p, v, dim = dataclasses_replace(lk.PROTOCOLS[name], ode_tol=1e-5), 0.25, 32
  imgs = jax.random.randint(jax.random.PRNGKey(0), (4, 4, 8, 1), 0, 256).astype(jnp.uint8)
  key = jax.random.PRNGKey(7)
  k_in, k_est = jax.random.split(key)
  fn = jax.jit(lambda im, k1, k2: lk.protocol_ode_logp(
      _gaussian_denoiser(0.0, v), lk.protocol_inputs(p, im, k1), k2, p, sigma_min=SMIN,
      sigma_max=SMAX, rho=7.0, rtol=1e-5, atol=1e-5))
  out = fn(imgs, k_in, k_est)
  lv = lk.protocol_noise_levels(p, SMIN, SMAX, 7.0)
  y = np.asarray(lk.protocol_inputs(p, imgs, k_in), np.float64).reshape(4, -1)
  k_z, _, k_d = jax.random.split(k_est, 3)     # the documented key use: (z, probes, z_dec)
  s0 = lv["ode_start"]
  x0 = y + (s0 * np.asarray(jax.random.normal(k_z, (4, 4, 8, 1))).reshape(4, -1)
            if name == "ctm" else 0.0)
  logp = stats.multivariate_normal(np.zeros(dim), (v + s0 ** 2) * np.eye(dim)).logpdf(x0)
  if name == "ctm":
    sd = lv["decoder_sigma"]
    x_lo = y + sd * np.asarray(jax.random.normal(k_d, (4, 4, 8, 1))).reshape(4, -1)
    den = v / (sd ** 2 + v) * x_lo
    logp = logp + dim / 2 - np.sum((y - den) ** 2, 1) / (2 * sd ** 2)
  x_T = np.asarray(out["x_T"], np.float64).reshape(4, -1)
  mismatch = (stats.multivariate_normal(np.zeros(dim), (v + SMAX ** 2) * np.eye(dim)).logpdf(x_T)
              - np.asarray(out["prior_logp"]))
  bpd = np.asarray(lk.bits_per_dim(out["logp"] + mismatch, dim))
  np.testing.assert_allclose(bpd, -logp / (dim * math.log(2.0)) + 7.0, atol=1e-4)
  want_tol = {"ctm": 1e-3, "score_sde": 1e-5}.get(name)
  assert lk.PROTOCOLS[name].ode_tol == want_tol


def _standin_denoiser(w, b):
  """The fixture's stand-in network (tests/fixtures/make_ctm_bpd_fixture.py), NHWC."""
  def fn(x, s):
    s = jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape[:1]).reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (s ** 2 + 0.25), s * 0.5 / jnp.sqrt(s ** 2 + 0.25)
    c_in = 1.0 / jnp.sqrt(s ** 2 + 0.25)
    flat = (c_in * x).reshape(x.shape[0], -1)
    f = jnp.tanh(flat @ w + b * jnp.log(s.reshape(-1, 1)) / 4).reshape(x.shape)
    return c_skip * x + c_out * f
  return fn


def test_ctm_protocol_matches_eval_bpd_fixture():
  """CTM's eval_bpd.py `elbo` and `likelihood(mode='correct')` run on a stand-in network
  (tests/fixtures/ctm_bpd.npz, its README row): the `ctm` protocol's ELBO terms (decoder at
  0.41302, one-draw prior, sigma_lo 2.05e-3) and its ODE number (start x + 2.05e-3 z, decoder
  residual) fed the same draws give the script's bits/dim to 1e-4."""
  z = np.load("tests/fixtures/ctm_bpd.npz")
  fn = _standin_denoiser(jnp.asarray(z["w"]), jnp.asarray(z["b"]))
  p = lk.PROTOCOLS["ctm"]
  x = lk.protocol_inputs(dataclasses_replace(p, flips=False), jnp.asarray(z["v"]),
                         jax.random.PRNGKey(0))
  lv = lk.protocol_noise_levels(p, SMIN, SMAX, 7.0)
  draws = dict(u=jnp.asarray(z["elbo_u"]), z=jnp.asarray(z["elbo_z"]),
               eps=2.0 * jnp.asarray(z["elbo_eps"]) - 1.0, z_lo=jnp.asarray(z["elbo_z_dec"]),
               z_prior=jnp.asarray(z["elbo_z_prior"]), dropout=jax.random.split(
                   jax.random.PRNGKey(0)))
  terms = lk.elbo_terms(fn, x, draws, sigma_lo=lv["elbo_sigma_lo"], sigma_max=SMAX,
                        decoder_sigma=lv["decoder_sigma"], prior=p.elbo_prior)
  bpd = np.asarray(lk.bits_per_dim(sum(terms), 48))
  print("ELBO bpd", bpd, "fixture", z["bpd_elbo"])
  np.testing.assert_allclose(bpd, z["bpd_elbo"], atol=1e-4)
  ode = jax.jit(lambda x, d: lk.protocol_ode_logp(
      fn, x, jax.random.PRNGKey(0), dataclasses_replace(p, ode_tol=1e-6), sigma_min=SMIN,
      sigma_max=SMAX, rho=7.0, draws=d))
  out = ode(x, dict(z=jnp.asarray(z["ode_z"]), probes=2.0 * jnp.asarray(z["ode_eps"])[None] - 1.0,
                    z_dec=jnp.asarray(z["ode_z_dec"])))
  bpd = np.asarray(lk.bits_per_dim(out["logp"], 48))
  print("ODE bpd", bpd, "fixture (solve_ivp 1e-9)", z["bpd_ode_tight"])
  np.testing.assert_allclose(bpd, z["bpd_ode_tight"], atol=1e-4)
