"""Data: TFDS builders for the built-in sets and the deterministic input pipeline.

Importing this package registers the built-in TFDS builders (digits, toy_gmm, checkerboard,
mnist_local), so tfds.builder / tfds.data_source find them by name.
"""
from ctm_jax.data.builders import DATASETS
from ctm_jax.data.builders import DatasetInfo
from ctm_jax.data.builders import DatasetNotPreparedError
from ctm_jax.data.builders import dataset_info
from ctm_jax.data.builders import prepare
from ctm_jax.data.builders import resolve_tfds_name
from ctm_jax.data.pipeline import BatchIterator
from ctm_jax.data.pipeline import InputPipeline
from ctm_jax.data.pipeline import load_split

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetNotPreparedError", "dataset_info", "prepare",
    "resolve_tfds_name", "BatchIterator", "InputPipeline", "load_split",
]
