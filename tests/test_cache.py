"""data.cache=decoded: a streamed set decoded once into memory-mapped shards gives exactly the
streamed tensors; later opens decode nothing; a changed source or size makes a new cache; a
damaged shard is decoded again; concurrent builders share the work; a whole run gives the same
results as data.cache=none."""

from __future__ import annotations

import json
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from streaming_data import CLASSES, class_tree, flat_folder, shards

from pipeline.data import streamed as streamed_module
from pipeline.data.cache import CachedImages, open_cache
from pipeline.data.manifest import Manifest, list_folder, list_shards
from pipeline.data.streamed import StreamedImages, concat
from pipeline.engine.datamodule import resolve_workers
from pipeline.errors import UserError

ROWS = 16  # rows per shard: a 50-image set is 4 shards, the last one short


def folder_set(root: Path, n: int = 50, size: int = 12, channels: int = 1) -> StreamedImages:
    if not root.exists():
        flat_folder(root, n, seed=0)
    manifest = Manifest.write(root.parent / f"manifest-{root.name}", list_folder(root, None))
    return StreamedImages(manifest, channels, size)


def count_decodes(monkeypatch) -> list[int]:
    """Counts calls of decode_to_shape made through the streamed path."""
    calls = [0]
    real = streamed_module.decode_to_shape

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(streamed_module, "decode_to_shape", counted)
    return calls


def test_cached_tensors_equal_the_streamed_ones(tmp_path):
    for kind in ("folder", "shards"):
        if kind == "folder":
            images = folder_set(tmp_path / "pool", channels=3)
        else:
            paths = shards(tmp_path / "tars", 50, per_shard=20, seed=1, labelled=True)
            manifest = Manifest.write(tmp_path / "manifest-tars", list_shards(paths))
            images = StreamedImages(manifest, 3, 12)
        cached = open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
        rows = np.array([49, 0, 16, 15, 17, 33, 3])
        want, want_bad = images.load(rows)
        got, got_bad = cached.load(rows)
        assert got.dtype == torch.uint8 and got.shape == (7, 3, 12, 12)
        assert torch.equal(got, want) and got_bad == want_bad == []
        assert torch.equal(cached.load(np.arange(50))[0], images.load(np.arange(50))[0])
        assert list(cached.keys(rows)) == list(images.keys(rows))
        # a subset (e.g. the kept pseudo-labels) reads the same rows, labels and keys
        pick = np.array([40, 2, 21])
        sub, want_sub = cached.subset(pick), images.subset(pick)
        assert isinstance(sub, CachedImages) and len(sub) == 3
        assert torch.equal(sub.load(np.arange(3))[0], want_sub.load(np.arange(3))[0])
        assert list(sub.keys(np.arange(3))) == list(want_sub.keys(np.arange(3)))
        if kind == "shards":
            assert torch.equal(sub.labels, want_sub.labels)
            assert torch.equal(cached.labels, images.labels)
        # 50 rows, 16 per shard: 4 shards, each with its marker
        assert sorted(p.name for p in cached.entry.glob("shard-*")) == [
            f"shard-{s:05d}.{ext}" for s in range(4) for ext in ("json", "npy")
        ]
        assert np.load(cached.entry / "shard-00003.npy", mmap_mode="r").shape == (2, 3, 12, 12)


def test_pickled_to_workers_as_paths_and_read_without_workers(tmp_path):
    images = folder_set(tmp_path / "pool")
    cached = open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
    cached.load(np.arange(50))  # opens every shard in this process
    blob = pickle.dumps(cached)
    assert len(blob) < 4000  # paths and row numbers, no pixels (50 x 144 bytes would be 7200)
    again = pickle.loads(blob)
    assert again._files == {} and torch.equal(
        again.load(np.arange(50))[0], cached.load(np.arange(50))[0]
    )
    # read like a set in memory: no DataLoader workers by default, alone or merged
    assert resolve_workers("auto", [cached]) == 0
    assert resolve_workers("auto", [concat([cached.subset(np.arange(3)), cached])]) == 0
    assert resolve_workers("auto", [images]) >= 1


def test_any_rows_in_any_order_read_exactly_and_nothing_is_mapped(tmp_path):
    """Shuffled rows across shards, repeats, runs (one read each) and single rows give the
    decoded pixels; reading maps no shard into the process (its resident memory holds the
    batch only, docs/data.md)."""
    images = folder_set(tmp_path / "pool")
    cached = open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
    want = images.load(np.arange(50))[0]
    rng = np.random.default_rng(0)
    for rows in (rng.permutation(50), np.array([7, 7, 8, 9, 49, 0, 1, 2, 3, 30]), np.arange(50)):
        assert torch.equal(cached.load(rows)[0], want[torch.from_numpy(rows)])
    sub = cached.subset(np.array([40, 3, 17]))
    assert torch.equal(sub.load(np.array([2, 0]))[0], want[[17, 40]])
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(cached.entry) not in maps.read_text()


def test_second_open_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    images = folder_set(tmp_path / "pool")
    calls = count_decodes(monkeypatch)
    first = open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
    assert calls[0] == 50  # the first pass decodes each image once
    second = open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
    out, _ = second.load(np.arange(50))
    assert calls[0] == 50 and second.entry == first.entry
    assert torch.equal(out, images.load(np.arange(50))[0])


def test_changed_source_or_size_makes_a_new_cache(tmp_path, monkeypatch):
    images = folder_set(tmp_path / "pool")
    entry = open_cache(images, tmp_path / "cache", False, ROWS).entry
    calls = count_decodes(monkeypatch)
    bigger = StreamedImages(images.manifest, 1, 14)
    other = open_cache(bigger, tmp_path / "cache", False, ROWS)
    assert other.entry != entry and calls[0] == 50
    assert torch.equal(other.load(np.arange(50))[0], bigger.load(np.arange(50))[0])
    three = StreamedImages(images.manifest, 3, 12)
    assert open_cache(three, tmp_path / "cache", False, ROWS).entry not in (entry, other.entry)
    # a file replaced under the same name: the same keys, but the folder changed
    flat_folder(tmp_path / "new", 1, seed=9, nested=False)
    (tmp_path / "new" / "img00000.jpg").replace(tmp_path / "pool" / "part0" / "img00000.jpg")
    changed = open_cache(images, tmp_path / "cache", False, ROWS)
    assert changed.entry != entry
    assert torch.equal(changed.load(np.arange(50))[0], images.load(np.arange(50))[0])
    # tar shards: one rewritten (same samples, new bytes) is another source
    paths = shards(tmp_path / "tars", 20, per_shard=10, seed=1, labelled=False)
    tars = StreamedImages(Manifest.write(tmp_path / "m1", list_shards(paths)), 1, 12)
    before = open_cache(tars, tmp_path / "cache", False, ROWS).entry
    shards(tmp_path / "tars", 20, per_shard=10, seed=2, labelled=False)
    tars = StreamedImages(Manifest.write(tmp_path / "m2", list_shards(paths)), 1, 12)
    after = open_cache(tars, tmp_path / "cache", False, ROWS)
    assert after.entry != before
    assert torch.equal(after.load(np.arange(20))[0], tars.load(np.arange(20))[0])


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no_marker", "bad_header", "marker"])
def test_damaged_shard_is_decoded_again(tmp_path, monkeypatch, damage):
    images = folder_set(tmp_path / "pool")
    entry = open_cache(images, tmp_path / "cache", False, ROWS).entry
    shard, marker = entry / "shard-00001.npy", entry / "shard-00001.json"
    data = bytearray(shard.read_bytes())
    if damage == "truncated":
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "flipped":  # same size, one pixel changed: only the checksum tells
        data[-7] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "no_marker":  # killed after the shard's rename, before its marker
        marker.unlink()
    elif damage == "bad_header":
        shard.write_bytes(b"\x93NUMPY garbage" + bytes(data[14:]))
    else:
        marker.write_text("{not json")
    calls = count_decodes(monkeypatch)
    again = open_cache(images, tmp_path / "cache", False, ROWS)
    assert calls[0] == ROWS  # that shard's 16 rows, nothing else
    assert torch.equal(again.load(np.arange(50))[0], images.load(np.arange(50))[0])
    assert json.loads(marker.read_text())["rows"] == ROWS


def test_concurrent_builders_share_the_work(tmp_path, monkeypatch):
    """Two builders at once (separate locks, as two jobs have): each shard decoded once."""
    images = folder_set(tmp_path / "pool")
    calls = count_decodes(monkeypatch)
    results: list[CachedImages] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(open_cache(images, tmp_path / "cache", False, ROWS))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0].entry == results[1].entry
    assert calls[0] == 50  # no shard decoded twice
    for r in results:
        assert torch.equal(r.load(np.arange(50))[0], images.load(np.arange(50))[0])
    assert not list(results[0].entry.glob(".tmp-*"))


def test_bad_images_are_handled_as_when_streamed(tmp_path):
    images = folder_set(tmp_path / "pool")
    bad_file = tmp_path / "pool" / "part1" / "img00007.jpg"
    bad_file.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = folder_set(tmp_path / "pool")  # listed again: the same keys
    with pytest.raises(UserError, match="part1/img00007.jpg.*data.on_bad_image=skip"):
        open_cache(images, tmp_path / "cache", skip_bad=False, rows_per_shard=ROWS)
    cached = open_cache(images, tmp_path / "cache", skip_bad=True, rows_per_shard=ROWS)
    row = int(np.flatnonzero(images.keys(np.arange(50)) == "part1/img00007.jpg")[0])
    rows = np.array([0, row, 49])
    want, want_bad = images.load(rows)
    got, got_bad = cached.load(rows)
    assert got_bad == want_bad and [pos for pos, _ in got_bad] == [1]
    assert "part1/img00007.jpg" in got_bad[0][1]
    assert torch.equal(got, want) and int(got[1].sum()) == 0  # zeros, as streamed
    # reopened: the bad row is remembered without decoding anything
    assert open_cache(images, tmp_path / "cache", True, ROWS).load(rows)[1] == want_bad


def test_unwritable_cache_dir_is_a_user_error(tmp_path):
    images = folder_set(tmp_path / "pool")
    (tmp_path / "file").write_text("")  # a file where the cache folder should be
    with pytest.raises(
        UserError, match="cannot write the decoded-image cache in .*data.cache_dir="
    ):
        open_cache(images, tmp_path / "file", skip_bad=False, rows_per_shard=ROWS)


def test_unknown_cache_mode_is_a_user_error(tmp_path):
    from pipeline.data.image_folder import SetOpener

    with pytest.raises(UserError, match="data.cache=mapped; choose one of: none, decoded"):
        SetOpener({"image_size": 8, "cache": "mapped", "cache_dir": str(tmp_path)}, None)


TRAIN = [
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "train.epochs=2",
    "train.min_steps=10",
    "selftrain.rounds=1",
    "data=image_folder",
    f"data.num_classes={len(CLASSES)}",
    "data.image_size=16",
    "data.channels=1",
    "data.mean=[0.3]",
    "data.std=[0.3]",
    "data.in_memory=false",
    "pseudo_label.tta_views=0",
    "pseudo_label.threshold=0.5",
]


@pytest.mark.slow
def test_selftrain_from_the_cache_gives_the_same_run(tmp_path):
    class_tree(tmp_path / "labelled", per_class=6, seed=0)
    class_tree(tmp_path / "test", per_class=6, seed=1)
    shards(tmp_path / "pool", 60, per_shard=20, seed=2, labelled=False)
    data = [
        f"data.labelled_dir={tmp_path / 'labelled'}",
        f"data.test_dir={tmp_path / 'test'}",
        f"data.unlabelled_dir='{tmp_path / 'pool'}/pool-{{000..002}}.tar'",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    runs = {}
    for mode in ("none", "decoded"):
        proc = run_cli(*TRAIN, *data, f"data.cache={mode}", f"run_dir={tmp_path / mode}",
                       env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads((tmp_path / mode / "summary.json").read_text())
    for key in ("num_unlabelled", "final_test_accuracy"):
        assert runs["none"][key] == runs["decoded"][key], key
    for a, b in zip(runs["none"]["rounds"], runs["decoded"]["rounds"], strict=True):
        assert (a["test_accuracy"], a["num_pseudo"]) == (b["test_accuracy"], b["num_pseudo"])
    for name in ("round_0", "round_1"):
        ma, mb = (json.loads((tmp_path / m / name / "metrics.json").read_text()) for m in runs)
        assert ma["test_accuracy"] == mb["test_accuracy"]
        assert ma["per_class_recall"] == mb["per_class_recall"]
    with (
        np.load(tmp_path / "none" / "round_1" / "pseudo_labels.npz") as a,
        np.load(tmp_path / "decoded" / "round_1" / "pseudo_labels.npz") as b,
    ):
        for key in ("index", "label", "confidence"):
            assert np.array_equal(a[key], b[key]), key
    # data.in_memory=false streams every set: the labelled, test and pool sets each got a cache
    metas = [
        json.loads((e / "meta.json").read_text())
        for e in (tmp_path / "cache" / "decoded").iterdir()
    ]
    assert sorted(m["count"] for m in metas) == [18, 18, 60]
    assert all(m["size"] == 16 and m["channels"] == 1 for m in metas)


@pytest.mark.slow
def test_bench_round_resumes_after_a_kill(tmp_path):
    """scripts/bench_round.py at N=2000: killed once the teacher is done, rerun, it finishes
    without generating the pool again, with every phase's figures and the disk used."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    out = tmp_path / "round.json"
    command = [sys.executable, str(REPO / "scripts" / "bench_round.py"), "--n", "2000",
               "--per-shard", "500", "--dir", str(tmp_path), "--out", str(out), "--",
               "trainer.accelerator=cpu", "trainer.num_threads=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work = tmp_path / "n2000"
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    state = work / "state.json"  # the bench records each phase as it ends
    while not (state.exists() and "teacher" in json.loads(state.read_text())["phases"]):
        assert proc.poll() is None and time.monotonic() < deadline, "no teacher"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (work / "run" / "summary.json").exists()
    shards = sorted((work / "pool").glob("pool-*.tar"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    assert len(shards) == 4
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # not generated again
    result = json.loads(out.read_text())
    phases = result["phases"]
    assert list(phases) == ["data", "teacher", "labelling", "selection", "merge_and_student"]
    assert phases["data"]["resumed"] is False and phases["teacher"]["resumed"] is False
    assert phases["labelling"]["resumed"] is True  # the first phase of the second attempt
    assert all(p["wall_s"] >= 0 and p["peak_tree_rss_mb"] > 100 for p in phases.values())
    # each phase's exact peak of the pipeline process (its high-water mark, reset per phase)
    exact = {name: p["peak_process_rss_mb"] for name, p in phases.items()}
    assert all(x > 100 for x in exact.values())
    second = ("labelling", "selection", "merge_and_student")  # (the rerun's own process)
    assert result["process_peak_rss_mb"] == max(exact[name] for name in second)
    assert result["num_unlabelled"] == 2000 and result["num_pseudo"] == 2000
    assert all(result["disk_mb"][k] > 0 for k in ("pool", "cache", "run_dir"))
    assert "merge_and_student" in done.stdout and "disk MB" in done.stdout


@pytest.mark.slow
def test_bench_stream_cache_figures_at_a_tiny_size(tmp_path):
    """scripts/bench_stream.py --quick writes every cache figure (their values are measured by
    running it at full size, never asserted: timings on a shared machine are noise)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "cache.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_stream.py"), "--quick",
         "--dir", str(tmp_path / "stream"), "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("cache_train_ratio_vs_memory", "cache_first_pass_ratio_vs_bare_decode",
                "cache_peak_rss_ratio", "cache_peak_rss_mb_small", "cache_peak_rss_mb_large",
                "cache_read_us_per_batch", "memory_read_us_per_batch"):  # fmt: skip
        assert figures[key] > 0, key
    # (the read's share of a step is a difference of two timings: its sign is not asserted)
    assert isinstance(figures["cache_read_share_of_step"], float)
    assert figures["cache_train_threads"] == 1
    assert (figures["cache_rss_images_small"], figures["cache_rss_images_large"]) == (200, 400)


def _resident_kb(path_part: str) -> int:
    """This process's resident kB in mappings of files whose path contains `path_part`."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line
            current = fields[5] if len(fields) >= 6 else ""
        elif line.startswith("Rss:") and path_part in current:
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_read_tar_shards_leave_no_pages_in_the_process(tmp_path):
    """wids maps each open shard; after a batch the process lets go of the pages it touched
    (the first pass over 10^6 images otherwise kept 16 whole shards resident)."""
    from pipeline.data import streamed

    paths = shards(tmp_path / "tars", 60, per_shard=20, seed=3, labelled=False)
    tars = StreamedImages(Manifest.write(tmp_path / "m", list_shards(paths)), 1, 12)
    out, bad = tars.load(np.arange(60))
    assert not bad and out.shape == (60, 1, 12, 12) and out.float().std() > 0
    assert sum(str(tmp_path) in k for k in streamed._OPEN_SHARDS) == 3  # open, for the next
    assert _resident_kb(str(tmp_path / "tars")) == 0
    again, _ = tars.load(np.arange(60)[::-1].copy())  # pages come back when read again
    assert torch.equal(again, out.flip(0))


def test_the_first_pass_closes_the_tar_shards_it_decoded(tmp_path):
    """Once decoded into the cache, a set's tar shards are read no more: the first pass closes
    them (each open one holds wids' index of its members, ~320 bytes a member), and the cache
    alone serves the same pixels."""
    from pipeline.data import streamed

    paths = shards(tmp_path / "tars", 60, per_shard=20, seed=4, labelled=False)
    tars = StreamedImages(Manifest.write(tmp_path / "m", list_shards(paths)), 1, 12)
    cached = open_cache(tars, tmp_path / "cache", False, ROWS)
    assert not any(str(tmp_path) in k for k in streamed._OPEN_SHARDS)
    out, _ = cached.load(np.arange(60))
    assert not any(str(tmp_path) in k for k in streamed._OPEN_SHARDS)  # (not reopened)
    assert torch.equal(out, tars.load(np.arange(60))[0]) and out.float().std() > 0
