"""Tests for pipeline.data: in-memory datasets, resizing, image folders and the splits."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_python
from omegaconf import OmegaConf
from torchvision.io import write_png

from pipeline.data import (
    DataBundle,
    ImageArrays,
    Splits,
    check_disjoint,
    conform_arrays,
    load_data,
    make_splits,
    subset,
    unlabelled_pool,
)
from pipeline.errors import UserError

CLASSES = ["cat", "dog", "frog"]


def data_cfg(name: str, **overrides) -> dict:
    cfg = {
        "name": name,
        "num_classes": 10,
        "channels": 1,
        "image_size": 8,
        "root": None,
        "download": False,
        "labels_per_class": 10,
        "val_per_class": 5,
        "test_fraction": 0.2,
        "on_bad_image": "fail",
    }
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------------------------
# digits / mnist5k
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(data_cfg("digits"))


def test_digits_shapes_dtypes_classes(digits):
    assert digits.name == "digits"
    assert digits.classes == [str(i) for i in range(10)]
    assert digits.train.images.shape == (1437, 1, 8, 8)
    assert digits.test.images.shape == (360, 1, 8, 8)
    for arrays in (digits.train, digits.test):
        assert arrays.images.dtype == torch.uint8
        assert arrays.images.is_contiguous()
        assert arrays.labels.dtype == torch.int64
    assert digits.train.images.max() == 255 and digits.train.images.min() == 0
    assert digits.extra_unlabelled is None and digits.val is None and digits.num_bad_images == 0
    # Stratified: every class is in the test set in (about) the same proportion.
    test_counts = torch.bincount(digits.test.labels, minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37


def test_digits_holdout_is_fixed_and_a_partition(digits):
    again = load_data(OmegaConf.create(data_cfg("digits")))  # a DictConfig works too
    assert torch.equal(again.test.images, digits.test.images)
    assert torch.equal(again.test.labels, digits.test.labels)
    assert torch.equal(again.train.images, digits.train.images)

    # train + test is exactly the full dataset (as a multiset of (image, label) pairs).
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = np.rint(raw.images * 255 / 16).astype(np.uint8)
    expected = Counter((im.tobytes(), int(y)) for im, y in zip(full, raw.target, strict=True))
    got = Counter()
    for arrays in (digits.train, digits.test):
        for im, y in zip(arrays.images.numpy(), arrays.labels.tolist(), strict=True):
            got[(im[0].tobytes(), y)] += 1
    assert got == expected


def test_digits_resize_and_channels():
    bundle = load_data(data_cfg("digits", channels=3, image_size=16))
    images = bundle.train.images
    assert images.shape == (1437, 3, 16, 16) and images.dtype == torch.uint8
    # 1 -> 3 channels repeats the gray channel.
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # Upscaling keeps the value range and roughly the mean brightness.
    small = load_data(data_cfg("digits")).train.images.float()
    assert abs(images.float().mean() - small.mean()) < 3


def test_mnist5k_shapes_and_pretraining_pair():
    bundle = load_data(data_cfg("mnist5k", image_size=8))
    assert bundle.train.images.shape == (4000, 1, 8, 8)
    assert bundle.test.images.shape == (1000, 1, 8, 8)
    assert torch.bincount(bundle.test.labels).tolist() == [100] * 10
    native = load_data(data_cfg("mnist5k", image_size=28))
    assert native.train.images.shape == (4000, 1, 28, 28)
    assert torch.equal(native.test.labels, bundle.test.labels)


def test_unknown_name_and_bad_config():
    with pytest.raises(UserError, match="digits"):
        load_data(data_cfg("nope"))
    with pytest.raises(UserError, match="data.num_classes"):
        load_data(data_cfg("digits", num_classes=7))
    with pytest.raises(UserError, match="data.channels"):
        load_data(data_cfg("digits", channels=2))
    with pytest.raises(UserError, match="data.test_fraction"):
        load_data(data_cfg("digits", test_fraction=1.5))


# --------------------------------------------------------------------------------------------
# Resizing and channel conversion on handmade images
# --------------------------------------------------------------------------------------------


def test_rgb_to_gray_uses_luminance_and_downscale_keeps_constants():
    red = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    red[:, 0] = 255
    arrays = ImageArrays(red, torch.zeros(2, dtype=torch.int64))
    gray = conform_arrays(arrays, channels=1, size=8)
    assert gray.images.shape == (2, 1, 8, 8)
    assert (gray.images == round(0.299 * 255)).all()
    assert conform_arrays(arrays, channels=3, size=16) is arrays  # nothing to do: no copy


# --------------------------------------------------------------------------------------------
# make_splits / Splits / check_disjoint / unlabelled_pool
# --------------------------------------------------------------------------------------------


@pytest.fixture
def labels() -> np.ndarray:
    values = np.repeat(np.arange(3), [10, 12, 15])
    return np.random.default_rng(123).permutation(values)


def test_make_splits_stratified_counts(labels):
    # The val images come out of the label budget: 5 labels per class = 2 train + 3 val.
    splits = make_splits(labels, labels_per_class=5, val_per_class=3, seed=0, num_classes=3)
    assert np.bincount(labels[splits.labelled], minlength=3).tolist() == [2, 2, 2]
    assert np.bincount(labels[splits.val], minlength=3).tolist() == [3, 3, 3]
    assert np.bincount(labels[splits.unlabelled], minlength=3).tolist() == [5, 7, 10]
    for part in (splits.labelled, splits.val, splits.unlabelled):
        assert part.dtype == np.int64
        assert np.array_equal(part, np.sort(part))
    check_disjoint(labelled=splits.labelled, val=splits.val, unlabelled=splits.unlabelled)
    union = np.concatenate([splits.labelled, splits.val, splits.unlabelled])
    assert np.array_equal(np.sort(union), np.arange(len(labels)))


def test_make_splits_seeds(labels):
    a = make_splits(labels, 5, 3, seed=0, num_classes=3)
    b = make_splits(labels, 5, 3, seed=0, num_classes=3)
    c = make_splits(labels, 5, 3, seed=1, num_classes=3)
    assert np.array_equal(a.labelled, b.labelled) and np.array_equal(a.val, b.val)
    assert np.array_equal(a.unlabelled, b.unlabelled)
    assert not np.array_equal(a.labelled, c.labelled)


def test_make_splits_all_labelled(labels):
    splits = make_splits(labels, None, val_per_class=2, seed=0, num_classes=3)
    assert len(splits.unlabelled) == 0
    assert np.bincount(labels[splits.val]).tolist() == [2, 2, 2]
    assert len(splits.labelled) == len(labels) - 6
    check_disjoint(labelled=splits.labelled, val=splits.val)


def test_make_splits_errors(labels):
    with pytest.raises(UserError, match=r"class 0 has only 10 .*data.labels_per_class"):
        make_splits(labels, labels_per_class=11, val_per_class=3, seed=0, num_classes=3)
    with pytest.raises(UserError, match=r"val_per_class=3 must be below data.labels_per_class=3"):
        make_splits(labels, labels_per_class=3, val_per_class=3, seed=0, num_classes=3)
    with pytest.raises(UserError, match="at least 1"):
        make_splits(labels, labels_per_class=0, val_per_class=0, seed=0, num_classes=3)
    with pytest.raises(UserError, match="class 3 has no"):
        make_splits(labels, labels_per_class=1, val_per_class=0, seed=0, num_classes=4)


def test_make_splits_on_digits_train_is_disjoint_from_test(digits):
    splits = make_splits(digits.train.labels.numpy(), 10, 5, seed=3, num_classes=10)
    assert len(splits.labelled) == 50 and len(splits.val) == 50
    assert len(splits.unlabelled) == len(digits.train) - 100


def test_check_disjoint_reports_names():
    with pytest.raises(AssertionError, match="'labelled' and 'unlabelled'"):
        check_disjoint(labelled=np.array([1, 2]), val=np.array([3]), unlabelled=np.array([2, 4]))
    with pytest.raises(AssertionError, match="'val' contains duplicate"):
        check_disjoint(labelled=np.array([1]), val=np.array([3, 3]))
    check_disjoint(a=np.array([0, 1]), b=np.array([], dtype=np.int64))


def test_splits_save_load_roundtrip(tmp_path, labels):
    splits = make_splits(labels, 5, 3, seed=0, num_classes=3)
    path = tmp_path / "splits.npz"
    splits.save(path)
    splits.save(path)  # overwriting works too
    loaded = Splits.load(path)
    for name in ("labelled", "val", "unlabelled"):
        assert np.array_equal(getattr(loaded, name), getattr(splits, name))
        assert getattr(loaded, name).dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["splits.npz"]  # no temp files left


def test_unlabelled_pool_appends_extra_with_unknown_labels():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 1, 2, 2)
    train = ImageArrays(images, torch.tensor([0, 1, 0, 1, 0, 1]))
    extra = ImageArrays(torch.full((3, 1, 2, 2), 200, dtype=torch.uint8), None)
    bundle = DataBundle("x", ["a", "b"], train, train, extra)
    splits = Splits(labelled=np.array([0, 1]), val=np.array([2]), unlabelled=np.array([3, 5]))
    pool = unlabelled_pool(bundle, splits)
    assert len(pool) == 5
    assert pool.images[:, 0, 0, 0].tolist() == [3, 5, 200, 200, 200]
    assert pool.labels.tolist() == [1, 1, -1, -1, -1]

    no_extra = unlabelled_pool(DataBundle("x", ["a", "b"], train, train, None), splits)
    assert no_extra.labels.tolist() == [1, 1]
    only_extra = unlabelled_pool(bundle, Splits(np.arange(6), np.array([]), np.array([])))
    assert len(only_extra) == 3 and only_extra.labels is None


def test_subset_copies_selected_rows():
    arrays = ImageArrays(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([3, 2, 1, 0]))
    part = subset(arrays, np.array([2, 0]))
    assert part.labels.tolist() == [1, 3] and part.images.shape == (2, 1, 2, 2)


# --------------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------------


def write_image(path: Path, value: int, channels: int = 3, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.full((channels, size, size), value, dtype=torch.uint8), str(path))


@pytest.fixture
def tree(tmp_path) -> Path:
    """labelled/ (6 per class), test/ (2 per class), unlabelled/ (nested, 5 images)."""
    for label, name in enumerate(CLASSES):
        for i in range(6):
            write_image(tmp_path / "labelled" / name / f"{i}.png", 40 * label + i)
        for i in range(2):
            write_image(tmp_path / "test" / name / f"t{i}.PNG", 40 * label + 20 + i)
        write_image(tmp_path / "val" / name / "v.png", 40 * label + 30)
    for i, rel in enumerate(["a.png", "b.png", "x/c.png", "x/y/d.png", "x/y/e.png"]):
        write_image(tmp_path / "unlabelled" / rel, 250 - i)
    (tmp_path / "unlabelled" / "notes.txt").write_text("not an image")
    return tmp_path


def folder_cfg(root: Path, **overrides) -> dict:
    cfg = data_cfg(
        "image_folder",
        num_classes=3,
        channels=3,
        image_size=8,
        labels_per_class=2,
        val_per_class=1,
        labelled_dir=str(root / "labelled"),
        unlabelled_dir=str(root / "unlabelled"),
        test_dir=str(root / "test"),
        val_dir=None,
    )
    cfg.update(overrides)
    return cfg


def test_image_folder_counts_classes_labels(tree):
    bundle = load_data(folder_cfg(tree, val_dir=str(tree / "val")))
    assert bundle.classes == CLASSES
    assert bundle.train.images.shape == (18, 3, 8, 8)
    assert bundle.test.images.shape == (6, 3, 8, 8)
    assert bundle.val.images.shape == (3, 3, 8, 8)
    assert bundle.extra_unlabelled.images.shape == (5, 3, 8, 8)
    assert bundle.extra_unlabelled.labels is None
    assert bundle.num_bad_images == 0
    # Each image's pixel value encodes its class: value // 40 == label.
    for arrays in (bundle.train, bundle.test, bundle.val):
        assert torch.equal(arrays.images[:, 0, 0, 0].long() // 40, arrays.labels)
    assert torch.bincount(bundle.train.labels).tolist() == [6, 6, 6]
    assert sorted(bundle.extra_unlabelled.images[:, 0, 0, 0].tolist()) == [246, 247, 248, 249, 250]

    splits = make_splits(bundle.train.labels.numpy(), 3, 1, seed=0, num_classes=3)
    pool = unlabelled_pool(bundle, splits)
    assert len(pool) == 9 + 5
    assert pool.labels.tolist()[-5:] == [-1] * 5


def test_image_folder_holdout_gray_and_resize(tree):
    cfg = folder_cfg(tree, test_dir=None, unlabelled_dir=None, test_fraction=0.5)
    bundle = load_data({**cfg, "channels": 1, "image_size": 16})
    assert bundle.extra_unlabelled is None
    assert bundle.train.images.shape == (9, 1, 16, 16)
    assert bundle.test.images.shape == (9, 1, 16, 16)
    assert torch.bincount(bundle.test.labels).tolist() == [3, 3, 3]
    again = load_data(folder_cfg(tree, test_dir=None, unlabelled_dir=None, test_fraction=0.5))
    assert torch.equal(again.test.labels, bundle.test.labels)
    # A constant image stays constant after resizing.
    first = bundle.train.images[0]
    assert (first == first[0, 0, 0]).all()


def test_image_folder_all_labelled_splits(tree):
    bundle = load_data(folder_cfg(tree, labels_per_class=None, val_per_class=0))
    splits = make_splits(bundle.train.labels.numpy(), None, 0, seed=0, num_classes=3)
    assert len(splits.labelled) == 18 and len(splits.unlabelled) == 0
    assert len(unlabelled_pool(bundle, splits)) == 5


def test_image_folder_missing_and_not_a_dir(tree):
    with pytest.raises(UserError, match=r"data.labelled_dir=.*nowhere.* does not exist"):
        load_data(folder_cfg(tree, labelled_dir=str(tree / "nowhere")))
    (tree / "file.txt").write_text("x")
    with pytest.raises(UserError, match=r"data.unlabelled_dir=.*file.txt is not a directory"):
        load_data(folder_cfg(tree, unlabelled_dir=str(tree / "file.txt")))
    with pytest.raises(UserError, match="data.labelled_dir is not set"):
        load_data(folder_cfg(tree, labelled_dir=None))


def test_image_folder_empty_trees(tree):
    (tree / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        load_data(folder_cfg(tree, labelled_dir=str(tree / "empty")))
    with pytest.raises(UserError, match="contains no images"):
        load_data(folder_cfg(tree, unlabelled_dir=str(tree / "empty")))
    (tree / "labelled" / "zebra").mkdir()
    (tree / "test" / "zebra").mkdir()
    with pytest.raises(UserError, match=r"zebra .*contains no images"):
        load_data(folder_cfg(tree, num_classes=4))


def test_image_folder_class_mismatch(tree):
    (tree / "test" / "frog").rename(tree / "test" / "toad")
    with pytest.raises(
        UserError, match=r"data.test_dir.*missing: \['frog'\].*unexpected: \['toad'\]"
    ):
        load_data(folder_cfg(tree))


def test_image_folder_corrupt_file_fail_and_skip(tree, caplog):
    (tree / "labelled" / "dog" / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"x\.png.*data.on_bad_image=skip"):
        load_data(folder_cfg(tree))
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        bundle = load_data(folder_cfg(tree, on_bad_image="skip"))
    assert bundle.num_bad_images == 1
    assert len(bundle.train) == 18
    assert any("x.png" in record.getMessage() for record in caplog.records)
    with pytest.raises(UserError, match="data.on_bad_image"):
        load_data(folder_cfg(tree, on_bad_image="ignore"))


def test_image_folder_other_formats_and_sizes(tree):
    from PIL import Image

    # Different sizes, BMP (read through PIL) and a grayscale JPEG all end up (3, 8, 8).
    Image.new("RGB", (20, 12), (90, 90, 90)).save(tree / "unlabelled" / "big.bmp")
    Image.new("L", (5, 5), 100).save(tree / "unlabelled" / "small.JPG")
    bundle = load_data(folder_cfg(tree))
    assert bundle.extra_unlabelled.images.shape == (7, 3, 8, 8)


# --------------------------------------------------------------------------------------------
# torchvision datasets: no download, so a missing dataset is a UserError
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10", "mnist", "fashion_mnist"])
def test_torchvision_sets_not_found_is_user_error(tmp_path, name):
    cfg = data_cfg(name, root=str(tmp_path / "empty"), download=False)
    with pytest.raises(UserError, match=r"data.download=true") as info:
        load_data(cfg)
    assert "data.root" in str(info.value)
    assert "\n" not in str(info.value)


def test_torchvision_root_unset_is_user_error():
    with pytest.raises(UserError, match="data.root is not set"):
        load_data(data_cfg("cifar10", root=None))


def test_epoch_batches_resumed_mid_epoch_go_on_with_the_rest_of_that_epoch():
    """A run resumed from a checkpoint saved after k optimizer steps trains on the batches an
    uninterrupted run trains on from step k: the rest of that epoch, in the same order."""
    import numpy as np

    from pipeline.engine.batches import EpochBatches

    def make(rng):
        order = rng.permutation(40)
        return [order[i : i + 4] for i in range(0, 40, 4)]  # 10 batches of 4

    def epochs(sampler, n):
        out = []
        for epoch in range(n):
            sampler.set_epoch(epoch)
            out += [b.tolist() for b in sampler]
        return out

    whole = epochs(EpochBatches(make, seed=3), 3)
    for done in (0, 7, 10, 13, 29):
        resumed = EpochBatches(make, seed=3, steps_done=lambda done=done: done)
        rest = [b.tolist() for b in resumed]  # the epoch the checkpoint was saved in
        epoch = done // 10
        assert rest == whole[done : (epoch + 1) * 10], done
    # With 2 batches per optimizer step, k steps are 2k batches.
    resumed = EpochBatches(make, seed=3, steps_done=lambda: 2, accumulate=2)
    assert [b.tolist() for b in resumed] == whole[4:10]
    assert len(np.unique(np.concatenate(whole[:10]))) == 40


# --------------------------------------------------------------------------------------------
# resident memory of long passes


def test_free_heap_memory_goes_back_to_the_system():
    """What labelling does after each shard: heap blocks freed by the program stay resident
    until the heap is trimmed (then they are returned)."""
    import ctypes
    import resource

    from pipeline.runtime import memory

    if memory._LIBC is None:
        pytest.skip("not glibc: nothing to release")
    # A handle of its own: setting argument types on the module's would change it for everyone.
    libc = memory._glibc()
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    page = resource.getpagesize()

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**20

    size, count = 100_000, 400  # below glibc's mmap threshold: heap blocks, 40 MB
    blocks = [libc.malloc(size) for _ in range(count)]
    for b in blocks:
        libc.memset(b, 1, size)  # touched: resident
    before = rss_mb()
    for b in blocks[:-1]:  # the last one keeps the heap's top in place
        libc.free(b)
    freed = rss_mb()
    assert memory.release_free_memory()
    trimmed = rss_mb()
    libc.free(blocks[-1])
    assert freed > before - 10  # freeing alone returned (almost) nothing
    assert trimmed < freed - 30  # the trim returned most of the 40 MB


def test_large_blocks_come_from_the_heap_inside_the_block_and_are_given_back_after():
    """runtime/memory.py's large_blocks_from_the_heap (the trainings with an online pool): an
    80 MB block freed and allocated again is faulted in afresh each time outside it (its own
    mapping), reused from the heap inside it (no page faults after the first), and after the
    block the memory is given back and large blocks get their own mappings again."""
    code = (
        "import ctypes, json, resource, sys\n"
        "from pathlib import Path\n"
        "from pipeline.runtime import memory\n"
        "if memory._LIBC is None: print('skip'); sys.exit()\n"
        "libc = memory._glibc()\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]\n"
        "size = 80 << 20\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    b = libc.malloc(size); libc.memset(b, 1, size); libc.free(b)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "def rss_mb():\n"
        "    return int(Path('/proc/self/statm').read_text().split()[1]) * 4096 / 2**20\n"
        "base = rss_mb()\n"
        "outside = [faults(), faults()]\n"
        "with memory.large_blocks_from_the_heap():\n"
        "    inside = [faults(), faults(), faults()]\n"
        "    held = rss_mb()\n"
        "after = faults()\n"
        "print(json.dumps([outside, inside, after, held - base, rss_mb() - base]))\n"
    )
    out = run_python(code)
    if out.strip() == "skip":
        pytest.skip("not glibc")
    outside, inside, after, held_mb, after_mb = json.loads(out)
    assert min(outside) > 1000 and after > 1000  # a fresh mapping, faulted in page by page
    assert inside[0] > 1000 and max(inside[1:]) < min(outside) / 20  # the heap's block reused
    assert held_mb > 60  # kept while inside
    assert after_mb < 20  # given back after


def test_imported_objects_are_frozen_once_per_process():
    """The CLI freezes what its stage imported (runtime/memory.py); a second call, as the next
    job of a sweep in the same process makes, freezes nothing more, so that job's leftovers
    stay collectable."""
    code = (
        "import gc, weakref\n"
        "import lightning, torch\n"
        "from pipeline.runtime.memory import freeze_imported_objects\n"
        "freeze_imported_objects()\n"
        "frozen = gc.get_freeze_count()\n"
        "class Leftover: pass\n"
        "x = Leftover(); x.me = x; ref = weakref.ref(x); del x\n"
        "freeze_imported_objects()\n"
        "assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)\n"
        "gc.collect()\n"
        "assert ref() is None, 'a reference cycle made after the freeze was not collected'\n"
        "print(frozen)\n"
    )
    assert int(run_python(code).split()[-1]) > 100_000  # torch and Lightning's objects
