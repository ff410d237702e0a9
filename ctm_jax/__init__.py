"""ctm-jax: Consistency Trajectory Models and related few-step diffusion methods in JAX/Flax."""
import os as _os

# Object-store paths (gs://...) go through etils.epath's fsspec backend (gcsfs), not
# TensorFlow's gfile: the same backend for real GCS and for an emulator named by the standard
# STORAGE_EMULATOR_HOST (gfile ignores it).  Set before epath picks a backend; a value the
# user set wins.  See ctm_jax/fileio.py.
_os.environ.setdefault("EPATH_USE_TF", "false")

__version__ = "0.1.0"
