"""The logger group with the real loggers, read back with their own readers: CSV (pandas),
TensorBoard (EventAccumulator), MLflow (MlflowClient on a local store), W&B (offline files);
one logger run per pipeline run, and a resumed run appends to it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import FAST, run_cli

from pipeline.config.keys import dir_name, run_name

EPOCHS = 3
RUN = [
    *FAST,
    f"train.epochs={EPOCHS}",
    "train.min_steps=90",
    "pseudo_label.threshold=0.5",  # a teacher this short keeps some pseudo-labels
    "data.val_per_class=1",  # 4 labels per class: 3 train + 1 val
    "trainer.num_threads=1",
]
# What names the logger run: the job's overrides (FAST's run-neutral ones left out).
RUN_NAME = dir_name(RUN)


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def mlflow_state(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    run = runs[0]
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }
    return {"runs": len(runs), "run": run, "history": history}


def snapshot(run_dir: Path, uri: str) -> dict:
    return {
        "csv": pd.read_csv(run_dir / "logs" / "csv" / "metrics.csv"),
        "tb": tensorboard_scalars(run_dir / "logs" / "tensorboard" / RUN_NAME),
        "mlflow": mlflow_state(uri, str(run_dir)),
    }


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A selftrain run logged to CSV, TensorBoard and MLflow; then, as if it had been killed
    after round 0, the same command again (it resumes at round 1)."""
    root = tmp_path_factory.mktemp("loggers")
    run_dir, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    args = [
        *RUN,
        f"run_dir={run_dir}",
        "logger=[csv,tensorboard,mlflow]",
        f"logger.mlflow.tracking_uri={uri}",
    ]
    proc = run_cli(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads((run_dir / f"round_{k}" / "metrics.json").read_text()) for k in (0, 1)]
    first = snapshot(run_dir, uri)
    for name in ("round_1/metrics.json", "round_1/model.ckpt", "summary.json"):
        (run_dir / name).unlink()
    proc = run_cli(*args, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": run_dir, "rounds": rounds, "first": first, "resumed": snapshot(run_dir, uri)}


def per_round(points: list[tuple[int, float]]) -> dict[int, float]:
    return dict(points)


@pytest.mark.slow  # trains through the CLI
def test_csv_has_each_epoch_of_each_round_and_each_round(logged):
    csv, rounds = logged["first"]["csv"], logged["rounds"]
    for k in (0, 1):
        for name in ("train/loss", "val/acc", "train/images_per_s"):
            rows = csv.dropna(subset=[f"round_{k}/{name}"])
            assert rows["step"].tolist() == list(range(EPOCHS)), name
        epochs = csv.dropna(subset=[f"round_{k}/val/acc"])[f"round_{k}/val/acc"].tolist()
        assert epochs == pytest.approx([e["val_accuracy"] for e in rounds[k]["epochs"]])
    by_round = csv.dropna(subset=["round/test_acc"]).set_index("step")
    assert by_round["round/test_acc"].to_dict() == pytest.approx(
        {k: rounds[k]["test_accuracy"] for k in (0, 1)}
    )
    assert by_round["round/val_acc"].to_dict() == pytest.approx(
        {k: rounds[k]["val_accuracy"] for k in (0, 1)}
    )
    assert by_round.loc[1, "round/pseudo_count"] == rounds[1]["num_pseudo"]
    assert by_round.loc[1, "round/pseudo_precision"] == pytest.approx(rounds[1]["pseudo_accuracy"])
    assert by_round.loc[1, "round/teacher_ece"] == pytest.approx(rounds[1]["teacher_ece"])
    assert 0 < by_round.loc[1, "round/pseudo_coverage"] <= 1
    assert (by_round["round/images_per_s"] > 0).all()
    params = (logged["dir"] / "logs" / "csv" / "hparams.yaml").read_text()
    assert "pseudo_label.threshold: 0.5" in params and "trainer.devices" not in params


@pytest.mark.slow  # trains through the CLI
def test_tensorboard_event_files_read_back(logged):
    tb, rounds = logged["first"]["tb"], logged["rounds"]
    assert [s for s, _ in tb["round_1/train/loss"]] == list(range(EPOCHS))
    assert per_round(tb["round/test_acc"]) == pytest.approx(
        {k: rounds[k]["test_accuracy"] for k in (0, 1)}
    )
    assert per_round(tb["round/val_acc"]) == pytest.approx(
        {k: rounds[k]["val_accuracy"] for k in (0, 1)}
    )
    assert per_round(tb["round/pseudo_count"]) == {1: rounds[1]["num_pseudo"]}
    # the run's final accuracies for the HParams tab
    assert tb["hparams/final_test_accuracy"][0][1] == pytest.approx(rounds[1]["test_accuracy"])


@pytest.mark.slow  # trains through the CLI
def test_mlflow_store_reads_back_with_mlflow_client(logged):
    state, rounds = logged["first"]["mlflow"], logged["rounds"]
    run = state["run"]
    assert state["runs"] == 1  # one MLflow run for the whole pipeline run, all rounds in it
    assert run.info.run_name == RUN_NAME and run.info.status == "FINISHED"
    assert run.data.params["pseudo_label.threshold"] == "0.5"
    assert run.data.params["data.val_per_class"] == "1"
    assert per_round(state["history"]["round/test_acc"]) == pytest.approx(
        {k: rounds[k]["test_accuracy"] for k in (0, 1)}
    )
    assert [s for s, _ in state["history"]["round_0/val/acc"]] == list(range(EPOCHS))
    kept = json.loads((logged["dir"] / "logs" / "mlflow.json").read_text())
    assert kept["run_id"] == run.info.run_id


@pytest.mark.slow  # trains through the CLI
def test_a_resumed_run_appends_to_the_same_logger_run(logged):
    first, resumed = logged["first"], logged["resumed"]
    # CSV: round 0's rows are still there, round 1's epochs are there twice (both attempts)
    csv = resumed["csv"]
    assert len(csv.dropna(subset=["round_0/train/loss"])) == EPOCHS
    assert len(csv.dropna(subset=["round_1/train/loss"])) == 2 * EPOCHS
    assert len(csv) == len(first["csv"]) + EPOCHS + 1  # the second attempt's epochs and round
    # TensorBoard: the same folder, now with the second attempt's events too
    assert len(resumed["tb"]["round_0/train/loss"]) == EPOCHS
    assert len(resumed["tb"]["round_1/train/loss"]) == 2 * EPOCHS
    assert len(list((logged["dir"] / "logs" / "tensorboard").iterdir())) == 1
    # MLflow: still one run, the same one, its history extended
    assert resumed["mlflow"]["runs"] == 1
    assert resumed["mlflow"]["run"].info.run_id == first["mlflow"]["run"].info.run_id
    assert len(resumed["mlflow"]["history"]["round_1/train/loss"]) == 2 * EPOCHS
    assert len(resumed["mlflow"]["history"]["round_0/train/loss"]) == EPOCHS


def test_logger_settings_are_result_neutral():
    assert run_name(["logger=[csv,tensorboard]", "logger.mlflow.tracking_uri=x"]) == "default"
    assert run_name(["objective=test_accuracy"]) == "default"


def test_a_missing_logger_package_is_bad_input_naming_the_pip_command(monkeypatch):
    import importlib.util

    from test_config import compose_cfg

    from pipeline.cli import resolve
    from pipeline.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(UserError, match=r"logger=mlflow needs the mlflow package.*pip install"):
        resolve(compose_cfg("logger=mlflow"))


@pytest.mark.slow
def test_wandb_runs_offline_unless_logged_in(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true")  # no API key anywhere: offline
    args = [*RUN, "stage=train", "train.epochs=1", f"run_dir={run_dir}", "logger=wandb"]
    proc = run_cli(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads((run_dir / "logs" / "wandb.json").read_text())["id"]
    runs = list((run_dir / "logs" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # a resumed run continues the same W&B run id
    shutil.rmtree(run_dir / "round_0", ignore_errors=True)
    (run_dir / "metrics.json").unlink()
    (run_dir / "model.ckpt").unlink()
    (run_dir / "summary.json").unlink()
    proc = run_cli(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "logs" / "wandb.json").read_text())["id"] == run_id
