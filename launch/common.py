r"""What every launch/ binary shares: flag mistakes reported in one line, and a quiet log.

    from launch import common
    ...
    if __name__ == "__main__":
      common.run(main, "launch.train")

run(main, prog) parses the flags (absl flags and ml_collections config files) and runs main.
A mistake of the user ends in ONE line on stderr, `prog: error: <what, which field or flag,
what is accepted>`, and exit status 2, with no traceback: an unknown flag or config field
(with the nearest name), a value of the wrong type, a config file that does not exist (found
before anything heavy is imported), a config file's bad argument (`file.py:arg`), a missing
required flag, a positional argument, and the errors of USER_ERRORS raised by main (config
checks, a workdir that is a file, a data set that is not prepared).  A run that fails on its
own (RUN_FAILURES: non-finite metrics) ends in one line and status 1; Ctrl-C that reaches
here (during start-up, or a second Ctrl-C in training; in launch.compare any Ctrl-C) in one
line and status 130.
`--verbose` (or absl's -v 1 / --verbosity=1) prints the traceback as well, and keeps the
libraries' INFO logs that are otherwise dropped.

The quiet log: TF_CPP_MIN_LOG_LEVEL=1 and TF_ENABLE_ONEDNN_OPTS=0 (no oneDNN / CPU feature /
CUDA notices of TensorFlow's and XLA's C++ start-up), the `jax` loggers at WARNING (no "Unable to initialize backend 'tpu'"), and
the INFO records of Orbax and the INFO / WARNING records of TFDS dropped (no "Load dataset
info from ...", no "Variant folder ... has no dataset_info.json"), and Orbax's three
warnings on a checkpoint opened to read ("Given directory is read only", "read_only=True,
setting ...").  Set before jax / TensorFlow are imported,
which launch binaries do inside main.
"""
from __future__ import annotations

import difflib
import glob
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Callable, Optional, Sequence, Tuple

from absl import app, flags
from ml_collections.config_flags import config_flags

FLAGS = flags.FLAGS
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Show tracebacks of errors and the libraries' INFO logs.")

# (module, class name, exit status): exceptions main may raise for a user's mistake (2) or
# a run that ended on its own (1), reported in one line.  Looked up in sys.modules when one
# is raised, so nothing is imported for it.
USER_ERRORS = (("ctm_jax.config_lib", "UserError", 2),
               ("ctm_jax.data.builders", "DatasetNotPreparedError", 2),
               ("ctm_jax.train", "NonFiniteError", 1))

# Log records from these library paths below these levels are dropped unless --verbose.
_QUIET_BELOW = {"tensorflow_datasets": py_logging.ERROR, "orbax": py_logging.WARNING}
# ... and these records of theirs at any level: Orbax's three notes on every checkpoint opened
# to read (the evaluation opens checkpoints read-only).
_QUIET_MESSAGES = {"orbax": ("Given directory is read only",
                             "CheckpointManagerOptions.read_only=True")}


class FlagMistake(Exception):
  """A flag or config mistake found while parsing the command line."""


# ----------------------------------------------------------------------------- entry point

def run(main: Callable, prog: str, extra_errors: Sequence[Tuple[type, int]] = (),
        on_ctrl_c: str = "", rename: Sequence[Tuple[str, str]] = ()):
  """app.run(main) with one-line errors (see the module docstring).  extra_errors: more
  (exception class, exit status) pairs a binary reports in one line.  on_ctrl_c: what the
  Ctrl-C line adds, e.g. 're-run the same command to resume'.  rename: (name, flag) pairs
  for a binary whose flags stand for other names (launch.sample's --samplers for
  config.eval.samplers): the error line says the flag the user typed (rename_flags)."""
  def _fail(prog, message, status, argv):
    _fail_line(prog, rename_flags(message, rename), status, argv)

  def parse(argv):
    try:
      _check_config_files(argv)
      return FLAGS(argv)
    except FlagMistake as e:
      _fail(prog, str(e), 2, argv)
    except Exception as e:  # noqa: BLE001
      msg = describe_parse_error(e, argv)
      if msg is None:
        raise
      _fail(prog, msg, 2, argv)

  def wrapped(argv):
    if not verbose(sys.argv):
      quiet_logs()
    try:
      return main(argv)
    except KeyboardInterrupt as e:
      _fail(prog, ctrl_c_message(e, on_ctrl_c), 130, sys.argv)
    except app.UsageError as e:
      _fail(prog, str(e), 2, sys.argv)
    except Exception as e:  # noqa: BLE001
      status = _known_status(e, extra_errors)
      if status is None:
        raise
      _fail(prog, " ".join(str(e).split()), status, sys.argv)

  app.run(wrapped, flags_parser=parse)


def ctrl_c_message(e: KeyboardInterrupt, on_ctrl_c: str = "") -> str:
  """'stopped by Ctrl-C (SIGINT)', or the interrupt's own 'stopped by ...' message (where
  the library says what it was doing), then '; <on_ctrl_c>'."""
  from ctm_jax import progress
  text = " ".join(str(e).split())
  if not text.startswith(progress.stopped_by("")):
    text = progress.stopped_by("SIGINT", f": {text}" if text else "")
  return text + (f"; {on_ctrl_c}" if on_ctrl_c else "")


def fake_cpu_devices_flag():
  """Define --fake_cpu_devices (testing: run on N fake CPU devices); start() applies it."""
  return flags.DEFINE_integer(
      "fake_cpu_devices", 0, "Testing only: run on this many fake CPU devices (before JAX starts).")


def start(argv, how_to_set: str = "", fake_cpu_devices=None):
  """The first lines of a binary's main: a positional argument is refused in one line
  ('unexpected arguments [...]: <how_to_set>'), then --fake_cpu_devices is applied before
  JAX starts (fake_cpu_devices: the holder fake_cpu_devices_flag() returned)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}" + (f": {how_to_set}" if how_to_set
                                                                else ""))
  if fake_cpu_devices is not None and fake_cpu_devices.value:
    from ctm_jax import parallel
    parallel.configure_fake_cpu_devices(fake_cpu_devices.value)


def rename_flags(message: str, rename: Sequence[Tuple[str, str]]) -> str:
  """message with each `name` (or `--name`) of the (name, flag) pairs written as `flag`."""
  for name, flag in rename:
    message = re.sub(rf"(?<![\w.-])(?:--)?{re.escape(name)}(?![\w])", flag, message)
  return message


def _fail_line(prog: str, message: str, status: int, argv):
  if verbose(argv):
    traceback.print_exc()
  sys.stderr.write(f"{prog}: error: {message}\n" if status != 130 else f"{prog}: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def _known_status(e: BaseException, extra_errors) -> Optional[int]:
  for cls, status in extra_errors:
    if isinstance(e, cls):
      return status
  for module, name, status in USER_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and isinstance(e, cls):
      return status
  return None


def verbose(argv) -> bool:
  """--verbose, or absl's verbosity >= 1 (-v 1, -v=1, --verbosity=1), in argv or parsed."""
  try:
    if FLAGS.is_parsed() and (FLAGS.verbose or FLAGS.verbosity >= 1):
      return True
  except (AttributeError, flags.Error):
    pass
  argv = list(argv)
  for i, a in enumerate(argv):
    if a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1"):
      return True
    m = re.fullmatch(r"--?(?:v|verbosity)(?:=(-?\d+))?", a)
    if m:
      v = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
      if re.fullmatch(r"-?\d+", v or "") and int(v) >= 1:
        return True
  return False


# ----------------------------------------------------------------------------- quiet log

def quiet_environment():
  """C++ logs of TensorFlow / XLA at WARNING and above; call before they are imported.

  TensorFlow 2.21 prints its oneDNN notice through absl's C++ log before TF_CPP_MIN_LOG_LEVEL
  is read, so oneDNN's TensorFlow kernels are turned off as well (TensorFlow only writes
  TensorBoard events here; JAX does the compute)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record):
    path = record.pathname.replace("\\", "/")
    if any(f"/{p}/" in path and str(record.msg).startswith(m)
           for p, msgs in _QUIET_MESSAGES.items() for m in msgs):
      return False
    return not any(f"/{p}/" in path and record.levelno < level
                   for p, level in _QUIET_BELOW.items())


_FILTER = _DropLibraryInfo()


def quiet_logs():
  """quiet_environment() and the Python-side filters (idempotent)."""
  quiet_environment()
  py_logging.getLogger("jax").setLevel(py_logging.WARNING)
  for target in [py_logging.getLogger("absl"), *py_logging.getLogger().handlers]:
    if _FILTER not in target.filters:
      target.addFilter(_FILTER)


# ----------------------------------------------------------------------------- flag mistakes

def _config_flag_names():
  return [name for name in FLAGS
          if config_flags.is_config_flag(FLAGS[name]) and name == FLAGS[name].name]


def _flag_value(argv, name: str) -> Optional[str]:
  """The last value given to --name in argv (`--name=v` or `--name v`)."""
  value = None
  for i, a in enumerate(argv):
    if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      value = argv[i + 1]
    elif a.startswith(f"--{name}=") or a.startswith(f"-{name}="):
      value = a.split("=", 1)[1]
  return value


def _check_config_files(argv):
  """A config file named on the command line exists (checked before absl loads it, since
  ml_collections defers that error until the config is first used, after start-up)."""
  for name in _config_flag_names():
    value = _flag_value(argv, name)
    if not value:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      raise FlagMistake(f"--{name}={value}: config file {path!r} does not exist"
                        + _suggest_file(path))


def _suggest_file(path: str) -> str:
  folder = os.path.dirname(path) or "."
  if not os.path.isdir(folder):
    folder = "configs" if os.path.isdir("configs") else folder
  stems = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(folder, "*.py"))
                 if not os.path.basename(p).startswith("_"))
  if not stems:
    return ""
  stem = os.path.splitext(os.path.basename(path))[0]
  close = difflib.get_close_matches(stem, stems, n=1, cutoff=0.75)
  if close:
    return f"; did you mean {os.path.join(folder, close[0] + '.py')}?"
  return f"; the config files in {folder}/ are: " + ", ".join(s + ".py" for s in stems)


def flat_keys(config, prefix: str = "") -> list:
  """Every dotted field path of a (nested) ConfigDict / dict: nodes and leaves."""
  out = []
  for k, v in config.items():
    key = f"{prefix}{k}"
    out.append(key)
    if hasattr(v, "items"):
      out += flat_keys(v, key + ".")
  return out


def unknown_field_message(config, name: str, path: str) -> Optional[str]:
  """'unknown field config.a.b, did you mean config.a.c?' when path is not a field of config
  (difflib: over the siblings' names when the parent exists, else over every flattened key
  of the same depth), else None."""
  node, parts = config, path.split(".")
  for part in parts:
    if hasattr(node, "items") and part in node:
      node = node[part]
    elif hasattr(node, "items"):
      break
    else:
      return None       # past a leaf (e.g. indexing a tuple): not ours to judge
  else:
    return None
  parent = ".".join(parts[:-1])
  holder = config_at(config, parent)
  if hasattr(holder, "keys"):
    close = difflib.get_close_matches(parts[-1], list(holder.keys()), n=1, cutoff=0.6)
    close = [f"{parent}.{close[0]}" if parent else close[0]] if close else []
  else:
    keys = [k for k in flat_keys(config) if k.count(".") == path.count(".")]
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6)
  if close:
    return f"unknown field {name}.{path}, did you mean {name}.{close[0]}?"
  if not hasattr(holder, "keys"):
    return f"unknown field {name}.{path}; the sections of {name} are: " + ", ".join(
        sorted(k for k, v in config.items() if hasattr(v, "keys")))
  where = f"{name}.{parent}" if parent else name
  return (f"unknown field {name}.{path}; the fields of {where} are: "
          + ", ".join(sorted(holder.keys())))


def config_at(config, path: str):
  node = config
  for part in filter(None, path.split(".")):
    if not (hasattr(node, "items") and part in node):
      return None
    node = node[part]
  return node


def _overrides(argv, name: str):
  """(path, given value) of each --name.path override in argv."""
  out = []
  for a in argv:
    m = re.match(rf"^--?(no)?{re.escape(name)}\.([^=]+)(?:=(.*))?$", a)
    if m:
      out.append((m.group(2), m.group(3)))
  return out


def _load_config(value: str, name: str):
  return config_flags.ConfigFileFlagParser(name).parse(value)


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false",
          "tuple": "a tuple, e.g. '(1, 2)'"}


def describe_parse_error(e: Exception, argv) -> Optional[str]:
  """One line for an error of absl / ml_collections flag parsing; None if not a known one."""
  argv = list(argv)
  if isinstance(e, (AttributeError, KeyError, IndexError)):
    for name in _config_flag_names():
      value = _flag_value(argv, name)
      if not value:
        continue
      if isinstance(e, AttributeError) and "get_config" in str(e):
        return (f"--{name}={value}: {value.split(':', 1)[0]} has no get_config() function "
                f"(not a config file)")
      try:
        config = _load_config(value, name)
      except Exception:  # noqa: BLE001
        continue
      for path, _ in _overrides(argv, name):
        msg = unknown_field_message(config, name, path)
        if msg:
          return msg
    return None
  if isinstance(e, flags.UnrecognizedFlagError):
    known = [n for n in FLAGS if not n.startswith("no")]
    close = difflib.get_close_matches(e.flagname, known, n=1)
    return (f"unknown flag --{e.flagname}" + (f", did you mean --{close[0]}?" if close else
                                              "; --helpfull lists the flags"))
  if not isinstance(e, flags.Error):
    return None
  text = str(e)
  m = re.match(r"flag --([^=]+)=(.*?): (.*)", text, re.S)
  if not m:
    return " ".join(text.split())
  name, value, why = m.groups()
  if "must have a value other than None" in why:
    missing = re.findall(r"Flag --(\S+) must have a value", text)
    helps = [f"--{n} ({FLAGS[n].help.rstrip('.')})" if n in FLAGS else f"--{n}" for n in missing]
    return "missing required flag " + ", ".join(helps)
  if "Error whilst parsing config file" in why:
    last = [ln.strip() for ln in why.strip().splitlines() if ln.strip()][-1]
    kind, _, detail = last.partition(": ")
    path, _, arg = value.partition(":")
    if kind == "TypeError" and "positional argument" in detail:
      return (f"--{name}={value}: {path} takes no argument after ':'" if arg else
              f"--{name}={value}: {path} needs an argument after ':' ({detail})")
    return f"--{name}={value}: {detail or last}"
  base = name.split(".", 1)[0]
  if "." in name and base in _config_flag_names() and name in FLAGS:
    kind = _KINDS.get(FLAGS[name].parser.flag_type(), FLAGS[name].parser.flag_type())
    return f"--{name}={value}: {name} must be {kind}, got {value!r}"
  return f"--{name}={value}: " + " ".join(why.split())
