"""JAX's persistent compilation cache for training runs (config.training.compilation_cache_dir).

A resumed or pre-empted run finds its compiled step in the cache instead of compiling it
again (the key is the program, the compile options and the JAX / XLA version and backend).
  'auto' (default): JAX's cache directory when one is set already (JAX_COMPILATION_CACHE_DIR
         or jax.config), else <workdir>/../.jax_cache: beside the workdir, shared by the runs
         of one parent folder (a student and the evaluation of its teacher share programs).
         A URL workdir (gs://...) gets a local per-user folder instead,
         $XDG_CACHE_HOME/ctm_jax/jax_cache or ~/.cache/ctm_jax/jax_cache: compiled programs
         are per host, and a cache on the object store would cost a download per compile.
  a path: that directory (a URL such as gs://... too: JAX reads it through etils.epath).
  '':     the loop leaves JAX's settings alone (JAX's default: no persistent cache).
The cache is trusted code: do not point it at a folder that others may write to.
"""
from __future__ import annotations

import os
from typing import Optional

from ctm_jax import fileio

AUTO = "auto"
DEFAULT_NAME = ".jax_cache"


def resolve(value: str, workdir: str, configured: Optional[str]) -> Optional[str]:
  """The cache directory for `value` of training.compilation_cache_dir (None: leave JAX's
  settings as they are).  configured: JAX's current jax_compilation_cache_dir."""
  if value == "":
    return None
  if value == AUTO:
    if configured:
      return None
    if fileio.is_url(workdir):
      return fileio.local_cache_dir("jax_cache")
    parent = os.path.dirname(os.path.abspath(workdir.rstrip("/")))
    return os.path.join(parent, DEFAULT_NAME)
  return value


def use(path: str):
  """Point JAX's persistent cache at `path` (created if needed) from the next compile on.
  JAX reads the directory once per process, so its cache is reset when the path changes."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  fileio.makedirs(path)         # a URL here is JAX's own remote cache (through epath)
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    cc.reset_cache()


def setup(value: str, workdir: str) -> Optional[str]:
  """Apply training.compilation_cache_dir for a run in `workdir`; returns the directory
  used, or None where JAX's own settings apply."""
  import jax
  path = resolve(value, workdir, jax.config.jax_compilation_cache_dir)
  if path is not None:
    use(path)
  return path or jax.config.jax_compilation_cache_dir or None
