"""The one path layer for every file of a run: local paths and object-store URLs alike.

A run directory may be a local folder or a URL such as gs://bucket/runs/toy (hosts of a TPU
pod or a GPU cluster share no local disk).  Every read and write of run files (configs,
metrics, summaries, samples, evaluation shards and results, comparison tables, exported
weights, reference statistics) goes through these functions, which use etils.epath:
os for local paths and fsspec (gcsfs for gs://) for URLs.  ctm_jax/__init__.py makes epath
pick its fsspec backend rather than TensorFlow's gfile, so the same code talks to real GCS
(default credentials) and to a GCS emulator named by STORAGE_EMULATOR_HOST; Orbax's arrays
go through TensorStore (TENSORSTORE_GCS_HTTP_URL for an emulator).

Writes are whole-file and atomic: locally a temporary file renamed into place, on an object
store one upload (GCS objects are replaced whole, never seen half-written).  Object stores
cannot append, so append_text rewrites the object.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List

from etils import epath

PathLike = Any   # str or os.PathLike
TMP_PREFIX = ".tmp-"   # write_bytes' temporary files: .tmp-<pid>-<name> beside the target


def is_url(p: PathLike) -> bool:
  """Whether `p` names an object-store location (scheme://...) rather than a local path."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def join(base: PathLike, *parts: str) -> str:
  """base/part/...; for a URL always with '/' and without touching the scheme."""
  base = os.fspath(base)
  if is_url(base):
    return "/".join([base.rstrip("/")] + [str(p).strip("/") for p in parts])
  return os.path.join(base, *parts)


def dirname(p: PathLike) -> str:
  p = os.fspath(p)
  if is_url(p):
    head = p.rstrip("/").rsplit("/", 1)[0]
    return head if "://" in head and not head.endswith(":/") else p
  return os.path.dirname(p)


def basename(p: PathLike) -> str:
  return os.fspath(p).rstrip("/").rsplit("/", 1)[-1] if is_url(p) else os.path.basename(p)


def absolute(p: PathLike) -> str:
  """A URL unchanged; a local path made absolute (for records that name where a file is)."""
  p = os.fspath(p)
  return p if is_url(p) else os.path.abspath(p)


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def makedirs(p: PathLike) -> None:
  """Create a directory and its parents (a no-op on object stores, which have no folders)."""
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> List[str]:
  """The names in directory `p` ([] for a missing one)."""
  d = path(p)
  if not d.is_dir():
    return []
  return sorted(c.name for c in d.iterdir())


def remove(p: PathLike) -> None:
  path(p).unlink()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_json(p: PathLike) -> Any:
  return json.loads(read_text(p))


def write_bytes(p: PathLike, data: bytes) -> None:
  """Write `data` to `p` atomically (parents created): never half a file at `p`."""
  p = os.fspath(p)
  if is_url(p):
    path(p).write_bytes(data)
    return
  folder, name = os.path.split(os.path.abspath(p))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{name}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def remove_temporaries(directory: PathLike) -> None:
  """Delete the temporary files a process killed inside write_bytes left in a local
  `directory` (an object store never holds any)."""
  if is_url(directory) or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.startswith(TMP_PREFIX):
      os.remove(os.path.join(directory, name))


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj, **kwargs) -> None:
  write_text(p, json.dumps(obj, **kwargs))


def append_text(p: PathLike, text: str) -> None:
  """Append `text` to file `p` (created if missing).  Locally an O_APPEND write; on an object
  store, which cannot append, the object is read and replaced whole (atomically)."""
  p = os.fspath(p)
  if is_url(p):
    old = read_text(p) if exists(p) else ""
    write_text(p, old + text)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  with open(p, "a") as f:
    f.write(text)


def save_npz(p: PathLike, **arrays) -> None:
  """np.savez to `p`, atomically (the name is used as given: no '.npz' is appended)."""
  import numpy as np
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes(p, buf.getvalue())


def load_npz(p: PathLike) -> Dict[str, Any]:
  """Every array of an .npz file (no pickles), read at once."""
  import numpy as np
  with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def save_figure(fig, p: PathLike, **kwargs) -> None:
  """A matplotlib figure as PNG at `p` (atomically)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", **kwargs)
  write_bytes(p, buf.getvalue())


def local_cache_dir(name: str) -> str:
  """A per-user local cache folder for `name`: $XDG_CACHE_HOME/ctm_jax/name, else
  ~/.cache/ctm_jax/name (used where a run directory is a URL but a cache must be local)."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "ctm_jax", name)
