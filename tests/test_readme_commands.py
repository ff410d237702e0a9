"""Doc-tests: the shell commands of README.md that are marked to run, run with tiny settings.

A fenced ```bash block runs when an HTML comment (invisible on GitHub) stands right before it:

    <!-- doc-test: not this one -->
Some text.

<!-- doc-test: launch.train: --config.training.num_train_steps=20 ; launch.eval: --config.eval.num_samples=64 ; expect: Finished at step -->

Each segment, separated by ';', is one of
  launch.X: ARGS   appended to every `python -m launch.X` command of the block;
  ARGS             appended to every command of the block;
  expect: REGEX    a line of the last command's output (stdout + stderr) matches REGEX;
  slow             the block runs only with `-m slow` (a long example).
The block's commands run in order (a `\\` continues a line, `#` starts a comment; `VAR=value`
prefixes become environment variables; `pip ...` lines are skipped: the environment is the
test's), each must exit 0, in a fresh folder that holds links to the repository's top-level
entries, so `configs/...` resolves and `workdirs/...` is written under the test's tmp_path.
"""
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, List, NamedTuple

import pytest

from launch_utils import ROOT, subprocess_env

DOCS = ("README.md",)
MARKER = re.compile(r"<!--\s*doc-test\s*:(?P<spec>(?:(?!-->).)*)-->\s*\n\s*```(?:bash|sh|shell)?"
                    r"[ \t]*\n(?P<body>.*?)\n\s*```", re.S)


class Block(NamedTuple):
  where: str                    # file:line of the marker
  commands: List[str]
  overrides: Dict[str, List[str]]   # 'launch.X' or '' (every command) -> extra arguments
  expect: List[str]
  slow: bool


def parse_spec(spec: str):
  overrides, expect, slow = {}, [], False
  for seg in filter(None, (s.strip() for s in spec.split(";"))):
    key, sep, rest = seg.partition(":")
    if seg == "slow":
      slow = True
    elif sep and key.strip() == "expect":
      expect.append(rest.strip())
    elif sep and re.fullmatch(r"launch\.\w+", key.strip()):
      overrides.setdefault(key.strip(), []).extend(shlex.split(rest))
    else:
      overrides.setdefault("", []).extend(shlex.split(seg))
  return overrides, expect, slow


def commands_of(body: str) -> List[str]:
  """The block's commands: continuation lines joined, comments and pip lines dropped."""
  out = []
  for line in body.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    if words and words[0] != "pip":
      out.append(shlex.join(words))
  return out


def marked_blocks(path: str) -> List[Block]:
  text = open(path).read()
  blocks = []
  for m in MARKER.finditer(text):
    overrides, expect, slow = parse_spec(m.group("spec"))
    where = f"{os.path.relpath(path, ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
    blocks.append(Block(where, commands_of(m.group("body")), overrides, expect, slow))
  return blocks


def argv_of(command: str, overrides) -> tuple:
  """(environment additions, argv) of one command with its overrides appended."""
  words = shlex.split(command)
  env = {}
  while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
    k, _, v = words.pop(0).partition("=")
    env[k] = v
  if words and words[0] in ("python", "python3"):
    words[0] = sys.executable
  module = words[words.index("-m") + 1] if "-m" in words[:-1] else None
  return env, words + overrides.get("", []) + overrides.get(module, [])


def run_block(block: Block, folder) -> str:
  """Run the block's commands in `folder` (links to the repository's entries); the output of
  the last one."""
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(ROOT):
    if not name.startswith(".") and name != "workdirs":
      os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))
  out = ""
  for command in block.commands:
    env, argv = argv_of(command, block.overrides)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(argv, cwd=folder, env=subprocess_env(env), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{block.where}: {shlex.join(argv)}\n{out[-3000:]}"
  for pattern in block.expect:
    assert re.search(pattern, out, re.M), f"{block.where}: no line matches {pattern!r}\n{out[-3000:]}"
  return out


def _all_blocks():
  params = []
  for doc in DOCS:
    for b in marked_blocks(os.path.join(ROOT, doc)):
      params.append(pytest.param(b, id=b.where, marks=[pytest.mark.slow] if b.slow else []))
  return params


@pytest.mark.parametrize("block", _all_blocks() or [pytest.param(None, id="none-marked")])
def test_marked_readme_commands_run(block, tmp_path):
  if block is None:
    pytest.skip("README.md marks no command with <!-- doc-test: ... -->")
  run_block(block, str(tmp_path / "doc"))


EXAMPLE = """
Train, then sample:

<!-- doc-test: not this one -->
Some text.

<!-- doc-test: launch.train: --config.training.num_train_steps=2 --config.model.hidden=32
     --config.model.num_blocks=2 --config.training.batch_size=64 ;
     launch.sample: --num_samples=64 --batch_size=64 --config.eval.reference_seeds=1 ;
     expect: eval finished in -->
```bash
pip install -r requirements.txt       # skipped: the test's environment is installed
python -m launch.train --config=configs/toy_edm.py \\
    --workdir=workdirs/toy_edm        # a comment
python -m launch.sample --workdir=workdirs/toy_edm --samplers=heun:3
```

```bash
python -m launch.train --config=configs/cifar10_edm.py --workdir=workdirs/not_marked
```
"""


def test_marker_parsing_and_a_marked_block_run(tmp_path):
  """The helper on a document of its own: what is marked, the commands with their
  overrides, and a block run to its expected line (a 2-step toy run; a wrong expectation
  fails)."""
  doc = tmp_path / "DOC.md"
  doc.write_text(EXAMPLE)
  [block] = marked_blocks(str(doc))
  assert block.commands == [
      "python -m launch.train --config=configs/toy_edm.py --workdir=workdirs/toy_edm",
      "python -m launch.sample --workdir=workdirs/toy_edm --samplers=heun:3"]
  assert block.expect == ["eval finished in"] and not block.slow
  env, argv = argv_of("XLA_FLAGS=--x python -m launch.sample --workdir=w", block.overrides)
  assert env == {"XLA_FLAGS": "--x"} and argv == [
      sys.executable, "-m", "launch.sample", "--workdir=w", "--num_samples=64",
      "--batch_size=64", "--config.eval.reference_seeds=1"]
  assert parse_spec(" --a=1 ; slow ")[0] == {"": ["--a=1"]} and parse_spec("slow")[2]
  # Run the training alone (one subprocess keeps this cheap; launch.sample has its own tests).
  run_block(block._replace(commands=block.commands[:1], expect=[r"Finished at step 2 in"]),
            str(tmp_path / "run"))
  assert os.path.isfile(tmp_path / "run" / "workdirs" / "toy_edm" / "summary.json")
  with pytest.raises(AssertionError, match="no line matches 'Finished'"):
    run_block(block._replace(commands=[], expect=["Finished"]), str(tmp_path / "none"))
