"""kill -9 a real selftrain run at different moments, then re-run the same command: the run
finishes, what was finished before the kill is untouched (bytes and mtimes), interrupted training
resumes from its last.ckpt, and no temporary file or resume state is left.

Wide moments (a model training) are caught by polling run_dir for the artifact that marks them.
Narrow ones (labelling, the instants around a metrics.json or a rename) are made exact by a
small hook that pauses the run there and says so; the test then kills it the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

# Each training lasts 4 epochs, so it saves last.ckpt 4 times: the window in which a model is
# "training with a last.ckpt" is 3/4 of its training (a second or more), easy to catch.
ARGS = [
    "progress=false",
    "trainer.accelerator=cpu",
    "train.epochs=4",
    "train.min_steps=64",
    "selftrain.rounds=1",
    "train.checkpoint_every_s=null",  # last.ckpt every epoch
]
FINISHED_LAYOUT = {
    ".hydra",
    ".hydra/overrides.yaml",
    "config.yaml",
    "splits.npz",
    "summary.json",
    "round_0",
    "round_0/model.ckpt",
    "round_0/metrics.json",
    "round_1",
    "round_1/pseudo_labels.npz",
    "round_1/pseudo_diagnostics.json",
    "round_1/model.ckpt",
    "round_1/metrics.json",
}
# One intra-op thread per run: on a small shared machine, the default thread pools of several
# processes spin against each other and make a run about 8x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Runs the CLI with one pause point patched in: at the moment named by PAUSE_AT it writes
# PAUSE_MARKER and sleeps until killed. Nothing else changes.
PAUSING_CLI = r"""
import os, sys, time
from pathlib import Path

at = os.environ["PAUSE_AT"]

def pause():
    Path(os.environ["PAUSE_MARKER"]).write_text(at)
    time.sleep(3600)

if at == "labelling":  # every shard of the teacher's predictions is written, none selected yet
    from pipeline.engine.predict import ShardWriter as W
    real_end = W.on_predict_epoch_end
    def on_predict_epoch_end(self, trainer, module):
        real_end(self, trainer, module)
        pause()
    W.on_predict_epoch_end = on_predict_epoch_end
elif at == "renaming_pseudo_labels":  # pseudo_labels.npz is whole under its temporary name
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "pseudo_labels.npz":
            pause()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
elif at == "before_student_metrics":  # round_1/model.ckpt is saved, metrics.json is not
    from pipeline.runtime.rundir import RunDir
    real_write = RunDir.write_json
    def write_json(self, path, data):
        if Path(path).parent.name == "round_1" and Path(path).name == "metrics.json":
            pause()
        return real_write(self, path, data)
    RunDir.write_json = write_json
elif at == "after_student_metrics":  # round_1/metrics.json is written, the rest is not
    from pipeline.runtime.rundir import Step
    real_clean = Step.clean
    def clean(self):
        if self.path.name == "round_1" and (self.path / "metrics.json").exists():
            pause()
        return real_clean(self)
    Step.clean = clean
else:
    raise SystemExit(f"unknown PAUSE_AT={at}")

from pipeline.cli import main
sys.argv = ["pipeline", *sys.argv[1:]]
main()
"""


def exists(*parts: str) -> Callable[[Path], bool]:
    return lambda run_dir: all((run_dir / p).exists() for p in parts)


def training(round_dir: str) -> Callable[[Path], bool]:
    """A model is training: it saved last.ckpt at least once, and not yet its model.ckpt."""
    return lambda run_dir: (
        (run_dir / round_dir / "checkpoints" / "last.ckpt").exists()
        and not (run_dir / round_dir / "model.ckpt").exists()
    )


@dataclass
class Moment:
    name: str
    when: Callable[[Path], bool] | None = None  # polled in run_dir
    pause_at: str | None = None  # or an exact pause point of PAUSING_CLI
    resume_extra: list[str] = field(default_factory=list)  # runtime settings may change
    expect_resumed_training: bool = False


MOMENTS = [
    Moment(
        "teacher_training",
        when=training("round_0"),
        resume_extra=["progress=true"],
        expect_resumed_training=True,
    ),
    Moment("between_rounds", when=exists("round_0/metrics.json")),
    Moment("labelling", pause_at="labelling"),
    Moment("renaming_pseudo_labels", pause_at="renaming_pseudo_labels"),
    Moment(
        "student_training",
        when=training("round_1"),
        resume_extra=["data.num_workers=0"],
        expect_resumed_training=True,
    ),
    Moment("student_saved_before_metrics", pause_at="before_student_metrics"),
    Moment("right_after_student_metrics", pause_at="after_student_metrics"),
]


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def finished_artifacts(run_dir: Path) -> dict[str, tuple[str, int]]:
    """The artifacts a resumed run must leave exactly as they are: everything of a finished
    round, a saved model.ckpt, pseudo-labels whose diagnostics were written, and the run's
    config.yaml and splits.npz."""
    keep = [run_dir / "config.yaml", run_dir / "splits.npz"]
    for round_dir in sorted(run_dir.glob("round_*")):
        names = ["model.ckpt"]
        if (round_dir / "pseudo_diagnostics.json").exists():
            names += ["pseudo_labels.npz", "pseudo_diagnostics.json"]
        if (round_dir / "metrics.json").exists():
            names += ["metrics.json"]
        keep += [round_dir / n for n in names]
    return {str(p.relative_to(run_dir)): fingerprint(p) for p in keep if p.exists()}


def assert_every_final_file_is_whole(run_dir: Path) -> None:
    """After a kill, each file under a final name is complete, and loads without pickle."""
    for path in run_dir.rglob("*"):
        if not path.is_file() or path.name.startswith(".tmp-"):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                [z[k] for k in z.files]
        elif path.suffix == ".ckpt":  # model.ckpt and Lightning's checkpoints/last.ckpt
            assert "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.name == ".lock":  # the killed run's run_dir lock: who held it (or empty)
            assert path.read_text() == "" or "pid" in json.loads(path.read_text())
        else:
            raise AssertionError(f"unexpected file {path}")


def start(run_dir: Path, moment: Moment, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline"]
    if moment.pause_at:
        env.update(PAUSE_AT=moment.pause_at, PAUSE_MARKER=str(logs / "paused"))
        command = [sys.executable, "-c", PAUSING_CLI]
    with open(logs / "killed.out", "w") as out:
        return subprocess.Popen(
            [*command, *ARGS, f"run_dir={run_dir}"],
            cwd=logs,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def kill_at(moment: Moment, run_dir: Path, logs: Path, timeout: float = 400) -> bool:
    """Start the run, SIGKILL it at the moment; True if it was hit (False: the run ended
    before it was seen, which only polled moments may do)."""
    proc = start(run_dir, moment, logs)
    reached = (
        (lambda: (logs / "paused").exists()) if moment.pause_at else (lambda: moment.when(run_dir))
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not reached():
            assert time.monotonic() < deadline, f"{moment.name} not reached in {timeout} s"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait()
    output = (logs / "killed.out").read_text()
    if code == -signal.SIGKILL:
        return True
    assert code == 0 and not moment.pause_at, f"the run ended with {code}:\n{output[-3000:]}"
    return False


@pytest.mark.parametrize("moment", MOMENTS, ids=[m.name for m in MOMENTS])
def test_kill_then_resume_finishes_and_keeps_finished_artifacts(tmp_path, moment):
    run_dir = tmp_path / "run"
    hit = kill_at(moment, run_dir, tmp_path)
    if not hit:  # a polled moment can be missed on a very fast or very busy machine
        warnings.warn(
            f"{moment.name}: the run ended before the moment was seen; only the "
            "re-run of a finished run was checked",
            stacklevel=1,
        )
    had_last_ckpt = any(run_dir.glob("round_*/checkpoints/last.ckpt"))
    if hit:
        assert_every_final_file_is_whole(run_dir)
    kept = finished_artifacts(run_dir)
    config_text = (run_dir / "config.yaml").read_text()

    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline", *ARGS, *moment.resume_extra, f"run_dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr

    # what was finished before the kill is byte-for-byte untouched, not even rewritten
    assert finished_artifacts(run_dir) | kept == finished_artifacts(run_dir)
    assert {k: v for k, v in finished_artifacts(run_dir).items() if k in kept} == kept
    assert (run_dir / "config.yaml").read_text() == config_text  # runtime changes not saved
    if hit and moment.expect_resumed_training:
        assert had_last_ckpt and "resuming training from" in resumed.stdout

    # the finished layout, and nothing else: no .tmp-*, checkpoints/ or predict_shards/
    layout = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}
    assert layout == FINISHED_LAYOUT, sorted(layout ^ FINISHED_LAYOUT)
    assert_every_final_file_is_whole(run_dir)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "selftrain" and summary["dataset"] == "digits"
    assert summary["num_labelled"] == 40
    assert summary["num_labelled"] + summary["num_unlabelled"] + summary["num_test"] == 1797
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for k, r in enumerate(summary["rounds"]):
        metrics = json.loads((run_dir / f"round_{k}" / "metrics.json").read_text())
        assert r["test_accuracy"] == metrics["test_accuracy"]
        assert r["num_pseudo"] == metrics["num_pseudo"]
    assert summary["rounds"][1]["num_pseudo"] == len(
        np.load(run_dir / "round_1" / "pseudo_labels.npz")["index"]
    )
    assert summary["final_test_accuracy"] == summary["rounds"][-1]["test_accuracy"] > 0.3
