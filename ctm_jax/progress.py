"""Training progress: a tqdm bar when a person watches a terminal, plain log lines otherwise.

Both show the same text (progress_text): steps done of the total, steps/s (the log lines:
over the steps since the previous line; the bar: an exponential average over 0.5 s windows;
the first window includes compilation) and the ETA = remaining steps / rate, to the second.
"""
from __future__ import annotations

import logging as py_logging
import math
import os
import sys
import time
from typing import Optional

from absl import logging


def format_duration(seconds: float) -> str:
  """H:MM:SS, rounded to the second; '?' when unknown (no rate yet)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# Why a run stopped before num_train_steps (train's summary["stop_reason"]) -> its wording.
STOP_REASONS = {
    "SIGINT": "Ctrl-C (SIGINT)",
    "SIGTERM": "SIGTERM",
    "preemption": "a pre-emption notice",
}


def stopped_by(reason: str, detail: str = "") -> str:
  """'stopped by <STOP_REASONS[reason]><detail>': the one wording of a stop in the binaries'
  last line (launch/common.ctrl_c_message) and the comparison's interrupts."""
  return f"stopped by {STOP_REASONS.get(reason, reason)}".rstrip() + detail


def progress_text(step: int, total: int, steps_per_sec: Optional[float]) -> str:
  """'1200/6000 steps (20%), 35.2 steps/s, ETA 0:02:16'."""
  pct = 100.0 * step / total if total else 100.0
  if steps_per_sec and steps_per_sec > 0:
    rate = f"{steps_per_sec:.3g} steps/s"
    eta = format_duration((total - step) / steps_per_sec)
  else:
    rate, eta = "? steps/s", "?"
  return f"{step}/{total} steps ({pct:.0f}%), {rate}, ETA {eta}"


class _BarLogHandler(py_logging.Handler):
  """Writes log records above the bar (tqdm.write) in the format of the handler it stands in
  for, with that handler's level and filters."""

  def __init__(self, replaced: py_logging.Handler, stream):
    super().__init__(replaced.level)
    self._replaced, self._stream = replaced, stream
    for f in replaced.filters:
      self.addFilter(f)

  def emit(self, record):
    from tqdm import tqdm
    try:
      tqdm.write(self._replaced.format(record), file=self._stream)
    except Exception:  # noqa: BLE001  (logging must never raise)
      self.handleError(record)


# The bar's rate: an exponential average over its refresh windows (this weight on the newest).
_SMOOTH = 0.3


class Progress:
  """step(s) after every training step; report(s) at logging steps returns steps/s over the
  steps since the previous report (and, without a bar, logs progress_text)."""

  def __init__(self, total: int, start: int, *, bar: bool = False, stream=None,
               refresh_seconds: float = 0.5):
    self.total = total
    self._stream = stream if stream is not None else sys.stderr
    self._refresh = refresh_seconds
    now = time.monotonic()
    self._report_at = self._window_at = (start, now)
    self._bar, self._swapped, self._rate = None, [], None
    if bar:
      from tqdm import tqdm
      # A pseudo-terminal without a size (e.g. under `script`) reports 0 x 0, with which
      # tqdm draws nothing: then a fixed size.
      sized = _columns(self._stream) > 0
      self._bar = tqdm(total=total, initial=start, file=self._stream, dynamic_ncols=sized,
                       ncols=None if sized else 100, nrows=None if sized else 24,
                       bar_format="{percentage:3.0f}%|{bar}| {desc}", leave=True,
                       desc=progress_text(start, total, None))
      root = py_logging.getLogger()
      for h in list(root.handlers):
        if getattr(h, "stream", None) in (sys.stderr, sys.stdout) or h is _absl_handler():
          root.removeHandler(h)
          new = _BarLogHandler(h, self._stream)
          root.addHandler(new)
          self._swapped.append((h, new))

  def step(self, step: int):
    if self._bar is None:
      return
    now = time.monotonic()
    s0, t0 = self._window_at
    if now - t0 >= self._refresh or step == self.total:
      if now > t0:
        rate = (step - s0) / (now - t0)
        self._rate = rate if self._rate is None else (1 - _SMOOTH) * self._rate + _SMOOTH * rate
      self._window_at = (step, now)
      self._bar.set_description_str(progress_text(step, self.total, self._rate), refresh=False)
      self._bar.update(step - self._bar.n)

  def report(self, step: int) -> float:
    now = time.monotonic()
    s0, t0 = self._report_at
    self._report_at = (step, now)
    rate = (step - s0) / (now - t0) if now > t0 and step > s0 else float("nan")
    if self._bar is None:
      logging.info("%s", progress_text(step, self.total, rate if math.isfinite(rate) else None))
    return rate

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    root = py_logging.getLogger()
    for old, new in self._swapped:
      root.removeHandler(new)
      root.addHandler(old)
    self._swapped = []


def _columns(stream) -> int:
  """The terminal's width (0 when it has no size or the stream is not a terminal)."""
  try:
    size = os.get_terminal_size(stream.fileno())
  except (AttributeError, OSError, ValueError):
    return 0
  return size.columns if size.lines > 0 else 0


def _absl_handler():
  try:
    return logging.get_absl_handler()
  except Exception:  # noqa: BLE001
    return None
