"""Checks of the project's files as files: no import circle inside ctm_jax, no absolute path of
one machine in a tracked file.  Cheap (ast and text only; nothing is imported or compiled)."""
import ast
import os
import re
import subprocess

import pytest

from launch_utils import ROOT


# ----------------------------------------------------------------------------- import graph

def package_modules(root: str, package: str = "ctm_jax") -> dict:
  """{dotted module name: file} of every .py under root/package (a package is its __init__)."""
  out = {}
  for d, _, files in os.walk(os.path.join(root, package)):
    for f in files:
      if f.endswith(".py"):
        parts = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(d, f)
  return out


def import_graph(root: str, package: str = "ctm_jax") -> dict:
  """{module: set of package modules it imports}, from every import statement of the file,
  module level or inside a function (a lazy import is a dependency too).  `from a.b import c`
  points at a.b.c when that is a module, else at a.b; relative imports are resolved."""
  mods = package_modules(root, package)
  graph = {}
  for name, path in mods.items():
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        targets += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
          base = ".".join(up + ([node.module] if node.module else []))
        targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                    for a in node.names]
    deps = set()
    for t in targets:
      while t and t not in mods:          # ctm_jax.x.attr -> ctm_jax.x; outside -> ''
        t = t.rpartition(".")[0]
      if t and t != name:
        deps.add(t)
    graph[name] = deps
  return graph


def find_cycle(graph: dict):
  """One import circle [a, b, ..., a] of the graph, or None (depth-first search)."""
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(graph.get(v, ())):
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state:
        got = visit(w)
        if got:
          return got
    state[v] = "done"
    stack.pop()
    return None

  for v in sorted(graph):
    if v not in state:
      got = visit(v)
      if got:
        return got
  return None


def test_ctm_jax_has_no_import_cycle():
  graph = import_graph(ROOT)
  assert len(graph) > 40 and "ctm_jax.evaljob.common" in graph["ctm_jax.evaljob.jobs"]
  cycle = find_cycle(graph)
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_import_graph_finds_a_planted_cycle(tmp_path):
  """The scanner on a small package: a circle through a relative import inside a function
  and a `from pkg import module` is found; the same package without it is clean."""
  pkg = tmp_path / "ctm_jax"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("import os\nfrom ctm_jax.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from . import c\nX = 1\n")
  (pkg / "sub" / "c.py").write_text("def f():\n  from ..a import y\n")
  graph = import_graph(str(tmp_path))
  assert graph["ctm_jax.a"] == {"ctm_jax.sub.b"}
  assert graph["ctm_jax.sub.c"] == {"ctm_jax.a"}
  assert find_cycle(graph) == ["ctm_jax.a", "ctm_jax.sub.b", "ctm_jax.sub.c", "ctm_jax.a"]
  (pkg / "sub" / "c.py").write_text("def f():\n  from ctm_jax import sub\n")
  assert find_cycle(import_graph(str(tmp_path))) is None


# ----------------------------------------------------------------------------- machine paths

# An absolute path: '/' and a name, then at least one more '/name' (so 'a/b', '<workdir>/x',
# 'gs://b/x', 'https://x/y', '~/x', '$W/x' and 'DDPM++/NCSN++' are not: they follow a word
# character, '>', ':', '/', '~', '$', '}', '+', '.' or '-').
ABSOLUTE_PATH = re.compile(r"(?<![\w.~$}/:>+\\-])/[A-Za-z_][\w.+-]*(?:/[\w.+*-]+)+/?")
# What a tracked file may name: scratch space in examples, the shell's env, a placeholder.
ALLOWED = ("/tmp/", "/dev/null", "/usr/bin/env", "/path/to/")
PRIVATE_FOLDER = "../" + "shared"     # the helpers' notes beside the repository, not shipped


def machine_paths(text: str) -> list:
  """The absolute paths in text outside ALLOWED, and mentions of PRIVATE_FOLDER."""
  found = [m.group(0) for m in ABSOLUTE_PATH.finditer(text)
           if not m.group(0).startswith(ALLOWED)]
  return found + [PRIVATE_FOLDER] * text.count(PRIVATE_FOLDER)


def tracked_text_files():
  try:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\n")
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout")
  for name in filter(None, names):
    try:
      with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        yield name, f.read()
    except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
      continue                                    # binary fixtures, deleted-but-tracked files


def test_no_tracked_file_names_a_machine_path():
  bad = {name: found for name, text in tracked_text_files() if (found := machine_paths(text))}
  assert not bad, f"absolute paths of one machine (use workdirs/..., /tmp/...): {bad}"


def test_machine_path_scanner():
  home, work = "/" + "home/ana/runs/edm", "/" + "work/runs/eval/inception_fid.npz"
  assert machine_paths(f"--workdir={home} --x='{work}' (`/" + "scratch/a`)") == [
      home, work, "/" + "scratch/a"]
  assert machine_paths("see " + PRIVATE_FOLDER + "/METHODS.md") == [PRIVATE_FOLDER]
  legit = ("--workdir=gs://bkt/runs/toy https://github.com/sony/ctm/blob/main/x.py "
           "--out=/tmp/bench.json #!/usr/bin/env bash >/dev/null workdirs/digits_edm "
           "<workdir>/eval/fid_stats/x.npz $W1/ckpt ${HOME}/x ~/tensorflow_datasets "
           "DDPM++/NCSN++/ADM /path/to/edm a/b/c x / y 1/2 /tmp")
  assert machine_paths(legit) == []
