"""Fields of a comparison config (python -m launch.compare, ctm_jax/compare.py)."""
import ml_collections


METHODS = ("ctm", "cd", "ct", "ict", "direct_cd", "tcd")


def compare_block(name: str, config_prefix: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,
      workdir=f"workdirs/compare_{name}",      # runs/, table.md, table.json, plots/
      methods=METHODS,
      # method -> its run config file, as launch.train's --config takes it (FILE.py[:arg])
      run_configs={m: f"configs/{config_prefix}_{m}.py" for m in METHODS},
      seeds=(0, 1),
      num_train_steps=1500,                   # the same for every method
      teacher_workdir="",                     # '' = the configs' teacher (toy: the oracle)
      overrides={},                           # run-config fields (nested dicts), every run
      method_overrides={},                    # method -> run-config fields (nested dicts)
      nfes=(1, 2, 4, 8),
      # method -> comma list of sampler templates, '{n}' the NFE (NFE 1 is always onestep)
      samplers={"ctm": "gamma:0:{n}", "cd": "cm:{n}", "ct": "cm:{n}", "ict": "cm:{n}",
                "direct_cd": "cm:{n}", "tcd": "sss:0.3:{n}"},
      mode="sample",                          # sample (2-D metrics) | fid (images: FID / KID)
      eval={},                                # config.eval fields for the evaluation jobs
      ode_error_samples=64,                   # images: x_T's of E against the teacher's ODE
      ode_rtol=1e-5,                          # images: scipy DOP853 tolerance of that solve
  ))
