"""Bad input through the real CLI: exit code 2, exactly one line on stderr that names the problem
and the fix, no traceback, and the run_dir exactly as it was (names, bytes and mtimes)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO
from torchvision.io import write_png

from pipeline.errors import UserError

IMAGES = [
    "data=image_folder",
    "data.image_size=8",
    "data.channels=1",
    "data.mean=[0.5]",
    "data.std=[0.5]",
    "data.augment.randaugment_ops=0",
    "data.labels_per_class=2",
]
TINY = ["progress=false", "trainer.accelerator=cpu", "train.epochs=1", "train.min_steps=4"]

# One intra-op thread per run: on a small shared machine, the default thread pools of several
# processes spin against each other and make a run about 8x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*overrides: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess. cwd is a temporary folder: Hydra's own output dir lands there."""
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "pipeline"]
    return subprocess.run(
        [*command, *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD, "PYTHONPATH": str(REPO)},
    )


def snapshot(root: Path) -> dict[str, tuple] | None:
    """Every entry under root: (sha256, size, mtime_ns) for files, 'dir' for folders."""
    if not root.exists():
        return None
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def assert_bad_input(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and one clear line: returns that line."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert err and len(err.splitlines()) == 1, f"not one line:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def write_class_tree(root: Path, per_class: list[int], size: int = 8, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for c, n in enumerate(per_class):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (torch.rand(1, size, size, generator=g) * 40).to(torch.uint8)
            img[:, 2 * c : 2 * c + 3, 1:7] = 220
            write_png(img, str(folder / f"{i}.png"))


def image_args(labelled: Path, num_classes: int = 2, **dirs: Path) -> list[str]:
    args = [*IMAGES, f"data.labelled_dir={labelled}", f"data.num_classes={num_classes}"]
    return args + [f"data.{k}={v}" for k, v in dirs.items()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def finished(work) -> tuple[Path, list[str]]:
    """A finished selftrain run on the bundled digits, and the command that made it."""
    run_dir = work / "finished"
    args = [*TINY, "selftrain.rounds=0", f"run_dir={run_dir}"]
    proc = cli(*args, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "summary.json").exists()
    return run_dir, args


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A run_dir that exists and holds a file of the user's (and no config.yaml)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    return run_dir


# --- config errors: refused before anything is read or written ------------------------------


CONFIG_ERRORS = [
    (["pseudo_label.threshold=1.5"], ["pseudo_label.threshold=1.5", "[0, 1]"]),
    (["pseudo_label.threshold=-0.1"], ["pseudo_label.threshold=-0.1", "[0, 1]"]),
    (["pseudo_label.threshold=abc"], ["pseudo_label.threshold=abc"]),
    (["selftrain.rounds=-1"], ["selftrain.rounds=-1", ">= 0"]),
    (["stage=bogus"], ["unknown stage='bogus'", "selftrain"]),
    (["foo=1"], ["unknown config key foo"]),
    (["+foo=1"], ["unknown config key foo"]),
    (["train.epochz=3"], ["unknown config key train.epochz"]),
    (["+pseudo_label.treshold=0.5"], ["unknown config key pseudo_label.treshold"]),
    (["data=nope"], ["data/nope", "digits"]),
    (["data.labels_per_class=0"], ["data.labels_per_class=0", ">= 1"]),
    (["stage=evaluate"], ["ckpt=PATH"]),
    (["data=image_folder"], ["data.labelled_dir", "data.labelled_dir=VALUE"]),
    # the val split comes out of the label budget, and best_val needs one
    (["data.val_per_class=4"], ["data.val_per_class=4 must be below data.labels_per_class=4"]),
    (["train.select=best_val"], ["train.select=best_val needs a val split", "val_per_class=N"]),
    (["train.select=best"], ["train.select='best'", "best_val"]),
    (["objective=loss"], ["objective='loss'", "val_accuracy"]),
    (["+trainer.limit_val_batches=0.5"], ["trainer.limit_val_batches is set by the pipeline"]),
    (["logger=nope"], ["logger/nope", "csv"]),
    # each key's type and range, from its declaration (config/schema.py)
    (["optimizer.lr=-0.1"], ["optimizer.lr=-0.1 must be > 0"]),
    (["data.labels_per_class=2.5"], ["data.labels_per_class=2.5 must be a whole number >= 1"]),
]


def test_two_mode_flags_are_refused_in_one_line(tmp_path):
    """Hydra raises (a traceback) for `--cfg job -m`: one line, exit 2, nothing written."""
    proc = cli("--cfg", "job", "-m", "seed=0,1", cwd=tmp_path)
    assert_bad_input(proc, "Only one of --run, --multirun, --cfg", "drop -m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, needles", CONFIG_ERRORS, ids=[" ".join(o) for o, _ in CONFIG_ERRORS]
)
def test_config_error_leaves_a_finished_run_unchanged(finished, work, overrides, needles):
    run_dir, args = finished
    before = snapshot(run_dir)
    assert_bad_input(cli(*args, *overrides, cwd=work), *needles)
    assert snapshot(run_dir) == before


OTHER_CONFIGS = [
    (["seed=1"], ["seed (0 -> 1)"]),
    (["data.labels_per_class=5"], ["data.labels_per_class (4 -> 5)"]),
    (["model=resnet18"], ["model.name (small_cnn -> resnet18)"]),
    (["pseudo_label.threshold=0.5"], ["pseudo_label.threshold (0.8 -> 0.5)"]),
    (["data=mnist5k"], ["data.name (digits -> mnist5k)"]),
]


@pytest.mark.parametrize(
    "overrides, keys",
    [
        pytest.param(*c, marks=() if i == 0 else pytest.mark.slow)
        for i, c in enumerate(OTHER_CONFIGS)
    ],
    ids=[o[0] for o, _ in OTHER_CONFIGS],
)
def test_run_dir_of_another_config_is_refused_naming_the_keys(finished, work, overrides, keys):
    run_dir, args = finished
    before = snapshot(run_dir)
    line = assert_bad_input(cli(*args, *overrides, cwd=work), "another config", "overwrite=true")
    for key in keys:
        assert key in line
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_runtime_settings_may_change_on_a_rerun(finished, work):
    run_dir, args = finished
    before = snapshot(run_dir)
    runtime = ["progress=true", "trainer.devices=1", "data.num_workers=0", "trainer.precision=32"]
    runtime += ["logger=[csv,tensorboard]", "objective=test_accuracy"]
    proc = cli(*args, *runtime, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to redo" in proc.stdout
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_overwrite_true_starts_a_run_dir_over(finished, work, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished[0], run_dir)
    args = [*FAST, "selftrain.rounds=0", "seed=1", f"run_dir={run_dir}"]
    assert_bad_input(cli(*args, cwd=tmp_path), "seed (0 -> 1)")
    proc = cli(*args, "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["seed"] == 1 and [r["round"] for r in summary["rounds"]] == [0]
    assert not (run_dir / "round_1").exists()  # the old run's student is gone
    assert "seed: 1" in (run_dir / "config.yaml").read_text()


# --- data errors: found while reading the data, before any artifact ------------------------


@pytest.fixture(scope="module")
def trees(work) -> Path:
    root = work / "trees"
    write_class_tree(root / "good", [6, 6], seed=1)
    write_class_tree(root / "test", [3, 3], seed=2)
    write_class_tree(root / "unlabelled" / "a", [4, 4], seed=3)
    (root / "empty").mkdir()
    write_class_tree(root / "empty_class", [6, 0])
    write_class_tree(root / "small_class", [6, 1])
    write_class_tree(root / "corrupt", [6, 6])
    (root / "corrupt" / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


DATA_CASES = {
    "missing_labelled_dir": (
        lambda t: image_args(t / "does_not_exist"),
        ["does_not_exist", "does not exist"],
    ),
    "empty_labelled_dir": (lambda t: image_args(t / "empty"), ["no class subfolders"]),
    "class_folder_without_images": (
        lambda t: image_args(t / "empty_class"),
        ["class1", "contains no images"],
    ),
    "empty_unlabelled_dir": (
        lambda t: image_args(t / "good", unlabelled_dir=t / "empty"),
        ["unlabelled_dir", "no images"],
    ),
    "missing_test_dir": (
        lambda t: image_args(t / "good", test_dir=t / "nope"),
        ["data.test_dir", "does not exist"],
    ),
    "corrupt_image": (
        lambda t: image_args(t / "corrupt", test_dir=t / "test"),
        ["broken.png", "data.on_bad_image=skip"],
    ),
    "labels_per_class_above_smallest_class": (
        lambda t: [*image_args(t / "small_class", test_dir=t / "test"), "data.labels_per_class=2"],
        ["only 1", "labels_per_class"],
    ),
    "num_classes_mismatch": (
        lambda t: image_args(t / "good", num_classes=3, test_dir=t / "test"),
        ["data.num_classes"],
    ),
    "labels_per_class_above_digits_class": (
        lambda t: ["data.labels_per_class=500"],
        ["labels_per_class"],
    ),
}


QUICK_DATA_CASES = ("missing_labelled_dir", "corrupt_image", "labels_per_class_above_digits_class")


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=() if c in QUICK_DATA_CASES else pytest.mark.slow)
        for c in sorted(DATA_CASES)
    ],
)
def test_bad_data_exits_2_and_leaves_the_folder_as_it_was(trees, user_dir, case):
    make_args, needles = DATA_CASES[case]
    before = snapshot(user_dir)
    proc = cli(*TINY, *make_args(trees), f"run_dir={user_dir}", cwd=user_dir.parent)
    assert_bad_input(proc, *needles)
    assert snapshot(user_dir) == before  # no config.yaml or splits.npz left behind


@pytest.mark.slow
def test_bad_data_in_a_new_run_dir_leaves_no_run_dir(trees, tmp_path):
    run_dir = tmp_path / "new" / "run"
    proc = cli(*TINY, *image_args(trees / "corrupt"), f"run_dir={run_dir}", cwd=tmp_path)
    assert_bad_input(proc, "broken.png")
    assert not run_dir.exists()
    # fixed, the same run_dir is accepted (it was not claimed by the failed command)
    proc = cli(
        *TINY, *image_args(trees / "good"), "selftrain.rounds=0", f"run_dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_bad_data_in_a_resumed_run_changes_nothing(finished, trees, tmp_path):
    """A run killed before its summary, whose data became unreadable since: nothing is lost."""
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *image_args(trees / "good", test_dir=trees / "test"),
        "selftrain.rounds=0",
        f"run_dir={run_dir}",
    ]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "summary.json").unlink()
    victim = sorted((trees / "good" / "class1").iterdir())[0]
    saved = victim.read_bytes()
    # The same file, now unreadable (its folder's listing is unchanged).
    victim.write_bytes((trees / "corrupt" / "class1" / "broken.png").read_bytes())
    try:
        before = snapshot(run_dir)
        assert_bad_input(cli(*args, cwd=tmp_path), victim.name, "data.on_bad_image=skip")
        assert snapshot(run_dir) == before
    finally:
        victim.write_bytes(saved)


@pytest.mark.slow
def test_on_bad_image_skip_goes_on_without_the_bad_file(trees, tmp_path):
    run_dir = tmp_path / "run"
    args = image_args(trees / "corrupt", test_dir=trees / "test")
    proc = cli(
        *TINY,
        *args,
        "data.on_bad_image=skip",
        "selftrain.rounds=0",
        f"run_dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "broken.png" in proc.stdout + proc.stderr  # the skip is reported
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_labelled"] + summary["num_unlabelled"] == 12  # the 12 good images
    # counted where the README promises it (an in-memory set: skipped while decoding)
    assert summary["num_bad_images"] == 1
    assert json.loads((run_dir / "round_0" / "metrics.json").read_text())["num_bad_images"] == 1


def test_bad_on_bad_image_value(trees, user_dir):
    before = snapshot(user_dir)
    proc = cli(
        *TINY,
        *image_args(trees / "good"),
        "data.on_bad_image=maybe",
        f"run_dir={user_dir}",
        cwd=user_dir.parent,
    )
    assert_bad_input(proc, "on_bad_image", "skip")
    assert snapshot(user_dir) == before


# --- checkpoints: another model, another class count, unreadable, or carrying code -----------


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def bad_checkpoints(work) -> dict[str, Path]:
    folder = work / "ckpts"
    folder.mkdir()
    files = {
        "payload": folder / "payload.ckpt",
        "payload_raw": folder / "payload_raw.ckpt",
        "mismatch": folder / "mismatch.ckpt",
        "truncated": folder / "truncated.ckpt",
    }
    marker = work / "PAYLOAD_RAN"
    torch.save(
        {"state_dict": {"net.w": torch.ones(1)}, "x": _Payload(f"touch {marker}")}, files["payload"]
    )
    files["payload_raw"].write_bytes(pickle.dumps({"state_dict": _Payload(f"touch {marker}")}))
    torch.save({"state_dict": {"net.w": torch.ones(3)}}, files["mismatch"])
    files["truncated"].write_bytes(files["mismatch"].read_bytes()[:200])
    return files


def marker_of(work: Path) -> Path:
    return work / "PAYLOAD_RAN"


@pytest.mark.slow
def test_checkpoint_of_another_class_count(finished, trees, user_dir):
    ckpt = finished[0] / "round_0" / "model.ckpt"
    before, before_run = snapshot(user_dir), snapshot(finished[0])
    args = image_args(trees / "good", test_dir=trees / "test")
    proc = cli(
        *TINY, *args, "stage=evaluate", f"ckpt={ckpt}", f"run_dir={user_dir}", cwd=user_dir.parent
    )
    assert_bad_input(proc, "predicts 10 classes", "has 2")
    assert snapshot(user_dir) == before and snapshot(finished[0]) == before_run


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["evaluate", "finetune"])  # load_net, init_from_pretrained
def test_checkpoint_of_another_architecture(finished, work, user_dir, stage):
    ckpt = finished[0] / "round_0" / "model.ckpt"
    before = snapshot(user_dir)
    proc = cli(
        *FAST, "model=resnet18", "stage=finetune", f"ckpt={ckpt}", f"run_dir={user_dir}", cwd=work
    )
    assert_bad_input(proc, "model=small_cnn")
    assert snapshot(user_dir) == before


def test_checkpoint_of_another_architecture_is_evaluated_as_it_names(finished, work, user_dir):
    # load_net builds the network a checkpoint names (a teacher may be another architecture)
    ckpt = finished[0] / "round_0" / "model.ckpt"
    proc = cli(
        *FAST, "model=resnet18", "stage=evaluate", f"ckpt={ckpt}", f"run_dir={user_dir}", cwd=work
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((user_dir / "summary.json").read_text())
    assert summary["model"] == "small_cnn" and summary["test_accuracy"] > 0.1


UNUSABLE = {
    "mismatch": ["does not fit model=small_cnn"],
    "truncated": ["unreadable or truncated"],
    "payload": ["refusing checkpoint", "could run code"],
    "payload_raw": ["refusing checkpoint", "could run code"],
    "missing": ["does not exist"],
}
UNUSABLE_CASES = [("ckpt", kind) for kind in UNUSABLE] + [
    ("pretrain.ckpt", kind) for kind in ("payload", "mismatch", "missing")
]


@pytest.mark.parametrize(
    "use, kind",
    [
        pytest.param(
            *c, marks=() if c in (("ckpt", "payload"), ("ckpt", "mismatch")) else pytest.mark.slow
        )
        for c in UNUSABLE_CASES
    ],
    ids=["-".join(c) for c in UNUSABLE_CASES],
)
def test_unusable_checkpoint_is_refused(bad_checkpoints, work, user_dir, use, kind):
    needles = UNUSABLE[kind]
    ckpt = bad_checkpoints.get(kind, work / "nope.ckpt")
    args = (
        [f"ckpt={ckpt}", "stage=evaluate"]
        if use == "ckpt"
        else [f"pretrain.ckpt={ckpt}", "init=pretrained"]
    )
    before = snapshot(user_dir)
    proc = cli(*FAST, *args, f"run_dir={user_dir}", cwd=work)
    line = assert_bad_input(proc, *needles)
    assert str(ckpt.name) in line
    assert not marker_of(work).exists()  # the payload never ran
    assert snapshot(user_dir) == before


# --- a disk that fills up while an artifact is written ----------------------------------------

DISK_FULL_ON_MODEL_CKPT = """
import errno, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if "model.ckpt" in str(f):  # half a file, then the device is full
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from pipeline.cli import main
sys.argv = ["pipeline", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_disk_full_while_writing_the_teacher_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, "selftrain.rounds=0", f"run_dir={run_dir}"]
    proc = cli(*args, cwd=tmp_path, script=DISK_FULL_ON_MODEL_CKPT)
    assert_bad_input(proc, "no space left", "model.ckpt", "re-run")
    assert not (run_dir / "round_0" / "model.ckpt").exists()
    assert not [p for p in run_dir.rglob(".tmp-*")]
    assert (run_dir / "round_0" / "checkpoints" / "last.ckpt").exists()  # the training is kept
    # with space again, the same command finishes the run from what was kept
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "summary.json").exists() and (run_dir / "round_0" / "model.ckpt").exists()
    assert "resuming training from" in proc.stdout
    assert (
        not [p for p in run_dir.rglob(".tmp-*")]
        and not (run_dir / "round_0" / "checkpoints").exists()
    )


@pytest.mark.slow
def test_run_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    before = snapshot(tmp_path)
    proc = cli(*FAST, f"run_dir={blocker / 'run'}", cwd=tmp_path)
    assert_bad_input(proc, "cannot be created", "run_dir=")
    assert {k: v for k, v in snapshot(tmp_path).items() if k == "a_file"} == {
        "a_file": before["a_file"]
    }


# --- values and paths that reached the code: refused in one line, nothing left behind --------


@pytest.mark.slow
def test_a_bad_value_leaves_nothing_and_the_corrected_command_runs_in_the_same_run_dir(tmp_path):
    """A negative learning rate used to fail in the optimizer (exit 1) after config.yaml and
    splits.npz were written, so that the corrected command was refused as another config."""
    run_dir = tmp_path / "run"
    args = [*TINY, "selftrain.rounds=0", f"run_dir={run_dir}"]
    assert_bad_input(cli(*args, "optimizer.lr=-0.1", cwd=tmp_path), "optimizer.lr=-0.1")
    assert not run_dir.exists()
    proc = cli(*args, "optimizer.lr=0.01", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "summary.json").exists()


def _symlink_loop(root: Path) -> Path:
    write_class_tree(root, [6, 6], seed=1)
    (root / "class0" / "again").symlink_to(root / "class0")  # leads back to its own folder
    return root


def _links_to_each_other(root: Path) -> Path:
    write_class_tree(root, [6, 6], seed=1)
    (root / "class1" / "a").symlink_to("b")
    (root / "class1" / "b").symlink_to("a")
    return root


def _non_utf8_name(root: Path) -> Path:
    write_class_tree(root, [6, 6], seed=1)
    good = root / "class0" / "0.png"
    (root / "class0").joinpath(os.fsdecode(b"caf\xe9.png")).write_bytes(good.read_bytes())
    return root


PATH_CASES = {
    "symlink_loop": (_symlink_loop, "data.labelled_dir", ["again is a symlink loop"]),
    "links_to_each_other": (_links_to_each_other, "data.labelled_dir", ["cannot be followed"]),
    "non_utf8_name": (_non_utf8_name, "data.labelled_dir", ["caf\\udce9.png", "not valid UTF-8"]),
    "unbalanced_braces": (
        lambda root: f"{root}/pool-{{000..009.tar",
        "data.unlabelled_dir",
        ["has unbalanced braces", "pool-{000..099}.tar"],
    ),
}


@pytest.mark.slow  # (in process, fast: test_the_folder_listing_names_what_it_cannot_follow)
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_a_path_the_listing_cannot_follow_is_one_line_and_leaves_nothing(trees, user_dir, case):
    make, key, needles = PATH_CASES[case]
    path = make(user_dir.parent / case)
    args = image_args(trees / "good", test_dir=trees / "test")
    before = snapshot(user_dir)
    proc = cli(*TINY, *args, f"{key}='{path}'", f"run_dir={user_dir}", cwd=user_dir.parent)
    assert_bad_input(proc, *needles)
    assert snapshot(user_dir) == before


@pytest.mark.parametrize("case", ["symlink_loop", "links_to_each_other", "non_utf8_name"])
def test_the_folder_listing_names_what_it_cannot_follow(tmp_path, case):
    from pipeline.data.manifest import image_paths

    make, _, needles = PATH_CASES[case]
    with pytest.raises(UserError) as refused:
        image_paths(make(tmp_path / case))
    for needle in needles:
        assert needle in str(refused.value)


# --- skipped images are counted: 0 when none, in every round's metrics.json and the summary --


def test_a_run_without_bad_images_counts_zero(finished):
    run_dir, _ = finished
    assert json.loads((run_dir / "summary.json").read_text())["num_bad_images"] == 0
    assert json.loads((run_dir / "round_0" / "metrics.json").read_text())["num_bad_images"] == 0


@pytest.mark.slow
def test_a_streamed_pool_counts_its_skipped_image_in_the_round_and_the_summary(tmp_path):
    import io
    import tarfile

    import numpy as np
    from streaming_data import CLASSES, class_tree, jpeg

    class_tree(tmp_path / "labelled", per_class=4, seed=0)
    class_tree(tmp_path / "test", per_class=3, seed=1)
    rng = np.random.default_rng(2)
    members = [(f"{i:04d}.jpg", jpeg(i % 3, rng)) for i in range(11)]
    members.insert(5, ("0099.jpg", b"\xff\xd8 not a jpeg"))
    with tarfile.open(tmp_path / "pool-000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "data=image_folder",
        f"data.num_classes={len(CLASSES)}",
        "data.image_size=16",
        "data.channels=1",
        "data.mean=[0.3]",
        "data.std=[0.3]",
        "data.augment.randaugment_ops=0",
        f"data.labelled_dir={tmp_path / 'labelled'}",
        f"data.test_dir={tmp_path / 'test'}",
        f"data.unlabelled_dir={tmp_path / 'pool-000.tar'}",
        "data.in_memory=false",
        "data.num_workers=0",
        "data.on_bad_image=skip",
        "selftrain.rounds=1",
        "pseudo_label.tta_views=0",
        "pseudo_label.threshold=0",
        f"run_dir={run_dir}",
    ]
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads((run_dir / f"round_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    assert [r["num_bad_images"] for r in rounds] == [0, 1]  # the pool is read from round 1 on
    assert rounds[1]["num_pseudo"] == 11  # every readable pool image, at threshold 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_bad_images"] == 1
    assert [r["num_bad_images"] for r in summary["rounds"]] == [0, 1]
