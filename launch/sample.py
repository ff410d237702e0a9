r"""Sample from a trained run and evaluate the samples.

  python -m launch.sample --workdir=workdirs/digits_ctm --samplers=onestep,gamma:0:2,heun:18

Writes, under <workdir>/eval/step_<N>/: samples_<name>.npz (uint8 images or float points,
plus labels), <name>.png (a grid or a 2-D density picture) and report.json.  For 2-D data
it adds MMD and sliced-W1 against fresh data; for toy_gmm also the oracle's EDM-Heun floor
and the ODE error E of the one-step map against the exact PF-ODE solution; for distilled runs
the teacher's EDM-Heun samples.  Consistency models (cd, ct, ict, direct_cd) take only onestep
and cm:<nfe>.  Without --config the run's own workdir/config.json is used.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config (default: workdir/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_SAMPLERS = flags.DEFINE_list("samplers", ["onestep", "gamma:0:2", "heun:18"], "Sampler specs.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Samples per sampler.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Sampling batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for x_T and sampler noise.")
_EMA = flags.DEFINE_string("ema", "", "Which EMA to sample ('' = config.sampling.eval_ema / first).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = newest).")
_LABEL = flags.DEFINE_integer("class_label", -1, "Class for conditional models (-1 = cycle).")
_TEACHER = flags.DEFINE_bool("teacher_baseline", True, "CTM runs: also sample the teacher (Heun).")
_ODE_N = flags.DEFINE_integer("ode_error_samples", 512, "x_T's for the ODE error (toy_gmm CTM).")
flags.mark_flags_as_required(["workdir"])


def load_config(workdir):
  from ctm_jax import train
  return _CONFIG.value if _CONFIG.value is not None else train.load_run_config(workdir)


def main(argv):
  del argv
  import jax
  import numpy as np
  from ctm_jax import evaluate, metric_io, samplers as samplers_lib, train, visualize
  metric_io.quiet_library_logs()
  workdir = _WORKDIR.value
  config = load_config(workdir)
  specs = [evaluate.parse_sampler(s) for s in _SAMPLERS.value]
  exp, state, step = train.load_state(config, workdir, None if _STEP.value < 0 else _STEP.value)
  for spec in specs:                  # refuse what the model cannot run before sampling anything
    exp.method.check_sampler(spec)
  if _EMA.value:
    config.unlock()
    config.sampling.eval_ema = _EMA.value
  params = exp.eval_params(state)
  out_dir = os.path.join(workdir, "eval", f"step_{step:08d}")
  os.makedirs(out_dir, exist_ok=True)
  info = exp.info
  num_classes = info.num_classes if config.data.class_conditional else 0
  report = {"step": step, "ema": config.sampling.eval_ema or "first", "seed": _SEED.value,
            "num_samples": _NUM.value, "samplers": {}}
  points = info.kind != "image"
  reference = train.reference_points(config, _NUM.value) if points else None

  def record(name, nfe, x, labels):
    entry = {"nfe": nfe}
    if jax.process_index() == 0:
      safe = name.replace(":", "_").replace(",", "-")
      np.savez(os.path.join(out_dir, f"samples_{safe}.npz"),
               x=(np.asarray(samplers_lib.to_uint8(x)) if not points else x),
               **({"label": labels} if labels is not None else {}))
      visualize.save_png(os.path.join(out_dir, f"{safe}.png"),
                         visualize.samples_picture(x[:256] if not points else x, info.kind),
                         scale=4 if not points and info.shape[0] < 32 else 1)
    if points:
      entry.update(train.toy_metrics(x, reference))
    report["samplers"][name] = entry
    logging.info("%s: %s", name, entry)

  for spec in specs:
    x, labels = evaluate.generate(evaluate.sampler_fn(exp.model, spec, exp.method), params, info.shape,
                                  _NUM.value, _BATCH.value, _SEED.value, exp.mesh, num_classes,
                                  _LABEL.value, exp.model.schedule.sigma_max)
    record(spec.name, spec.nfe, x, labels)

  if getattr(exp.method, "teacher", None) is not None and _TEACHER.value:
    teacher = exp.method.teacher
    t_params = teacher.params()
    steps = config.sampling.heun_steps
    fn = lambda p, x, key, labels: samplers_lib.edm_heun_sampler(
        lambda xx, tt: teacher.denoise(p, xx, tt, labels), x, steps, exp.model.schedule)
    x, labels = evaluate.generate(fn, t_params, info.shape, _NUM.value, _BATCH.value,
                                  _SEED.value, exp.mesh, num_classes, _LABEL.value,
                                  exp.model.schedule.sigma_max)
    record(f"teacher_heun:{steps}", 2 * steps - 1, x, labels)

  if config.data.dataset == "toy_gmm":
    report["oracle_floor_heun"] = train.oracle_floor(config, _NUM.value)
    # ODE error of the one-step map (G(x_T, T, sigma_min), or f(x_T, T) for a CM)
    from ctm_jax.oracle import toy_mixture_2d
    gm = toy_mixture_2d()
    sch = exp.model.schedule
    x_T = np.asarray(samplers_lib.initial_noise(jax.random.PRNGKey(_SEED.value + 1),
                                                (_ODE_N.value, 2), sch.sigma_max))
    ref = evaluate.exact_ode_solution(gm.denoise, x_T, sch.sigma_max, sch.sigma_min)
    report["ode_error_exact"] = evaluate.ode_error(exp.model, params, x_T, ref,
                                                   exp.method.jump_fn(params))
    report["data_variance_per_dim"] = float(np.var(ref))
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "report.json"), "w") as f:
      json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  app.run(main)
