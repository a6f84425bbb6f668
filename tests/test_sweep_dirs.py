"""Sweep job dirs named by each job's own overrides (conf/config.yaml hydra.sweep.subdir,
pipeline/config/keys.py dir_name), not by their position in the sweep: values added to a
finished sweep run only the new jobs, reordering changes nothing, and the report reads sweeps
of either layout."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import FAST, run_cli

from pipeline.config.keys import dir_name

THREADS = {"OMP_NUM_THREADS": "1"}
TINY = [*FAST, "stage=train", "train.epochs=2", "train.min_steps=20", "trainer.num_threads=1"]


def test_the_name_is_the_result_overrides_in_any_order_hashed_when_long():
    assert dir_name(["seed=1", "stage=train", "trainer.devices=2", "progress=false"]) == (
        "seed=1,stage=train"
    )
    assert dir_name(["stage=train", "seed=1"]) == dir_name(["seed=1", "stage=train"])
    assert dir_name(["seed=1", "seed=2"]) == "seed=2"  # Hydra's rule: the last one counts
    assert dir_name(["hydra.launcher.partition=gpu", "run_dir=/x"]) == "default"
    long = [f"+model.extra_{i}=value_{i}" for i in range(20)]
    name = dir_name(long)
    assert len(name) <= 100 and name.startswith("+model.extra_0=value_0,")
    assert name != dir_name(long[:-1]) and name == dir_name(list(reversed(long)))
    assert "/" not in dir_name(["ckpt=/data/m.ckpt"])


def test_jobs_differing_only_in_result_neutral_settings_are_refused(tmp_path):
    """They would share one job dir (and, side by side on a cluster, write it at once)."""
    proc = run_cli(
        "-m", "trainer.devices=1,2", *TINY, f"hydra.sweep.dir={tmp_path / 'S'}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: two jobs of this sweep would share the job dir "), line
    assert "trainer.devices=1, trainer.devices=2" in line, line
    assert not (tmp_path / "S").exists()


def sweep(sweep_dir: Path, seeds: str):
    proc = run_cli("-m", f"seed={seeds}", *TINY, f"hydra.sweep.dir={sweep_dir}", env=THREADS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return re.sub(r"\s+", " ", proc.stdout + proc.stderr)


def summaries(sweep_dir: Path) -> dict[str, float]:
    """{job dir name: summary.json's mtime}."""
    return {p.parent.name: p.stat().st_mtime for p in sweep_dir.glob("*/summary.json")}


@pytest.mark.slow  # three short trainings and two reports
def test_adding_values_runs_only_the_new_jobs_and_the_report_reads_both_layouts(tmp_path):
    sweep_dir = tmp_path / "S"
    sweep(sweep_dir, "0,1")
    first = summaries(sweep_dir)
    name = "seed={},selftrain.rounds=1,stage=train,train.epochs=2,train.min_steps=20"
    assert sorted(first) == [name.format(0), name.format(1)]

    log = sweep(sweep_dir, "0,1,2")  # a value added to the finished sweep
    assert log.count("complete; nothing to redo") == 2, log[-3000:]
    assert "made by another config" not in log
    second = summaries(sweep_dir)
    assert sorted(second) == [name.format(s) for s in (0, 1, 2)]
    assert {k: second[k] for k in first} == first  # the finished jobs untouched

    log = sweep(sweep_dir, "2,1,0")  # reordered: nothing to do
    assert log.count("complete; nothing to redo") == 3, log[-3000:]
    assert summaries(sweep_dir) == second

    # The same jobs in the numbered layout of earlier versions (SWEEP/0, SWEEP/1, ...).
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for i, job in enumerate(sorted(second)):
        shutil.copytree(sweep_dir / job, numbered / str(i))
    tables = []
    for layout in (sweep_dir, numbered):
        out = tmp_path / f"report-{layout.name}"
        proc = run_cli("stage=report", f"report.sweep_dir={layout}", f"run_dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "summary.json").read_text())
        assert report["n_jobs"] == 3 and report["n_failed"] == 0, report
        markdown = (out / "report.md").read_text()
        tables.append(markdown.split("## Results per group", 1)[1].split("##", 1)[0])
        assert "`python -m pipeline -m " in tables[-1] and "seed=0,1,2" in tables[-1]
    assert tables[0] == tables[1]
