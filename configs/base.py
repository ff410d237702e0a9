"""The shared base of every training config (ml_collections, locked: unknown keys fail).

Experiment files call `get_base_config()`, fill in what differs, and return it locked.
Key names relied on by scripts: seed, method, data.dataset, training.batch_size (global),
training.num_train_steps, training.log_every, training.checkpoint_every, training.sample_every.
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "edm"            # edm | ctm | cd | ct | ict | direct_cd | tcd
  # A new run may start from another run's checkpoint (e.g. a CTM+DSM run, then a GAN phase):
  # every state entry with the same name and shape is taken from it, the rest is fresh.
  c.init_from = ""            # that run's workdir ('' = start from scratch)
  c.init_from_step = -1       # its checkpoint step (-1 = newest)

  c.data = ml_collections.ConfigDict(dict(
      dataset="toy_gmm",        # toy_gmm | checkerboard | digits | mnist_local | cifar10 | imagenet64_adm | imagenet64
      data_dir="",              # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
      split="train",
      random_flip=False,
      sharding="global",        # global (process-count invariant) | split (tfds per-process sub-split)
      prefetch=2,
      class_conditional=False,  # feed labels to the network
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0,
      c_noise="log4",           # log4 (DDPM++/NCSN++: ln(t)/4) | 250log (ADM: 250 ln t)
  ))

  # Network: `arch` picks the module (mlp | songunet | adm); the other fields are that
  # module's constructor arguments (filled by the experiment file).
  c.model = ml_collections.ConfigDict(dict(arch="mlp"))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam",              # adam | radam
      lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      warmup_steps=0,           # linear warm-up from 0 (EDM: lr * min(step / warmup, 1))
      grad_clip=0.0,            # global-norm clipping; 0 = off
  ))

  c.ema = ml_collections.ConfigDict(dict(
      rates=(0.999,),           # fixed-decay EMAs, one per rate
      halflife_kimg=0.0,        # > 0 adds EDM's half-life EMA ("halflife"), in thousands of examples
      rampup_ratio=0.05,        # EDM's ramp-up: half-life <= ratio * examples seen so far
  ))

  c.training = ml_collections.ConfigDict(dict(
      batch_size=256,           # global batch (all processes and devices)
      num_train_steps=1000,
      microbatches=1,           # gradient accumulation: batch is split into this many parts
      compute_dtype="float32",  # float32 | bfloat16 (params stay float32)
      log_every=100,
      checkpoint_every=1000,
      sample_every=1000,        # 0 = never
      keep_last=3,              # checkpoints kept besides the permanent ones
      keep_every=0,             # > 0: also keep every checkpoint whose step is a multiple of this
      async_checkpointing=True,
      # JAX persistent compilation cache (ctm_jax/compile_cache.py): 'auto' = JAX's own when
      # set, else <workdir>/../.jax_cache; a path; '' = leave JAX's settings alone.
      compilation_cache_dir="auto",
  ))

  c.sampling = ml_collections.ConfigDict(dict(
      num_samples=64,           # samples drawn for the grid / toy metrics at sample_every
      heun_steps=18,            # EDM Heun sampler on the denoiser head
      eval_ema="",              # which EMA to sample from ("" = the first rate)
      num_eval_samples=4096,    # toy data: samples for the MMD / sliced-Wasserstein metrics
      cm_clip_x0=True,          # image data: CM multistep clips each x0 estimate to [-1, 1]
  ))

  c.eval = eval_block()

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                  # -1: all devices not used by the other axes
      fsdp=1,                   # parameter sharding axis (1 = replicated parameters)
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False,         # call jax.distributed.initialize (multi-host)
      coordinator_address="",   # host:port; "" lets JAX detect it (TPU pods, SLURM)
      num_processes=0,          # 0 = detect
      process_id=-1,            # -1 = detect
  ))
  return c


def eval_block() -> ml_collections.ConfigDict:
  """Settings of the evaluation binary (python -m launch.eval, docs/evaluation.md).

  A run stores them in config.json; `--config.eval.FIELD=...` overrides them at evaluation
  time (base defaults < the run's block < the command line).
  """
  return ml_collections.ConfigDict(dict(
      checkpoints="latest",     # latest | all | comma list of steps
      ema="",                   # '' = sampling.eval_ema or the first EMA | comma list | all | params
      samplers="",              # comma list of sampler specs; '' = the method's default
      num_samples=0,            # samples per setting; 0 = 50000 on cifar10 / imagenet64 (the
                                # papers' FID count), 10000 elsewhere
      uint8_rule="",            # samples -> uint8: truncate (CTM, CM) | round (EDM); '' = the
                                # method's (edm, tcd: round; others: truncate)
      batch_size=256,           # global sampling batch (divisible by the device count)
      shard_size=2048,          # examples per shard file (a multiple of batch_size)
      seed=0,                   # x_T and sampler noise: fold_in(fold_in(key(seed), shard), batch)
      class_label=-1,           # class-conditional runs: -1 cycles the classes
      inception_weights="",     # the FID Inception-v3 .npz (docs/evaluation.md: how to make it)
      ref_stats="",             # FID reference .npz; '' = <workdir>/eval/fid_stats/<set>-<split>.npz
      fid_split="train",        # split of the FID reference (--mode=fid_stats): train, the
                                # eval split, or both ('train+test' / 'train+validation')
      inception_score=False,    # --mode=fid also: IS (guided-diffusion's evaluator: splits of
                                # 5000; needs weights with the logits, from pytorch-fid's .pth)
      precision_recall=False,   # --mode=fid also: precision / recall (k = 3) against the
                                # reference features of ref_stats (or of its images, arr_0)
      sfid=False,               # --mode=fid also: sFID (mixed_6/conv, 7 channels) against the
                                # mu_s, sigma_s of ref_stats (a guided-diffusion reference
                                # batch, or --mode=fid_stats with sfid=True)
      kid_subsets=100,          # KID: number of subsets ...
      kid_subset_size=1000,     # ... and their size (at most half of each set: disjoint blocks)
      nll_protocol="dequantized",    # images: dequantized | point | score_sde | ctm
                                # (ctm_jax/metrics/likelihood.py PROTOCOLS, docs/evaluation.md)
      nll_split="",             # split of --mode=nll; '' = the protocol's (ctm: train), else the
                                # data set's test/validation split
      nll_num_examples=0,       # examples of that split (0 = all)
      nll_batch_size=256,       # global batch of the NLL solves
      nll_divergence="hutchinson",   # hutchinson | exact (the trace of the jacobian; low dim.)
      nll_probes=1,             # Hutchinson probes per example
      nll_solver="tsit5",       # adaptive ODE solver of the PF-ODE (diffrax)
      nll_rtol=1e-5,
      nll_atol=1e-5,
      nll_max_steps=4096,
      nll_metrics="",           # comma list ('' = all): images bpd_ode, bpd_elbo (inputs as
                                # the protocol says); 2-D points nll_ode
      nll_elbo_samples=16,      # bpd_elbo: Monte Carlo draws (t, noise, probe) per example
      nll_elbo_form="implicit",  # bpd_elbo: implicit (CTM's eval_bpd.py) | dsm
      reference_seeds=5,        # 2-D data: seeds of the exact-denoiser / two-sample references
      ode_error_samples=512,    # toy_gmm CTM: x_T's for the ODE error against scipy
      data_dir="",              # TFDS data dir for fid_stats / nll ('' = config.data.data_dir)
      recompute=False,          # recompute finished settings and their shards
  ))
