"""Test set-up: 8 fake CPU devices and a persistent compilation cache.

Multi-device reliability on small machines: with 8 fake CPU devices on a 2-core
host, XLA:CPU's collectives (the all-reduce of a data-parallel step) were seen to
stall until the CPU rendezvous timeout aborted the process (5 of 5 runs). XLA
sizes its CPU thread pool from the NPROC environment variable; when the pool is
smaller than the number of fake devices taking part in a collective, some
participants never get a thread and the rendezvous waits forever. Setting NPROC
to at least twice the device count *before jax is imported* made 8 of 8 runs
pass, so we set it here (and ctm_jax.parallel.configure_fake_devices does the
same for scripts).
"""
import os

NUM_FAKE_DEVICES = 8

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={NUM_FAKE_DEVICES}"
os.environ["NPROC"] = str(max(int(os.environ.get("NPROC", "0") or 0), 2 * NUM_FAKE_DEVICES))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

_CACHE = os.environ.get(
    "CTM_JAX_TEST_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
