"""Images streamed from disk (JPEG folders, WebDataset tar shards) give the same results as the
same images in memory; pseudo-labelling is a resumable map over shards (one file per shard, an
array of jobs, a pool that changed is refused); bad input is exit 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from streaming_data import CLASSES, class_tree, flat_folder, shards

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # every test here trains or labels through the CLI
TRAIN = [
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "train.epochs=3",
    "train.min_steps=30",
    "selftrain.rounds=1",
    "data=image_folder",
    f"data.num_classes={len(CLASSES)}",
    "data.image_size=16",
    "data.channels=1",
    "data.mean=[0.3]",
    "data.std=[0.3]",
    "pseudo_label.tta_views=2",
    "pseudo_label.threshold=0.5",
]


def cli(*args: str):
    return run_cli(*args, env=ONE_THREAD)


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def bad(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    class_tree(root / "labelled", per_class=6, seed=0)
    class_tree(root / "test", per_class=10, seed=1)
    (root / "truth.json").write_text(json.dumps(flat_folder(root / "pool", 90, seed=2)))
    return root


def dirs(root: Path, pool: str | None = None) -> list[str]:
    # A brace pattern is quoted for Hydra's override grammar (as on a shell command line).
    return [
        f"data.labelled_dir={root / 'labelled'}",
        f"data.test_dir={root / 'test'}",
        f"data.unlabelled_dir='{pool or root / 'pool'}'",
        f"data.cache_dir={root / 'cache'}",
    ]


def read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_streamed_folder_gives_the_same_run_as_in_memory(folders, tmp_path):
    runs = {}
    for mode in ("true", "false"):
        run_dir = tmp_path / mode
        ok(cli(*TRAIN, *dirs(folders), f"data.in_memory={mode}", f"run_dir={run_dir}"))
        runs[mode] = run_dir
    a, b = (read_npz(runs[m] / "round_1" / "pseudo_labels.npz") for m in ("true", "false"))
    assert a.keys() == b.keys() == {"index", "label", "confidence", "key"}
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert len(a["index"]) > 0 and all(k.startswith("part") for k in a["key"])
    sa, sb = (json.loads((runs[m] / "summary.json").read_text()) for m in ("true", "false"))
    assert [r["test_accuracy"] for r in sa["rounds"]] == [r["test_accuracy"] for r in sb["rounds"]]
    assert sa["final_test_accuracy"] > 1 / 3  # three classes: above chance
    # the manifest lists the pool once, keyed by relative path
    keys = np.load(runs["false"] / "manifest" / "unlabelled" / "keys.npy")
    assert len(keys) == 90 and keys[0].decode() == "part0/img00000.jpg"
    # the kept pseudo-labels carry the key of their file
    truth = json.loads((folders / "truth.json").read_text())
    number = [int(key.split("img")[1][:5]) for key in b["key"]]
    assert np.mean([truth[i] == label for i, label in zip(number, b["label"], strict=True)]) > 0.5


def test_pool_changed_since_the_run_started_is_refused(folders, tmp_path):
    pool = tmp_path / "pool"
    flat_folder(pool, 20, seed=3)
    run_dir = tmp_path / "run"
    args = [*TRAIN, *dirs(folders, str(pool)), "data.in_memory=false", "train.epochs=0"]
    ok(cli(*args, f"run_dir={run_dir}"))
    # as a run killed after its teacher: round 1 and the summary not yet written
    shutil.rmtree(run_dir / "round_1")
    (run_dir / "summary.json").unlink()
    flat_folder(pool / "more", 2, seed=4)
    (pool / "part0" / "img00000.jpg").unlink()
    before = sorted(p.name for p in run_dir.rglob("*"))
    line = bad(cli(*args, f"run_dir={run_dir}"), "2 files added, 1 removed")
    assert "data.unlabelled_dir changed since this run started" in line
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_corrupt_jpeg_met_mid_stream(folders, tmp_path):
    pool = tmp_path / "pool"
    flat_folder(pool, 30, seed=5)
    (pool / "part1" / "img00007.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = _teacher(folders, tmp_path)
    args = [*TRAIN, *dirs(folders, str(pool)), "data.in_memory=false", "stage=pseudolabel"]
    line = bad(cli(*args, f"ckpt={ckpt}", f"run_dir={tmp_path / 'fail'}"), "img00007.jpg")
    assert "data.on_bad_image=skip" in line
    ok(cli(*args, f"ckpt={ckpt}", "data.on_bad_image=skip", f"run_dir={tmp_path / 'skip'}"))
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["num_bad_images"] == 1 and summary["num_unlabelled"] == 30
    kept = read_npz(tmp_path / "skip" / "pseudo_labels.npz")
    assert "part1/img00007.jpg" not in set(kept["key"])


def _teacher(folders: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "teacher"
    if not (run_dir / "model.ckpt").exists():
        ok(cli(*TRAIN, *dirs(folders), "stage=train", f"run_dir={run_dir}"))
    return run_dir / "model.ckpt"


def test_pseudo_labelling_as_an_array_of_jobs_over_tar_shards(folders, tmp_path):
    pool = shards(tmp_path / "shards", 50, per_shard=20, seed=6, labelled=True)
    spec = str(tmp_path / "shards" / "pool-{000..002}.tar")
    ckpt = _teacher(folders, tmp_path)
    out = tmp_path / "pl.npz"
    args = [*TRAIN, *dirs(folders, spec), "stage=pseudolabel", f"ckpt={ckpt}", f"out={out}"]
    args += ["data.in_memory=false", "pseudo_label.num_shards=3"]
    for shard in (0, 2):
        ok(cli(*args, f"pseudo_label.shard={shard}", f"run_dir={tmp_path / f'job{shard}'}"))
    files = sorted((tmp_path / "pl.shards").glob("*.npz"))
    assert [f.name for f in files] == ["shard-00000-of-00003.npz", "shard-00002-of-00003.npz"]
    first = {f.name: f.stat().st_mtime_ns for f in files}
    # the last job labels only the shard that has no file, then selects over all three
    ok(cli(*args, f"run_dir={tmp_path / 'final'}"))
    assert {f.name: f.stat().st_mtime_ns for f in files} == first
    kept = read_npz(out)
    assert all(k.startswith("pool-00") and k.endswith(tuple("0123456789")) for k in kept["key"])
    # the same as labelling the pool in one job
    one = tmp_path / "one.npz"
    args_one = [a for a in args if not a.startswith(("out=", "pseudo_label.num_shards"))]
    ok(cli(*args_one, f"out={one}", f"run_dir={tmp_path / 'one'}"))
    single = read_npz(one)
    for k in ("index", "label", "confidence", "key"):
        assert np.array_equal(single[k], kept[k]), k
    # shards carry their labels (KEY.cls): the pool's truth gives the pseudo-label accuracy
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["num_unlabelled"] == 50 and summary["pseudo_accuracy"] is not None
    assert len(pool) == 3


def test_bad_shards_and_shard_numbers(folders, tmp_path):
    shards(tmp_path / "s", 10, per_shard=10, seed=7, labelled=False)
    ckpt = _teacher(folders, tmp_path)
    args = [*TRAIN, "stage=pseudolabel", f"ckpt={ckpt}", "data.in_memory=false"]
    nothing = str(tmp_path / "s" / "none-{000..001}.tar")
    bad(cli(*args, *dirs(folders, nothing), f"run_dir={tmp_path / 'a'}"), "does not exist")
    data = (tmp_path / "s" / "pool-000.tar").read_bytes()
    (tmp_path / "s" / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    cut = str(tmp_path / "s" / "cut.tar")
    bad(cli(*args, *dirs(folders, cut), f"run_dir={tmp_path / 'b'}"), "truncated", "cut.tar")
    spec = str(tmp_path / "s" / "pool-000.tar")
    line = bad(
        cli(
            *args,
            *dirs(folders, spec),
            "pseudo_label.num_shards=2",
            "pseudo_label.shard=5",
            f"run_dir={tmp_path / 'c'}",
        ),  # fmt: skip
        "pseudo_label.shard=5 is out of range",
    )
    assert "0..1" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_decoding_on_the_device_gives_the_same_pseudo_labels(folders, tmp_path):
    """data.decode_on=device: DataLoader workers only read the files, the batch is decoded
    where the model runs (torchvision.io.decode_jpeg: nvJPEG on a GPU, libjpeg here)."""
    ckpt = _teacher(folders, tmp_path)
    args = [*TRAIN, *dirs(folders), "stage=pseudolabel", f"ckpt={ckpt}", "data.in_memory=false"]
    out = {}
    for where in ("workers", "device"):
        out[where] = tmp_path / f"{where}.npz"
        ok(
            cli(
                *args, f"data.decode_on={where}", f"out={out[where]}", f"run_dir={tmp_path / where}"
            )
        )
    a, b = read_npz(out["workers"]), read_npz(out["device"])
    for k in ("index", "label", "key"):
        assert np.array_equal(a[k], b[k]), k
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-6)
    assert len(a["index"]) > 0


def test_labelled_shards_with_a_sample_without_its_label_name_it(folders, tmp_path):
    """A labelled set of shards where a sample has no KEY.cls: exit 2 naming that sample (not
    advice about data.num_classes)."""
    import io
    import tarfile

    paths = shards(tmp_path / "lab", 12, per_shard=12, seed=3, labelled=True)
    with tarfile.open(paths[0]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(paths[0], "w") as tar:
        for member, data in members:
            if member.name != "000004.cls":
                tar.addfile(member, io.BytesIO(data))
    args = [*TRAIN, "stage=train", *dirs(folders), f"data.labelled_dir={paths[0]}"]
    line = bad(cli(*args, f"run_dir={tmp_path / 'run'}"), "000004", "KEY.cls")
    assert "num_classes" not in line
