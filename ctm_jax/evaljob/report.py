"""What an evaluation leaves behind: results.jsonl records, TensorBoard scalars, plots and
pictures (matplotlib, Agg backend; process 0 only)."""
from __future__ import annotations

import json
from typing import Dict, Iterable, List, Optional

import jax
import numpy as np

from ctm_jax import fileio, metric_io

RESULTS = "results.jsonl"


def eval_dir(workdir: str) -> str:
  return fileio.join(workdir, "eval")


def append_records(workdir: str, records: Iterable[dict]) -> None:
  """Append records to workdir/eval/results.jsonl (one JSON object a line)."""
  if jax.process_index() != 0:
    return
  path = fileio.join(eval_dir(workdir), RESULTS)
  fileio.append_text(path, "".join(json.dumps(r, sort_keys=True, default=str) + "\n"
                                   for r in records))


def read_records(workdir: str) -> List[dict]:
  return metric_io.read_jsonl(fileio.join(eval_dir(workdir), RESULTS), missing_ok=True)


def write_scalars(workdir: str, records: Iterable[dict]) -> None:
  """TensorBoard scalars eval/<metric>/<ema>/<sampler or split> at each record's step (logdir
  workdir/eval; `tensorboard --logdir workdir` shows it beside the training curves)."""
  from clu import metric_writers
  writer = metric_writers.MultiWriter(
      [metric_writers.LoggingWriter()]
      + ([metric_io.summary_writer(eval_dir(workdir))] if jax.process_index() == 0 else []))
  for r in records:
    if r.get("value") is None or r.get("step") is None:
      continue
    what = r.get("sampler") or r.get("split") or "data"
    writer.write_scalars(int(r["step"]), {f"eval/{r['metric']}/{r.get('ema', '-')}/{what}":
                                          float(r["value"])})
  writer.flush()
  writer.close()


def _latest(records: List[dict], key) -> Dict:
  out = {}
  for r in records:
    out[key(r)] = r
  return out


def nfe_lines(records: List[dict], metric: str = "fid") -> Dict[str, list]:
  """{line label: [(NFE, value, stderr), ...] sorted by NFE} of one checkpoint's records: one
  line per gamma, Heun on the score head and the teacher's Heun apart; the newest record of
  each sampler counts.  The one-step sampler (gamma sampling with NFE 1: a single jump
  T -> sigma_min, gamma unused) starts every gamma line."""
  rows = [r for r in records if r.get("metric") == metric and r.get("nfe")]
  rows = list(_latest(rows, lambda r: r["sampler"]).values())
  groups: Dict[str, list] = {}
  for r in rows:
    label = (f"gamma = {r['gamma']:g}" if r.get("kind") == "gamma" else
             "teacher, EDM Heun" if r.get("kind") == "teacher_heun" else "EDM Heun (score head)")
    groups.setdefault(label, []).append((r["nfe"], r["value"], r.get("stderr")))
  one = [(r["nfe"], r["value"], r.get("stderr")) for r in rows
         if r.get("kind") == "gamma" and r["nfe"] == 1]
  for label, pts in groups.items():
    if label.startswith("gamma") and one and not any(p[0] == 1 for p in pts):
      pts.append(one[0])
    pts.sort()
  return groups


def plot_fid_vs_nfe(records: List[dict], path: str, metric: str = "fid",
                    title: Optional[str] = None) -> Optional[str]:
  """`nfe_lines` of one checkpoint and EMA against NFE (error bars where a record has a
  standard error, e.g. KID)."""
  groups = nfe_lines(records, metric)
  if not groups:
    return None
  r0 = [r for r in records if r.get("metric") == metric and r.get("nfe")][0]
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for label, pts in sorted(groups.items()):
    err = [p[2] for p in pts] if all(p[2] is not None for p in pts) else None
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=err, fmt="o-", capsize=3,
                label=label)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("NFE")
  ax.set_ylabel(metric.upper())
  ax.set_title(title or f"step {r0.get('step')}, EMA {r0.get('ema')}, "
                        f"{r0.get('num_samples')} samples", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_fid_vs_step(records: List[dict], path: str, metric: str = "fid") -> Optional[str]:
  """FID against training step, one line per sampler and EMA (when >= 2 steps exist)."""
  rows = [r for r in records if r.get("metric") == metric and r.get("step") is not None]
  rows = list(_latest(rows, lambda r: (r["sampler"], r["ema"], r["step"])).values())
  lines: Dict[str, list] = {}
  for r in rows:
    lines.setdefault(f"{r['sampler']} ({r['ema']})", []).append((r["step"], r["value"]))
  if not any(len(v) >= 2 for v in lines.values()):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for label, pts in sorted(lines.items()):
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
  ax.set_xlabel("training step")
  ax.set_ylabel(metric.upper())
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def points_figure(samples: np.ndarray, reference: np.ndarray, path: str, title: str,
                  lim: float = 2.0) -> Optional[str]:
  """2-D samples beside the true data, on the same axes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
  for ax, pts, name in ((axes[0], samples, title), (axes[1], reference, "data")):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="k", rasterized=True)
    ax.set_title(f"{name} ({len(pts)} points)", fontsize=9)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("x2")
  return _save(fig, path)


def _save(fig, path: str) -> Optional[str]:
  import matplotlib.pyplot as plt
  if jax.process_index() != 0:
    plt.close(fig)
    return None
  fig.tight_layout()
  fileio.save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path
