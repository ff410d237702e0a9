"""Run directories on object storage: launch.train / eval / compare with a gs:// workdir against a
real GCS API server on 127.0.0.1 (fake-gcs-server, tests/gcs_server.py).

Each command runs as on a pod host: in its own empty working directory with its own empty HOME
and TMPDIR, and only the standard settings STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL
point it at the server.  Afterwards nothing may lie in those local folders but caches that the
command's log names (the compilation cache, TFDS's prepared toy data, the TensorBoard staging
folder) and two per-user library files (UNLOGGED_CACHES).
"""
import io
import json
import os
import random
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import gcs_server
from ctm_jax import checkpointing, compile_cache, fileio, metric_io, runs, train
from tensorboard.util import tensor_util
from launch_utils import ROOT, TINY_TOY_FIELDS, tiny_toy_edm, wait_until

BUCKET = "pods"
STEPS = 12
ARGS = [f"--config.training.num_train_steps={STEPS}", "--config.training.checkpoint_every=4",
        "--config.training.log_every=4", "--config.training.async_checkpointing=True",
        "--config.training.sample_every=12"]
# Per-user library files no log names: matplotlib's font cache, and the default config Keras
# writes when TensorFlow (clu's writers) is imported.
UNLOGGED_CACHES = (".cache/matplotlib", ".config/matplotlib", ".keras/keras.json")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The server, a bucket, and this test process pointed at it (the standard settings)."""
  d = tmp_path_factory.mktemp("gcs")
  with gcs_server.running(str(d / "cloud"), str(d / "server.log")) as server:
    server.create_bucket(BUCKET)
    with pytest.MonkeyPatch.context() as mp:
      for k, v in server.env().items():
        mp.setenv(k, v)
      yield server


# ----------------------------------------------------------------------------- the path layer

def test_path_layer_checkpoints_metrics_and_tensorboard_on_the_server(gcs, tmp_path,
                                                                     monkeypatch):
  """ctm_jax.fileio, the Orbax checkpointer, metrics.jsonl and the TensorBoard mirror against
  the server, each checked by reading the server's objects through its own API."""
  monkeypatch.chdir(tmp_path)
  root = f"gs://{BUCKET}/unit"
  assert fileio.join(root, "a", "b.txt") == f"{root}/a/b.txt"
  assert fileio.dirname(f"{root}/a/b.txt") == f"{root}/a" and fileio.basename(root) == "unit"
  assert fileio.absolute(root) == root
  fileio.write_text(fileio.join(root, "a", "b.txt"), "one\n")
  fileio.append_text(fileio.join(root, "a", "b.txt"), "two\n")
  assert gcs.read(BUCKET, "unit/a/b.txt") == b"one\ntwo\n"
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  fileio.save_npz(fileio.join(root, "x.npz"), x=x)
  got = np.load(io.BytesIO(gcs.read(BUCKET, "unit/x.npz")))
  assert np.array_equal(got["x"], x) and np.array_equal(fileio.load_npz(f"{root}/x.npz")["x"], x)
  assert fileio.listdir(root) == ["a", "x.npz"] and fileio.isdir(f"{root}/a")
  assert fileio.isfile(f"{root}/x.npz") and not fileio.exists(f"{root}/nothing")

  # Orbax: the gs:// directory itself; a step without commit_success.txt is not finished.
  cfg = tiny_toy_edm(**{"training.async_checkpointing": False})
  ck = checkpointing.Checkpointer(root, cfg.training)
  assert ck.directory == f"{root}/checkpoints"
  tree = {"w": jax.numpy.arange(5.0), "b": jax.numpy.ones((2, 2), jax.numpy.bfloat16)}
  ck.save(3, tree, {"next_step": 3}, {"step": 3})
  ck.close()
  assert "unit/checkpoints/3/commit_success.txt" in gcs.objects(BUCKET, "unit/checkpoints/")
  fileio.write_text(f"{root}/checkpoints/7/state/partial", "killed mid-save")
  assert runs.checkpoint_steps(root) == [3]
  ck = checkpointing.Checkpointer(root, cfg.training, read_only=True)
  back, data_state, meta = ck.restore(3, jax.tree_util.tree_map(np.zeros_like, tree))
  ck.close()
  assert _leaves_equal(back, tree) and data_state == {"next_step": 3} and meta == {"step": 3}

  # metrics.jsonl: appended rows, and a resume's cut, read back from the server.
  w = metric_io.JsonlWriter(fileio.join(root, "metrics.jsonl"))
  for step in (1, 2, 3):
    w.write_scalars(step, {"loss": step / 4})
  assert metric_io.drop_rows_after(root, 2) == 1
  assert [json.loads(r) for r in gcs.read(BUCKET, "unit/metrics.jsonl").splitlines()] == [
      {"step": 1, "loss": 0.25}, {"step": 2, "loss": 0.5}]

  # TensorBoard: events written locally by clu, copied up on flush; parsed from the server.
  board = metric_io.summary_writer(root)
  board.write_scalars(5, {"loss": 0.125})
  board.flush()
  board.close()
  assert not os.path.exists(board._local)          # the local staging folder is removed
  events = [n for n in gcs.objects(BUCKET, "unit/") if "tfevents" in n]
  assert len(events) == 1
  local = tmp_path / "events_copy"
  local.write_bytes(gcs.read(BUCKET, events[0]))
  from tensorboard.backend.event_processing import event_file_loader
  seen = [(e.step, v.tag, float(np.asarray(tensor_util.make_ndarray(v.tensor))))
          for e in event_file_loader.EventFileLoader(str(local)).Load()
          for v in e.summary.value]
  assert (5, "loss", 0.125) in seen, seen

  # compilation cache 'auto' for a URL: a local per-user folder, nothing named after the URL.
  assert compile_cache.resolve("auto", root, None) == fileio.local_cache_dir("jax_cache")
  assert "gs:" not in compile_cache.resolve("auto", root, None)
  assert os.listdir(tmp_path) == ["events_copy"]


def toy_args(devices=1):
  return [f"--config={ROOT}/configs/toy_edm.py", f"--fake_cpu_devices={devices}",
          *(f"--config.{k}={v}" for k, v in TINY_TOY_FIELDS.items())]


class Host:
  """A fresh "host": empty cwd, HOME and TMPDIR under `base`, the server's settings only."""

  def __init__(self, base, server):
    self.base = base
    self.dirs = [base / "cwd", base / "home", base / "tmp"]
    for d in self.dirs:
      d.mkdir(parents=True)
    self.env = {"PATH": os.environ["PATH"], "PYTHONPATH": ROOT, "HOME": str(base / "home"),
                "TMPDIR": str(base / "tmp"), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
                "NPROC": "16", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                **server.env()}
    self.logs = []

  def start(self, module, *args, name="cmd"):
    log = self.base / f"{name}.log"
    self.logs.append(log)
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=self.dirs[0],
                            env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT)

  def run(self, module, *args, name="cmd", timeout=600):
    proc = self.start(module, *args, name=name)
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"{module} failed ({rc}):\n{self.logs[-1].read_text()[-4000:]}"

  def local_files_not_logged(self):
    """Files in cwd / HOME / TMPDIR under no folder that a log of this host names."""
    text = "".join(log.read_text() for log in self.logs)
    left = []
    for root in self.dirs:
      for dirpath, _, files in os.walk(root):
        for f in files:
          path = os.path.join(dirpath, f)
          rel = os.path.relpath(path, self.dirs[1])
          if rel.startswith(UNLOGGED_CACHES):
            continue
          parents = [os.path.dirname(path)]
          while parents[-1] != str(root):
            parents.append(os.path.dirname(parents[-1]))
          if not any(p in text for p in parents[:-1]):
            left.append(path)
    return left


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def _state(workdir):
  _, state, step = train.load_state(tiny_toy_edm(**{"training.num_train_steps": STEPS}), workdir)
  return jax.device_get(state), step


@pytest.mark.slow
def test_gs_workdir_killed_run_resumes_bitwise_and_eval_writes_there(gcs, tmp_path):
  """toy_edm on gs://: SIGKILLed after a checkpoint, resumed on a fresh host, equal bit for
  bit to an uninterrupted local run; then launch.eval --mode=sample and --mode=nll on a third
  host write their results to the bucket.  No host keeps anything but logged caches."""
  local = tmp_path / "local_run"
  ref = Host(tmp_path / "ref", gcs)
  ref.run("launch.train", f"--workdir={local}", *toy_args(), *ARGS, name="ref")
  wd = f"gs://{BUCKET}/runs/toy"
  first = Host(tmp_path / "host1", gcs)
  proc = first.start("launch.train", f"--workdir={wd}", *toy_args(), *ARGS, name="first")
  want = random.Random(0).choice([4, 8])
  wait_until(proc, lambda: any(int(s) >= want for s in gcs_steps(gcs, "runs/toy")),
             f"a checkpoint at step >= {want} on the server")
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  killed_at = max(int(s) for s in gcs_steps(gcs, "runs/toy"))
  assert killed_at < STEPS
  second = Host(tmp_path / "host2", gcs)
  second.run("launch.train", f"--workdir={wd}", *toy_args(), *ARGS, name="second")
  assert f"Resuming from {wd}/checkpoints at step " in second.logs[-1].read_text()

  got, step = _state(wd)
  want_state, want_step = _state(str(local))
  assert step == want_step == STEPS
  assert _leaves_equal(got.params, want_state.params)
  assert _leaves_equal(got.ema, want_state.ema)
  assert _leaves_equal(got.opt_state, want_state.opt_state)
  rows = metric_io.read_metrics(wd)
  assert [r["step"] for r in rows] == [r["step"] for r in metric_io.read_metrics(str(local))]
  loss = lambda rs: [r["loss"] for r in rs if "loss" in r]
  assert loss(rows) == loss(metric_io.read_metrics(str(local))) and len(loss(rows)) == 3
  names = gcs.objects(BUCKET, "runs/toy/")
  for f in ("config.json", "metrics.jsonl", "summary.json", "samples/heun18_step00000012.png",
            f"config_resume_{killed_at:08d}.json"):
    assert f"runs/toy/{f}" in names, (f, names)
  assert any(n.startswith("runs/toy/events.out.tfevents.") for n in names), names
  assert runs.checkpoint_steps(wd)[-1] == STEPS

  third = Host(tmp_path / "host3", gcs)
  third.run("launch.eval", f"--workdir={wd}", "--mode=sample", "--fake_cpu_devices=1",
            "--config.eval.samplers=heun:4", "--config.eval.num_samples=128",
            "--config.eval.batch_size=64", "--config.eval.shard_size=64",
            "--config.eval.reference_seeds=1", name="sample")
  third.run("launch.eval", f"--workdir={wd}", "--mode=nll", "--fake_cpu_devices=1",
            "--config.eval.nll_num_examples=64", "--config.eval.nll_batch_size=64",
            "--config.eval.batch_size=64", "--config.eval.shard_size=64", name="nll")
  recs = metric_io.read_jsonl(fileio.join(wd, "eval", "results.jsonl"))
  metrics = {r["metric"] for r in recs}
  assert {"mmd", "sliced_w1"} <= metrics, metrics
  assert any(m.startswith("nll") or m.startswith("bpd") for m in metrics), metrics
  assert all(r["workdir"] == wd for r in recs)
  names = gcs.objects(BUCKET, "runs/toy/eval/")
  assert any(n.split("/")[-2:] == ["samples", "shard_00001.npz"] for n in names), names
  assert any(n.endswith("points.png") for n in names), names
  assert any("/invocations/" in n for n in names), names
  for host in (ref, first, second, third):
    assert host.local_files_not_logged() == []
  assert os.listdir(first.dirs[0]) == os.listdir(second.dirs[0]) == []   # cwd: nothing at all


def gcs_steps(server, prefix):
  """The finished checkpoint steps under gs://BUCKET/<prefix>/checkpoints: on an object store
  Orbax marks a complete step with <step>/commit_success.txt."""
  names = server.objects(BUCKET, f"{prefix}/checkpoints/")
  base = len(prefix.split("/")) + 1
  return sorted({n.split("/")[base] for n in names
                 if n.split("/")[base:] == [n.split("/")[base], "commit_success.txt"]}, key=int)


# Local file calls that are not on run paths, by file: (count, why).  A new os.path / open /
# np.load ... anywhere else, or another one in these files, fails the test below.
LOCAL_ONLY = {
    "ctm_jax/fileio.py": (None, "the path layer itself (its local branch)"),
    "ctm_jax/config_lib.py": (1, "config files are Python source on the local disk"),
    "ctm_jax/compile_cache.py": (1, "the cache beside a LOCAL workdir (URLs return earlier)"),
    "ctm_jax/metric_io.py": (3, "the local TensorBoard staging folder of a URL workdir"),
    "ctm_jax/data/builders.py": (6, "TFDS generation into a local data_dir (rename, wheels)"),
    "ctm_jax/evaljob/shards.py": (1, "fileio.path(...).open: the path layer's stream"),
    "launch/common.py": (3, "config-file suggestions for --config"),
    "launch/bench.py": (1, "--also names config files: Python source on the local disk"),
    "launch/export_torch_weights.py": (4, "torch.load of a local --source pickle / JSON"),
}
LOCAL_CALL = re.compile(r"\b(os\.path\.(exists|isfile|isdir|abspath)|open\(|os\.makedirs|"
                        r"os\.replace|os\.remove|os\.rename|os\.listdir|np\.savez|np\.load|"
                        r"shutil\.|\.savefig\()")


def test_run_files_go_through_the_path_layer():
  """grep: no local file call on run paths in ctm_jax/ or launch/ outside LOCAL_ONLY."""
  found = {}
  for top in ("ctm_jax", "launch"):
    for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, f), ROOT)
          with open(os.path.join(dirpath, f)) as fh:
            hits = [ln for ln in fh if LOCAL_CALL.search(ln.split("#")[0])]
          if hits:
            found[rel] = len(hits)
  unexpected = {f: n for f, n in found.items()
                if f not in LOCAL_ONLY or LOCAL_ONLY[f][0] not in (None, n)}
  assert unexpected == {}, unexpected


@pytest.mark.slow
def test_reduced_comparison_on_the_server(gcs, tmp_path):
  """launch.compare (CD and TCD, one step each, NFE 1) with its workdir on gs://: the runs,
  their evaluations and the table land in the bucket; the host keeps only logged caches."""
  from configs import compare_toy
  c = compare_toy.get_config()
  fields = dict(workdir=f"gs://{BUCKET}/cmp", methods=("cd", "tcd"), seeds=(0,),
                run_configs={m: f"{ROOT}/configs/toy_{m}.py" for m in ("cd", "tcd")},
                num_train_steps=1, nfes=(1,),
                overrides={"training": {"sample_every": 0, "checkpoint_every": 1,
                                        "log_every": 1, "batch_size": 64},
                           "model": {"hidden": 32, "num_blocks": 2}},
                eval={"num_samples": 64, "batch_size": 64, "shard_size": 64,
                      "reference_seeds": 2, "ode_error_samples": 32})
  assert set(fields) <= set(c)
  cfg = tmp_path / "cmp_config.py"
  cfg.write_text("from configs import compare_toy\n\n\ndef get_config():\n"
                 "  c = compare_toy.get_config()\n"
                 + "".join(f"  c.{k} = {v!r}\n" for k, v in fields.items()) + "  return c\n")
  host = Host(tmp_path / "host", gcs)
  host.run("launch.compare", f"--config={cfg}", "--fake_cpu_devices=1", name="compare")
  table = fileio.read_text(f"gs://{BUCKET}/cmp/table.md").splitlines()
  assert [ln.split("|")[1:3] for ln in table[2:4]] == [[" cd ", " cm "], [" tcd ", " sss0 "]]
  saved = json.loads(gcs.read(BUCKET, "cmp/table.json"))
  assert {r["method"] for r in saved["rows"]} == {"cd", "tcd"}
  names = gcs.objects(BUCKET, "cmp/")
  for m in ("cd", "tcd"):
    assert f"cmp/runs/{m}-s0/checkpoints/1/commit_success.txt" in names
    assert any(n.startswith(f"cmp/runs/{m}-s0/eval/") and n.endswith("results.jsonl")
               for n in names)
  assert any(n.startswith("cmp/plots/") and n.endswith(".png") for n in names), names
  assert host.local_files_not_logged() == [] and os.listdir(host.dirs[0]) == []


@pytest.mark.slow
def test_two_hosts_checkpoint_to_the_server_killed_and_resumed(gcs, tmp_path):
  """Two processes (jax.distributed on 127.0.0.1, 2 fake devices each), each on its own
  "host" (empty cwd, HOME, TMPDIR), train toy_edm into one gs:// workdir; both are SIGKILLed
  after a checkpoint, both restarted: the result equals an uninterrupted two-process run bit
  for bit, and one process with 4 devices to rounding (cross-process sums)."""
  steps = ["--config.training.num_train_steps=12", "--config.training.checkpoint_every=4",
           "--config.training.log_every=4", "--config.training.sample_every=0"]
  local = tmp_path / "one_process"
  Host(tmp_path / "single", gcs).run("launch.train", f"--workdir={local}", *toy_args(4),
                                     *steps, name="single")
  wd = f"gs://{BUCKET}/runs/two"

  def start_both(round_, workdir=wd):
    port = 20000 + random.randrange(20000)
    hosts = [Host(tmp_path / f"r{round_}_p{i}", gcs) for i in range(2)]
    procs = [h.start("launch.train", f"--workdir={workdir}", *toy_args(2), *steps,
                     "--config.distributed.initialize=True",
                     f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                     "--config.distributed.num_processes=2",
                     f"--config.distributed.process_id={i}", name=f"p{i}")
             for i, h in enumerate(hosts)]
    return hosts, procs

  hosts, procs = start_both(0)
  wait_until(procs[0], lambda: bool(gcs_steps(gcs, "runs/two")), "a checkpoint on the server")
  for p in procs:
    p.send_signal(signal.SIGKILL)
  assert [p.wait(timeout=60) for p in procs] == [-signal.SIGKILL] * 2
  assert max(int(s) for s in gcs_steps(gcs, "runs/two")) < 12
  names = gcs.objects(BUCKET, "runs/two/checkpoints/")
  assert any("/ocdbt.process_1/" in n for n in names), "process 1 wrote no array shards"
  hosts2, procs = start_both(1)
  for h, p in zip(hosts2, procs):
    assert p.wait(timeout=900) == 0, h.logs[-1].read_text()[-3000:]
  # The same two processes uninterrupted: the killed-and-resumed run equals it bit for bit.
  hosts3, procs = start_both(2, f"gs://{BUCKET}/runs/two_uninterrupted")
  for h, p in zip(hosts3, procs):
    assert p.wait(timeout=900) == 0, h.logs[-1].read_text()[-3000:]
  got, step = _state(wd)
  ref, _ = _state(f"gs://{BUCKET}/runs/two_uninterrupted")
  assert step == 12
  assert _leaves_equal(got.params, ref.params) and _leaves_equal(got.ema, ref.ema)
  assert _leaves_equal(got.opt_state, ref.opt_state)
  # One process with 4 devices: equal up to the order of the cross-process sums (as in
  # tests/test_train.py's two-process test; not bitwise on XLA:CPU).
  want, want_step = _state(str(local))
  assert want_step == 12
  for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(want.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for h in hosts + hosts2 + hosts3:
    assert h.local_files_not_logged() == [] and os.listdir(h.dirs[0]) == []
