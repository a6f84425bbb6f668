"""A whole self-training round over a generated pool of N small JPEGs in tar shards (default
10^6), through the real pipeline, its streamed sets read from the decoded-image cache:

    python scripts/bench_round.py --n 1000000 --dir /fast/disk/round --out round.json

1. generates the pool: N 28 x 28 grayscale JPEGs of 10 classes in WebDataset tar shards of
   --per-shard images (each shard written to a temporary name and renamed: a rerun skips the
   finished ones), and small labelled and test class trees;
2. runs `python -m pipeline stage=selftrain selftrain.rounds=1 data=image_folder
   data.cache=decoded ...` over them: the listing and the cache's first pass (phase `data`), the
   teacher, labelling the pool, selection, and the merge plus one student epoch over the cache
   (every pseudo-label kept: pseudo_label.threshold=0);
3. records per phase the wall time, the peak resident memory of the process tree (the CLI
   process and its DataLoader workers, sampled every 0.2 s), the exact peak of the CLI process
   (the kernel's high-water mark, reset as each phase starts), and the disk used by the pool,
   the cache and the run dir: a JSON (--out) and a printed table.

   The exact peak is the figure to compare between pool sizes: a training step allocates and
   frees a few hundred MB, so a sampled peak is the highest of however many samples hit a
   step's top, and a phase 50 times longer takes 50 times more samples.

Phases are told apart by the files the run writes (splits.npz, round_0/metrics.json, the
labelling shard files, round_1/pseudo_labels.npz, round_1/metrics.json). Kill it at any point and
rerun the same command: generation skips finished shards, the pipeline resumes its run_dir
(finished rounds, labelled shards and cache shards are kept), and the phases finished by an
earlier attempt keep the figures recorded then (state.json in --dir). Extra pipeline overrides
follow `--`, e.g. `-- trainer.accelerator=gpu`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import subprocess
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SIZE, CLASSES = 28, 10
PHASES = ("data", "teacher", "labelling", "selection", "merge_and_student", "done")


def image(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 28 x 28 uint8 image of class `label`: a bar whose place and direction the class sets."""
    x = rng.integers(0, 50, (SIZE, SIZE)).astype(np.float32)
    k = 4 + 4 * (label % 5) + int(rng.integers(-1, 2))
    if label < 5:
        x[k - 1 : k + 2, :] += 180
    else:
        x[:, k - 1 : k + 2] += 180
    return np.clip(x, 0, 255).astype(np.uint8)


def jpeg(label: int, rng: np.random.Generator) -> bytes:
    import torch
    from torchvision.io import encode_jpeg

    return bytes(encode_jpeg(torch.from_numpy(image(label, rng))[None], quality=90).numpy())


def write_shard(job: tuple[Path, int, int]) -> None:
    """Pool images start..stop-1 as one tar shard, written to a temporary name and renamed."""
    path, start, stop = job
    if path.exists():
        return
    rng = np.random.default_rng(start)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with tarfile.open(tmp, "w") as tar:
        for i in range(start, stop):
            data = jpeg(int(rng.integers(0, CLASSES)), rng)
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def class_tree(root: Path, per_class: int, seed: int) -> Path:
    done = root / ".complete"
    if not done.exists():
        rng = np.random.default_rng(seed)
        for c in range(CLASSES):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / f"c{c}" / f"{i:04d}.jpg").write_bytes(jpeg(c, rng))
        done.write_text("")
    return root


def generate(work: Path, n: int, per_shard: int) -> dict:
    """The pool's shards (those missing), and the labelled and test trees."""
    pool = work / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    shards = math.ceil(n / per_shard)
    jobs = [(pool / f"pool-{s:05d}.tar", s * per_shard, min(n, (s + 1) * per_shard))
            for s in range(shards)]  # fmt: skip
    todo = [j for j in jobs if not j[0].exists()]
    start = time.perf_counter()
    if todo:
        with Pool(os.cpu_count() or 1) as workers:
            for done, _ in enumerate(workers.imap_unordered(write_shard, todo), 1):
                print(f"\rgenerated {done}/{len(todo)} shards", end="", file=sys.stderr)
        print(file=sys.stderr)
    class_tree(work / "labelled", 10, seed=1)
    class_tree(work / "test", 50, seed=2)
    return {
        "pattern": f"{pool}/pool-{{00000..{shards - 1:05d}}}.tar",
        "shards": shards,
        "generate_s": round(time.perf_counter() - start, 1),
        "generated_shards": len(todo),
    }


def tree_rss_mb(pid: int) -> float:
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


def process_peak_mb(pid: int, reset: bool) -> float | None:
    """The peak resident memory (MB) of the process `pid` since it started or since the last
    reset (VmHWM), exact where sampling is not: the kernel keeps it at every page fault.
    `reset` starts a new peak from what is resident now (clear_refs 5, Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(x.split()[1]) for x in f if x.startswith("VmHWM"))
        if reset:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
    except (OSError, StopIteration):
        return None
    return round(kb / 1024, 1)


def pipeline_pid(wrapper: int) -> int | None:
    """The pipeline process: the wrapper's child."""
    try:
        with open(f"/proc/{wrapper}/task/{wrapper}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def phase_now(run_dir: Path, label_shards: int) -> str:
    """The phase the run is in, from the files it has written."""
    round1 = run_dir / "round_1"
    if (round1 / "metrics.json").exists():  # (then only summary.json is left to write)
        return "done"
    if (round1 / "pseudo_labels.npz").exists():
        return "merge_and_student"
    shards = round1 / "pseudo_shards"
    if shards.is_dir() and len(list(shards.glob("shard-*.npz"))) >= label_shards:
        return "selection"
    if (run_dir / "round_0" / "metrics.json").exists():
        return "labelling"
    if (run_dir / "splits.npz").exists():
        return "teacher"
    return "data"


def du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return round(total / 2**20, 1)


def run_round(work: Path, pattern: str, n: int, extra: list[str], record) -> dict:
    """The CLI run, sampled: `record(phase, figures)` as each phase ends (wall time, peak tree
    RSS; `resumed` when the phase was under way when an earlier attempt was killed)."""
    run_dir = work / "run"
    overrides = [
        "stage=selftrain",
        "selftrain.rounds=1",
        "data=image_folder",
        f"data.num_classes={CLASSES}",
        f"data.image_size={SIZE}",
        "data.channels=1",
        "data.mean=[0.3]",
        "data.std=[0.3]",
        f"data.labelled_dir={work / 'labelled'}",
        f"data.test_dir={work / 'test'}",
        f"data.unlabelled_dir='{pattern}'",
        "data.in_memory=false",
        "data.cache=decoded",
        f"data.cache_dir={work / 'cache'}",
        "train.epochs=1",
        "train.batch_size=256",  # one student epoch over 10^6 images: 3907 steps
        "train.min_steps=0",
        "pseudo_label.threshold=0.0",
        "pseudo_label.tta_views=0",
        "progress=false",
        f"run_dir={run_dir}",
        *extra,
    ]
    label_shards = math.ceil(n / 4096)  # pseudo_label.shard_size's default
    wrapper = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss));"
        " sys.exit(code)"
    )
    peak_file = work / "maxrss"
    resumed = run_dir.exists()  # an earlier attempt started: its first phase resumes
    phase_figures: list[dict] = []

    def keep(phase: str, figures: dict) -> None:
        phase_figures.append(figures)
        record(phase, figures)

    with open(work / "pipeline.log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(peak_file), sys.executable, "-m", "pipeline",
             *overrides],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        current, since, peak, main_pid = None, time.perf_counter(), 0.0, None
        while True:
            running = proc.poll() is None
            now = phase_now(run_dir, label_shards)
            main_pid = main_pid or pipeline_pid(proc.pid)
            if now != current:
                # The pipeline process's exact peak over the phase that ended (None when it
                # exited first: the last phase's is the process's own peak, below).
                exact = process_peak_mb(main_pid, reset=True) if main_pid else None
                if current is not None and current != "done":
                    keep(current, {"wall_s": round(time.perf_counter() - since, 1),
                                   "peak_tree_rss_mb": round(peak, 1),
                                   "peak_process_rss_mb": exact, "resumed": resumed})  # fmt: skip
                    resumed = False
                    # Phases shorter than the sampling interval passed between two samples.
                    for passed in PHASES[PHASES.index(current) + 1 : PHASES.index(now)]:
                        keep(passed, {"wall_s": 0.0, "peak_tree_rss_mb": round(peak, 1),
                                      "peak_process_rss_mb": exact, "resumed": False})  # fmt: skip
                current, since, peak = now, time.perf_counter(), 0.0
            if not running:
                break
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(0.2)
    if proc.returncode != 0:
        tail = (work / "pipeline.log").read_text()[-3000:]
        raise SystemExit(f"the pipeline failed (exit {proc.returncode}):\n{tail}")
    # The process's peak: the highest of its phases' (the kernel's maxrss of the children
    # is lowered by each phase's reset, and counts the DataLoader workers, which a fork
    # starts at their parent's high-water mark).
    exacts = [f["peak_process_rss_mb"] for f in phase_figures if f.get("peak_process_rss_mb")]
    children = round(int(peak_file.read_text()) / 1024, 1)
    return {
        "process_peak_rss_mb": max(exacts) if exacts else children,
        "summary": json.loads((run_dir / "summary.json").read_text()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="pool images")
    p.add_argument("--per-shard", type=int, default=10_000, help="images per tar shard")
    p.add_argument("--dir", type=Path, default=Path("/tmp/pipeline-bench-round"))
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="extra pipeline overrides (after --)")
    args = p.parse_args()
    work = args.dir / f"n{args.n}"
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"phases": {}}
    pool = generate(work, args.n, args.per_shard)
    state.setdefault("generate", pool)

    def record(phase: str, figures: dict) -> None:
        # Saved as each phase ends: a phase an earlier attempt finished keeps its figures.
        state["phases"][phase] = figures
        state_file.write_text(json.dumps(state, indent=2) + "\n")

    attempt = run_round(work, pool["pattern"], args.n, args.overrides, record)
    summary = attempt["summary"]
    result = {
        "n": args.n,
        "machine": f"{os.cpu_count()} cores",
        "phases": {k: state["phases"][k] for k in PHASES[:-1] if k in state["phases"]},
        "process_peak_rss_mb": attempt["process_peak_rss_mb"],
        "pipeline_phase_seconds": summary.get("phase_seconds"),
        "num_unlabelled": summary["num_unlabelled"],
        "num_pseudo": summary["rounds"][-1]["num_pseudo"],
        "final_test_accuracy": summary["final_test_accuracy"],
        "disk_mb": {
            "pool": du_mb(work / "pool"),
            "cache": du_mb(work / "cache" / "decoded"),
            "run_dir": du_mb(work / "run"),
        },
        "generate": state["generate"],
        "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{'phase':<20} {'wall s':>10} {'peak RSS MB':>12} {'exact (CLI process)':>20}")
    for name, figures in result["phases"].items():
        exact = figures.get("peak_process_rss_mb")
        print(f"{name:<20} {figures['wall_s']:>10} {figures['peak_tree_rss_mb']:>12} "
              f"{exact if exact is not None else '-':>20}")  # fmt: skip
    print(f"disk MB: {result['disk_mb']}; CLI process peak RSS MB: {result['process_peak_rss_mb']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
