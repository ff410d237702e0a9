"""ctm-jax: Consistency Trajectory Models and related few-step diffusion methods in JAX/Flax."""

__version__ = "0.1.0"
