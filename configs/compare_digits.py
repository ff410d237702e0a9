"""The family on the 8x8 digits, distilled from (CT / iCT: beside) the digits_edm teacher.

  python -m launch.compare --config=configs/compare_digits.py \
      --config.teacher_workdir=/work/runs/digits_edm \
      --config.eval.inception_weights=/work/runs/eval/inception_fid.npz \
      --config.eval.ref_stats=/work/runs/eval/digits-train+test.npz

Reduced to fit this 2-core machine (README): 300 steps per method, one seed, and FID / KID of
only 32 samples per setting (Inception runs at 1-5 images/s here).  FID of 32 samples carries a
large bias (compare methods with it, never with published numbers); KID is unbiased but noisy.
"""
from configs import compare_common


def get_config():
  c = compare_common.compare_block("digits", "digits")
  c.num_train_steps = 300
  c.seeds = (0,)
  c.teacher_workdir = "workdirs/digits_edm"
  c.overrides = {"training": {"sample_every": 0, "checkpoint_every": 300, "log_every": 50}}
  c.mode = "fid"
  c.eval = {"num_samples": 32, "batch_size": 32, "shard_size": 32, "kid_subsets": 50,
            "kid_subset_size": 32,
            "inception_weights": "workdirs/inception_fid.npz",
            "ref_stats": "workdirs/digits-train+test.npz"}
  c.ode_error_samples = 64
  c.ode_rtol = 1e-4
  return c
