"""The cluster path against a real SLURM cluster on this machine (scripts/slurm_cluster.sh):
two emulated nodes n1 and n2, a `low` partition whose jobs a `high` partition preempts, a
`lowgrace` one whose jobs it preempts after a grace time, accounting through slurmdbd. Every
test runs the real CLI (`python -m pipeline ...`) inside real SLURM jobs, in its own tmp_path,
and checks what SLURM and the run dir say afterwards:
a. a 2-job sweep through hydra/launcher=slurm, then the same sweep with a value added and the
   values reordered (job dirs named by their overrides: only the new job trains);
b, c. DDP under srun: 2 tasks on one node, 1 task on each of the 2 nodes;
d, e, f. training interrupted by the time limit (USR2; sbatch + srun, and through the
   launcher), by preemption (TERM) and by `scontrol requeue` (TERM): saved on the signal,
   requeued, resumed, finished with the test accuracies of an uninterrupted run;
e (grace). preemption with a GraceTime: one job requeues itself, one waits for SLURM; both
   resume and finish (with those accuracies too), the sweep exits 0;
n. the requeues of an sbatch + srun job are bounded (max_requeues), then it ends FAILED;
g. `scancel` of one job of a slurm-launcher sweep, while it trains or as it starts: the job
   stops, the sweep ends, exits non-zero and names it;
h. a failing job is FAILED in sacct, through sbatch + srun and through the launcher;
i. scripts/sbatch_example.sh as written, through real sbatch, on the CPU partition;
j. the launcher on the CPU partition with trainer.accelerator=cpu alone; an sbatch refusal is
   one error line (exit 2);
m. the launcher without accounting (sacct) stops before submitting (exit 2, one line);
k. torch threads follow --cpus-per-task; l. no srun hint on stderr where SLURM is installed.

    sudo bash scripts/slurm_cluster.sh install && sudo bash scripts/slurm_cluster.sh start
    PIPELINE_REPO=$PWD python -m pytest tests/test_slurm.py

Without a cluster (and without root to start one) the tests skip, saying why; with CI=true they
fail instead. What SLURM sends (measured on this cluster with a job that traps and logs signals):
- time limit, `--signal=USR2@N`: USR2 to the job steps' tasks (not the batch shell) N s before
  the limit, give or take the controller's 30 s check; at the limit CONT + TERM to everything,
  KILL after KillWait; the job ends TIMEOUT and is not requeued by SLURM;
- preemption (partition_prio, PreemptMode=REQUEUE): TERM to the steps' tasks, then CONT + TERM
  to everything, KILL after KillWait (30 s); no USR2, even with --signal; the job is requeued;
- preemption with a grace time (GraceTime=G): TERM to the steps' tasks at once, while the job
  stays RUNNING (with a PreemptTime and EndTime = now + G); at EndTime, give or take the
  controller's 30 s check, CONT + TERM to everything, KILL after KillWait, and only then is the
  job requeued: a job that ends within its grace time simply ends;
- `scontrol requeue`: CONT + TERM to everything, KILL after KillWait; the job is requeued;
- `scancel`: CONT + TERM, KILL after KillWait; `scancel --signal=USR2` reaches only the steps.
A requeued job waits 120 s (Reason=BeginTime) before it may start again: the tests release it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from slurm_helpers import (
    FINAL_STATES,
    GRACE_PARTITION,
    HIGH_PARTITION,
    IN_CI,
    PARTITION,
    REPO,
    Jobs,
    ensure_cluster,
    job_env,
    new_jobs,
    pipeline_command,
    queue_entry,
    read_step,
    release,
    sacct_records,
    sh,
    stop_cluster,
    wait_until,
)

# The tests share one cluster (a preemption takes its partition's nodes): one file, which
# `--dist loadfile` (pyproject.toml) runs on one test worker, one test after another, beside the
# other tests on the other worker.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Seconds-long runs: two epochs of the default model on the bundled digits, one student round.
TINY = [
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "train.epochs=2",
    "train.min_steps=20",
    "selftrain.rounds=1",
]
# One model trained long enough to be interrupted by the time-limit signal, which comes 45-75 s
# into a job: 6000 steps, a minute and a half or more on one core. It saves checkpoints/last.ckpt
# now and then by itself (every epoch, or every train.checkpoint_every_s): a checkpoint saved *on
# a signal* is one written after the signal.
RESUME_STEPS = 6000
RESUME = [
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "stage=train",
    "train.epochs=2",
    f"train.min_steps={RESUME_STEPS}",
]
# The same model trained 2000 steps (half a minute or more) for the tests that send their signal
# themselves, TRAINING_AFTER_SPLITS_S into the training: they need no more, and a resumed run
# still has most of it to do.
SHORT_STEPS = 2000
SHORT = [a for a in RESUME if not a.startswith("train.min_steps=")] + [
    f"train.min_steps={SHORT_STEPS}"
]
# splits.npz is written just before the model is built and trained; this long after it, the
# run has been training for several seconds (and has most of its minute still to go).
TRAINING_AFTER_SPLITS_S = 10
JOB = ["--nodes=1", "--ntasks=1", "--cpus-per-task=1", f"--partition={PARTITION}"]
# The launcher on this cluster's CPU partition, one CPU per task.
SLURM_LAUNCHER = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="session")
def cluster():
    """The cluster answers and its nodes are idle; started here if it is installed but not
    running (and stopped again at the end)."""
    problem, started = ensure_cluster()
    if problem:
        message = f"no usable SLURM cluster: {problem}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield
    if started:
        stop_cluster()


@pytest.fixture
def jobs(cluster, request, tmp_path) -> Jobs:
    """Submits the test's jobs under one name; cancels whatever is left when the test ends."""
    submitted = new_jobs(request.node.name, tmp_path)
    yield submitted
    submitted.cancel_all()


def uninterrupted(run: list[str], tmp: Path) -> dict:
    """summary.json of `run` without SLURM and without interruption."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *run, f"run_dir={tmp / 'run'}"],
        cwd=tmp,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "run" / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted RESUME run's summary.json."""
    return uninterrupted(RESUME, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory) -> dict:
    """The uninterrupted SHORT run's summary.json."""
    return uninterrupted(SHORT, tmp_path_factory.mktemp("short_reference"))


def accuracies(summary: dict) -> list[float]:
    return [r["test_accuracy"] for r in summary["rounds"]] + [summary["final_test_accuracy"]]


def sweep(jobs: Jobs, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """A -m sweep submitted from tmp_path (as from a login node), its jobs named jobs.name."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "-m", f"hydra.launcher.name={jobs.name}", *overrides],
        cwd=jobs.workdir,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def jobs_named(name: str) -> dict[str, str]:
    """{job id (ARRAY_TASK for array tasks): state} of every job of that name, from sacct."""
    proc = sh(["sacct", "-X", "-n", "-P", f"--name={name}", "-o", "JobID,State"])
    return {
        line.split("|")[0]: line.split("|")[1].split()[0]
        for line in proc.stdout.splitlines()
        if "|" in line
    }


def wait_named_final(name: str, count: int, timeout: float = 300) -> dict[str, str]:
    """Until the `count` jobs of that name have ended (a sweep returns once every job wrote its
    result; the job itself ends a moment later)."""

    def final() -> dict[str, str] | None:
        states = jobs_named(name)
        done = len(states) == count and all(s in FINAL_STATES for s in states.values())
        return states if done else None

    return wait_until(
        final, timeout, f"the {count} jobs named {name} ending", lambda: str(jobs_named(name))
    )


def run_dirs(under: Path) -> list[Path]:
    return sorted(p.parent for p in under.rglob("config.yaml"))


def ok(record, jobs: Jobs) -> None:
    assert (record.state, record.exit_code) == ("COMPLETED", "0:0"), jobs.describe(record.job_id)


def train_job(
    jobs: Jobs,
    run_dir: Path,
    *options: str,
    extra: tuple[str, ...] = (),
    run: list[str] = SHORT,
    partition: str = PARTITION,
) -> str:
    """The SHORT (or `run`) training as a one-task batch job (sbatch + srun, as
    scripts/sbatch_example.sh runs it), requeueable; the requeued job runs the same command,
    hence the same run_dir."""
    body = (
        'echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"\n'
        f"srun --kill-on-bad-exit=1 {pipeline_command(*run, *extra, f'run_dir={run_dir}')}"
    )
    job = [o for o in JOB if not o.startswith("--partition=")] + [f"--partition={partition}"]
    return jobs.sbatch(body, *job, "--time=20", "--requeue", *options)


def wait_training(jobs: Jobs, job: str, run_dir: Path) -> None:
    """Until the job's run is training (see TRAINING_AFTER_SPLITS_S)."""
    splits = run_dir / "splits.npz"
    wait_until(splits.exists, 600, f"{splits} (the run started)", lambda: jobs.describe(job))
    time.sleep(TRAINING_AFTER_SPLITS_S)
    assert queue_entry(job) is not None, f"job {job} ended already\n{jobs.describe(job)}"
    assert not (run_dir / "model.ckpt").exists(), f"training was over already\n{jobs.describe(job)}"


def not_saved_on_the_signal(last: Path, signalled_at: float) -> list[str]:
    """What is wrong with the last.ckpt a SHORT run left when it was stopped by a signal sent
    at signalled_at (nothing: [])."""
    if not last.exists():
        return ["nothing saved: no checkpoints/last.ckpt when the job was requeued"]
    step, age = read_step(last), signalled_at - last.stat().st_mtime
    if age > 0:
        return [
            f"nothing saved when the signal came: checkpoints/last.ckpt (step {step}) was "
            f"written {age:.0f} s before it"
        ]
    if not 0 < step < SHORT_STEPS:
        return [f"checkpoints/last.ckpt is at step {step}, not inside the training"]
    return []


def finished_like(run_dir: Path, record, reference: dict | None) -> list[str]:
    """What is wrong with how a resumed job ended: not COMPLETED 0:0, no summary.json, other
    test accuracies than the uninterrupted reference run."""
    if (record.state, record.exit_code) != ("COMPLETED", "0:0"):
        return [f"the job ended {record.raw_state} {record.exit_code}"]
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        return ["no summary.json"]
    summary = json.loads(summary_path.read_text())
    if reference is not None and accuracies(summary) != accuracies(reference):
        return [
            f"test accuracies {accuracies(summary)} differ from the uninterrupted run's "
            f"{accuracies(reference)}"
        ]
    return []


# --- a. a sweep through hydra/launcher=slurm ----------------------------------------------------


def job_dir(sweep_dir: Path, seed: int) -> Path:
    """The job dir of `seed` in a sweep: named by the job's result overrides."""
    (found,) = sweep_dir.glob(f"seed={seed},*")
    return found


def test_a_slurm_launcher_sweep_runs_both_jobs(jobs, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(jobs, "seed=0,1", *SLURM_LAUNCHER, *TINY, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    for seed in (0, 1):
        summary = json.loads((job_dir(out, seed) / "summary.json").read_text())
        assert summary["seed"] == seed and [r["round"] for r in summary["rounds"]] == [0, 1]
    states = wait_named_final(jobs.name, 2)
    assert sorted(states.values()) == ["COMPLETED", "COMPLETED"], states
    assert (out / ".submitit").is_dir()
    # The same sweep with a value added and the values reordered: only the new job trains.
    before = {p: p.stat().st_mtime for p in out.glob("seed=*/summary.json")}
    proc = sweep(jobs, "seed=2,1,0", *SLURM_LAUNCHER, *TINY, f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    assert {p: p.stat().st_mtime for p in before} == before
    assert sorted(p.name.split(",")[0] for p in out.glob("seed=*")) == [
        "seed=0",
        "seed=1",
        "seed=2",
    ]
    assert (job_dir(out, 2) / "summary.json").is_file()
    logs = "".join(p.read_text() for p in (out / ".submitit").rglob("*_log.*"))
    assert re.sub(r"\s+", " ", logs).count("complete; nothing to redo") == 2, logs[-3000:]


# --- b, c. DDP under srun: 2 tasks on one node, 1 task on each of 2 nodes -----------------------


def test_b_two_task_ddp_job(jobs, tmp_path):
    command = pipeline_command(
        *TINY, "trainer.strategy=ddp", "trainer.devices=2", "pseudo_label.threshold=0.0"
    )
    job = jobs.sbatch(
        f"srun --kill-on-bad-exit=1 {command}",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        f"--partition={PARTITION}",
        "--time=20",
        f"--chdir={tmp_path}",
    )
    ok(jobs.wait_done(job), jobs)
    # Both ranks resolved the default run_dir (outputs/<stage>/<overrides>/seed0) the same way.
    (run_dir,) = run_dirs(tmp_path / "outputs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["num_test"] == 360
    # Pseudo-labels written once, by rank 0: every unlabelled sample exactly once (threshold 0).
    labels = np.load(run_dir / "round_1" / "pseudo_labels.npz")
    assert np.array_equal(np.sort(labels["index"]), np.arange(summary["num_unlabelled"]))
    assert summary["rounds"][1]["num_pseudo"] == summary["num_unlabelled"]
    leftovers = [p for p in run_dir.rglob("*") if p.name.startswith((".tmp-", "rank"))]
    assert not leftovers, leftovers


def test_c_two_node_ddp_job(jobs, tmp_path):
    command = pipeline_command(
        *TINY, "trainer.strategy=ddp", "trainer.num_nodes=2", "trainer.devices=1"
    )
    job = jobs.sbatch(
        f"srun --kill-on-bad-exit=1 {command}",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        f"--partition={PARTITION}",
        "--time=20",
        f"--chdir={tmp_path}",
    )
    record = jobs.wait_done(job)
    ok(record, jobs)
    assert record.nodes == "n[1-2]", record
    (run_dir,) = run_dirs(tmp_path / "outputs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["num_test"] == 360


# --- d, e, f. interrupted training: saved, requeued, resumed ------------------------------------


def test_d_time_limit_saves_requeues_and_resumes_to_the_same_metrics(jobs, tmp_path, reference):
    """--time=2 --signal=USR2@75: USR2 comes 45-75 s into the job, mid-training (the job starts
    in seconds, and training alone needs more than its limit). The job saves, requeues
    itself and resumes; with the limit raised after that first requeue, it finishes with the
    test accuracies of an uninterrupted run."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = train_job(jobs, run_dir, "--time=2", "--signal=USR2@75", run=RESUME)
    jobs.wait_requeued(job, timeout=300)
    problems = []
    step = read_step(last) if last.exists() else None
    if step is None or not 0 < step < RESUME_STEPS:
        problems.append(f"nothing saved on USR2 before the requeue (last.ckpt step: {step})")
    sh(["scontrol", "update", f"JobId={job}", "TimeLimit=20"])
    problems += finished_like(run_dir, jobs.wait_done(job), reference)
    states = [r.state for r in sacct_records(job)]
    if "TIMEOUT" in states:
        problems.append(f"the job hit its time limit: {states}")
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(job)


def test_d_time_limit_through_the_slurm_launcher(jobs, tmp_path, reference):
    """The same through hydra/launcher=slurm (timeout_min=2, signal_delay_s=75): the pipeline
    saves, submitit's handler requeues the job, the sweep waits through the requeue and ends 0,
    with the test accuracies of an uninterrupted run."""
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    launcher = [a for a in SLURM_LAUNCHER if not a.startswith("hydra.launcher.timeout_min")]
    command = [
        *(sys.executable, "-m", "pipeline", "-m", f"hydra.launcher.name={jobs.name}"),
        *launcher,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=75",
        *RESUME,
        f"hydra.sweep.dir={out}",
    ]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=job_env(), stdout=sink, stderr=subprocess.STDOUT
        )
    try:

        def submitted() -> str | None:
            ids = sh(["squeue", "-h", f"--name={jobs.name}", "-o", "%i"]).stdout.split()
            return ids[0] if ids else None

        job = wait_until(submitted, 300, "the sweep's job", log.read_text)
        jobs.wait_requeued(job, timeout=300)
        (run_dir,) = run_dirs(out)
        last = run_dir / "checkpoints" / "last.ckpt"
        problems = []
        step = read_step(last) if last.exists() else None
        if step is None or not 0 < step < RESUME_STEPS:
            problems.append(f"nothing saved on USR2 before the requeue (last.ckpt step: {step})")
        sh(["scontrol", "update", f"JobId={job}", "TimeLimit=20"])
        record = jobs.wait_done(job)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        problems.append(f"the sweep exited {code}:\n{log.read_text()[-3000:]}")
    problems += finished_like(run_dir, record, reference)
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(job)


def test_e_preemption_saves_requeues_and_resumes_to_the_same_metrics(
    jobs, tmp_path, short_reference
):
    """A job in `high` takes the node of a training job in `low`: SLURM sends the low job TERM
    (no USR2) and requeues it; it must save within KillWait, then resume and finish with the
    test accuracies of an uninterrupted run."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = train_job(jobs, run_dir)
    node = jobs.wait_running(job)["nodes"]
    wait_training(jobs, job, run_dir)
    signalled_at = time.time()
    high = jobs.sbatch(
        "sleep 3", f"--partition={HIGH_PARTITION}", f"--nodelist={node}", "--exclusive", "--time=5"
    )
    jobs.wait_requeued(job, timeout=300)
    assert "PREEMPTED" in [r.state for r in sacct_records(job)], jobs.describe(job)
    problems = not_saved_on_the_signal(last, signalled_at)
    problems += finished_like(run_dir, jobs.wait_done(job), short_reference)
    ok(jobs.wait_done(high), jobs)
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(job)


def test_e_preemption_with_a_grace_time_requeues_and_both_jobs_resume(
    jobs, tmp_path, short_reference
):
    """`lowgrace` (PreemptMode=REQUEUE GraceTime=20): SLURM sends the tasks TERM at once and
    requeues the job only when the grace time is over; a job that ended within it would be
    FAILED and never requeued. One job in `high` over both nodes preempts two training jobs at
    once:
    - A, sbatch + srun: it saves, then requeues itself (`scontrol requeue`): REQUEUED;
    - B, a one-job sweep through hydra/launcher=slurm with max_requeues=0 (it may not requeue
      itself): it saves, then waits until SLURM requeues it at the end of the grace time:
      PREEMPTED.
    Both resume from the last.ckpt saved on the signal and end COMPLETED 0:0 with the test
    accuracies of an uninterrupted run; the sweep exits 0."""
    run_a, out = tmp_path / "run", tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    a = train_job(jobs, run_a, partition=GRACE_PARTITION)
    launcher = [o for o in SLURM_LAUNCHER if not o.startswith("hydra.launcher.partition=")]
    command = [
        *(sys.executable, "-m", "pipeline", "-m", f"hydra.launcher.name={jobs.name}"),
        *launcher,
        f"hydra.launcher.partition={GRACE_PARTITION}",
        *SHORT,
        "max_requeues=0",
        f"hydra.sweep.dir={out}",
    ]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=job_env(), stdout=sink, stderr=subprocess.STDOUT
        )
    try:

        def sweep_job() -> str | None:
            ids = sh(["squeue", "-h", f"--name={jobs.name}", "-o", "%i"]).stdout.split()
            return next((i for i in ids if i != a), None)

        b = wait_until(sweep_job, 300, "the sweep's job", log.read_text)
        jobs.submitted.append(b)
        splits_b = wait_until(
            lambda: next(out.glob("*/splits.npz"), None), 600, "the sweep's run", log.read_text
        )
        run_b = splits_b.parent
        wait_training(jobs, a, run_a)
        assert not (run_b / "model.ckpt").exists(), f"B was done already\n{jobs.describe(b)}"
        signalled_at = time.time()
        high = jobs.sbatch(
            "sleep 3", f"--partition={HIGH_PARTITION}", "--nodes=2", "--exclusive", "--time=5"
        )
        jobs.wait_requeued(a, timeout=300)
        jobs.wait_requeued(b, timeout=300)
        problems = [
            f"A: {p}"
            for p in not_saved_on_the_signal(run_a / "checkpoints" / "last.ckpt", signalled_at)
        ]
        problems += [
            f"B: {p}"
            for p in not_saved_on_the_signal(run_b / "checkpoints" / "last.ckpt", signalled_at)
        ]
        ok(jobs.wait_done(high), jobs)
        release(a)
        release(b)
        record_a = jobs.wait_done(a)
        record_b = jobs.wait_done(b)
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        problems.append(f"the sweep exited {code}:\n{log.read_text()[-3000:]}")
    log_a = re.sub(r"\s+", " ", jobs.log_text(a, tail=100_000))
    log_b = re.sub(
        r"\s+", " ", "".join(p.read_text() for p in sorted((out / ".submitit").rglob("*_log.*")))
    )
    for name, job, run_dir, record, said, states, how in (
        ("A", a, run_a, record_a, log_a, ["REQUEUED", "COMPLETED"], "requeued it (restart 1)"),
        ("B", b, run_b, record_b, log_b, ["PREEMPTED", "COMPLETED"], "waiting for SLURM"),
    ):
        problems += [f"{name}: {p}" for p in finished_like(run_dir, record, short_reference)]
        if [r.state for r in sacct_records(job)] != states:
            problems.append(
                f"{name}: sacct {[r.raw_state for r in sacct_records(job)]}, not {states}"
            )
        if how not in said:
            problems.append(f"{name}: its log does not say {how!r}")
        if "resuming training from" not in said:
            problems.append(f"{name}: the requeued run did not resume from its last.ckpt")
    assert "(max_requeues=0)" in log_b, log_b[-3000:]
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(a) + "\n" + jobs.describe(b)


def test_f_scontrol_requeue_saves_and_the_job_resumes_and_finishes(jobs, tmp_path, short_reference):
    """`scontrol requeue` mid-training: SLURM sends TERM and requeues the job; it must save
    within KillWait, then resume and finish with the test accuracies of an uninterrupted run."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = train_job(jobs, run_dir)
    jobs.wait_running(job)
    wait_training(jobs, job, run_dir)
    signalled_at = time.time()
    proc = sh(["scontrol", "requeue", job])
    assert proc.returncode == 0, proc.stderr
    jobs.wait_requeued(job, timeout=300)
    problems = not_saved_on_the_signal(last, signalled_at)
    problems += finished_like(run_dir, jobs.wait_done(job), short_reference)
    states = [r.state for r in sacct_records(job)]
    if states != ["REQUEUED", "COMPLETED"]:
        problems.append(f"sacct: {states}")
    if last.exists():
        problems.append("checkpoints/last.ckpt left behind after the model was done")
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(job)


def test_n_requeues_on_the_sbatch_path_are_bounded(jobs, tmp_path):
    """The time-limit signal (USR2, sent here with `scancel --signal=USR2`, which reaches the
    job's steps as --signal=USR2@N does) requeues an sbatch + srun job while it has restarted
    fewer than max_requeues times; after that the job saves, is not requeued and ends FAILED,
    saying why (a job that can never finish does not loop forever)."""
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    job = train_job(jobs, run_dir, extra=("max_requeues=1",))
    jobs.wait_running(job)
    wait_training(jobs, job, run_dir)
    signalled_at = time.time()
    assert sh(["scancel", "--signal=USR2", job]).returncode == 0
    jobs.wait_requeued(job, timeout=300)
    problems = not_saved_on_the_signal(last, signalled_at)
    first = read_step(last) if last.exists() else 0
    release(job)

    def resumed() -> bool:
        log = re.sub(r"\s+", " ", jobs.log_text(job, tail=100_000))
        return "restart 1 on" in log and "resuming training from" in log

    wait_until(resumed, 300, "the requeued job resuming", lambda: jobs.describe(job))
    time.sleep(TRAINING_AFTER_SPLITS_S)
    signalled_at = time.time()
    assert sh(["scancel", "--signal=USR2", job]).returncode == 0
    record = jobs.wait_done(job, release_requeued=False)
    if record.state != "FAILED":
        problems.append(f"the job ended {record.raw_state} {record.exit_code}, not FAILED")
    problems += not_saved_on_the_signal(last, signalled_at)
    if last.exists() and not read_step(last) > first:
        problems.append(f"last.ckpt at step {read_step(last)}, not after the first save ({first})")
    said = re.sub(r"\s+", " ", jobs.log_text(job, tail=100_000))
    if "not requeued: SLURM job" not in said or "(max_requeues=1)" not in said:
        problems.append("the log does not say why the job was not requeued")
    states = [r.state for r in sacct_records(job)]
    if states != ["REQUEUED", "FAILED"]:
        problems.append(f"sacct: {states}")
    assert not problems, "\n".join(problems) + "\n" + jobs.describe(job)


# --- g, h. a cancelled job, a failing job -------------------------------------------------------


@pytest.mark.parametrize("when", ["training", "starting"])
def test_g_scancel_of_one_sweep_job_ends_the_sweep_naming_it(jobs, tmp_path, when):
    """scancel of job _1 of a 2-job slurm-launcher sweep of trainings (stage=train), while it
    trains, or as soon as the pipeline has started (before training: submitit's handler, which
    ignores TERM, is the one that gets it then). The cancelled job must stop; the sweep must
    end, exit non-zero and name it; job _0 finishes."""
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    # "starting": a job that would finish its work within KillWait (30 s) if it went on.
    steps = "train.min_steps=2000" if when == "training" else "train.min_steps=400"
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "-m",
        "seed=0,1",
        f"hydra.launcher.name={jobs.name}",
        *SLURM_LAUNCHER,
        *TINY,
        "stage=train",
        steps,
        f"hydra.sweep.dir={out}",
    ]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=job_env(), stdout=sink, stderr=subprocess.STDOUT
        )
    try:

        def second_job_running() -> str | None:
            lines = sh(["squeue", "-h", f"--name={jobs.name}", "-o", "%i %T"]).stdout.split("\n")
            running = [j for j, s in (ln.split() for ln in lines if ln) if s == "RUNNING"]
            return next((j for j in running if j.endswith("_1")), None)

        victim = wait_until(second_job_running, 300, "sweep job _1 running", log.read_text)

        # "starting": the pipeline wrote the run's config.yaml, it loads the data and builds
        # the model; "training": it trains (2000 steps, half a minute or more).
        def started() -> Path | None:
            found = list(
                out.glob("seed=1,*/" + ("config.yaml" if when == "starting" else "splits.npz"))
            )
            return found[0] if found else None

        wait_until(started, 300, "sweep job _1 started", log.read_text, poll=0.05)
        if when == "training":
            time.sleep(TRAINING_AFTER_SPLITS_S)
        assert sh(["scancel", victim]).returncode == 0
        code = proc.wait(timeout=600)  # the sweep must end, not wait forever
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    states = wait_named_final(jobs.name, 2, timeout=600)
    first = victim[: -len("_1")] + "_0"
    job_log = "\n".join(
        p.read_text()[-1500:] for p in sorted((out / ".submitit").glob(f"{victim}/*_log.*"))
    )
    problems = []
    if code == 0:
        problems.append("the sweep exited 0 although one of its jobs was cancelled")
    if victim not in output:
        problems.append(f"the sweep's output does not name the cancelled job {victim}")
    if list(out.glob("seed=1,*/summary.json")):
        problems.append(f"the cancelled job {victim} went on and finished its run")
    if states != {first: "COMPLETED", victim: "CANCELLED"}:
        problems.append(f"sacct: {states}")
    if not list(out.glob("seed=0,*/summary.json")):
        problems.append("job _0 has no summary.json")
    assert not problems, (
        "\n".join(problems) + f"\n--- sweep ---\n{output[-3000:]}\n--- {victim} ---\n{job_log}"
    )


@pytest.mark.parametrize("path", ["sbatch_srun", "slurm_launcher"])
def test_h_failing_job_is_failed_in_sacct(jobs, tmp_path, path):
    """pseudo_label.threshold=1.5 composes but is refused by the pipeline (exit 2): SLURM must
    record the job as FAILED, not COMPLETED 0:0."""
    bad = "pseudo_label.threshold=1.5"
    if path == "sbatch_srun":
        command = pipeline_command(*TINY, bad, f"run_dir={tmp_path / 'run'}")
        job = jobs.sbatch(f"srun {command}", *JOB, "--time=10", f"--chdir={tmp_path}")
        record = jobs.wait_done(job)
        assert (record.state, record.exit_code) == ("FAILED", "2:0"), jobs.describe(job)
        assert "pseudo_label.threshold" in jobs.log_text(job)
    else:
        out = tmp_path / "sweep"
        proc = sweep(jobs, "seed=0", *SLURM_LAUNCHER, *TINY, bad, f"hydra.sweep.dir={out}")
        assert proc.returncode != 0, proc.stdout[-3000:]
        (job,) = wait_named_final(jobs.name, 1)
        record = jobs.wait_done(job)
        steps = "\n".join(
            f"{r.job_id} {r.raw_state} {r.exit_code}" for r in sacct_records(job, True)
        )
        assert record.state == "FAILED", (
            f"sacct says {record.raw_state} {record.exit_code}:\n{steps}"
        )
        # The sweep names the job and says why, in one line, without a traceback.
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"SLURM job {job}")]
        assert "failed" in line and "pseudo_label.threshold" in line, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# --- i. scripts/sbatch_example.sh ---------------------------------------------------------------


def test_i_sbatch_example_script_on_the_cpu_partition(jobs, tmp_path):
    """The example script through real sbatch, as written (only the partition and a short time
    limit added): it asks for nothing a CPU partition lacks, and runs on CPU."""
    run_dir = tmp_path / "run"
    job = jobs.sbatch(
        "",
        f"--partition={PARTITION}",
        "--time=20",
        script=REPO / "scripts" / "sbatch_example.sh",
        args=[*TINY, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"],
        cwd=REPO,  # the script runs from the submit dir, the repo root
    )
    ok(jobs.wait_done(job), jobs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["num_test"] == 360
    assert "cpu, restart 0 of at most 20" in jobs.log_text(job)


# --- more of the SLURM path ---------------------------------------------------------------------


def test_j_launcher_on_a_cpu_partition_without_gpus_per_node(jobs, tmp_path):
    """hydra/launcher=slurm with trainer.accelerator=cpu alone (no
    hydra.launcher.gpus_per_node=null) on a partition without GPUs: a valid CPU job."""
    out = tmp_path / "sweep"
    launcher = [a for a in SLURM_LAUNCHER if not a.startswith("hydra.launcher.gpus_per_node")]
    proc = sweep(jobs, "seed=0", *launcher, *TINY, "stage=train", f"hydra.sweep.dir={out}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (job_dir(out, 0) / "summary.json").is_file()


def test_j_sbatch_refusing_the_jobs_is_one_error_line(jobs, tmp_path):
    """trainer.accelerator=gpu on the CPU partition: sbatch refuses the GPU request; the sweep
    exits 2 with one line saying what to change (exit-code contract), submitting nothing."""
    launcher = [a for a in SLURM_LAUNCHER if not a.startswith("hydra.launcher.gpus_per_node")]
    out = tmp_path / "sweep"
    proc = sweep(
        jobs, "seed=0", *launcher, *TINY, "trainer.accelerator=gpu", f"hydra.sweep.dir={out}"
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: sbatch refused the sweep's jobs: "), line
    assert "trainer.accelerator=cpu" in line, line
    assert not jobs_named(jobs.name)


@pytest.mark.parametrize("accounting", ["disabled", "unreachable"])
def test_m_slurm_launcher_without_accounting_says_so_up_front(cluster, tmp_path, accounting):
    """submitit follows its jobs with sacct; without accounting a cancelled job would keep the
    sweep waiting forever. A client whose slurm.conf has no accounting (or a slurmdbd port
    nothing listens on): the sweep stops before submitting, exit 2, one line naming sacct."""
    conf = Path("/etc/slurm/slurm.conf").read_text()
    if accounting == "disabled":
        conf = re.sub(
            r"(?m)^AccountingStorageType=.*$", "AccountingStorageType=accounting_storage/none", conf
        )
    else:
        conf = re.sub(r"(?m)^AccountingStoragePort=.*$", "AccountingStoragePort=1", conf)
    (tmp_path / "slurm.conf").write_text(conf)
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "-m",
            "seed=0",
            *SLURM_LAUNCHER,
            *TINY,
            f"hydra.sweep.dir={out}",
        ],
        cwd=tmp_path,
        env=job_env(SLURM_CONF=str(tmp_path / "slurm.conf")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "error: hydra/launcher=slurm follows its jobs with SLURM's accounting"
    ), line
    assert "sacct" in line and "scripts/sbatch_example.sh" in line, line
    assert not (out / ".submitit").exists()


PROBE = """
import atexit, runpy, sys
import torch
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(torch.get_num_threads())))
sys.argv[0] = "pipeline"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def test_k_torch_threads_follow_slurm_cpus_per_task(jobs, tmp_path):
    """A job given one CPU per task (--cpus-per-task=1) on nodes with more cores, without
    trainer.num_threads or OMP_NUM_THREADS: the run uses one thread, not every core of the node."""
    threads = tmp_path / "threads.txt"
    overrides = [a for a in TINY if not a.startswith("trainer.num_threads")]
    command = shlex.join(
        [
            sys.executable,
            "-c",
            PROBE,
            str(threads),
            *overrides,
            "stage=train",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    env = job_env()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var)
    job = jobs.sbatch(f"srun {command}", *JOB, "--time=10", f"--chdir={tmp_path}", env=env)
    ok(jobs.wait_done(job), jobs)
    assert threads.read_text() == "1", f"torch used {threads.read_text()} threads on 1 CPU"


def test_l_no_srun_hint_where_slurm_is_installed(cluster, tmp_path):
    """Outside any job, on a machine with SLURM: the run says nothing about srun."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            *TINY,
            "stage=train",
            "train.epochs=1",
            f"run_dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    hint = re.search(r".*`srun` command is available.*", proc.stderr)
    assert hint is None, hint.group(0) if hint else ""
