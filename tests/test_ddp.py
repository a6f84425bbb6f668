"""DDP, sweeps and the cluster path, on CPU with gloo, through the real CLI.

Two-process runs use `trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp`: the job
starts its two ranks itself (pipeline/launch.py), each with one intra-op thread on 2 cores.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, run_cli, stop_mid_epoch_and_resume

DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
# Smaller than FAST: these tests are about who runs what and where, not about accuracy.
TINY = [*FAST, "train.epochs=2", "train.min_steps=30", "train.eval_batch_size=100"]
DIGITS = 1797  # images in scikit-learn's digits


# One intra-op thread per process: on a busy 2-core machine more threads make small convs many
# times slower (the DDP ranks get this from pipeline/launch.py anyway).
THREADS = {"OMP_NUM_THREADS": "1"}


def cli(*overrides: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*overrides, cwd=cwd, env=THREADS)


# The sweep's job dirs are named by each job's result overrides (hydra.sweep.subdir).
JOB = "seed={},selftrain.rounds=1,train.epochs=2,train.eval_batch_size=100,train.min_steps=30"


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def assert_same_pseudo_labels(one: Path, two: Path, n: int) -> None:
    """Two pseudo_labels.npz made with threshold 0: each holds every pool index 0..n-1 once,
    and they give each index the same label and confidence."""
    a, b = np.load(one), np.load(two)
    for z in (a, b):
        assert np.array_equal(np.sort(z["index"]), np.arange(n))
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    assert np.array_equal(a["label"][order_a], b["label"][order_b])
    np.testing.assert_allclose(a["confidence"][order_a], b["confidence"][order_b], atol=1e-5)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-job -m sweep of the whole self-training loop, each job on 2 DDP ranks."""
    cwd = tmp_path_factory.mktemp("sweep_cwd")
    sweep_dir = cwd / "X"
    proc = cli("-m", "seed=0,1", *TINY, *DDP, f"hydra.sweep.dir={sweep_dir}", cwd=cwd)
    ok(proc)
    return cwd, sweep_dir, proc


@pytest.mark.slow
def test_ddp_sweep_makes_one_dir_per_job_and_runs_each_job_once(sweep):
    cwd, sweep_dir, proc = sweep
    assert sorted(p.name for p in cwd.iterdir()) == ["X"]  # no other sweep or output dir
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        JOB.format(0),
        JOB.format(1),
    ]
    log = proc.stdout + proc.stderr
    assert log.count("starting 2 DDP ranks") == 2  # two jobs, each started its ranks once
    for seed in (0, 1):
        job = sweep_dir / JOB.format(seed)
        summary = json.loads((job / "summary.json").read_text())
        assert summary["seed"] == seed
        assert [r["round"] for r in summary["rounds"]] == [0, 1]
        for name in ("config.yaml", "round_0/model.ckpt", "round_1/model.ckpt"):
            assert (job / name).is_file(), name
        # Every rank wrote into its job's dir and nowhere else; no per-rank leftovers.
        assert not list(job.rglob("rank*.npz")) and not list(job.rglob("predict_shards"))
        pseudo = np.load(job / "round_1" / "pseudo_labels.npz")
        assert len(np.unique(pseudo["index"])) == len(pseudo["index"])
        assert json.loads((job / "round_1" / "metrics.json").read_text())["num_test"] == 360


@pytest.mark.slow
def test_ddp_pseudo_labels_equal_one_process(sweep, tmp_path):
    """Same checkpoint, 1 vs 2 processes: the same index set, each index once, the same labels."""
    _, sweep_dir, _ = sweep
    ckpt = sweep_dir / JOB.format(0) / "round_0" / "model.ckpt"
    common = [*TINY, "stage=pseudolabel", f"ckpt={ckpt}", "pseudo_label.threshold=0.0"]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    ok(cli(*common, f"out={one}", f"run_dir={tmp_path / 'run1'}"))
    ok(cli(*common, *DDP, f"out={two}", f"run_dir={tmp_path / 'run2'}"))
    num_unlabelled = json.loads((tmp_path / "run1" / "summary.json").read_text())["num_unlabelled"]
    assert_same_pseudo_labels(one, two, num_unlabelled)
    # Rank 0 alone wrote the shared artifacts.
    assert not list((tmp_path / "run2").rglob("rank*.npz"))


@pytest.mark.slow
def test_ddp_pseudo_labels_of_a_streamed_folder_equal_one_process(tmp_path):
    """A JPEG folder streamed from disk (DataLoader workers decoding), 1 vs 2 processes: every
    image labelled exactly once, the same labels, the same keys."""
    from streaming_data import class_tree, flat_folder

    class_tree(tmp_path / "labelled", per_class=4, seed=0)
    flat_folder(tmp_path / "pool", 37, seed=1)
    data = [
        "data=image_folder", "data.num_classes=3", "data.image_size=16", "data.channels=1",
        "data.mean=[0.3]", "data.std=[0.3]", f"data.labelled_dir={tmp_path / 'labelled'}",
        f"data.unlabelled_dir={tmp_path / 'pool'}", "data.in_memory=false",
        "data.test_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    ok(cli(*TINY, *data, "stage=train", f"run_dir={tmp_path / 'teacher'}"))
    common = [*TINY, *data, "stage=pseudolabel", f"ckpt={tmp_path / 'teacher' / 'model.ckpt'}"]
    common += ["pseudo_label.threshold=0.0", "pseudo_label.shard_size=8", "data.num_workers=1"]
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    ok(cli(*common, f"out={one}", f"run_dir={tmp_path / 'run1'}"))
    ok(cli(*common, *DDP, f"out={two}", f"run_dir={tmp_path / 'run2'}"))
    a, b = np.load(one), np.load(two)
    assert np.array_equal(a["index"], np.arange(37)) and np.array_equal(b["index"], a["index"])
    assert np.array_equal(a["key"], b["key"]) and np.array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-5)
    assert len(list((tmp_path / "two.shards").glob("shard-*-of-00005.npz"))) == 5


@pytest.mark.slow
def test_ddp_loop_on_cached_features_labels_every_pool_image_once_as_its_teacher_does(tmp_path):
    """model.cache_features=true on 2 ranks, with a pool of two feature parts (4096 rows and
    the rest), one computed by each rank: the round's pseudo-labels (threshold 0) hold every
    pool image once, with the labels and confidences its teacher gives the images themselves
    (stage=pseudolabel, one process, no test-time views)."""
    from conftest import compose_spec
    from streaming_data import class_tree, flat_folder

    from pipeline.engine.features import PART_ROWS
    from pipeline.models.checkpoint import build_net, hparams_for, model_checkpoint
    from pipeline.runtime.io import save_checkpoint

    n = PART_ROWS + 104
    class_tree(tmp_path / "labelled", per_class=8, seed=0)
    flat_folder(tmp_path / "pool", n, seed=1)
    data = [
        "data=image_folder", "data.num_classes=3", "data.image_size=16", "data.channels=3",
        "data.mean=[0.3,0.3,0.3]", "data.std=[0.3,0.3,0.3]", "data.test_fraction=0.25",
        f"data.labelled_dir={tmp_path / 'labelled'}", f"data.unlabelled_dir={tmp_path / 'pool'}",
        "model.net.dropout=0",
    ]  # fmt: skip
    pre = tmp_path / "pre.ckpt"
    cfg = compose_spec(*data)
    save_checkpoint(pre, model_checkpoint(build_net(cfg, 3), hparams_for(cfg, cfg.data, 3), {}))
    cached = ["init=pretrained", f"pretrain.ckpt={pre}", "finetune.mode=linear"]
    cached += ["model.cache_features=true", "pseudo_label.threshold=0.0"]
    run = tmp_path / "run"
    ok(cli(*TINY, *data, *cached, *DDP, f"run_dir={run}"))
    (pool_features,) = (run / "features").glob("unlabelled-*")
    assert json.loads((pool_features / "meta.json").read_text())["rows"] == n
    assert sorted(p.name for p in pool_features.glob("part-*.npy")) == [
        "part-00000.npy",
        "part-00001.npy",
    ]
    out = tmp_path / "images.npz"
    ok(cli(*TINY, *data, "stage=pseudolabel", f"ckpt={run / 'round_0' / 'model.ckpt'}",
           "pseudo_label.threshold=0.0", "pseudo_label.tta_views=0", f"out={out}",
           f"run_dir={tmp_path / 'images'}"))  # fmt: skip
    assert_same_pseudo_labels(run / "round_1" / "pseudo_labels.npz", out, n)


@pytest.mark.slow
def test_one_and_two_processes_take_the_same_optimizer_steps(tmp_path):
    """train.batch_size is the global batch: 2 processes take the steps 1 process takes."""
    steps = {}
    for name, extra in (("one", []), ("two", DDP)):
        run_dir = tmp_path / name
        ok(cli(*TINY, *extra, "stage=train", "train.batch_size=32", f"run_dir={run_dir}"))
        log = run_dir / "model.ckpt"
        assert log.is_file()
        steps[name] = json.loads((run_dir / "metrics.json").read_text())["train_steps"]
    assert steps["one"] == steps["two"] > 0
    bad = cli(*TINY, *DDP, "stage=train", "train.batch_size=33", f"run_dir={tmp_path / 'odd'}")
    assert bad.returncode == 2 and "train.batch_size=33" in bad.stderr


@pytest.mark.slow
def test_ddp_evaluation_counts_each_test_sample_once(sweep, tmp_path):
    """A test split of odd size (361) in uneven batches on 2 ranks (181 + 180, batches of 64):
    each test sample counted exactly once."""
    _, sweep_dir, _ = sweep
    ckpt = sweep_dir / JOB.format(0) / "round_1" / "model.ckpt"
    fraction = 0.2004  # ceil(0.2004 * 1797) = 361 test images
    expected = math.ceil(fraction * DIGITS)
    assert expected % 2 == 1
    run_dir = tmp_path / "run"
    ok(
        cli(
            *TINY,
            *DDP,
            "stage=evaluate",
            f"ckpt={ckpt}",
            f"data.test_fraction={fraction}",
            "train.eval_batch_size=64",
            f"run_dir={run_dir}",
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_test"] == expected
    assert json.loads((run_dir / "summary.json").read_text())["num_test"] == expected


@pytest.mark.slow
def test_submitit_local_sweep_of_ddp_jobs(sweep, tmp_path):
    """hydra/launcher=submitit_local: 2 jobs, each in a process of its own (as on a cluster
    node), each starting its 2 DDP ranks there."""
    _, sweep_dir, _ = sweep
    ckpt = sweep_dir / JOB.format(1) / "round_0" / "model.ckpt"
    out = tmp_path / "S"
    proc = cli(
        "-m",
        "train.eval_batch_size=100,50",  # two jobs (evaluating the same checkpoint)
        *[o for o in TINY if not o.startswith("train.eval_batch_size")],
        *DDP,
        "stage=evaluate",
        f"ckpt={ckpt}",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={out}",
        cwd=tmp_path,
    )
    ok(proc)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(names) == 3 and names[0] == ".submitit", names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S"]
    for job in names[1:]:
        summary = json.loads((out / job / "summary.json").read_text())
        assert summary["stage"] == "evaluate" and summary["num_test"] == 360
    logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.*"))
    assert logs.count("starting 2 DDP ranks") == 2


@pytest.mark.slow
def test_requeue_signal_saves_last_ckpt_and_the_rerun_resumes(tmp_path):
    """USR2 (what SLURM sends before the time limit) during training: the job saves
    checkpoints/last.ckpt mid-epoch and stops; running the same command again resumes."""
    stop_mid_epoch_and_resume(tmp_path, signal.SIGUSR2, env=THREADS)


# --- fast checks of the launch decisions and the SLURM launcher config -----------------------


def trainer_cfg(**kw):
    """The trainer node as the runtime gets it: plain values."""
    return {"accelerator": "cpu", "devices": 1, "strategy": "auto", **kw}


def test_which_strategies_start_ranks(monkeypatch):
    from pipeline.runtime import launch

    for var in ("RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SUBMITIT_LOCAL_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert launch.ranks_to_start(trainer_cfg(devices=2, strategy="ddp")) == 2
    assert launch.ranks_to_start(trainer_cfg(devices=2)) == 2  # auto with 2 devices: DDP
    assert launch.ranks_to_start(trainer_cfg(devices=2, strategy="ddp_spawn")) == 2
    assert launch.ranks_to_start(trainer_cfg(devices=1, strategy="ddp")) == 0
    assert launch.ranks_to_start(trainer_cfg(devices=[0, 1], strategy="ddp")) == 2
    # The spawning variants run as ddp in ranks that already exist (and the log says so).
    assert launch.lightning_strategy(trainer_cfg(strategy="ddp_spawn")) == "ddp"
    assert launch.lightning_strategy(
        trainer_cfg(strategy="ddp_fork_find_unused_parameters_true")
    ) == ("ddp_find_unused_parameters_true")
    # Under srun / torchrun the ranks exist: nothing is started.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert launch.ranks_to_start(trainer_cfg(devices=2, strategy="ddp")) == 0


def test_lightning_gets_slurm_environment_without_auto_requeue(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from pipeline.runtime import launch

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "job"}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    (plugin,) = launch.lightning_settings(trainer_cfg(devices=2, strategy="ddp"))["plugins"]
    assert isinstance(plugin, SLURMEnvironment) and not plugin.auto_requeue
    monkeypatch.delenv("SLURM_NTASKS")
    assert launch.lightning_settings(trainer_cfg())["plugins"] == []


def test_slurm_launcher_config_follows_the_trainer():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import config

    config.register()
    overrides = ["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config", overrides=[*overrides, "trainer.accelerator=gpu"], return_hydra_config=True
        )
        cpu = compose(
            "config", overrides=[*overrides, "trainer.accelerator=cpu"], return_hydra_config=True
        )
    assert cpu.hydra.launcher.gpus_per_node is None  # a CPU partition refuses any GPU request
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.pipeline_launchers.slurm.SlurmLauncher"
    keys = ("tasks_per_node", "gpus_per_node", "nodes", "signal_delay_s")
    assert {k: launcher[k] for k in keys} == {
        "tasks_per_node": 4,
        "gpus_per_node": 4,
        "nodes": 2,
        "signal_delay_s": 120,
    }
    assert launcher.max_num_timeout > 0 and launcher.additional_parameters.requeue is True
    assert OmegaConf.select(launcher, "partition") is None  # sbatch reads SBATCH_PARTITION
