"""Nothing lost, nothing silent (docs/reliability.md): Ctrl-C saves like TERM, damaged
checkpoints are caught by their checksum (and a run's own resume state is set aside, not fatal),
a diverged training stops, a full or read-only disk is one line, one live run per run_dir."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, assert_same_weights, fit_small, run_cli, wait_for

from pipeline.errors import UserError
from pipeline.runtime import preemption, requeue
from pipeline.runtime.io import (
    CHECKSUM_KEY,
    DamagedCheckpoint,
    atomic_path,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.runtime.run_lock import LOCK, RunDirBusy
from pipeline.runtime.rundir import RunDir

THREADS = {"OMP_NUM_THREADS": "1"}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def flip_tensor_byte(path: Path) -> None:
    """Flip one bit inside the first tensor's bytes of a torch zip checkpoint (the pickle and
    the zip structure stay readable: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


# --- checksums ----------------------------------------------------------------------------


def test_a_checkpoint_carries_a_checksum_that_catches_a_flipped_bit(tmp_path):
    path = tmp_path / "model.ckpt"
    state = {"net.w": torch.randn(1000), "net.b": torch.zeros(3, dtype=torch.bfloat16)}
    save_checkpoint(path, {"state_dict": state, "optimizer_states": [{"step": torch.tensor(3)}]})
    raw = torch.load(path, weights_only=True)
    assert len(raw[CHECKSUM_KEY]["sha256"]) == 64
    loaded = load_checkpoint(path)
    assert CHECKSUM_KEY not in loaded and torch.equal(loaded["state_dict"]["net.w"], state["net.w"])

    flip_tensor_byte(path)
    torch.load(path, weights_only=True)  # still loads silently without the check
    with pytest.raises(DamagedCheckpoint, match="is damaged: its tensors do not match") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"net.w": torch.ones(2)}}, path)
    assert load_checkpoint(path)["state_dict"]["net.w"].tolist() == [1.0, 1.0]


# Random bytes from a fixed seed: the same in every test process (xdist workers collect the
# parameters each on their own), and not bytes that happen to spell a pickle's global, which is
# refused as code instead (also safe, but not what this test checks).
@pytest.mark.parametrize(
    "content", [b"", random.Random(0).randbytes(3000), b"\x80\x02garbage", None]
)
def test_random_or_cut_bytes_are_damaged_not_code(tmp_path, content):
    path = tmp_path / "last.ckpt"
    if content is None:  # a real checkpoint cut short, as a kill -9 of a non-atomic writer would
        save_checkpoint(path, {"state_dict": {"w": torch.randn(1000)}})
        content = path.read_bytes()[:700]
    path.write_bytes(content)
    with pytest.raises(DamagedCheckpoint, match="unreadable or truncated") as info:
        load_checkpoint(path)
    assert "could run code" not in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_intact_sets_a_damaged_one_aside_so_its_step_runs_again(tmp_path):
    run = RunDir(tmp_path)
    model = tmp_path / "round_0" / "model.ckpt"
    assert not run.checkpoint_intact(model)  # absent
    save_checkpoint(model, {"state_dict": {"net.w": torch.randn(100)}})
    assert run.checkpoint_intact(model)
    flip_tensor_byte(model)
    assert not run.checkpoint_intact(model)
    assert not model.exists()
    (aside,) = (tmp_path / "round_0").iterdir()
    assert aside.name.startswith("model.ckpt.damaged-")


def test_a_finished_step_with_a_damaged_model_ckpt_is_not_done(tmp_path):
    run = RunDir(tmp_path)
    step = run.step("round_0")
    save_checkpoint(step / "model.ckpt", {"state_dict": {"net.w": torch.randn(100)}})
    (step / "metrics.json").write_text('{"round": 0}')
    assert step.done
    assert run.step("").done is False  # no metrics.json
    flip_tensor_byte(step / "model.ckpt")
    assert not step.done  # it runs again
    names = sorted(p.name for p in step.path.iterdir())
    assert [n.split("-")[0] for n in names] == ["metrics.json.damaged", "model.ckpt.damaged"]


@pytest.mark.slow
def test_a_flipped_finished_teacher_is_trained_again_not_used(tmp_path):
    """The issue's case: round_0 finished, its model.ckpt's bytes flipped, round_1 still to do.
    It used to load silently (a NaN teacher, 0 pseudo-labels, exit 0); now round_0 is trained
    again, with the same weights, and round_1 labels with it."""
    run_dir = tmp_path / "run"
    args = [*FAST, f"run_dir={run_dir}"]
    first = run_cli(*args, env=THREADS)
    assert first.returncode == 0, first.stderr[-3000:]
    teacher = run_dir / "round_0" / "model.ckpt"
    weights = load_checkpoint(teacher)["state_dict"]
    pseudo = json.loads((run_dir / "summary.json").read_text())["rounds"][1]["num_pseudo"]
    for unfinished in ("summary.json", "round_1/metrics.json", "round_1/model.ckpt"):
        (run_dir / unfinished).unlink()
    flip_tensor_byte(teacher)
    again = run_cli(*args, env=THREADS)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stdout.split())  # (the log wraps long lines)
    assert "is damaged: its tensors do not match the checksum" in said
    names = sorted(p.name.split("-")[0] for p in (run_dir / "round_0").iterdir())
    assert "model.ckpt.damaged" in names and "metrics.json.damaged" in names
    for name, tensor in load_checkpoint(teacher)["state_dict"].items():
        assert torch.equal(tensor, weights[name]), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"][1]["num_pseudo"] == pseudo > 0


def test_a_damaged_last_ckpt_is_set_aside_and_the_training_starts_over(tmp_path, one_thread):
    """A garbled last.ckpt (kill -9, a bad disk) no longer blocks the run: it is renamed aside
    and the training starts over, ending with exactly the weights of a clean training."""
    _, clean, *_ = fit_small(tmp_path, "clean", epochs=2)
    last = tmp_path / "clean" / "checkpoints" / "last.ckpt"
    damaged = tmp_path / "again" / "checkpoints" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(last.read_bytes())
    flip_tensor_byte(damaged)
    _, again, _, _, result = fit_small(tmp_path, "again", epochs=2)
    assert result.steps == 12 and [e["epoch"] for e in result.epochs] == [0, 1]
    assert_same_weights(clean, again)
    names = sorted(p.name for p in damaged.parent.iterdir())
    assert names[0] == "last.ckpt" and names[1].startswith("last.ckpt.damaged-"), names
    assert load_checkpoint(damaged)["global_step"] == 12  # the new one, intact


# --- a diverged training ------------------------------------------------------------------


class PoisonAt:
    """Sets a weight to NaN before optimizer step `step`: the loss of that step is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self):
        import lightning as L

        step = self.step

        class Poison(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    with torch.no_grad():
                        next(pl_module.parameters()).view(-1)[0] = float("nan")

        return Poison()


def test_a_nan_loss_stops_the_training_in_one_line_and_keeps_the_good_state(tmp_path, one_thread):
    with pytest.raises(UserError) as info:
        fit_small(tmp_path, "round_1", epochs=3, callbacks=[PoisonAt(7)()])
    line = str(info.value)
    assert "\n" not in line
    assert "round_1" in line and "diverged: the loss became NaN or infinite at step 8 " in line
    assert "(epoch 1)" in line and "optimizer.lr=0.003" in line
    # epoch 0's last.ckpt (4 steps) is the one kept: nothing after the NaN was saved
    last = load_checkpoint(tmp_path / "round_1" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_on_one_gpu_the_loss_check_reads_the_step_before(tmp_path):
    """No GPU here: a "meta" tensor stands for a loss on a device. Its flag is read one step
    later (so the check never waits for the device), naming the step it belongs to; on the
    CPU the step's own flag is read at once."""
    from types import SimpleNamespace

    from pipeline.engine.trainer import LastCheckpoint

    callback = LastCheckpoint(tmp_path / "checkpoints" / "last.ckpt")
    trainer = SimpleNamespace(world_size=1, global_step=5)
    on_device = {"loss": torch.empty((), device="meta")}
    assert callback._loss_check(trainer, on_device) == (5, 0)
    trainer.global_step = 6
    step, flag = callback._loss_check(trainer, on_device)
    assert step == 5 and flag.device.type == "meta"
    cpu_step, cpu_flag = callback._loss_check(trainer, torch.tensor(float("nan")))
    assert cpu_step == 6 and bool(cpu_flag)
    # before a save, the flag not read yet is read: NaN weights are never saved
    callback._unread = (6, torch.tensor(True))
    module = SimpleNamespace(log_prefix="round_2/")
    trainer.optimizers, trainer.current_epoch = [], 0
    with pytest.raises(UserError, match="training round_2 in .* diverged: the loss .* step 6"):
        callback._read_unread(trainer, module)
    assert callback._unread is None


def test_weights_finite_and_the_deploy_refusal(tmp_path):
    from pipeline.deploy.model import refuse_non_finite
    from pipeline.engine.trainer import weights_finite

    net = torch.nn.Linear(3, 2)
    assert weights_finite(net)
    refuse_non_finite({"net.weight": net.weight.detach()}, tmp_path / "m.ckpt")
    with torch.no_grad():
        net.bias[1] = float("inf")
    assert not weights_finite(net)
    with pytest.raises(UserError, match=r"NaN or infinite weights \(net.bias\).*diverged"):
        refuse_non_finite({f"net.{k}": v for k, v in net.state_dict().items()}, Path("m.ckpt"))


# --- writes that fail ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on the device"),
        (errno.EDQUOT, "disk quota is exceeded"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_every_write_error_of_the_disk_is_one_line_and_leaves_no_temporary(tmp_path, code, words):
    final = tmp_path / "round_0" / "model.ckpt"
    with pytest.raises(UserError, match=words) as info, atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code))
    assert "\n" not in str(info.value) and str(final) in str(info.value)
    assert not final.exists() and temporaries(tmp_path) == []


def test_a_write_error_wrapped_by_torch_is_still_one_line(tmp_path, monkeypatch):
    """torch.save to a path hides a full disk's errno in a C++ RuntimeError (measured with
    /dev/full): the checkpoint is written again through a Python file, whose write raises it."""
    calls = []

    def save(obj, f):
        calls.append(type(f).__name__)
        if isinstance(f, str | Path):
            Path(f).write_bytes(b"x" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("torch.save", save)
    with pytest.raises(UserError, match="no space left on the device while writing"):
        save_checkpoint(tmp_path / "last.ckpt", {"state_dict": {}})
    assert calls == ["PosixPath", "BufferedWriter"]
    assert list(tmp_path.iterdir()) == []


def test_torchscript_export_on_a_full_disk_is_one_line_not_an_abort(tmp_path, monkeypatch):
    """torch.jit.save to a path aborts the process on a full disk (SIGABRT): the export saves
    to memory and writes with Python, so /dev/full (always full) raises ENOSPC instead."""
    from pipeline.deploy import export

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    with pytest.raises(OSError) as info:
        export.write_torchscript(net, torch.rand(1, 1, 2, 2), Path("/dev/full"))
    assert info.value.errno == errno.ENOSPC
    target = tmp_path / "m.torchscript.pt"
    full = pytest.raises(UserError, match="no space left on the device while writing")
    with full, atomic_path(target) as tmp:
        export.write_torchscript(net, torch.rand(1, 1, 2, 2), Path("/dev/full"))
        tmp.write_bytes(b"never reached")
    assert list(tmp_path.iterdir()) == []


def test_predict_leaves_no_parts_folder_after_an_exit_2(tmp_path):
    from pipeline.deploy.predict import drop_unstarted

    parts = tmp_path / "out.csv.parts"
    parts.mkdir()
    (parts / "plan.json").write_text('"x"\n')
    drop_unstarted(parts)
    assert not parts.exists()
    parts.mkdir()
    (parts / "plan.json").write_text('"x"\n')
    (parts / "part-00000-of-00002.npz").write_bytes(b"done")
    drop_unstarted(parts)  # work already done is kept for the re-run
    assert sorted(p.name for p in parts.iterdir()) == ["part-00000-of-00002.npz", "plan.json"]


# --- one live run per run_dir -------------------------------------------------------------


def test_a_second_live_run_is_refused_and_the_lock_goes_with_the_run(tmp_path):
    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    with pytest.raises(RunDirBusy, match=f"in use by another live run \\(pid {os.getpid()} on"):
        second.lock()
    first.unlock()
    assert not (tmp_path / "run" / LOCK).exists()  # a finished run_dir holds its results only
    second.lock()
    second.unlock()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).write_text(json.dumps({"pid": int(dead), "host": os.uname().nodename}))
    run = RunDir(run_dir)
    run.lock()  # the kernel released its flock when it died: locking it takes it over
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()
    run.unlock()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    """On a network file system a dead job's lock can outlive it: the same SLURM job, requeued
    (a later restart count), takes it over; another job is refused."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    old = RunDir(run_dir)
    old.lock()  # held by "the job before its requeue"
    monkeypatch.setenv("SLURM_JOB_ID", "5000")
    with pytest.raises(RunDirBusy, match="SLURM job 4242"):
        RunDir(run_dir).lock()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    new = RunDir(run_dir)
    new.lock()
    assert json.loads((run_dir / LOCK).read_text())["slurm_restart_count"] == 1
    new.unlock()
    old.unlock()  # its file was replaced and removed: nothing of the new one's is touched


def test_the_cli_refuses_a_run_dir_in_use_in_one_line_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    holder = RunDir(run_dir)
    holder.lock()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    try:
        proc = run_cli(*FAST, "stage=train", f"run_dir={run_dir}", env=THREADS, timeout=120)
    finally:
        holder.unlock()
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: run_dir {run_dir} is in use by another live run (pid")
    # nothing changed: config.yaml as it was; the lock file went with its holder
    after = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.iterdir())
    assert after == [b for b in before if b[0] != LOCK] and after[0][0] == "config.yaml"


# --- Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_is_recorded_like_term_and_a_second_one_stops_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption, "_owner_pid", os.getpid())
    monkeypatch.setattr(preemption, "_interrupts", 0)
    monkeypatch.setattr(preemption, "_requested", [])
    monkeypatch.setattr(preemption, "_deferring", 1)  # Lightning runs: recorded, not raised
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    preemption._on_signal(signal.SIGINT, None)
    assert preemption.pending() == signal.SIGINT and exits == []
    preemption._on_signal(signal.SIGINT, None)
    assert exits == [130]
    assert signal.SIGINT in preemption.SIGNALS
    monkeypatch.setattr(preemption, "_stopped_by", [])
    assert requeue.stopped(signal.SIGINT, started_rank=True, is_rank_zero=True) == 3
    assert requeue.stopped(signal.SIGINT, started_rank=False, is_rank_zero=False) == 130
    assert requeue.stopped(signal.SIGTERM, started_rank=False, is_rank_zero=False) == 1


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_ctrl_c_saves_last_ckpt_says_so_exits_130_and_the_rerun_resumes(tmp_path, devices):
    """SIGINT as TERM (tests/test_signals.py): in one process, or to a job that started 2 DDP
    ranks. Sent as a terminal sends Ctrl-C, to the whole foreground process group: the ranks
    left it, so each gets it once (forwarded by the launcher), not twice (a second Ctrl-C)."""
    run_dir = tmp_path / "run"
    args = [*FAST, "stage=train", "train.epochs=2", "train.min_steps=400",
            f"trainer.devices={devices}", "trainer.strategy=ddp", f"run_dir={run_dir}"]  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env={**os.environ, **THREADS, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        try:
            wait_for(last, proc)  # epoch 1's last.ckpt
            os.killpg(proc.pid, signal.SIGINT)  # the group this test started, as Ctrl-C does
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped by SIGINT after saving the run's state: re-run the same command" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert 200 < load_checkpoint(last)["global_step"] < 400  # saved on the signal, mid-epoch 2
    assert not (run_dir / LOCK).exists()
    again = run_cli(*args, env=THREADS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming training from" in again.stdout + again.stderr
    assert (run_dir / "summary.json").is_file()


# The CLI, with the save that follows a signal wrapped: the process first sends itself a second
# SIGINT, as a user pressing Ctrl-C again while the run saves.
SECOND_CTRL_C = r"""
import os, runpy, signal as sig, sys
from pipeline.engine.trainer import LastCheckpoint
original = LastCheckpoint._save

def save(self, trainer, signal=False):
    if signal:
        os.kill(os.getpid(), sig.SIGINT)
    return original(self, trainer, signal)

LastCheckpoint._save = save
sys.argv[0] = "pipeline"
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*FAST, "stage=train", "train.epochs=2", "train.min_steps=400", f"run_dir={run_dir}"]
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", SECOND_CTRL_C, *args],
            cwd=REPO,
            env={**os.environ, **THREADS, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for(last, proc)  # epoch 1's last.ckpt (200 steps)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 130, stderr[-3000:]
    (line,) = stderr.strip().splitlines()
    assert line.startswith("stopped at once by a second SIGINT, without saving"), line
    assert load_checkpoint(last)["global_step"] == 200  # the last saved state, kept


@pytest.mark.slow
def test_a_diverging_learning_rate_exits_2_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*FAST, "stage=train", "optimizer.lr=1e6", f"run_dir={run_dir}", env=THREADS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert f"training in {run_dir} diverged: the loss became NaN or infinite at step" in line
    assert "optimizer.lr=1e+06 is the likely cause" in line
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.ckpt").exists()


# --- a real full disk: a small tmpfs (root only; skipped, saying why, elsewhere) -------------


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs at tmp_path/disk, unmounted after the test."""
    import shutil

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (the /dev/full tests cover the rest)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int = 64 * 1024) -> None:
    """Take all but `leave` bytes of the disk's free space."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))


def test_a_checkpoint_save_that_fills_the_disk_is_one_line_and_keeps_the_previous(small_disk):
    last = small_disk / "checkpoints" / "last.ckpt"
    save_checkpoint(last, {"state_dict": {"w": torch.ones(1000)}})
    fill(small_disk)
    big = {"state_dict": {"w": torch.zeros(1_000_000)}}  # 4 MB on a disk with 64 KB left
    with pytest.raises(UserError, match="no space left on the device while writing") as info:
        save_checkpoint(last, big)
    assert "\n" not in str(info.value) and str(last) in str(info.value)
    assert temporaries(small_disk) == []
    assert torch.equal(load_checkpoint(last)["state_dict"]["w"], torch.ones(1000))  # intact


def test_a_torchscript_export_that_fills_the_disk_is_one_line_and_keeps_the_previous(small_disk):
    from pipeline.deploy import export

    target = small_disk / "m.torchscript.pt"
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    with atomic_path(target) as tmp:
        export.write_torchscript(small, torch.rand(1, 1, 2, 2), tmp)
    before = target.read_bytes()
    fill(small_disk)
    big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 1024)).eval()  # 4 MB
    full = pytest.raises(UserError, match="no space left on the device while writing")
    with full as info, atomic_path(target) as tmp:
        export.write_torchscript(big, torch.rand(1, 1, 32, 32), tmp)
    assert "\n" not in str(info.value)
    assert temporaries(small_disk) == [] and target.read_bytes() == before


@pytest.mark.slow
def test_export_to_a_full_disk_through_the_cli_exits_2_in_one_line(small_disk, tmp_path):
    run_dir = tmp_path / "run"
    tiny = ["progress=false", "trainer.accelerator=cpu", "train.epochs=1", "train.min_steps=2"]
    args = [*tiny, "selftrain.rounds=0", f"run_dir={run_dir}"]
    proc = run_cli(*args, env=THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = small_disk / "model.ckpt"
    ckpt.write_bytes((run_dir / "round_0" / "model.ckpt").read_bytes())
    (small_disk / "model.torchscript.pt").write_bytes(b"the previous export")
    fill(small_disk, leave=16 * 1024)
    export = ["stage=export", f"ckpt={ckpt}", "format=torchscript", f"run_dir={tmp_path / 'ex'}"]
    proc = run_cli(*export, "progress=false", env=THREADS)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space left on the device while writing" in lines[0], lines
    assert temporaries(small_disk) == []
    assert (small_disk / "model.torchscript.pt").read_bytes() == b"the previous export"
    assert load_checkpoint(ckpt)["state_dict"]  # the checkpoint beside it is untouched


@pytest.mark.slow
def test_a_read_only_disk_under_a_partly_finished_run_or_out_is_one_line(small_disk, tmp_path):
    run_dir = small_disk / "run"
    tiny = ["progress=false", "trainer.accelerator=cpu", "train.epochs=1", "train.min_steps=2"]
    args = [*tiny, "selftrain.rounds=0", f"run_dir={run_dir}"]
    assert run_cli(*args, env=THREADS).returncode == 0
    (run_dir / "summary.json").unlink()  # killed before its summary: a rerun would finish it
    remount = ["mount", "-o", "remount,ro", str(small_disk)]
    assert subprocess.run(remount, capture_output=True).returncode == 0
    ckpt, images = run_dir / "round_0" / "model.ckpt", tmp_path / "images"
    images.mkdir()
    from torchvision.io import write_png

    write_png(torch.zeros(1, 8, 8, dtype=torch.uint8), str(images / "a.png"))
    commands = {
        "rerun": args,
        "predict": ["stage=predict", f"ckpt={ckpt}", f"input={images}", "progress=false"]
        + [f"out={small_disk / 'p.csv'}", f"run_dir={tmp_path / 'predict'}"],
        "export": ["stage=export", f"ckpt={ckpt}", "format=torchscript", "progress=false"]
        + [f"out={small_disk / 'm.pt'}", f"run_dir={tmp_path / 'export'}"],
    }
    before = sorted(p.name for p in run_dir.rglob("*"))
    for name, command in commands.items():
        proc = run_cli(*command, env=THREADS)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert len(lines) == 1 and "the file system is read-only" in lines[0], (name, lines)
    assert sorted(p.name for p in run_dir.rglob("*")) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["run"]
    assert not (tmp_path / "predict").exists() and not (tmp_path / "export").exists()
