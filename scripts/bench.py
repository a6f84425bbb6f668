"""Benchmarks of the pipeline's hot paths, as ratios of two things measured in the same run.

    python scripts/bench.py --out bench.json            # everything (a few minutes on 2 cores)
    python scripts/bench.py --skip-rss --skip-default   # only the two ratios

- train_ratio_vs_raw_loop: images/s of our training path (LitClassifier + ImageDataModule +
  Trainer, as engine.fit configures them, checkpointing included) over a plain PyTorch loop
  training the same model on the same tensors, batches, augmentation and optimizer;
  train_overhead_ms_per_step: what our path adds to each step. The same again without
  RandAugment (train_no_randaugment_*) when the dataset's augmentation has it.
- pseudolabel_ratio_vs_bare_forward: images/s of our pseudo-labelling (selftrain.label.pseudo_label:
  Trainer.predict, per-rank writer, merge by index, selection, atomic .npz) over a bare
  `model(x)` loop under inference_mode on the same pre-loaded tensors.
  Measured without test-time augmentation (pseudo_label.tta_views=0); with the default views,
  pseudolabel_tta_ratio_vs_bare_forward_same_views compares against a bare loop doing the same
  forward passes on the same views.
- pseudolabel_peak_rss_mb: peak RSS of a process pseudo-labelling 1,000,000 synthetic images
  generated on the fly (never all in memory).
- default_run_wall_s and default_run_phases_s: `python -m pipeline` as a whole process, and
  where its time went (start-up = wall time minus the timed phases).
- stream_*: JPEG folders streamed from disk (scripts/bench_stream.py): peak RSS over 20k vs
  160k images, time to the first labelled shard, labelling vs a bare decode-and-forward loop,
  training from disk vs from memory.
- features_round_speedup (--only-features): a self-training round (teacher head, labelling,
  student head) of a frozen torchvision resnet18 at 64 px (finetune.mode=linear, random weights
  from a local file), `model.cache_features=true` over false: `python -m pipeline` wall times
  from summary.json (start-up left out), each run in a fresh run_dir (the cache is computed
  inside the timed run). Tiny check: --only-features --repeats 1 --features-epochs 1
  --features-min-steps 2 --features-image-size 32.
- --set KEY=VALUE (repeatable) composes the config with those overrides, and --only-ratios
  runs only the training and labelling ratios: the figures on a model whose step costs what
  users' steps cost, e.g.
  --only-ratios --set model=wide_resnet28_2 --set data=mnist5k --set data.image_size=32
Each timing is the median of --repeats runs after a warm-up; A and B alternate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline import config
    from pipeline.cli import CONF_DIR, resolve
    from pipeline.config.specs import run_spec

    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=["run_dir=/tmp/bench-unused", "progress=false",
                                                 *overrides])  # fmt: skip
    return run_spec(resolve(cfg))  # the typed spec the stages take


def alternating_medians(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b` over `repeats` runs each, after one warm-up run of each;
    A and B alternate so that a slow spell of a shared machine hits both."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, acc in zip((a, b), times, strict=True):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_training(cfg, steps: int, repeats: int, suffix: str = "") -> dict:
    """Our Lightning training path vs a raw loop: same net init, batches, augmentation, optim."""
    from hydra.utils import instantiate

    from pipeline.data import ImageArrays
    from pipeline.data.task import prepare_task
    from pipeline.engine.augment import BatchAugment
    from pipeline.engine.fit import fit, training_batches
    from pipeline.engine.losses import soft_cross_entropy
    from pipeline.engine.trainer import channels_last
    from pipeline.models.checkpoint import build_net
    from pipeline.selftrain.merge import merge_labelled_and_pseudo
    from pipeline.selftrain.select import PseudoLabels

    task = prepare_task(cfg.data, cfg.seed, None)
    rows = np.arange(len(task.unlabelled))
    pseudo = PseudoLabels(rows, task.unlabelled.labels.numpy(), np.ones(len(rows), np.float32))
    train_set = merge_labelled_and_pseudo(task.labelled.labels.numpy(), pseudo, task.num_classes)
    images = ImageArrays(torch.cat([task.labelled.images, task.unlabelled.images]), None)
    # before the batches are made: both paths then train the same steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, min_steps=0))
    make = training_batches(train_set, cfg, 1)
    per_epoch = len(make(np.random.default_rng(0)))
    epochs = max(1, steps // per_epoch)
    n_images = epochs * per_epoch * cfg.train.batch_size
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    augment = BatchAugment(**cfg.data.augment)
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)

    def ours() -> None:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # train from the start each time
        net = build_net(cfg, task.num_classes)
        steps = fit(
            cfg, cfg.data, net, images, train_set, work, 0, epochs, {"num_classes": 10}, augment
        ).steps
        if steps != epochs * per_epoch:  # both paths must do the same work
            raise RuntimeError(f"our path trained {steps} steps, the raw loop {epochs * per_epoch}")

    def raw() -> None:
        torch.manual_seed(0)
        net = build_net(cfg, task.num_classes)
        if channels_last(cfg.trainer.args):  # the memory format our path trains in
            net.to(memory_format=torch.channels_last)
        opt = instantiate(cfg.optimizer)(net.parameters())
        sched = instantiate(cfg.scheduler)(opt, T_max=epochs * per_epoch)
        weight = torch.from_numpy(train_set.weight)
        net.train()
        for epoch in range(epochs):
            for i, b in enumerate(make(np.random.default_rng([0, epoch]))):
                r = torch.as_tensor(b)
                gen = torch.Generator().manual_seed(epoch * 100_000 + i)
                x = (augment(images.images[r], gen) - mean) / std
                loss = soft_cross_entropy(net(x), train_set.target_rows(b), weight[r])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()

    t_ours, t_raw = alternating_medians(ours, raw, repeats)
    ours_ips, raw_ips = n_images / t_ours, n_images / t_raw
    p = f"train{suffix}"
    return {
        f"{p}_images": n_images,
        f"{p}_ours_images_per_s": round(ours_ips, 1),
        f"{p}_raw_images_per_s": round(raw_ips, 1),
        f"{p}_ratio_vs_raw_loop": round(ours_ips / raw_ips, 3),
        # what our path adds to each optimizer step (the Trainer's set-up spread over them)
        f"{p}_overhead_ms_per_step": round((t_ours - t_raw) / (epochs * per_epoch) * 1e3, 3),
    }


def bench_consistency(steps: int, repeats: int, batch: int = 8, mu: int = 7) -> dict:
    """A training step with online pseudo-labelling (consistency=fixmatch, through engine.fit)
    vs a raw PyTorch FixMatch step on the same WRN-28-2 at 32 px: same init, batches (each
    `batch` labelled and `mu` x `batch` pool images), weak and strong views, optimizer and
    schedule. The labelled batch gets the weak view in both (data.augment = shift only)."""
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from pipeline.data.task import prepare_task
    from pipeline.engine.augment import BatchAugment
    from pipeline.engine.batches import with_pool
    from pipeline.engine.fit import OnlinePool, fit, training_batches
    from pipeline.engine.losses import soft_cross_entropy
    from pipeline.models.checkpoint import build_net
    from pipeline.selftrain.merge import merge_labelled_and_pseudo

    cfg = compose(
        "model=wide_resnet28_2", "consistency=fixmatch", f"consistency.mu={mu}",
        "data.image_size=32", "data.channels=3", "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.5,0.5,0.5]", f"train.batch_size={batch}", "train.min_steps=0",
        f"data.labels_per_class={-(-steps * batch // 10)}", "trainer.channels_last=false",
    )  # fmt: skip
    task = prepare_task(cfg.data, cfg.seed, None)
    spec = cfg.consistency
    train_set = merge_labelled_and_pseudo(task.labelled.labels.numpy(), None, task.num_classes)
    images, pool_images = task.labelled, task.unlabelled
    weak = BatchAugment(translate=0.125, flip=True)
    strong = BatchAugment(translate=0.125, flip=True, cutout=0.5, randaugment_ops=2,
                          randaugment_magnitude=10)  # fmt: skip
    pool = OnlinePool(pool_images, spec, weak, strong, None)
    make = with_pool(training_batches(train_set, cfg, 1), len(pool_images), mu)
    batches = make(np.random.default_rng([0, 0]))
    n_steps = len(batches)
    n_images = n_steps * batch * (1 + 2 * mu)  # forward passes per step: labelled, weak, strong
    work = Path(tempfile.mkdtemp(prefix="bench-consistency-"))
    mean, std = 0.5, 0.5

    def ours() -> None:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        net = build_net(cfg, task.num_classes)
        done = fit(cfg, cfg.data, net, images, train_set, work, 0, 1, {"num_classes": 10},
                   weak, pool=pool).steps  # fmt: skip
        if done != n_steps:
            raise RuntimeError(f"our path trained {done} steps, the raw loop {n_steps}")

    def raw() -> None:
        torch.manual_seed(0)
        net = build_net(cfg, task.num_classes)
        opt = instantiate(cfg.optimizer)(net.parameters())
        sched = instantiate(cfg.scheduler)(opt, T_max=n_steps)
        net.train()
        for i, (rows, pool_rows) in enumerate(batches):
            gen = [torch.Generator().manual_seed(i * 10 + k) for k in range(3)]
            x = (weak(images.images[torch.as_tensor(rows)], gen[0]) - mean) / std
            u = pool_images.images[torch.as_tensor(pool_rows)]
            uw = (weak(u, gen[1]) - mean) / std
            us = (strong(u, gen[2]) - mean) / std
            logits = net(torch.cat([x, uw, us]))
            n, m = len(x), len(uw)
            sup = soft_cross_entropy(logits[:n], train_set.target_rows(rows),
                                     torch.ones(n))  # fmt: skip
            max_p, target = logits[n : n + m].detach().softmax(1).max(1)
            mask = max_p.ge(spec.threshold).float()
            unsup = (F.cross_entropy(logits[n + m :], target, reduction="none") * mask).mean()
            loss = sup + spec.weight * unsup
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    t_ours, t_raw = alternating_medians(ours, raw, repeats)
    return {
        "consistency_model": "wide_resnet28_2 at 32 px",
        "consistency_batch": f"{batch} labelled + {mu} x {batch} pool (weak and strong)",
        "consistency_steps": n_steps,
        "consistency_ours_images_per_s": round(n_images / t_ours, 1),
        "consistency_raw_images_per_s": round(n_images / t_raw, 1),
        "consistency_ratio_vs_raw_fixmatch": round(t_raw / t_ours, 3),
    }


def bench_pseudolabel(cfg, n: int, repeats: int, views: int = 0) -> dict:
    """Our pseudo-labelling stage (selection and writing included) vs a bare forward loop.

    views=0: the clean image only, against a bare `model(x)` loop (the stage's own overhead).
    views=V: the stage's test-time augmentation (clean + V fixed views), against a bare loop
    doing the same V+1 forward passes on the same views."""
    from pipeline.data import ImageArrays
    from pipeline.data.task import prepare_task
    from pipeline.engine.augment import BatchAugment, fixed_views
    from pipeline.engine.trainer import channels_last
    from pipeline.models.checkpoint import build_net
    from pipeline.runtime.rundir import RunDir
    from pipeline.selftrain.label import pseudo_label

    cfg = dataclasses.replace(
        cfg, pseudo_label=dataclasses.replace(cfg.pseudo_label, tta_views=views)
    )
    task = prepare_task(cfg.data, cfg.seed, None)
    reps = -(-n // len(task.unlabelled))
    images = task.unlabelled.images.repeat(reps, 1, 1, 1)[:n].contiguous()
    unlabelled = ImageArrays(images, None)
    net = build_net(cfg, task.num_classes).eval()
    if channels_last(cfg.trainer.args):  # the memory format our path labels in
        net.to(memory_format=torch.channels_last)
    work = Path(tempfile.mkdtemp(prefix="bench-pl-"))
    mean = torch.tensor(list(cfg.data.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, -1, 1, 1)
    bs = cfg.train.eval_batch_size
    augment = BatchAugment(**cfg.data.augment)

    def ours() -> None:
        shutil.rmtree(work / "pseudo_shards", ignore_errors=True)  # label every shard each time
        pseudo_label(cfg, cfg.data, net, unlabelled, work / "pseudo_labels.npz", RunDir(work), None)

    def bare() -> None:
        with torch.inference_mode():
            for i in range(0, n, bs):
                x = images[i : i + bs].float() / 255
                xs = [x, *fixed_views(x, views, augment)] if views else [x]
                sum(net((v - mean) / std).softmax(1) for v in xs)

    t_ours, t_bare = alternating_medians(ours, bare, repeats)
    ours_ips, bare_ips = n / t_ours, n / t_bare
    if views:
        return {
            "pseudolabel_tta_views": views,
            "pseudolabel_tta_ours_images_per_s": round(ours_ips, 1),
            "pseudolabel_tta_ratio_vs_bare_forward_same_views": round(ours_ips / bare_ips, 3),
        }
    return {
        "pseudolabel_images": n,
        "pseudolabel_ours_images_per_s": round(ours_ips, 1),
        "pseudolabel_bare_images_per_s": round(bare_ips, 1),
        "pseudolabel_ratio_vs_bare_forward": round(ours_ips / bare_ips, 3),
    }


def rss_child(n: int) -> None:
    """Run in a child process: pseudo-label `n` synthetic images through our sharded stage
    (shard files, streaming selection and diagnostics)."""
    from pipeline.data.arrays import ImageSet
    from pipeline.models.checkpoint import build_net
    from pipeline.runtime.rundir import RunDir
    from pipeline.selftrain.label import pseudo_label

    class SyntheticImages(ImageSet):
        """`n` 8x8 images made from their index on demand: nothing is held in memory."""

        labels = None

        def __len__(self) -> int:
            return n

        def load(self, rows):
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            grid = torch.arange(64).view(1, 1, 8, 8)
            return ((rows_t.view(-1, 1, 1, 1) * 2654435761 + grid * 40503) % 256).to(
                torch.uint8
            ), []

        def keys(self, rows):
            return np.asarray(rows).astype(str)

    # Memory per batch does not grow with the views; without them the 1M images take 1/9 the time.
    cfg = compose("pseudo_label.tta_views=0", "pseudo_label.threshold=0.5")
    net = build_net(cfg, 10).eval()
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    kept, _ = pseudo_label(cfg, cfg.data, net, SyntheticImages(), work / "pseudo_labels.npz",
                           RunDir(work), None)  # fmt: skip
    print(json.dumps({"kept": len(kept)}))


def bench_rss(n: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(n)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "pseudolabel_rss_images": n,
        "pseudolabel_rss_tta_views": 0,
        "pseudolabel_peak_rss_mb": round(peak_kb / 1024, 1),
        "pseudolabel_rss_wall_s": round(time.perf_counter() - start, 1),
    }


def bench_default_run(repeats: int) -> dict:
    walls, phases = [], []
    for _ in range(repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="bench-default-")) / "run"
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", f"run_dir={run_dir}", "progress=false"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        summary = json.loads((run_dir / "summary.json").read_text())
        walls.append(wall)
        ph = dict(summary.get("phase_seconds", {}))
        ph["startup_and_other"] = wall - sum(ph.values())
        ph["final_test_accuracy"] = summary["final_test_accuracy"]
        phases.append(ph)
    i = walls.index(statistics.median_low(walls))
    return {
        "default_run_wall_s": round(walls[i], 1),
        "default_run_wall_all_s": [round(w, 1) for w in walls],
        "default_run_phases_s": {k: round(v, 2) for k, v in phases[i].items()},
    }


def bench_features(
    image_size: int, repeats: int, epochs: int | None, min_steps: int | None
) -> dict:
    """A self-training round of a frozen resnet18, with cached features vs without."""
    import torchvision

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    weights = work / "resnet18.pth"
    torch.manual_seed(0)  # (random weights: they do not change the speed)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    common = [
        "model=torchvision", "model.name=resnet18", f"model.weights={weights}",
        "finetune.mode=linear", f"data.image_size={image_size}", "selftrain.rounds=1",
        "progress=false", "pseudo_label.threshold=0.1",
        *([f"train.epochs={epochs}"] if epochs is not None else []),
        *([f"train.min_steps={min_steps}"] if min_steps is not None else []),
    ]  # fmt: skip
    runs = 0

    def run(cached: bool) -> dict:
        nonlocal runs
        runs += 1
        run_dir = work / f"run{runs}"
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", *common, f"model.cache_features={cached}",
             f"run_dir={run_dir}"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        summary = json.loads((run_dir / "summary.json").read_text())
        shutil.rmtree(run_dir, ignore_errors=True)
        return summary

    results: dict[bool, list[dict]] = {True: [], False: []}
    for i in range(repeats + 1):  # the first pair is the warm-up
        for cached in (False, True):
            summary = run(cached)
            if i:
                results[cached].append(summary)

    def median(cached: bool) -> dict:
        walls = [r["wall_time_s"] for r in results[cached]]
        return results[cached][walls.index(statistics.median_low(walls))]

    plain, fast = median(False), median(True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "features_model": "torchvision resnet18, finetune.mode=linear, selftrain.rounds=1",
        "features_image_size": image_size,
        "features_round_uncached_s": plain["wall_time_s"],
        "features_round_cached_s": fast["wall_time_s"],
        "features_round_speedup": round(plain["wall_time_s"] / max(fast["wall_time_s"], 1e-9), 2),
        "features_round_uncached_phases_s": plain["phase_seconds"],
        "features_round_cached_phases_s": fast["phase_seconds"],
        "features_final_test_accuracy": {
            "uncached": plain["final_test_accuracy"],
            "cached": fast["final_test_accuracy"],
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--pseudolabel-images", type=int, default=100_000)
    p.add_argument("--rss-images", type=int, default=1_000_000)
    p.add_argument("--default-runs", type=int, default=1)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-default", action="store_true")
    p.add_argument("--skip-stream", action="store_true")
    p.add_argument("--skip-consistency", action="store_true")
    p.add_argument("--only-consistency", action="store_true")
    p.add_argument("--consistency-steps", type=int, default=20)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for the composed config (repeatable)",
    )
    p.add_argument(
        "--only-ratios",
        action="store_true",
        help="only the training and labelling ratios (with --set: on another model or data)",
    )
    p.add_argument(
        "--only-features",
        action="store_true",
        help="only the cached-features round (model.cache_features) vs uncached",
    )
    p.add_argument("--features-image-size", type=int, default=64)
    p.add_argument("--features-epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--features-min-steps", type=int, default=None, help="default: the config's")
    p.add_argument("--stream-small", type=int, default=20_000)
    p.add_argument("--stream-large", type=int, default=160_000)
    p.add_argument("--stream-train-images", type=int, default=5_000)
    p.add_argument(
        "--stream-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pipeline-bench-stream",
        help="where the generated JPEG folders are kept between runs",
    )
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None:
        return rss_child(args.rss_child)

    from pipeline.cli import setup_logging
    from pipeline.runtime.memory import freeze_imported_objects
    from pipeline.stages import recipe

    setup_logging(rank_zero=True)
    cfg = compose(*args.set)
    recipe("selftrain")  # imported, then frozen, as `python -m pipeline` does before a stage
    freeze_imported_objects()
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}",
        "model": str(cfg.model.name),
        "dataset": str(cfg.data.name),
        "image_size": int(cfg.data.image_size),
        "overrides": list(args.set),
        "batch_size": int(cfg.train.batch_size),
    }
    if args.only_features:
        result.update(bench_features(args.features_image_size, args.repeats,
                                     args.features_epochs, args.features_min_steps))  # fmt: skip
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    if args.only_consistency:
        result.update(bench_consistency(args.consistency_steps, args.repeats))
        print(json.dumps(result, indent=2))
        return
    result.update(bench_training(cfg, args.train_steps, args.repeats))
    if (cfg.data.augment or {}).get("randaugment_ops"):
        # The same without RandAugment (digits' default noise before it had two ops): shorter
        # steps, so what our path adds per step weighs more.
        plain = compose(*args.set, "data.augment.randaugment_ops=0")
        result.update(bench_training(plain, args.train_steps, args.repeats, "_no_randaugment"))
    result.update(bench_pseudolabel(cfg, args.pseudolabel_images, args.repeats))
    views = int(cfg.pseudo_label.tta_views)
    if views:  # the default labelling, with test-time augmentation
        result.update(bench_pseudolabel(cfg, args.pseudolabel_images // 4, args.repeats, views))
    if args.only_ratios:
        args.skip_rss = args.skip_stream = args.skip_consistency = args.skip_default = True
    if not args.skip_rss:
        result.update(bench_rss(args.rss_images))
    if not args.skip_stream:
        import bench_stream as stream

        work = args.stream_dir
        result.update(stream.bench_folder_rss(work, args.stream_small, args.stream_large))
        result.update(
            stream.bench_folder_labelling(
                work, args.stream_small, args.repeats, compose, alternating_medians
            )
        )
        result.update(
            stream.bench_stream_training(
                work, args.stream_train_images, args.repeats, compose, alternating_medians
            )
        )
    if not args.skip_consistency:
        result.update(bench_consistency(args.consistency_steps, args.repeats))
    if not args.skip_default:
        result.update(bench_default_run(args.default_runs))
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
