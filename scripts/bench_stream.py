"""The streaming figures of scripts/bench.py: JPEG folders read from disk.

- stream_peak_rss_mb_{small,large} and their ratio: peak RSS of `stage=pseudolabel` (the whole
  CLI process) over a folder of 20k vs 160k JPEGs (48 px files, labelled at 16 px).
- stream_first_shard_s: from starting that command on the large folder to its first shard file.
- stream_pseudolabel_ratio_vs_bare_loop: images/s of our labelling of the small folder
  (selftrain.label.pseudo_label: manifest, DataLoader workers decoding, Trainer.predict, shard
  files, selection) over a bare loop decoding the same files with the same number of workers
  and running the same forward pass.
- stream_train_images_per_s vs memory_train_images_per_s: our training path on the same 5k
  images streamed from disk and decoded in memory.

Run on its own, it measures the decoded-image cache (data.cache=decoded):

    python scripts/bench_stream.py --out cache.json     # --quick: tiny sizes, a smoke test

- cache_train_ratio_vs_memory: our training path on 20k images read from the cache vs the same
  images decoded in memory (one epoch each, alternating, the median of --repeats);
- cache_read_us_per_batch vs memory_read_us_per_batch: reading a batch of random rows from the
  cache vs indexing them in memory, and cache_read_share_of_step, the difference as a share of
  a training step: the ratio's systematic part (whole trainings of a few seconds differ from
  run to run by several percent on a shared machine);
- cache_first_pass_ratio_vs_bare_decode: the cache's first pass over 20k JPEGs (decode, resize,
  write the shards) vs a bare decode + resize of the same files, the same threads;
- cache_peak_rss_ratio: peak RSS of a process training one epoch from a 160k vs a 20k image
  cache (each measured in a fresh subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
FILE_SIZE, INPUT_SIZE = 48, 16


def _write_jpegs(job: tuple[Path, int, int]) -> None:
    from torchvision.io import encode_jpeg

    folder, start, stop = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        image = torch.from_numpy(rng.integers(0, 256, (3, FILE_SIZE, FILE_SIZE), dtype=np.uint8))
        (folder / f"{i:07d}.jpg").write_bytes(bytes(encode_jpeg(image, quality=90).numpy()))


def jpeg_folder(root: Path, n: int) -> Path:
    """n random 48 px JPEGs in folders of 1000 (made once, kept for later runs)."""
    done = root / f".complete-{n}"
    if not done.exists():
        jobs = [(root / f"{s // 1000:04d}", s, min(n, s + 1000)) for s in range(0, n, 1000)]
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_write_jpegs, jobs)
        done.write_text("")
    return root


def labelled_tree(root: Path, per_class: int = 20) -> Path:
    for c in range(3):
        jpeg_folder(root / f"class{c}", per_class)
    return root


def data_args(work: Path, pool: Path) -> list[str]:
    return [
        "data=image_folder",
        "data.num_classes=3",
        f"data.image_size={INPUT_SIZE}",
        f"data.labelled_dir={labelled_tree(work / 'labelled')}",
        f"data.test_dir={labelled_tree(work / 'test')}",
        f"data.unlabelled_dir={pool}",
        f"data.cache_dir={work / 'cache'}",
        "progress=false",
    ]


def teacher(work: Path, pool: Path) -> Path:
    run_dir = work / "teacher"
    if not (run_dir / "model.ckpt").exists():
        cmd = [*data_args(work, pool), "stage=train", "train.epochs=1", f"run_dir={run_dir}"]
        subprocess.run([sys.executable, "-m", "pipeline", *cmd], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
    return run_dir / "model.ckpt"


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MB), from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(x.split()[1]) for x in f if x.startswith("VmRSS"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total / 1024


def labelling_run(work: Path, pool: Path, name: str) -> dict:
    """stage=pseudolabel over `pool` as a CLI process: its peak RSS (the largest process, and
    the sampled sum over the process and its DataLoader workers) and its first shard's time."""
    run_dir = work / f"run-{name}"
    subprocess.run(["rm", "-rf", str(run_dir), str(work / f"{name}.shards")], check=True)
    cmd = [*data_args(work, pool), "stage=pseudolabel", f"ckpt={teacher(work, pool)}",
           f"out={work / name}.npz", "pseudo_label.tta_views=0", "data.in_memory=false",
           f"run_dir={run_dir}"]  # fmt: skip
    peak_file = work / f"{name}.maxrss"
    start = time.perf_counter()
    # A wrapper reports the largest resident size of the command's processes (ru_maxrss of its
    # children: the CLI process and its DataLoader workers).
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss));"
        " sys.exit(code)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(peak_file), sys.executable, "-m", "pipeline", *cmd],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    peak_tree, first = 0.0, None
    shards = work / f"{name}.shards"
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_rss_mb(proc.pid))
        if first is None and shards.is_dir() and any(shards.glob("shard-*.npz")):
            first = time.perf_counter() - start
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-2000:])
    peak = int(peak_file.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "images": summary["num_unlabelled"],
        "peak_rss_mb": round(peak / 1024, 1),
        "peak_tree_rss_mb": round(peak_tree, 1),
        "first_shard_s": round(first, 1) if first is not None else None,
        "wall_s": round(wall, 1),
    }


def bench_folder_rss(work: Path, small: int, large: int) -> dict:
    little = labelling_run(work, jpeg_folder(work / f"pool{small}", small), "small")
    big = labelling_run(work, jpeg_folder(work / f"pool{large}", large), "large")
    return {
        "stream_rss_images_small": little["images"],
        "stream_rss_images_large": big["images"],
        "stream_peak_rss_mb_small": little["peak_rss_mb"],
        "stream_peak_rss_mb_large": big["peak_rss_mb"],
        "stream_peak_rss_ratio": round(big["peak_rss_mb"] / little["peak_rss_mb"], 3),
        "stream_peak_tree_rss_mb_small": little["peak_tree_rss_mb"],
        "stream_peak_tree_rss_mb_large": big["peak_tree_rss_mb"],
        "stream_first_shard_s": big["first_shard_s"],
        "stream_wall_s_small": little["wall_s"],
        "stream_wall_s_large": big["wall_s"],
    }


def bench_folder_labelling(work: Path, n: int, repeats: int, compose, medians) -> dict:
    """Our labelling of a JPEG folder vs a bare decode + forward loop, same workers."""
    from pipeline.data.decode import decode_to_shape
    from pipeline.data.image_folder import load_image_folder
    from pipeline.engine.datamodule import resolve_workers
    from pipeline.engine.trainer import channels_last
    from pipeline.models.checkpoint import build_net
    from pipeline.runtime.rundir import RunDir
    from pipeline.selftrain.label import pseudo_label

    pool_dir = jpeg_folder(work / f"pool{n}", n)
    cfg = compose(
        *data_args(work, pool_dir)[:-1], "data.in_memory=false", "pseudo_label.tta_views=0"
    )
    pool = load_image_folder(cfg.data.node).extra_unlabelled
    net = build_net(cfg, 3).eval()
    if channels_last(cfg.trainer.args):  # the memory format our path labels in
        net.to(memory_format=torch.channels_last)
    workers = resolve_workers(cfg.data.num_workers, [pool])
    out_dir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    files = sorted(str(p) for p in pool_dir.rglob("*.jpg"))
    bs = int(cfg.train.eval_batch_size)

    def ours() -> None:
        subprocess.run(["rm", "-rf", str(out_dir)], check=True)
        pseudo_label(cfg, cfg.data, net, pool, out_dir / "pl.npz", RunDir(out_dir), None)

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, rows):
            out = []
            for r in rows:
                with open(files[r], "rb") as f:
                    out.append(decode_to_shape(f.read(), "jpg", 3, INPUT_SIZE))
            return torch.stack(out)

    batches = [list(range(i, min(len(files), i + bs))) for i in range(0, len(files), bs)]

    def bare() -> None:
        loader = torch.utils.data.DataLoader(
            Files(), sampler=batches, batch_size=None, num_workers=workers
        )
        with torch.inference_mode():
            for x in loader:
                net((x.float() / 255 - mean) / std).softmax(1)

    t_ours, t_bare = medians(ours, bare, repeats)
    return {
        "stream_pseudolabel_images": len(files),
        "stream_pseudolabel_workers": workers,
        "stream_pseudolabel_ours_images_per_s": round(len(files) / t_ours, 1),
        "stream_pseudolabel_bare_images_per_s": round(len(files) / t_bare, 1),
        "stream_pseudolabel_ratio_vs_bare_loop": round(t_bare / t_ours, 3),
    }


def train_vs_memory(
    cfg, images, memory, repeats: int, medians, prefix: str, memory_key: str
) -> dict:
    """One training epoch on `images` (streamed or cached) vs `memory`, the same images
    decoded into memory: images per second of each (`memory_key` the in-memory figure's name)
    and their ratio, the other keys named `prefix`_*."""
    from pipeline.engine.augment import BatchAugment
    from pipeline.engine.fit import fit, training_batches
    from pipeline.models.checkpoint import build_net
    from pipeline.selftrain.merge import merge_labelled_and_pseudo

    train_set = merge_labelled_and_pseudo(np.arange(len(images)) % 3, None, 3)
    augment = BatchAugment(**cfg.data.augment)
    per_epoch = len(training_batches(train_set, cfg, 1)(np.random.default_rng(0)))
    images_per_run = per_epoch * int(cfg.train.batch_size)
    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-train-"))

    def run(data) -> None:
        subprocess.run(["rm", "-rf", str(work_dir)], check=True)
        net = build_net(cfg, 3)
        fit(cfg, cfg.data, net, data, train_set, work_dir, 0, 1, {"num_classes": 3}, augment)

    t_images, t_memory = medians(lambda: run(images), lambda: run(memory), repeats)
    return {
        f"{prefix}_train_images": images_per_run,
        f"{prefix}_train_images_per_s": round(images_per_run / t_images, 1),
        memory_key: round(images_per_run / t_memory, 1),
        f"{prefix}_train_ratio_vs_memory": round(t_memory / t_images, 3),
    }


def bench_stream_training(work: Path, n: int, repeats: int, compose, medians) -> dict:
    """Our training path on n JPEGs streamed from disk vs the same images decoded in memory."""
    from pipeline.data.image_folder import load_image_folder
    from pipeline.data.streamed import decode_all

    pool_dir = jpeg_folder(work / f"pool{n}", n)
    cfg = compose(*data_args(work, pool_dir)[:-1], "data.in_memory=false", "train.min_steps=0",
                  "train.checkpoint_every_s=60")  # fmt: skip
    streamed = load_image_folder(cfg.data.node).extra_unlabelled
    memory = decode_all(streamed, False, "pool")
    return train_vs_memory(
        cfg, streamed, memory, repeats, medians, "stream", "memory_train_images_per_s"
    )


# --- data.cache=decoded --------------------------------------------------------------------


def cache_args(work: Path, pool: Path) -> list[str]:
    """A pool streamed from the decoded-image cache (every set: data.in_memory=false)."""
    return [*data_args(work, pool)[:-1], "data.in_memory=false", "data.cache=decoded"]


def bench_cache_training(
    work: Path, n: int, repeats: int, compose, medians, threads: int = 1
) -> dict:
    """Our training path on n images read from the decoded-image cache vs the same images
    decoded in memory (the cache made before the timing), each training on `threads` threads.

    One thread by default: on a 2-core machine, two threads wait on each other at every op,
    and whatever else the machine does stalls one of them, so whole epochs differ by +-15%
    from run to run (pair ratios 0.84-1.06, measured); with one thread, by +-4%."""
    from pipeline.data.image_folder import load_image_folder
    from pipeline.data.streamed import decode_all

    pool_dir = jpeg_folder(work / f"pool{n}", n)
    cfg = compose(*cache_args(work, pool_dir), "train.min_steps=0",
                  "train.checkpoint_every_s=60")  # fmt: skip
    cached = load_image_folder(cfg.data.node).extra_unlabelled
    memory = decode_all(cached.source, False, "pool")
    before = torch.get_num_threads()
    # (what the CLI does with trainer.num_threads; fit, called here, does not read that key)
    torch.set_num_threads(threads)
    try:
        out = train_vs_memory(
            cfg, cached, memory, repeats, medians, "cache", "cache_memory_train_images_per_s"
        )
        out.update(read_cost(cfg, cached, memory, out["cache_memory_train_images_per_s"]))
    finally:
        torch.set_num_threads(before)
    return out


def read_cost(cfg, cached, memory, memory_images_per_s: float, batches: int = 2000) -> dict:
    """What reading a training batch costs, the cache's way and from `memory` (microseconds
    per batch of random rows, each the best of 3 passes), and the difference as a share of a
    training step in memory: the ratio's systematic part, without the run-to-run spread of
    whole trainings."""
    size = int(cfg.train.batch_size)
    rng = np.random.default_rng(0)
    rows = [rng.choice(len(cached), size, replace=False) for _ in range(batches)]

    def best(images) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for r in rows:
                images.load(r)
            times.append((time.perf_counter() - t) / batches)
        return min(times)

    t_cache, t_memory = best(cached), best(memory)
    step = size / memory_images_per_s
    return {
        "cache_read_us_per_batch": round(t_cache * 1e6, 1),
        "memory_read_us_per_batch": round(t_memory * 1e6, 1),
        "cache_read_share_of_step": round((t_cache - t_memory) / step, 4),
    }


def bench_cache_first_pass(work: Path, n: int, repeats: int, compose, medians) -> dict:
    """The cache's first pass (decode, resize, write the shards) vs a bare decode + resize of
    the same files into memory with the same number of threads."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.cache import open_cache
    from pipeline.data.decode import decode_to_shape
    from pipeline.data.image_folder import load_image_folder

    pool_dir = jpeg_folder(work / f"pool{n}", n)
    cfg = compose(*data_args(work, pool_dir)[:-1], "data.in_memory=false")
    streamed = load_image_folder(cfg.data.node).extra_unlabelled
    files = [str(pool_dir / k) for k in streamed.keys(np.arange(len(streamed)))]
    cache_dir = Path(tempfile.mkdtemp(prefix="bench-cache-first-"))
    threads = min(8, os.cpu_count() or 1)  # what the cache's builder uses

    def first_pass() -> None:
        subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
        open_cache(streamed, cache_dir, skip_bad=False)

    def bare() -> None:
        out = np.zeros((len(files), 3, INPUT_SIZE, INPUT_SIZE), np.uint8)

        def decode(start: int) -> None:
            for i in range(start, min(len(files), start + 256)):
                with open(files[i], "rb") as f:
                    out[i] = decode_to_shape(f.read(), "jpg", 3, INPUT_SIZE).numpy()

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(decode, range(0, len(files), 256)))

    t_ours, t_bare = medians(first_pass, bare, repeats)
    return {
        "cache_first_pass_images": len(files),
        "cache_first_pass_images_per_s": round(len(files) / t_ours, 1),
        "cache_bare_decode_images_per_s": round(len(files) / t_bare, 1),
        "cache_first_pass_ratio_vs_bare_decode": round(t_bare / t_ours, 3),
    }


def cache_rss_child(work: Path, n: int) -> None:
    """(In a fresh process) one epoch of our training over every image of the n-image pool
    read from its cache; prints this process's peak RSS (MB) as JSON."""
    import resource

    from bench import compose

    from pipeline.data.image_folder import load_image_folder
    from pipeline.engine.augment import BatchAugment
    from pipeline.engine.fit import fit
    from pipeline.models.checkpoint import build_net
    from pipeline.selftrain.merge import merge_labelled_and_pseudo

    pool_dir = jpeg_folder(work / f"pool{n}", n)
    cfg = compose(*cache_args(work, pool_dir), "train.min_steps=0", "train.batch_size=256",
                  "train.checkpoint_every_s=null")  # fmt: skip
    cached = load_image_folder(cfg.data.node).extra_unlabelled
    train_set = merge_labelled_and_pseudo(np.arange(len(cached)) % 3, None, 3)
    augment = BatchAugment(**cfg.data.augment)
    work_dir = Path(tempfile.mkdtemp(prefix="bench-cache-rss-"))
    fit(cfg, cfg.data, build_net(cfg, 3), cached, train_set, work_dir, 0, 1,
        {"num_classes": 3}, augment)  # fmt: skip
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": len(cached), "peak_rss_mb": round(usage, 1)}))


def bench_cache_rss(work: Path, small: int, large: int, compose) -> dict:
    """Peak RSS of a process training one epoch from a `small` vs a `large` image cache (each
    cache made here first, so that only the training is measured)."""
    from pipeline.data.image_folder import load_image_folder

    out = {}
    for name, n in (("small", small), ("large", large)):
        load_image_folder(compose(*cache_args(work, jpeg_folder(work / f"pool{n}", n))).data.node)
        command = [sys.executable, __file__, "--dir", str(work), "--cache-rss-child", str(n)]
        proc = subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"cache_rss_images_{name}"] = figures["images"]
        out[f"cache_peak_rss_mb_{name}"] = figures["peak_rss_mb"]
    out["cache_peak_rss_ratio"] = round(
        out["cache_peak_rss_mb_large"] / out["cache_peak_rss_mb_small"], 3
    )
    return out


def main() -> None:
    """The decoded-image cache's figures (the other streaming figures run from bench.py)."""
    import argparse

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "pipeline-bench-stream",
                   help="where the generated JPEG folders (and their caches) are kept")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-images", type=int, default=20_000)
    p.add_argument("--train-threads", type=int, default=1,
                   help="threads of the cache-vs-memory training (bench_cache_training says why 1)")  # fmt: skip
    p.add_argument("--first-pass-images", type=int, default=20_000)
    p.add_argument("--rss-small", type=int, default=20_000)
    p.add_argument("--rss-large", type=int, default=160_000)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    p.add_argument("--cache-rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cache_rss_child is not None:
        return cache_rss_child(args.dir, args.cache_rss_child)
    if args.quick:
        args.repeats, args.train_images, args.first_pass_images = 1, 200, 300
        args.rss_small, args.rss_large = 200, 400

    from bench import alternating_medians, compose

    from pipeline.cli import setup_logging

    setup_logging(rank_zero=True)
    result = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}"}
    work = args.dir
    result.update(bench_cache_training(work, args.train_images, args.repeats, compose,
                                       alternating_medians, args.train_threads))  # fmt: skip
    result["cache_train_threads"] = args.train_threads
    result.update(bench_cache_first_pass(work, args.first_pass_images, args.repeats, compose,
                                         alternating_medians))  # fmt: skip
    result.update(bench_cache_rss(work, args.rss_small, args.rss_large, compose))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
