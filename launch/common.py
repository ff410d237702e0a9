"""Start-up shared by the launch scripts."""
from absl import app


def begin(argv, fake_cpu_devices: int = 0) -> None:
  """Refuse stray arguments, set up fake CPU devices (before JAX starts) and quiet the
  checkpoint library's INFO logs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ctm_jax import metric_io, parallel
  if fake_cpu_devices:
    parallel.configure_fake_cpu_devices(fake_cpu_devices)
  metric_io.quiet_library_logs()
