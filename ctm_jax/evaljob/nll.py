"""--mode=nll: per-example likelihoods of a data split through the score head, in shards.

Each quantity of config.eval.nll_metrics is its own resumable setting
(eval/step_<N>/<ema>/<metric>_<split>-<hash>/shard_*.npz, nll.json), one record each with the
mean and standard error over examples (ctm_jax/metrics/likelihood.py for the estimators):

  images (bits/dim, 7-bit offset: data in [-1, 1] from 256 levels, METHODS.md section 8), the
  inputs, split, mode and noise levels set by config.eval.nll_protocol (likelihood.PROTOCOLS:
  dequantized, point, score_sde, ctm; written into every record)
    bpd_ode                  PF-ODE density of the protocol's inputs (an upper bound on the
                             discrete NLL with uniform dequantization, Theis et al. 2016; a
                             point value without)
    bpd_elbo                 CTM's ELBO (eval_bpd.py): a variational bound through the reverse
                             SDE and a Gaussian decoder
  2-D points (nats)
    nll_ode                  -log p_{sigma_min}(x) by the PF-ODE; on toy_gmm also the exact
                             mixture's -log p_{sigma_min}(x) (its cross-entropy on the split,
                             about its entropy) and the per-point gap model - exact (KL).
Keys: batch b of shard i uses fold_in(fold_in(key(seed), i), b), split into (dequantization,
estimator): the dequantization noise is the same for every quantity and checkpoint.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from ctm_jax import data, fileio, parallel
from ctm_jax.evaljob import report
from ctm_jax.evaljob.common import (ODE_METRICS, base_record, batch_keys, finish, global_batch,
                                    metrics_for, nll_split, reuse)
from ctm_jax.evaljob.shards import ShardStore, settings_hash

LABELS = {
    "bpd_ode": "PF-ODE bits/dim of the protocol's inputs (see protocol_label)",
    "bpd_elbo": (
        "CTM's ELBO (eval_bpd.py) in bits/dim: the reverse SDE from N(0, sigma_max^2 I) and a "
        "Gaussian decoder at decoder_sigma (with decoder_sigma = sigma_lo an upper bound, in "
        "expectation, on the SDE model's NLL; Monte Carlo; see protocol_label)"),
    "nll_ode": "-log p_{sigma_min}(x) of the PF-ODE model, nats per point",
    "nll_exact_mixture": (
        "-log p_{sigma_min}(x) of the exact mixture (its cross-entropy on the split: an "
        "estimate of its entropy), nats per point"),
    "nll_gap_to_exact": (
        "model NLL - exact mixture NLL per point (estimates KL(p_data || p_model) at "
        "sigma_min), nats"),
}


def nll_data(job):
  """The NLL split's examples: uint8 images (or float points) and labels."""
  ev = job.ev
  got = data.load_split(job.config.data.dataset, nll_split(ev, job.config),
                        ev.data_dir or job.config.data.data_dir or None,
                        max_examples=ev.nll_num_examples or None)
  x = got["x"]
  if job.info.kind == "image":
    x = np.rint((x + 1.0) * 127.5).astype(np.uint8)
  return x, got.get("label")


def protocol(job):
  from ctm_jax.metrics import likelihood
  return likelihood.protocol(job.ev.nll_protocol)


def noise_levels(job) -> dict:
  from ctm_jax.metrics import likelihood
  sch = job.model.schedule
  return likelihood.protocol_noise_levels(protocol(job), sch.sigma_min, sch.sigma_max, sch.rho)


def ode_settings(job) -> dict:
  """The ODE solver settings in force: config.eval's, unless the protocol fixes them."""
  ev, p = job.ev, protocol(job)
  tol = p.ode_tol
  return dict(divergence=ev.nll_divergence, probes=ev.nll_probes,
              solver=p.ode_solver or ev.nll_solver, rtol=tol or ev.nll_rtol,
              atol=tol or ev.nll_atol)


def default_logp_fn(job):
  """log p(x) by the PF-ODE of the score head g(x, t, t) under the protocol (eval mode; on
  2-D points sigma_min -> sigma_max)."""
  from ctm_jax.metrics import likelihood
  ev, sch, o = job.ev, job.model.schedule, ode_settings(job)
  p = protocol(job) if job.info.kind == "image" else likelihood.PROTOCOLS["dequantized"]

  def fn(params, x, key, labels):
    return likelihood.protocol_ode_logp(
        job.model.denoise_fn(params, labels), x, key, p, sigma_min=sch.sigma_min,
        sigma_max=sch.sigma_max, rho=sch.rho, divergence=o["divergence"],
        num_probes=o["probes"], solver=o["solver"], rtol=o["rtol"], atol=o["atol"],
        max_steps=ev.nll_max_steps,
        throw=False)        # no host callback in the program: checked in per_example
  return fn


def elbo_fn(job):
  """CTM's ELBO of the score head as the 'logp' of `sde_elbo`, in the protocol's mode."""
  from ctm_jax.metrics import likelihood
  ev, sch, p, lv = job.ev, job.model.schedule, protocol(job), noise_levels(job)

  def fn(params, x, key, labels):
    if p.train_mode:
      den = lambda y, t, k: job.model.denoiser(params, y, t, None, labels, train=True, rng=k)
    else:
      den = job.model.denoise_fn(params, labels)
    out = likelihood.sde_elbo(den, x, key, sigma_lo=lv["elbo_sigma_lo"],
                              sigma_max=sch.sigma_max, num_samples=ev.nll_elbo_samples,
                              form=ev.nll_elbo_form, decoder_sigma=lv["decoder_sigma"],
                              prior=p.elbo_prior, dropout=p.train_mode)
    return dict(out, logp=out["elbo"])
  return fn


def _inputs(protocol_name: str, xb, key):
  """(model input, estimator key) of a batch: the protocol's image inputs from the first half
  of the key (dequantization noise, flips), or the points."""
  from ctm_jax.metrics import likelihood
  k_deq, k_est = jax.random.split(key)
  if protocol_name:
    return likelihood.protocol_inputs(likelihood.protocol(protocol_name), xb, k_deq), k_est
  return xb, k_est


def metric_settings(job, metric: str, split: str, n: int, step, ema) -> dict:
  ev = job.ev
  s = {"kind": "nll", "metric": metric, "split": split, "num_examples": n, "step": step,
       "ema": ema, "seed": ev.seed, "batch_size": ev.nll_batch_size, "shard_size": ev.shard_size}
  if job.info.kind == "image":
    s["protocol"] = ev.nll_protocol
  if metric in ODE_METRICS:
    s.update({k: ev[k] for k in ("nll_divergence", "nll_probes", "nll_solver", "nll_rtol",
                                 "nll_atol", "nll_max_steps")})
  else:
    s.update(nll_elbo_samples=ev.nll_elbo_samples, nll_elbo_form=ev.nll_elbo_form)
  return s


def estimator(job, kind: str) -> Callable:
  """jit(params, y, key, labels) -> the (B,) outputs of the PF-ODE ('ode') or the ELBO
  ('elbo'), built once per job: the two ODE quantities share one compiled solve."""
  if ("nll", kind) not in job.cache:
    fn = (job.logp_fn or default_logp_fn(job)) if kind == "ode" else elbo_fn(job)

    def run(params, y, key, labels):
      return {k: jnp.asarray(v) for k, v in fn(params, y, key, labels).items()
              if jnp.ndim(v) <= 1}
    job.cache[("nll", kind)] = jax.jit(run)
  return job.cache[("nll", kind)]


_inputs_jit = jax.jit(_inputs, static_argnums=0)


def per_example(job, metric: str, params, x_all, y_all, store: ShardStore,
                label: str) -> Dict[str, np.ndarray]:
  """The sharded per-example outputs of the metric's estimator (logp and its (B,)
  diagnostics), with bits/dim for images and the exact log-density on toy_gmm."""
  ev, nb, cond = job.ev, job.ev.nll_batch_size, job.num_classes > 0
  image = job.info.kind == "image"
  dim = int(np.prod(job.info.shape))
  exact = job.config.data.dataset == "toy_gmm" and metric == "nll_ode"
  logp = estimator(job, "ode" if metric in ODE_METRICS else "elbo")

  pname = ev.nll_protocol if image else ""

  def batch(params, xb, key, labels):
    y, k_est = _inputs_jit(pname, xb, key)
    return logp(params, y, k_est, labels)

  def compute(i, start, count):
    rows = {}
    for b in range(-(-count // nb)):
      lo = start + b * nb
      idx = np.minimum(np.arange(lo, lo + nb), start + count - 1)   # pad the last batch, cut
      labels = global_batch(job.mesh, y_all[idx].astype(np.int32)) if cond else None
      out = parallel.to_host(batch(params, global_batch(job.mesh, x_all[idx]),
                                   batch_keys(ev.seed, i, b), labels))
      n = min(nb, start + count - lo)
      if np.any(out.pop("solver_failed", False)):
        raise RuntimeError(
            f"{metric}: the PF-ODE solve of examples {lo}..{lo + n - 1} stopped at the maximum "
            f"number of solver steps, config.eval.nll_max_steps = {ev.nll_max_steps} (nothing "
            f"of this shard was saved); raise it or loosen nll_rtol / nll_atol")
      for k, v in out.items():
        v = np.asarray(v)
        rows.setdefault(k, []).append(v[:n] if v.ndim == 1 and len(v) == nb else
                                      np.full((n,), v, v.dtype))
    rows = {k: np.concatenate(v) for k, v in rows.items()}
    if image:
      from ctm_jax.metrics import likelihood
      rows["bits_per_dim"] = np.asarray(likelihood.bits_per_dim(rows["logp"], dim), np.float64)
    if exact:
      from ctm_jax.oracle import toy_mixture_2d
      rows["logp_exact"] = np.asarray(toy_mixture_2d().log_prob(
          jnp.asarray(x_all[start:start + count], jnp.float32), job.model.schedule.sigma_min),
          np.float64)
    return rows

  return store.run(compute, label, ev.recompute)


def metric_records(job, metric: str, out: Dict[str, np.ndarray], base: dict) -> List[dict]:
  """The records of one quantity: mean +- standard error over examples, labelled."""
  ev = job.ev
  image = job.info.kind == "image"
  per = out["bits_per_dim"] if image else -out["logp"].astype(np.float64)
  rec = dict(base, unit="bits/dim" if image else "nats", num_examples=int(len(per)))
  lv = noise_levels(job)
  if image:
    p = protocol(job)
    rec.update(protocol=p.name, protocol_label=p.label, inputs=p.inputs,
               dequantization="uniform" if p.inputs == "uniform" else "none", flips=p.flips,
               train_mode=p.train_mode and metric == "bpd_elbo", offset_bits=7.0)
  if metric in ODE_METRICS:
    rec.update(ode_settings(job), sigma_start=lv["ode_start"] if image else
               job.model.schedule.sigma_min)
    if image and protocol(job).ode_residual:
      rec["decoder_sigma"] = lv["decoder_sigma"]
  else:
    rec.update(elbo_samples=ev.nll_elbo_samples, elbo_form=ev.nll_elbo_form,
               sigma_lo=lv["elbo_sigma_lo"], decoder_sigma=lv["decoder_sigma"],
               elbo_prior=protocol(job).elbo_prior)
  if "nfe" in out:
    rec["nfe_mean"] = float(np.mean(out["nfe"]))
  recs = [dict(rec, metric=metric, label=LABELS[metric], **_value_se(per))]
  if "logp_exact" in out:
    exact = -out["logp_exact"]
    recs.append(dict(rec, metric="nll_exact_mixture", label=LABELS["nll_exact_mixture"],
                     **_value_se(exact)))
    recs.append(dict(rec, metric="nll_gap_to_exact", label=LABELS["nll_gap_to_exact"],
                     **_value_se(per - exact)))
  return recs


def _value_se(v) -> dict:
  """The mean over examples and its standard error (std ddof 1 / sqrt n; None for one)."""
  v = np.asarray(v, np.float64)
  se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
  return {"value": float(np.mean(v)), "stderr": se}


def nll_setting(job, params, step, ema) -> List[dict]:
  """Every quantity of config.eval.nll_metrics for one checkpoint and EMA."""
  ev = job.ev
  x_all, y_all = nll_data(job)
  split = nll_split(ev, job.config)
  recs = []
  for metric in metrics_for(ev, job.info):
    t0 = time.time()
    s = metric_settings(job, metric, split, len(x_all), step, ema)
    d = fileio.join(report.eval_dir(job.workdir), f"step_{step:08d}", ema,
                     f"{metric}_{split}-{settings_hash(s)}")
    result = fileio.join(d, "nll.json")
    got = reuse(job, result)
    if got is not None:
      recs.extend(got)
      continue
    store = ShardStore(d, s, len(x_all), ev.shard_size)
    out = per_example(job, metric, params, x_all, y_all, store,
                      f"{metric} {split} (step {step}, {ema})")
    base = dict(base_record(job, None, step, ema), split=split, shards=d)
    new = [dict(r, seconds=time.time() - t0) for r in metric_records(job, metric, out, base)]
    recs.extend(finish(job, result, new, []))
  return recs
