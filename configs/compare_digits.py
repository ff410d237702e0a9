"""The family on the 8x8 digits, distilled from (CT / iCT: beside) the digits_edm teacher.

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m launch.compare \
      --config=configs/compare_digits.py

It reads the teacher run workdirs/digits_edm (python -m launch.train
--config=configs/digits_edm.py --workdir=workdirs/digits_edm), the Inception weights
workdirs/inception_fid.npz (docs/evaluation.md, "Weights") and the digits train+test statistics
that teacher run's evaluation writes:
  python -m launch.eval --workdir=workdirs/digits_edm --mode=fid_stats \
      --config.eval.fid_split=train+test --config.eval.inception_weights=workdirs/inception_fid.npz

Sized so that it and configs/compare_toy.py together run in under an hour on a 2-core CPU
(README): all six methods, 600 steps each, one seed, FID / KID of 128 samples per setting at
NFE 1, 2, 4, 8 (Inception runs at a few images/s here).  FID of 128 samples carries a large
bias (compare rows with each other, never with published numbers); KID is unbiased but noisy.
CTM is also sampled with gamma 1 (CM multistep through its own G) and TCD's SSS at gamma 0
and 0.3, for the papers' contrasts.  XLA_FLAGS above turns XLA:CPU's YNNPACK fusions off,
which makes these small networks and Inception faster on a CPU (docs/performance.md).
"""
from configs import compare_common


def get_config():
  c = compare_common.compare_block("digits", "digits")
  c.num_train_steps = 600
  c.seeds = (0,)
  c.teacher_workdir = "workdirs/digits_edm"
  c.overrides = {"training": {"sample_every": 0, "checkpoint_every": 600, "log_every": 50}}
  c.samplers = {"ctm": "gamma:0:{n},cm:{n}", "cd": "cm:{n}", "ct": "cm:{n}", "ict": "cm:{n}",
                "direct_cd": "cm:{n}", "tcd": "sss:0:{n},sss:0.3:{n}"}
  c.mode = "fid"
  c.eval = {"num_samples": 128, "batch_size": 128, "shard_size": 128, "kid_subsets": 50,
            "kid_subset_size": 64,
            "inception_weights": "workdirs/inception_fid.npz",
            "ref_stats": "workdirs/digits_edm/eval/fid_stats/digits-train+test.npz"}
  c.ode_error_samples = 64
  c.ode_rtol = 1e-4
  return c
