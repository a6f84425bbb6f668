"""Tests of the sweep report on hand-written fake sweeps."""

from __future__ import annotations

import csv
import itertools
import json
import re
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config.keys import RESULT_NEUTRAL, is_result_neutral
from pipeline.errors import UserError
from pipeline.report import (
    find_job_dirs,
    find_swept_keys,
    fold_into_selectors,
    load_config,
    run_report,
    split_aliases,
    write_report,
)
from pipeline.report.load import flatten_config
from pipeline.runtime.rundir import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STAGES = ("baseline", "selftrain")
BUDGETS = (4, 10)
SEEDS = (0, 1)
N_CLASSES = 4

# (stage, labels_per_class, seed) -> test accuracy per round; the last entry is the final one.
ACCURACY = {
    ("baseline", 4, 0): [0.7012],
    ("baseline", 4, 1): [0.7288],
    ("baseline", 10, 0): [0.8105],
    ("baseline", 10, 1): [0.8231],
    ("selftrain", 4, 0): [0.6950, 0.7601, 0.7915],
    ("selftrain", 4, 1): [0.7120, 0.7733, 0.8044],
    ("selftrain", 10, 0): [0.8090, 0.8150, 0.8179],
    ("selftrain", 10, 1): [0.8302, 0.8297, 0.8120],
}
FINAL_OFFSET = 0.0011  # summary's final accuracy = last round + offset (a final student fit)


def final_accuracy(key: tuple[str, int, int]) -> float:
    """The final_test_accuracy written into the fake summary.json of a job."""
    return round(ACCURACY[key][-1] + FINAL_OFFSET, 4)


def make_config(stage: str, budget: int, seed: int, run_dir: Path) -> dict:
    """A job's resolved config with per-job runtime keys that must be ignored."""
    return {
        "stage": stage,
        "seed": seed,
        "init": "scratch",
        "run_dir": str(run_dir),
        "data": {
            "name": "digits",
            "labels_per_class": budget,
            "split_seed": seed,  # varies in step with seed: not a group key
            "root": f"/data/{run_dir.name}",
            "num_workers": 2 + seed,
        },
        "model": {"name": "cnn", "channels": [16, 32]},
        "selftrain": {"rounds": 2},
        "pseudo_label": {"threshold": 0.9, "max_per_class": None, "soft": False},
        "trainer": {"max_epochs": 3, "devices": 1 + seed % 2, "accelerator": "cpu"},
        "hydra": {"job": {"num": seed}, "runtime": {"output_dir": str(run_dir)}},
    }


def round_metrics(stage: str, k: int, acc: float, budget: int) -> dict:
    """round_K/metrics.json; baseline files leave out the optional keys."""
    metrics = {"round": k, "test_accuracy": acc, "num_pseudo": 0}
    if stage == "baseline":
        return metrics
    teacher = k == 0
    metrics.update(
        num_pseudo=0 if teacher else 300 * k + budget,
        pseudo_accuracy=None if teacher else 0.9 + 0.01 * k,
        per_class_coverage=None if teacher else [0.5 + 0.1 * c * k / 2 for c in range(N_CLASSES)],
        per_class_precision=None,
        confidence_hist=None if teacher else {"edges": [0.0, 0.5, 1.0], "counts": [10, 90]},
        teacher_ece=0.05,
        num_labelled=budget * N_CLASSES,
        num_unlabelled=1000,
    )
    return metrics


def write_job(
    job_dir: Path,
    stage: str,
    budget: int,
    seed: int,
    finished: bool = True,
    overrides: bool = True,
) -> None:
    """One fake job dir; unfinished jobs get config.yaml and round 0 only. Without overrides: a
    job of a sweep made before the pipeline recorded them."""
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(json.dumps(make_config(stage, budget, seed, job_dir)))
    hydra_dir = job_dir / ".hydra"  # Hydra's own copy must not count as a job dir
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text("stage: other\n")
    if overrides:
        tokens = [f"stage={stage}", f"data.labels_per_class={budget}", f"seed={seed}"]
        tokens += ["trainer.max_epochs=3", f"trainer.devices={1 + seed % 2}"]
        (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(tokens))
    accuracies = ACCURACY.get((stage, budget, seed), [0.5])
    if not finished:
        accuracies = accuracies[:1]
    rounds = [round_metrics(stage, k, acc, budget) for k, acc in enumerate(accuracies)]
    for entry in rounds:
        round_dir = job_dir / f"round_{entry['round']}"
        round_dir.mkdir()
        (round_dir / "metrics.json").write_text(json.dumps(entry))
    if not finished:
        return
    summary = {
        "stage": stage,
        "dataset": "digits",
        "num_labelled": budget * N_CLASSES,
        "num_unlabelled": 1000,
        "rounds": [
            {k: e[k] for k in ("round", "test_accuracy", "num_pseudo", "pseudo_accuracy") if k in e}
            for e in rounds
        ],
        "final_test_accuracy": final_accuracy((stage, budget, seed)),
        "wall_time_s": 12.5,
    }
    (job_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """2 stages × 2 label budgets × 2 seeds, plus one unfinished selftrain job (seed 2)."""
    sweep_dir = tmp_path / "multirun"
    keys = [(s, b, seed) for s in STAGES for b in BUDGETS for seed in SEEDS]
    for num, (stage, budget, seed) in enumerate(keys):
        write_job(sweep_dir / str(num), stage, budget, seed)
    write_job(sweep_dir / str(len(keys)), "selftrain", 4, 2, finished=False)
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    (sweep_dir / "report").mkdir()  # an earlier report must not count as a job
    (sweep_dir / "report" / "config.yaml").write_text("stage: other\n")
    return sweep_dir


@pytest.fixture()
def report(sweep: Path, tmp_path: Path) -> tuple[dict, str]:
    """The report written for the fake sweep: (returned dict, report.md text)."""
    info = write_report(sweep, tmp_path / "out")
    return info, (tmp_path / "out" / "report.md").read_text()


def table_after(markdown: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after a heading, as a list of {header: cell} rows."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


def parse_cell(text: str) -> tuple[float, float | None]:
    """``**81.12 ± 0.89 (2)**`` -> (81.12, 0.89); std None when shown as '–'."""
    match = re.fullmatch(r"\**([\d.]+) ± ([\d.]+|–)(?: \(\d+\))?\**", text)
    assert match, text
    std = None if match.group(2) == "–" else float(match.group(2))
    return float(match.group(1)), std


def expected_pct(values: list[float]) -> str:
    """Mean ± sample std in % as the report should print it."""
    std = f"{100 * statistics.stdev(values):.2f}" if len(values) > 1 else "–"
    return f"{100 * statistics.mean(values):.2f} ± {std}"


def test_swept_keys_are_stage_and_budget_with_seed_as_replicate(sweep: Path, report) -> None:
    info, _ = report
    assert info["group_keys"] == ["stage", "data.labels_per_class"]
    assert info["replicate_key"] == "seed"
    configs = [load_config(p / "config.yaml") for p in sorted(sweep.glob("[0-9]*"))]
    swept = find_swept_keys(configs)
    assert set(swept) == {"stage", "seed", "data.labels_per_class", "data.split_seed"}
    primary, aliases = split_aliases(swept, configs)
    assert set(primary) == {"stage", "seed", "data.labels_per_class"}
    assert aliases == {"data.split_seed": "seed"}


def test_a_selector_varying_like_a_shown_key_is_shown_in_its_place() -> None:
    # experiment=a,b sets the budget; data.split_seed follows seed; model.name is swept too.
    configs = [
        {"experiment": e, "data.labels_per_class": b, "seed": s, "data.split_seed": s,
         "model.name": m, "model.width": w}
        for (e, b), s, (m, w) in itertools.product(
            [("a", 4), ("b", 25)], (0, 1), [("cnn", 16), ("wrn", 32)]
        )
    ]  # fmt: skip
    swept = find_swept_keys(configs)
    primary, aliases = split_aliases(swept, configs)
    assert aliases["experiment"] == "data.labels_per_class"  # the budget wins among equals
    primary, aliases = fold_into_selectors(primary, aliases, configs, {"experiment"})
    assert primary == ["experiment", "seed", "model.name"]
    assert aliases == {
        "data.labels_per_class": "experiment",
        "data.split_seed": "seed",
        "model.width": "model.name",
    }


def test_main_table_cells_match_hand_computed_stats(report) -> None:
    info, markdown = report
    rows = table_after(markdown, "## Results per group")
    assert len(rows) == len(STAGES) * len(BUDGETS)
    for row in rows:
        stage, budget = row["stage"], int(row["data.labels_per_class"])
        keys = [(stage, budget, seed) for seed in SEEDS]
        teacher = [ACCURACY[k][0] for k in keys]
        final = [final_accuracy(k) for k in keys]
        assert row["teacher acc (%)"] == expected_pct(teacher)
        assert row["final acc (%)"] == expected_pct(final)
        mean, std = parse_cell(row["final acc (%)"])
        assert mean == pytest.approx(100 * statistics.mean(final), abs=0.005)
        assert std == pytest.approx(100 * statistics.stdev(final), abs=0.005)
        assert row["n"] == "2"
        seeds = "0,1,2" if (stage, budget) == ("selftrain", 4) else "0,1"  # with the failed job
        # The recorded constant override first (trainer.devices is result-neutral: left out).
        assert row["command"] == (
            "`python -m pipeline -m trainer.max_epochs=3 "
            f"stage={stage} data.labels_per_class={budget} seed={seeds}`"
        )


def test_budget_pivot_cells_and_bold_best_per_column(report) -> None:
    _, markdown = report
    rows = table_after(markdown, "## Final accuracy by label budget")
    assert [r["method"] for r in rows] == list(STAGES)
    for budget in BUDGETS:
        column = f"data.labels_per_class={budget}"
        means = {}
        for row in rows:
            final = [final_accuracy((row["method"], budget, seed)) for seed in SEEDS]
            assert row[column].strip("*") == f"{expected_pct(final)} (2)"
            means[row["method"]] = statistics.mean(final)
        best = max(means, key=means.get)
        bold = [r["method"] for r in rows if r[column].startswith("**")]
        assert bold == [best]


def test_failed_job_is_listed(report) -> None:
    info, markdown = report
    assert info["n_jobs"] == 9 and info["n_failed"] == 1
    failed = markdown.split("## Failed or unfinished jobs", 1)[1].split("##", 1)[0]
    assert "`8`" in failed and "no summary.json" in failed
    assert "Jobs: 9 (8 finished, 1 failed or unfinished)" in markdown


def test_results_csv_has_one_row_per_job(report, tmp_path: Path) -> None:
    info, _ = report
    with open(info["paths"]["results.csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "job",
        "status",
        "stage",
        "seed",
        "data.labels_per_class",
        "data.split_seed",
        "dataset",
        "num_labelled",
        "num_unlabelled",
        "teacher_test_accuracy",
        "final_test_accuracy",
        "final_balanced_accuracy",
        "final_val_accuracy",
        "selected_by",
        "rounds",
        "final_num_pseudo",
        "final_pseudo_accuracy",
        "final_merged_foreign_fraction",
        "final_ood_auroc",
        "models",
        "wall_time_s",
    ]
    assert [r["job"] for r in rows] == [str(i) for i in range(9)]
    assert [r["status"] for r in rows] == ["ok"] * 8 + ["failed"]
    selftrain = rows[4]
    assert selftrain["stage"] == "selftrain" and selftrain["rounds"] == "2"
    assert selftrain["num_labelled"] == "16" and selftrain["final_num_pseudo"] == "604"
    assert float(selftrain["final_test_accuracy"]) == final_accuracy(("selftrain", 4, 0))
    assert rows[8]["final_test_accuracy"] == ""


def test_plots_are_png_files(report) -> None:
    info, markdown = report
    names = [
        "accuracy_per_round.png",
        "teacher_vs_student.png",
        "pseudo_labels_per_round.png",
        "class_coverage_last_round.png",
        "accuracy_vs_label_budget.png",
    ]
    assert [n for n in info["paths"] if n.endswith(".png")] == names
    for name in names:
        data = info["paths"][name].read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1024, name
        assert f"]({name})" in markdown
    leftovers = [
        p.name for p in info["paths"]["report.md"].parent.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == []


def test_single_run_dir_without_diagnostics(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_job(run, "baseline", 10, 0)
    info = write_report(run, run / "report")
    assert info["n_jobs"] == 1 and info["n_failed"] == 0 and info["group_keys"] == []
    markdown = info["paths"]["report.md"].read_text()
    assert "Final accuracy by label budget" not in markdown
    command = "python -m pipeline -m stage=baseline data.labels_per_class=10 trainer.max_epochs=3"
    assert f"`{command} seed=0`" in markdown  # the overrides recorded in .hydra/overrides.yaml
    assert "class_coverage_last_round.png" not in info["paths"]
    assert "pseudo_labels_per_round.png" not in info["paths"]


def test_missing_or_empty_sweep_dir_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no job dirs"):
        write_report(tmp_path / "empty", tmp_path / "out")


def test_header_lists_the_settings_all_jobs_share(report) -> None:
    _, markdown = report
    header = markdown.split("## Results per group", 1)[0]
    # stage, budget and seed are swept; trainer.devices differs too but is result-neutral.
    assert "- Shared settings: `trainer.max_epochs=3`\n" in header


# --- reproduce commands from the recorded overrides ------------------------------------------


def write_small_job(job_dir: Path, config: dict, overrides: list[str] | None, acc: float) -> None:
    """A finished one-round job: config.yaml, summary.json and (if given) the overrides the
    pipeline records in .hydra/overrides.yaml."""
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if overrides is not None:
        (job_dir / ".hydra").mkdir()
        (job_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    rounds = [{"round": 0, "test_accuracy": acc, "num_pseudo": 0}]
    summary = {"stage": config["stage"], "dataset": "digits", "rounds": rounds}
    (job_dir / "summary.json").write_text(json.dumps({**summary, "final_test_accuracy": acc}))


def small_config(stage: str, seed: int, **nested: dict) -> dict:
    """A job's config with the keys the commands below set; nested entries replace sections."""
    config = {
        "stage": stage,
        "seed": seed,
        "run_dir": f"outputs/{stage}/seed{seed}",
        "progress": True,
        "data": {"name": "digits", "num_classes": 10, "labels_per_class": 4, "root": "data"},
        "selftrain": {"rounds": 1},
        "train": {"epochs": 3},
        "trainer": {"devices": 1, "num_threads": None},
    }
    return {**config, **nested}


def test_reproduce_command_adds_the_overrides_the_jobs_share(tmp_path: Path) -> None:
    # python -m pipeline data.labels_per_class=4 selftrain.rounds=1 train.epochs=3 \
    #     -m stage=selftrain,baseline seed=0,1 (trainer.num_threads=2: result-neutral)
    sweep = tmp_path / "multirun"
    shared = ["data.labels_per_class=4", "selftrain.rounds=1", "train.epochs=3"]
    for num, (stage, seed) in enumerate(itertools.product(("selftrain", "baseline"), (0, 1))):
        overrides = [*shared, "trainer.num_threads=2", f"stage={stage}", f"seed={seed}"]
        write_small_job(sweep / str(num), small_config(stage, seed), overrides, 0.8 + 0.01 * num)
    info = write_report(sweep, tmp_path / "out")
    markdown = info["paths"]["report.md"].read_text()
    rows = {r["stage"]: r for r in table_after(markdown, "## Results per group")}
    assert rows["baseline"]["command"] == (
        "`python -m pipeline -m data.labels_per_class=4 selftrain.rounds=1 train.epochs=3 "
        "stage=baseline seed=0,1`"
    )
    assert rows["selftrain"]["command"] == (
        "`python -m pipeline -m data.labels_per_class=4 selftrain.rounds=1 train.epochs=3 "
        "stage=selftrain seed=0,1`"
    )
    assert "- Shared settings: `data.labels_per_class=4 selftrain.rounds=1 train.epochs=3`\n" in (
        markdown
    )


def test_group_choice_overrides_are_in_the_command(tmp_path: Path) -> None:
    # python -m pipeline -m experiment=quick data=mnist5k,digits seed=0
    sweep = tmp_path / "multirun"
    datasets = {"mnist5k": {"name": "mnist5k", "num_classes": 10, "labels_per_class": 4},
                "digits": {"name": "digits", "num_classes": 10, "labels_per_class": 10}}  # fmt: skip
    for num, (choice, data) in enumerate(datasets.items()):
        overrides = ["experiment=quick", f"data={choice}", "seed=0"]
        write_small_job(sweep / str(num), small_config("selftrain", 0, data=data), overrides, 0.9)
    info = write_report(sweep, tmp_path / "out")
    assert info["group_keys"] == ["data.labels_per_class"]  # data.name varies in step with it
    markdown = info["paths"]["report.md"].read_text()
    commands = [r["command"] for r in table_after(markdown, "## Results per group")]
    assert commands == [
        "`python -m pipeline -m experiment=quick data=mnist5k data.labels_per_class=4 seed=0`",
        "`python -m pipeline -m experiment=quick data=digits data.labels_per_class=10 seed=0`",
    ]
    assert "- Shared settings: `experiment=quick seed=0`\n" in markdown
    assert "`data.name` (with `data.labels_per_class`)" in markdown


def test_an_arm_sweep_is_grouped_and_named_by_arm(tmp_path: Path) -> None:
    # python -m pipeline -m experiment=ssl_ablation arm=supervised,fixmatch,selftrain_fixmatch \
    #     data.labels_per_class=4,10 seed=0,1: each arm sets stage and the method (its file is
    #     `@package _global_`, so no config key says which arm a job ran).
    sweep = tmp_path / "multirun"
    arms = {"supervised": ("train", "none"), "fixmatch": ("train", "fixmatch"),
            "selftrain_fixmatch": ("selftrain", "fixmatch")}  # fmt: skip
    accuracy = {}
    for num, (arm, budget, seed) in enumerate(itertools.product(arms, (4, 10), (0, 1))):
        stage, method = arms[arm]
        data = {"name": "digits", "num_classes": 10, "labels_per_class": budget, "root": "data"}
        config = small_config(stage, seed, data=data, consistency={"method": method, "mu": 7})
        overrides = ["experiment=ssl_ablation", f"arm={arm}", f"data.labels_per_class={budget}",
                     f"seed={seed}"]  # fmt: skip
        accuracy[arm, budget, seed] = 0.8 + 0.01 * num
        write_small_job(sweep / str(num), config, overrides, accuracy[arm, budget, seed])
    info = write_report(sweep, tmp_path / "out")
    assert info["group_keys"] == ["arm", "data.labels_per_class"]
    markdown = info["paths"]["report.md"].read_text()
    rows = table_after(markdown, "## Results per group")
    assert [(r["arm"], r["data.labels_per_class"]) for r in rows] == [
        (arm, str(budget)) for arm in sorted(arms) for budget in (4, 10)
    ]
    for row in rows:
        arm, budget = row["arm"], int(row["data.labels_per_class"])
        assert row["final acc (%)"] == expected_pct([accuracy[arm, budget, s] for s in (0, 1)])
        assert row["command"] == (
            f"`python -m pipeline -m experiment=ssl_ablation arm={arm} "
            f"data.labels_per_class={budget} seed=0,1`"
        )
    assert "`stage` (with `arm`), `consistency.method` (with `arm`)" in markdown
    with (tmp_path / "out" / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert sorted({r["arm"] for r in table}) == sorted(arms)  # a column of its own
    assert "experiment" not in table[0]  # a choice too, the same in every job: not swept


def test_a_swept_experiment_that_sets_the_budget_is_one_row_each_and_no_budget_pivot(
    tmp_path: Path,
) -> None:
    # python -m pipeline -m experiment=cifar10_40,cifar10_250 seed=0,1: each experiment sets the
    # label budget (4 and 25 a class), so the budget is not a factor of its own: one row per
    # experiment, named by it, and no budget pivot (it would be one cell a row).
    sweep = tmp_path / "multirun"
    budgets = {"cifar10_40": 4, "cifar10_250": 25}
    accuracy = {}
    for num, (experiment, seed) in enumerate(itertools.product(budgets, (0, 1))):
        data = {"name": "cifar10", "num_classes": 10, "labels_per_class": budgets[experiment]}
        accuracy[experiment, seed] = 0.7 + 0.02 * num
        overrides = [f"experiment={experiment}", f"seed={seed}"]
        config = small_config("selftrain", seed, data=data)
        write_small_job(sweep / str(num), config, overrides, accuracy[experiment, seed])
    info = write_report(sweep, tmp_path / "out")
    assert info["group_keys"] == ["experiment"]
    markdown = info["paths"]["report.md"].read_text()
    rows = table_after(markdown, "## Results per group")
    assert [r["experiment"] for r in rows] == sorted(budgets)
    for row in rows:
        experiment = row["experiment"]
        assert row["final acc (%)"] == expected_pct([accuracy[experiment, s] for s in (0, 1)])
        assert row["command"] == f"`python -m pipeline -m experiment={experiment} seed=0,1`"
    assert "`data.labels_per_class` (with `experiment`)" in markdown
    assert "Final accuracy by label budget" not in markdown


def test_sweep_without_recorded_overrides_gets_the_swept_keys_command(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for num, (stage, seed) in enumerate([(s, seed) for s in STAGES for seed in SEEDS]):
        write_job(sweep / str(num), stage, 4, seed, overrides=False)
    info = write_report(sweep, tmp_path / "out")
    markdown = info["paths"]["report.md"].read_text()
    commands = [r["command"] for r in table_after(markdown, "## Results per group")]
    assert commands == [f"`python -m pipeline -m stage={s} seed=0,1`" for s in STAGES]
    assert "Shared settings" not in markdown  # unknown: the jobs did not record them


# --- result-neutral keys never form groups ----------------------------------------------------


def test_jobs_differing_only_in_result_neutral_keys_form_one_group(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    neutral = [
        (["progress=false", "trainer.num_threads=2"], {"progress": False},
         {"devices": 1, "num_threads": 2}),
        (["trainer.devices=4"], {"progress": True}, {"devices": 4, "num_threads": None}),
    ]  # fmt: skip
    for num, (tokens, top, trainer) in enumerate(neutral):
        config = {**small_config("selftrain", num, trainer=trainer), **top}
        write_small_job(sweep / str(num), config, ["stage=selftrain", *tokens, f"seed={num}"], 0.9)
    info = write_report(sweep, tmp_path / "out")
    assert info["group_keys"] == [] and info["replicate_key"] == "seed"
    markdown = info["paths"]["report.md"].read_text()
    (row,) = table_after(markdown, "## Results per group")
    assert row["n"] == "2"
    assert row["command"] == "`python -m pipeline -m stage=selftrain seed=0,1`"
    assert "- Shared settings: `stage=selftrain`\n" in markdown


def nested(flat: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def test_result_neutral_keys_are_those_of_the_config_package() -> None:
    # Every key of pipeline.config.keys.RESULT_NEUTRAL (and keys under one) differs; so do two
    # keys that are part of the experiment, one ending in _dir (not neutral by its name alone).
    neutral = [k if k not in ("report", "hydra") else f"{k}.sweep.dir" for k in RESULT_NEUTRAL]
    varying = [*neutral, "ckpt", "selftrain.cache_dir"]
    assert [k for k in varying if not is_result_neutral(k)] == ["ckpt", "selftrain.cache_dir"]
    configs = [  # as the report reads them from config.yaml
        flatten_config(nested({"stage": "selftrain", **{k: f"v{i}" for k in varying}}))
        for i in range(2)
    ]
    assert find_swept_keys(configs) == ["ckpt", "selftrain.cache_dir"]


# --- sweep dir layouts ------------------------------------------------------------------------


LAYOUTS = {  # job dir of (stage, labels_per_class, seed), the numbered one by its index
    "numbered": lambda num, stage, budget, seed: str(num),
    "by_overrides": lambda num, stage, budget, seed: (
        f"data.labels_per_class={budget},seed={seed},stage={stage}"
    ),
    "nested": lambda num, stage, budget, seed: f"lpc{budget}/{stage}/seed={seed}",
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_job_dirs_at_any_depth_give_the_same_report(layout: str, tmp_path: Path, report) -> None:
    _, expected = report  # of the numbered sweep in tmp_path/multirun
    sweep = tmp_path / layout
    keys = [(s, b, seed) for s in STAGES for b in BUDGETS for seed in SEEDS]
    rels = [LAYOUTS[layout](num, *key) for num, key in enumerate(keys)]
    for rel, key in zip(rels, keys, strict=True):
        write_job(sweep / rel, *key)
    rels.append(LAYOUTS[layout](len(keys), "selftrain", 4, 2))
    write_job(sweep / rels[-1], "selftrain", 4, 2, finished=False)
    (sweep / ".submitit" / "0").mkdir(parents=True)  # hidden dirs are not searched
    (sweep / ".submitit" / "0" / "config.yaml").write_text("stage: other\n")
    (sweep / "report").mkdir()  # nor an earlier report
    (sweep / "report" / "config.yaml").write_text("stage: report\n")

    found = [p.relative_to(sweep).as_posix() for p in find_job_dirs(sweep)]
    assert sorted(found) == sorted(rels)
    info = write_report(sweep, tmp_path / f"out-{layout}")
    markdown = info["paths"]["report.md"].read_text()
    for heading in ("## Results per group", "## Final accuracy by label budget"):
        assert table_after(markdown, heading) == table_after(expected, heading)
    with open(info["paths"]["results.csv"], newline="") as handle:
        assert sorted(r["job"] for r in csv.DictReader(handle)) == sorted(rels)
    failed = markdown.split("## Failed or unfinished jobs", 1)[1].split("##", 1)[0]
    assert f"- `{rels[-1]}` (selftrain, labels_per_class=4, seed=2): no summary.json" in failed


def test_run_report_stage_writes_into_the_run_dir(sweep: Path, tmp_path: Path) -> None:
    cfg = OmegaConf.create({"report": {"sweep_dir": str(sweep)}})
    out = tmp_path / "report_run"
    result = run_report(cfg, RunDir(out))
    assert result["stage"] == "report" and result["n_jobs"] == 9 and result["n_failed"] == 1
    assert result["group_keys"] == ["stage", "data.labels_per_class"]
    assert result["paths"]["report.md"] == str(out.resolve() / "report.md")
    assert all(isinstance(p, str) and Path(p).is_file() for p in result["paths"].values())
    with pytest.raises(UserError, match="does not exist"):
        run_report(OmegaConf.create({"report": {"sweep_dir": str(tmp_path / "nope")}}), RunDir(out))


# --- a real sweep: 2 stages x 2 seeds on the bundled digits, through the CLI ------------------


@pytest.mark.slow  # four short trainings and a report
def test_report_of_a_real_sweep_matches_the_jobs(tmp_path: Path) -> None:
    from conftest import FAST, run_cli

    sweep_dir = tmp_path / "multirun"
    proc = run_cli(
        "-m", *FAST, "stage=selftrain,train", "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        s = json.loads((job / "summary.json").read_text())
        summaries[(s["stage"], s["seed"])] = s
        # Timings are per job, not summed over the sweep's earlier jobs in this process.
        assert sum(s.get("phase_seconds", {}).values()) <= s["wall_time_s"] + 1.0
    assert set(summaries) == {(st, seed) for st in ("selftrain", "train") for seed in (0, 1)}

    out = tmp_path / "report"
    proc = run_cli("stage=report", f"report.sweep_dir={sweep_dir}", f"run_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_after((out / "report.md").read_text(), "## Results per group")
    assert sorted(r["stage"] for r in rows) == ["selftrain", "train"]
    for row in rows:
        jobs = [summaries[(row["stage"], seed)] for seed in (0, 1)]
        assert row["final acc (%)"] == expected_pct([j["final_test_accuracy"] for j in jobs])
        assert row["teacher acc (%)"] == expected_pct([j["teacher_test_accuracy"] for j in jobs])
        assert row["n"] == "2"
        # The recorded overrides, less the result-neutral ones (progress, trainer.accelerator).
        assert row["command"] == (
            "`python -m pipeline -m train.epochs=4 train.min_steps=40 selftrain.rounds=1 "
            f"stage={row['stage']} seed=0,1`"
        )
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert {"stage", "seed", "final_test_accuracy"} <= set(table[0])
    for r in table:
        s = summaries[(r["stage"], int(r["seed"]))]
        assert float(r["final_test_accuracy"]) == pytest.approx(s["final_test_accuracy"])
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_SIGNATURE for p in pngs)
