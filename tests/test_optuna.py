"""Hydra's Optuna sweeper on the jobs' objective (val accuracy of the final round): a real
3-trial study on digits, and the checks made before a study starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import FAST, run_cli

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

TINY = [*FAST, "train.epochs=3", "train.min_steps=60", "trainer.num_threads=1"]

# A Hydra callback that records what each job returned: the value the sweeper hands to Optuna.
RECORDER = """
import json
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback


class Record(Callback):
    def __init__(self, out):
        self.out = out

    def on_job_end(self, config, job_return, **kwargs):
        hc = HydraConfig.get()
        entry = {"num": hc.job.num, "dir": hc.runtime.output_dir, "value": job_return.return_value}
        with open(self.out, "a") as f:
            f.write(json.dumps(entry) + "\\n")
"""


@pytest.mark.slow  # 3 trials x (teacher + student)
def test_a_three_trial_study_returns_each_trials_val_accuracy(tmp_path):
    (tmp_path / "record_objective.py").write_text(RECORDER)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    sweep, returns = tmp_path / "sweep", tmp_path / "returns.jsonl"
    proc = run_cli(
        "-m",
        "hparams_search=pseudo_label",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        "+hydra.callbacks.record._target_=record_objective.Record",
        f"+hydra.callbacks.record.out={returns}",
        *TINY,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(line) for line in returns.read_text().splitlines()]
    assert [t["num"] for t in trials] == [0, 1, 2]
    for trial in trials:
        summary = json.loads((Path(trial["dir"]) / "summary.json").read_text())
        assert isinstance(trial["value"], float)
        assert trial["value"] == summary["val_accuracy"]  # the objective is the val accuracy
        assert summary["num_val"] == 30 and summary["val_source"] == "val_per_class"
        overrides = yaml.safe_load((Path(trial["dir"]) / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides if o.startswith("pseudo_label."))
        assert 0.5 <= float(params["pseudo_label.threshold"]) <= 0.99
        assert params["pseudo_label.tta_views"] in ("0", "4", "8")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(t["value"] for t in trials)

    from pipeline.report import write_report

    report = write_report(sweep, tmp_path / "report")
    text = report["paths"]["report.md"].read_text()
    assert report["n_jobs"] == 3 and "final val acc (%)" in text
    assert "test accuracy chose nothing" in text


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.val_per_class=0"], "objective=val_accuracy needs a val split"),
        (["hydra.sweeper.direction=minimize"], "pass hydra.sweeper.direction=maximize"),
        (["objective=null"], "pass objective=val_accuracy"),
    ],
)
def test_a_study_that_cannot_optimise_is_refused_before_its_first_trial(
    tmp_path, overrides, needle
):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hparams_search=pseudo_label", f"hydra.sweep.dir={sweep}", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not any(sweep.glob("*/summary.json"))


def test_a_missing_sweeper_names_the_pip_command():
    from pipeline.command_line import hydra_error_line

    text = (
        "In 'hparams_search/pseudo_label': Could not find 'hydra/sweeper/optuna'\n\n"
        "Available options in 'hydra/sweeper':\n\tbasic\n"
        "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n"
    )
    line = hydra_error_line(text)
    assert "hydra/sweeper/optuna" in line and "pip install -e '.[optuna]'" in line
