"""The family on the 2-D mixture from the EXACT oracle teacher (issue 10's comparison).

  python -m launch.compare --config=configs/compare_toy.py

1500 steps per method (batch 256, the sampled EMA 0.99 for all, CTM included), seeds 0 and 1;
2000 samples per setting against 2000 fresh mixture draws; E over 512 x_T against scipy's
exact PF-ODE solution.  CTM samples deterministically (gamma 0) and, for the CTM paper's
contrast, with gamma 1 (CM multistep through its own G); TCD (its own network, no s input) and
tcd_s (TCD's loss on CTM's s-input network) with SSS at gamma 0, 0.3, 0.6, 1; MeanFlow by
deterministic chains of its jumps (gamma 0), sCT / sCD by CM multistep.
"""
from configs import compare_common


def get_config():
  c = compare_common.compare_block("toy", "toy")
  c.methods = ("ctm", "cd", "ct", "ict", "direct_cd", "tcd", "tcd_s", "meanflow", "sct", "scd")
  c.run_configs.tcd_s = "configs/toy_tcd_s.py"           # TCD's loss on CTM's s-input network
  c.num_train_steps = 1500
  c.seeds = (0, 1)
  c.overrides = {"training": {"sample_every": 0, "checkpoint_every": 1500}}
  c.method_overrides = {"ctm": {"ema": {"rates": (0.99, 0.999)},
                                "sampling": {"eval_ema": "rate_0p99"}}}
  c.samplers = {"ctm": "gamma:0:{n},cm:{n}", "cd": "cm:{n}", "ct": "cm:{n}", "ict": "cm:{n}",
                "direct_cd": "cm:{n}", "tcd": "sss:0:{n},sss:0.3:{n},sss:0.6:{n},sss:1:{n}",
                "tcd_s": "sss:0:{n},sss:0.3:{n},sss:0.6:{n},sss:1:{n}",
                "meanflow": "gamma:0:{n}", "sct": "cm:{n}", "scd": "cm:{n}"}
  c.eval = {"num_samples": 2000, "batch_size": 500, "shard_size": 2000,
            "reference_seeds": 3, "ode_error_samples": 512}
  return c
