"""The evaluation jobs of python -m launch.eval: samples, FID / KID, NLL and FID reference
statistics of a trained run, as resumable sharded batch jobs (docs/evaluation.md).

Layout under the run's workdir (each setting directory is named by its sampler or split and
a hash of every setting that determines its content, written out in its manifest.json, so
files of different settings never mix):
  eval/step_<N>/<ema>/<sampler>-<hash>/samples/shard_00000.npz   uint8 images / float points
  eval/step_<N>/<ema>/<sampler>-<hash>/features-<weights sha>/shard_*.npz   2048-d float32
  eval/step_<N>/<ema>/<sampler>-<hash>/{grid.png, fid-*.json, samples-*.json, toy-*.json}
  eval/step_<N>/<ema>/<nll metric>_<split>-<hash>/shard_*.npz, nll.json  per-example log p
                                                                  (ctm_jax/evaljob/nll.py)
  eval/teacher/<sampler>-<hash>/...                               CTM runs: the teacher's samples
  eval/results.jsonl, eval/plots/*.png, eval/invocations/<time>.json, TensorBoard under eval/
Keys: x_T and sampler noise of batch b of shard i come from fold_in(fold_in(key(seed), i), b);
NLL dequantization and probes likewise.  A finished setting (its result file exists) is
reused unless config.eval.recompute.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ctm_jax import config_lib, data, evaluate, fileio, parallel, runs, samplers, visualize
from ctm_jax.evaljob import nll, report, settings
from ctm_jax.evaljob.common import (FeatureFn, Job, LogpFn, base_record, batch_keys, finish,
                                    global_batch, reuse)
from ctm_jax.evaljob.shards import ShardStore, file_sha256, settings_hash, write_json_atomic
from ctm_jax.progress import format_duration

NETWORK = "Inception-v3 2015-12-05 (FID), pool3 2048-d"
RESIZE = "299x299 bilinear (TF1 legacy resize), (x - 128) / 128, gray -> 3 channels"

def eval_mesh(config, devices=None):
  """Every device on the data axis; the run's fsdp axis kept when it divides the count."""
  devices = jax.devices() if devices is None else list(devices)
  fsdp = int(config.mesh.fsdp)
  if len(devices) % fsdp:
    fsdp = 1
  return parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": fsdp}), devices)


def _put_replicated(mesh, tree):
  return jax.device_put(tree, parallel.replicated(mesh))


# ----------------------------------------------------------------------------- sampling

def make_batch_sampler(job: Job, fn):
  """jit(params, key, labels) -> one global batch of samples, batch-sharded: x_T from the
  first half of key, the sampler's noise from the second; images as uint8."""
  shape = (job.ev.batch_size,) + tuple(job.info.shape)
  sigma_max = job.config.diffusion.sigma_max
  sh = parallel.batch_sharding(job.mesh)
  image = job.info.kind == "image"
  rule = settings.uint8_rule(job.ev, job.config) if image else None

  def run(params, key, labels):
    k_x, k_s = jax.random.split(key)
    x = jax.lax.with_sharding_constraint(samplers.initial_noise(k_x, shape, sigma_max), sh)
    out = fn(params, x, k_s, labels)
    return samplers.to_uint8(out, rule) if image else out.astype(jnp.float32)

  return jax.jit(run, out_shardings=sh)


def _labels(job: Job, start: int, n: int) -> Optional[np.ndarray]:
  if not job.num_classes:
    return None
  if job.ev.class_label >= 0:
    return np.full((n,), job.ev.class_label, np.int32)
  return (np.arange(start, start + n) % job.num_classes).astype(np.int32)


def sample_settings(job: Job, spec, step, ema) -> dict:
  s = {"kind": "samples", "sampler": spec.name, "seed": job.ev.seed,
       "batch_size": job.ev.batch_size, "shard_size": job.ev.shard_size,
       "class_label": job.ev.class_label, "step": step, "ema": ema,
       "shape": list(job.info.shape), "dataset": job.config.data.dataset}
  if job.info.kind == "image":
    s["uint8_rule"] = settings.uint8_rule(job.ev, job.config)
  if getattr(spec, "cm", False):
    s["clip_x0"] = samplers.clips_x0(job.config)
  return s


def setting_dir(job: Job, spec, step, ema) -> str:
  s = sample_settings(job, spec, step, ema)
  base = (fileio.join(report.eval_dir(job.workdir), "teacher") if spec.kind == "teacher_heun"
          else fileio.join(report.eval_dir(job.workdir), f"step_{step:08d}", ema))
  return fileio.join(base, f"{spec.safe_name}-{settings_hash(s)}")


def draw_samples(job: Job, spec, params, step, ema) -> Dict[str, np.ndarray]:
  """All job.ev.num_samples samples of one setting, from its shards (computed if missing)."""
  if spec.kind == "teacher_heun":
    teacher, params = job_teacher(job)
    fn = evaluate.teacher_sampler_fn(teacher, spec, job.model.schedule)
  else:
    fn = evaluate.sampler_fn(job.model, spec, evaluate.generator_kind(job.config),
                             samplers.clips_x0(job.config))
  run = make_batch_sampler(job, fn)
  ev = job.ev
  bs = ev.batch_size
  store = ShardStore(fileio.join(setting_dir(job, spec, step, ema), "samples"),
                     sample_settings(job, spec, step, ema), ev.num_samples, ev.shard_size)

  def compute(i, start, count):
    xs, ys = [], []
    for b in range(-(-count // bs)):
      lab = _labels(job, start + b * bs, bs)
      out = run(params, batch_keys(ev.seed, i, b), None if lab is None else global_batch(job.mesh, lab))
      xs.append(np.asarray(parallel.to_host(out)))
      if lab is not None:
        ys.append(lab)
    arrays = {"x": np.concatenate(xs)[:count]}
    if ys:
      arrays["label"] = np.concatenate(ys)[:count]
    return arrays

  return store.run(compute, f"samples {spec.name} (step {step}, {ema})", ev.recompute)


def job_teacher(job: Job):
  """(Teacher, its params on the mesh) of a distilled run, built once."""
  if job._teacher is None:
    from ctm_jax import teacher as teacher_lib
    t = teacher_lib.Teacher(job.config)
    job._teacher = (t, _put_replicated(job.mesh, t.params()))
  return job._teacher


def save_grid(job: Job, x: np.ndarray, path: str) -> str:
  if jax.process_index() == 0:
    pic = visualize.image_grid(x[:256] if x.dtype == np.uint8 else
                               np.asarray(samplers.to_uint8(jnp.asarray(x[:256]))))
    visualize.save_png(path, pic, scale=4 if job.info.shape[0] < 32 else 1)
  return path


# ----------------------------------------------------------------------------- modes

def sample_setting(job: Job, spec, params, step, ema, t0: float) -> List[dict]:
  """--mode=sample: the samples, a picture, and for 2-D data MMD / sliced W1 with their two
  references (exact denoiser with the same Heun sampler; two independent data sets)."""
  ev = job.ev
  d = setting_dir(job, spec, step, ema)
  points = job.info.kind != "image"
  result = fileio.join(d, f"{'toy' if points else 'samples'}-n{ev.num_samples}-"
                           f"{settings_hash({'seeds': ev.reference_seeds})}.json")
  got = reuse(job, result)
  if got is not None:
    return got
  out = draw_samples(job, spec, params, step, ema)
  rec = dict(base_record(job, spec, step, ema), num_samples=ev.num_samples,
             samples=fileio.join(d, "samples"))
  if not points:
    rec["uint8_rule"] = settings.uint8_rule(ev, job.config)
  if not points:
    grid = save_grid(job, out["x"], fileio.join(d, "grid.png"))
    return finish(job, result, [dict(rec, metric="samples", value=ev.num_samples,
                                     seconds=time.time() - t0, grid=grid)], [grid])
  ref = evaluate.reference_points(job.config, ev.num_samples)
  met = evaluate.toy_metrics(out["x"], ref)
  refs = {"two_sample": job.reference("two_sample", evaluate.two_sample_reference,
                                       ev.num_samples, ev.reference_seeds)}
  if job.config.data.dataset == "toy_gmm":
    steps = spec.steps if spec.kind in ("heun", "teacher_heun") else job.config.sampling.heun_steps
    refs["exact_denoiser_heun"] = dict(job.reference(
        "exact_denoiser", evaluate.exact_denoiser_reference, ev.num_samples, steps,
        ev.reference_seeds), heun_steps=steps)
  pic = report.points_figure(out["x"], ref, fileio.join(d, "points.png"),
                             f"{spec.name}, step {step}")
  recs = []
  for k in ("mmd", "sliced_w1"):
    recs.append(dict(rec, metric=k, value=met[k], seconds=time.time() - t0, picture=pic,
                     references={n: {"mean": r.get(k), "std": r.get(k + "_std"), "seeds":
                                     ev.reference_seeds} for n, r in refs.items() if r}))
  return finish(job, result, recs, [p for p in (pic,) if p])


def image_features(job: Job, images: np.ndarray, directory: str, manifest: dict,
                   what: str) -> np.ndarray:
  """The feature function over `images`, cached in shards in `directory` (resumable; manifest
  + the weights and shard size).  With config.eval.sfid the rows hold pool3 and sFID's spatial
  features, in their own shards (`directory`-sfid)."""
  ev = job.ev
  suffix, kind = ("-sfid", {"spatial": True}) if ev.sfid else ("", {})
  store = ShardStore(directory + suffix, {**manifest, "weights_sha256": job.feature_id,
                                          "shard_size": ev.shard_size, **kind},
                     len(images), ev.shard_size)
  return store.run(lambda i, start, count: {"features": compute_features(
      job.feature_fn, images[start:start + count], ev.batch_size)}, what, ev.recompute)["features"]


def split_features(feats: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """(pool3 (N, 2048), spatial (N, 2023) or None) of the feature function's rows."""
  dim = settings.FEATURE_DIM
  return feats[:, :dim], (feats[:, dim:] if feats.shape[1] > dim else None)


def feature_shards(job: Job, samples: Dict[str, np.ndarray], d: str) -> np.ndarray:
  """The Inception features of a setting's samples, cached in shards beside them."""
  return image_features(job, samples["x"][:job.ev.num_samples],
                        fileio.join(d, f"features-{job.feature_id[:12]}"),
                        {"kind": "features", "samples": fileio.basename(d)},
                        f"features {fileio.basename(d)}")


def compute_features(feature_fn: FeatureFn, images: np.ndarray, batch: int) -> np.ndarray:
  """feature_fn over fixed-size batches (the last padded by repeating rows, then cut)."""
  out = []
  for s in range(0, len(images), batch):
    chunk = images[s:s + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, 0)])
    out.append(np.asarray(feature_fn(chunk), np.float32)[:n])
  return np.concatenate(out)


def fid_setting(job: Job, spec, params, step, ema, ref: dict, t0: float) -> List[dict]:
  """--mode=fid: samples (reused from disk when there), their features, FID and KID against
  the reference statistics."""
  from ctm_jax.metrics import fid
  ev = job.ev
  d = setting_dir(job, spec, step, ema)
  extra = {k: True for k in ("inception_score", "precision_recall", "sfid") if ev[k]}
  key = settings_hash({"ref": ref["sha256"], "weights": job.feature_id,
                       "kid": [ev.kid_subsets, ev.kid_subset_size], **extra})
  result = fileio.join(d, f"fid-n{ev.num_samples}-{key}.json")
  got = reuse(job, result)
  if got is not None:
    return got
  samples = draw_samples(job, spec, params, step, ema)
  grid = save_grid(job, samples["x"], fileio.join(d, "grid.png"))
  feats, spatial = split_features(feature_shards(job, samples, d))
  value = fid.frechet_distance_from_features(feats, ref["mu"], ref["sigma"])
  rec = dict(base_record(job, spec, step, ema), num_samples=len(feats),
             uint8_rule=settings.uint8_rule(ev, job.config), ref_stats=ref["path"],
             ref_stats_sha256=ref["sha256"], ref_count=ref["count"],
             weights=fileio.absolute(ev.inception_weights), weights_sha256=job.feature_id,
             network=NETWORK, resize=RESIZE, samples=fileio.join(d, "samples"), grid=grid)
  recs = [dict(rec, metric="fid", value=value, stderr=None, seconds=time.time() - t0)]
  if ref.get("features") is not None:
    recs.append(kid_record(dict(rec, metric="kid"), feats, ref["features"], ev, t0))
  recs.extend(guided_records(job, rec, feats, spatial, ref, t0))
  return finish(job, result, recs, [grid])


def guided_records(job: Job, rec: dict, feats: np.ndarray, spatial: Optional[np.ndarray],
                   ref: dict, t0: float) -> List[dict]:
  """config.eval.sfid / inception_score / precision_recall: guided-diffusion evaluator's sFID
  (the Frechet distance of the spatial features to the reference's mu_s, sigma_s), IS (pool3 @
  the logits matrix, splits of 5000) and precision / recall (k = 3) against the reference
  features, from the samples' features (ctm_jax/metrics/guided_eval.py)."""
  from ctm_jax.metrics import fid, guided_eval
  from ctm_jax.nets import inception
  ev, out = job.ev, []
  if ev.sfid:
    out.append(dict(rec, metric="sfid", value=fid.frechet_distance_from_features(
        spatial, ref["mu_s"], ref["sigma_s"]), stderr=None, seconds=time.time() - t0))
  if ev.inception_score:
    if "logits" not in job.cache:
      job.cache["logits"] = inception.load_logits_weight(ev.inception_weights)
    got = guided_eval.inception_score(guided_eval.pool3_logits(feats, job.cache["logits"]))
    out.append(dict(rec, metric="inception_score", value=got["value"], stderr=None,
                    is_split_std=got["std"], is_splits=got["splits"],
                    is_split_size=guided_eval.IS_SPLIT_SIZE, seconds=time.time() - t0))
  if ev.precision_recall:
    got = guided_eval.precision_recall(reference_features(job, ref), feats)
    for m in ("precision", "recall"):
      out.append(dict(rec, metric=m, value=got[m], stderr=None, k=got["k"],
                      seconds=time.time() - t0))
  return out


def kid_record(rec: dict, feats_a: np.ndarray, feats_b: np.ndarray, ev, t0: float) -> dict:
  """rec with KID (fid.kid: disjoint blocks of at most half of each set) as value +- stderr,
  and the subset size, subset count, blocks per partition and partitions it used."""
  from ctm_jax.metrics import fid
  got = fid.kid(feats_a, feats_b, num_subsets=ev.kid_subsets, subset_size=ev.kid_subset_size,
                seed=ev.seed)
  return dict(rec, value=got["value"], stderr=got["stderr"], kid_subset_size=got["subset_size"],
              kid_subsets=got["num_subsets"], kid_blocks=got["blocks"],
              kid_partitions=got["partitions"], seconds=time.time() - t0)


def fid_stats(job: Job) -> List[dict]:
  """--mode=fid_stats: mu, sigma and the features (for KID) of a split of the run's data set,
  in EDM's .npz layout, with the data set, split, resolution and count in its meta; plus
  the FID / KID of one half of the split against the other (the data's own level)."""
  from ctm_jax.metrics import fid
  ev, t0 = job.ev, time.time()
  path = settings.stats_path(job.config, ev, job.workdir)
  if fileio.exists(path) and not ev.recompute:
    if not ev.sfid or fid.load_stats(path, feature_dim=None)["mu_s"] is not None:
      logging.info("reference statistics exist (config.eval.recompute=True redoes them): %s",
                   path)
      job.files.append(path)
      return []
    logging.info("%s has no sFID statistics (config.eval.sfid = True): adding them", path)
  data_dir = ev.data_dir or job.config.data.data_dir or None
  images = np.concatenate([   # 'train+test': the splits one after the other
      np.rint((data.load_split(job.config.data.dataset, part, data_dir)["x"] + 1.0) * 127.5)
      .astype(np.uint8) for part in ev.fid_split.split("+")])
  feats, spatial = split_features(image_features(
      job, images, f"{path}.shards-{job.feature_id[:12]}",
      {"kind": "data_features", "dataset": job.config.data.dataset, "split": ev.fid_split,
       "count": len(images)}, f"features of {job.config.data.dataset}/{ev.fid_split}"))
  mu, sigma = fid.feature_statistics(feats)
  mu_s, sigma_s = fid.feature_statistics(spatial) if ev.sfid else (None, None)
  if jax.process_index() == 0:
    fid.save_stats(path, mu, sigma, features=feats, mu_s=mu_s, sigma_s=sigma_s,  # atomic
                   dataset=job.config.data.dataset,
                   split=ev.fid_split, resolution=list(job.info.shape), count=len(feats),
                   weights_sha256=job.feature_id, network=NETWORK, resize=RESIZE)
  rng = np.random.default_rng(ev.seed)
  perm = rng.permutation(len(feats))
  a, b = feats[perm[:len(feats) // 2]], feats[perm[len(feats) // 2:2 * (len(feats) // 2)]]
  rec = dict(base_record(job), metric="fid_data_halves", split=ev.fid_split,
             value=fid.frechet_distance_from_features(a, *fid.feature_statistics(b)), stderr=None,
             num_samples=len(a), ref_stats=path, weights=fileio.absolute(ev.inception_weights),
             weights_sha256=job.feature_id, network=NETWORK, resize=RESIZE)
  recs = [dict(rec, seconds=time.time() - t0),
          kid_record(dict(rec, metric="kid_data_halves"), a, b, ev, t0)]
  return finish(job, fileio.join(fileio.dirname(path), fileio.basename(path) + ".json"),
                recs, [path])


def load_reference(job: Job) -> dict:
  from ctm_jax.metrics import fid
  path = settings.stats_path(job.config, job.ev, job.workdir)
  stats = fid.load_stats(path, feature_dim=None)
  settings.check_reference_stats(path, job.config, job.ev, stats)
  feats, images = stats.get("features"), stats.get("images")
  meta = stats.get("meta") or {}
  count = meta.get("count", len(feats) if feats is not None else
                   (len(images) if images is not None else None))
  return {"mu": stats["mu"], "sigma": stats["sigma"], "features": feats, "images": images,
          "mu_s": stats.get("mu_s"), "sigma_s": stats.get("sigma_s"), "path": path,
          "sha256": file_sha256(path), "count": count}


def reference_features(job: Job, ref: dict) -> np.ndarray:
  """The reference set's pool3 features: the statistics file's own, or those of its images
  (a guided-diffusion reference batch's arr_0, as the evaluator computes them), cached in
  shards under <workdir>/eval/ref_features/."""
  if ref.get("features") is not None:
    return ref["features"]
  feats = image_features(
      job, ref["images"], fileio.join(job.workdir, "eval", "ref_features",
                                      f"{ref['sha256'][:12]}-{job.feature_id[:12]}"),
      {"kind": "reference_features", "ref_stats_sha256": ref["sha256"]},
      f"features of the reference images of {fileio.basename(ref['path'])}")
  ref["features"] = split_features(feats)[0]
  return ref["features"]


# ----------------------------------------------------------------------------- driver

def setup_features(job: Job, feature_fn: Optional[FeatureFn], feature_id: Optional[str]):
  """The Inception feature function from config.eval.inception_weights (or the one given)."""
  if feature_fn is not None:
    job.feature_fn, job.feature_id = feature_fn, feature_id or "given"
    return
  from ctm_jax.nets import inception
  try:
    params = inception.load_inception_params(job.ev.inception_weights)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.eval.inception_weights: {e}") from None
  job.feature_fn = inception.make_feature_fn(params, job.mesh, spatial=bool(job.ev.sfid))
  job.feature_id = file_sha256(job.ev.inception_weights)


def run(workdir: str, mode: str, ev, config, *, feature_fn: Optional[FeatureFn] = None,
        feature_id: Optional[str] = None, logp_fn: Optional[LogpFn] = None,
        argv: Optional[List[str]] = None, devices=None,
        checkpoint_file: str = "") -> Dict[str, Any]:
  """Run one evaluation invocation; returns its summary (records, files, paths).

  ev is the merged config.eval; everything is validated before any compute.  feature_fn /
  logp_fn replace the Inception network / the PF-ODE likelihood; devices, a subset of the
  devices to use (default all).  checkpoint_file: evaluate the network of an official-format
  state dict (a CTM `ema_*.pt`, a .npz export) built as `config` describes, instead of the
  workdir's checkpoints; its results go under workdir as step 0, EMA `file-<name>`.
  """
  t_start = time.time()
  mesh = eval_mesh(config, devices)
  settings.validate(ev, config, mode=mode, num_devices=mesh.size,
                    process_count=jax.process_count(), workdir=workdir)
  if checkpoint_file:
    steps, emas = [0], [file_ema_name(checkpoint_file)]
  else:
    steps = settings.checkpoint_steps(ev, workdir) if mode != "fid_stats" else []
    emas = settings.ema_list(ev, config)
  specs = settings.sampler_specs(ev, config) if mode in ("sample", "fid", "all") else []
  job = Job(workdir=workdir, config=config, ev=ev, mode=mode, mesh=mesh,
            info=data.dataset_info(config.data.dataset), model=runs.build_model(config),
            invocation=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}", logp_fn=logp_fn,
            checkpoint_file=checkpoint_file)
  if checkpoint_file:       # read and matched against the network before any compute
    job.cache["checkpoint_file_params"] = _load_file(job)
  if settings.needs_fid(mode):
    setup_features(job, feature_fn, feature_id)
  ref = load_reference(job) if mode in ("fid", "all") else None
  logging.info("eval %s of %s: steps %s, EMAs %s, samplers %s, %d devices, %d processes",
               mode, workdir, steps, emas, [s.name for s in specs], jax.device_count(),
               jax.process_count())

  if mode == "fid_stats":
    fid_stats(job)
  own = [s for s in specs if s.kind != "teacher_heun"]
  teacher_specs = [s for s in specs if s.kind == "teacher_heun"]
  for step in steps:
    for ema in emas:
      params = None
      for spec in own:
        params = params if params is not None else _load(job, step, ema)
        t0 = time.time()
        if mode == "sample":
          sample_setting(job, spec, params, step, ema, t0)
        else:
          fid_setting(job, spec, params, step, ema, ref, t0)
      if settings.needs_nll(mode):
        params = params if params is not None else _load(job, step, ema)
        nll.nll_setting(job, params, step, ema)
      if (mode == "sample" and config.data.dataset == "toy_gmm"
          and evaluate.one_step_generator(config) and own):
        _toy_ode_error(job, params, step, ema)
  for spec in teacher_specs:
    t0 = time.time()
    if mode == "sample":
      sample_setting(job, spec, None, None, "teacher", t0)
    else:
      fid_setting(job, spec, None, None, "teacher", ref, t0)
  return _close(job, argv, t_start)


def _load(job: Job, step: int, ema: str):
  if job.checkpoint_file:
    return job.cache["checkpoint_file_params"]
  params, _, _ = runs.load_params(job.config, job.workdir, step, ema, mesh=job.mesh)
  return params


def file_ema_name(path: str) -> str:
  """The EMA label of an official checkpoint file's results: `file-<its name>`."""
  stem = os.path.splitext(os.path.basename(path))[0]
  return "file-" + re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _load_file(job: Job):
  """The run network's parameters from job.checkpoint_file (torch names; every tensor used)."""
  from ctm_jax import official_weights
  from ctm_jax.nets import torch_port
  sd = official_weights.load_state_dict_file(job.checkpoint_file)
  try:
    params = torch_port.load_torch_state_dict(job.model.net, sd)
  except ValueError as e:
    raise config_lib.ConfigError(f"--checkpoint={job.checkpoint_file}: not the network the run "
                                 f"config describes: {e}") from None
  logging.info("eval: parameters from %s (%d tensors)", job.checkpoint_file, len(sd))
  return _put_replicated(job.mesh, params)


def _toy_ode_error(job: Job, params, step, ema):
  n = job.ev.ode_error_samples
  result = fileio.join(report.eval_dir(job.workdir), f"step_{step:08d}", ema,
                        f"ode_error-n{n}-seed{job.ev.seed}.json")
  if reuse(job, result) is not None:
    return
  t0 = time.time()
  got = evaluate.toy_ode_error(job.config, job.model, jax.device_get(params), n, job.ev.seed)
  finish(job, result, [dict(base_record(job, None, step, ema), metric="ode_error",
                            value=got["ode_error"], num_samples=n,
                            data_variance_per_dim=got["data_variance_per_dim"],
                            reference="scipy DOP853 rtol=atol=1e-9 on the exact mixture PF-ODE",
                            seconds=time.time() - t0)], [])


def _close(job: Job, argv, t_start) -> Dict[str, Any]:
  """Plots from results.jsonl, TensorBoard scalars, and this invocation's summary file."""
  new = [r for r in job.records if not r.get("reused")]
  if new:
    report.write_scalars(job.workdir, new)
  plots = []
  all_recs = [r for r in report.read_records(job.workdir)
              if r.get("workdir") == fileio.absolute(job.workdir)]
  touched = {(r.get("step"), r.get("ema")) for r in job.records if r.get("metric") == "fid"}
  pdir = fileio.join(report.eval_dir(job.workdir), "plots")
  for step, ema in sorted(touched, key=str):
    rows = [r for r in all_recs if r.get("step") == step and r.get("ema") == ema]
    for metric in ("fid", "kid"):
      plots.append(report.plot_fid_vs_nfe(
          rows, fileio.join(pdir, f"{metric}_vs_nfe-step{step}-{ema}.png"), metric))
  if touched:
    plots.append(report.plot_fid_vs_step(all_recs, fileio.join(pdir, "fid_vs_step.png")))
  plots = [p for p in plots if p]
  summary = {"invocation": job.invocation, "mode": job.mode, "workdir": fileio.absolute(job.workdir),
             "command": argv or sys.argv, "eval": job.ev.to_dict(), "records": job.records,
             "files": sorted(set(job.files)) + plots, "seconds": time.time() - t_start}
  path = fileio.join(report.eval_dir(job.workdir), "invocations", f"{job.invocation}.json")
  if jax.process_index() == 0:
    write_json_atomic(path, summary)
  summary["summary_path"] = path
  logging.info("eval finished in %s: %d records (%d new); results %s, this invocation %s; "
               "tensorboard --logdir %s", format_duration(time.time() - t_start),
               len(job.records), len(new),
               fileio.join(report.eval_dir(job.workdir), report.RESULTS), path,
               report.eval_dir(job.workdir))
  return summary
