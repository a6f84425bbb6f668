"""The stages by name: `stage=NAME` runs the recipe `run(spec, run) -> summary` found here, with
the job's RunSpec (config/specs.py; the CLI builds it once from the composed config).

Each recipe reads top to bottom like the step it is; the modules are imported only when their
stage runs (so `python -m pipeline --help` imports no torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from pipeline.config.schema import STAGES

# stage -> "module:function", for every stage of config.schema.STAGES
RECIPES = {
    "selftrain": "pipeline.selftrain.loop:run_selftrain",
    "train": "pipeline.selftrain.stages:run_train",
    "pseudolabel": "pipeline.selftrain.stages:run_pseudolabel",
    "merge": "pipeline.selftrain.stages:run_merge",
    "evaluate": "pipeline.selftrain.stages:run_evaluate",
    "pretrain": "pipeline.baseline.pretrain:run_pretrain",
    "finetune": "pipeline.baseline.finetune:run_finetune",
    "baseline": "pipeline.baseline.finetune:run_baseline",
    "report": "pipeline.report:run_report",
    "predict": "pipeline.deploy.predict:run_predict",
    "export": "pipeline.deploy.export:run_export",
}
# Stages whose recipe runs again when their run_dir is complete: they write outside it (a
# report, a table, an exported model) and decide themselves what is left to do.
RERUN = ("report", "predict", "export")
if tuple(RECIPES) != STAGES:  # (a stage named in one place only)
    raise AssertionError(f"RECIPES {tuple(RECIPES)} differ from config.schema.STAGES {STAGES}")


def recipe(stage: str) -> Callable[..., dict[str, Any]]:
    module, function = RECIPES[stage].split(":")
    return getattr(importlib.import_module(module), function)
