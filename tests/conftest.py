"""Shared test helpers: run the real CLI as a subprocess, with small but real settings; compose
the real configs; train a small network with the pipeline's own fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of two (or more) test processes on the machine's cores (pyproject's addopts): one
    # intra-op thread each, and for the pipeline runs they start, so that the processes do not
    # oversubscribe the cores (a run that sets trainer.num_threads or its own OMP_NUM_THREADS
    # keeps it).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """The files in the order the two xdist workers should take them (`--dist loadfile
    --no-loadscope-reorder`, pyproject.toml): the SLURM tests first, so that their waits on the
    cluster overlap with the other tests on the other worker instead of coming last, then the
    files with the most slow tests, so that no long file is left for the end. The tests of a
    file keep their order."""
    first, slow = {}, Counter()
    for i, item in enumerate(items):
        first.setdefault(item.path, i)
        slow[item.path] += item.get_closest_marker("slow") is not None

    def rank(item):
        slurm = item.get_closest_marker("slurm") is not None
        return (not slurm, -slow[item.path], first[item.path])

    items.sort(key=rank)  # (a stable sort)


# Small but real: a few epochs of the default model on the bundled digits, one student round.
FAST = [
    "progress=false",
    "train.epochs=4",
    "train.min_steps=40",
    "selftrain.rounds=1",
    "trainer.accelerator=cpu",
    "train.checkpoint_every_s=null",  # last.ckpt every epoch: the resume tests wait for it
]


def run_cli(
    *overrides: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
):
    """`python -m pipeline OVERRIDES...` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *overrides],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def run_python(code: str, *args: str, timeout: float = 300) -> str:
    """`python -c CODE ARGS...` in the checkout, in a fresh process (for what must not leak into
    the test process: allocator settings, gc freezes, imports); asserts it succeeded and returns
    its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until path exists (or proc ends, or timeout): asserts it does."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.exists(), f"{path} never appeared"


def stop_mid_epoch_and_resume(
    tmp_path: Path, signum: signal.Signals, *overrides: str, env: dict[str, str]
) -> str:
    """`stage=train` of 2 epochs of 200 steps, sent signum once the end of epoch 1 has written
    checkpoints/last.ckpt: the job saves last.ckpt at the next step (mid-epoch 2) and exits 1
    naming the signal, without a traceback or a model; the same command then resumes and
    finishes. Returns the stopped run's stderr."""
    run_dir = tmp_path / "run"
    args = [
        *FAST,
        "stage=train",
        "train.epochs=2",
        "train.min_steps=400",  # 200 steps per epoch: the signal lands inside epoch 2
        *overrides,
        f"run_dir={run_dir}",
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    err_log = tmp_path / "stderr.log"
    with open(err_log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for(last, proc)
            proc.send_signal(signum)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_log.read_text()
    assert proc.returncode == 1, stderr[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 200 < step < 400, step  # saved on the signal, mid-epoch 2 (not at an epoch end)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.ckpt").exists()

    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming training from" in again.stdout + again.stderr
    assert (run_dir / "summary.json").is_file() and not last.exists()
    return stderr


def compose_cfg(*overrides: str):
    """The root config (conf/config.yaml) composed with `overrides`, as the CLI composes it."""
    from hydra import compose, initialize_config_dir

    from pipeline import config
    from pipeline.cli import CONF_DIR

    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=["run_dir=/tmp/unused", *overrides])


def compose_spec(*overrides: str):
    """The RunSpec (config/specs.py) of the root config composed with `overrides`, resolved and
    checked as the CLI does before a stage runs: what the building blocks take."""
    from pipeline.cli import resolve
    from pipeline.config.specs import run_spec

    return run_spec(resolve(compose_cfg(*overrides)))


@pytest.fixture
def one_thread():
    """One intra-op thread (pytestmark = pytest.mark.usefixtures("one_thread")): small convs gain
    little from two, and two threads slow down many times over when another process keeps one
    of the cores busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StopAtEpoch(L.Callback):
    """A kill (KeyboardInterrupt) when epoch `epoch` starts: after epoch `epoch - 1`'s
    last.ckpt (with train.checkpoint_every_s=null)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of a's state dict equal, bit for bit, to b's (named on failure)."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def fit_small(
    tmp_path: Path, name: str, *overrides: str, epochs: int = 3, callbacks=(), pool=None,
    labels=None,
):  # fmt: skip
    """Train a small net on random 8x8 images of 3 classes with the pipeline's fit (no
    augmentation, so the training batches can be replayed), `callbacks` added to its Trainer;
    one image per entry of `labels` (default: 24, classes 0, 1, 2 in turn). `pool(cfg,
    generator)`, if given, makes the OnlinePool fit also trains on (its images drawn from the
    generator after the labelled ones). Returns cfg, net, the images, the training set and
    fit's FitResult."""
    import numpy as np

    from pipeline.data import ImageArrays
    from pipeline.engine import fit as engine_fit
    from pipeline.models import checkpoint as models
    from pipeline.selftrain.merge import merge_labelled_and_pseudo

    cfg = compose_spec(
        "trainer.accelerator=cpu",
        "progress=false",
        "model.net.width=8",
        "train.min_steps=12",
        "train.batch_size=8",
        "train.checkpoint_every_s=null",
        *overrides,
    )
    torch.manual_seed(1)
    net = models.build_net(cfg, 3)
    labels = np.arange(24) % 3 if labels is None else labels
    g = torch.Generator().manual_seed(0)
    shape = (len(labels), 1, 8, 8)
    images = ImageArrays(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8), None)
    online = pool(cfg, g) if pool is not None else None
    train_set = merge_labelled_and_pseudo(labels, None, 3)
    build = engine_fit.build_trainer

    def build_with(*args, callbacks_=callbacks, callbacks=None, **kwargs):
        return build(*args, callbacks=[*(callbacks or []), *callbacks_], **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_fit, "build_trainer", build_with)
        result = engine_fit.fit(
            cfg, cfg.data, net, images, train_set, tmp_path / name, 0, epochs,
            models.hparams_for(cfg, cfg.data, 3), None, pool=online,
        )  # fmt: skip
    return cfg, net, images, train_set, result
