"""The run's Lightning loggers (the `logger` config group: conf/logger/), built once per pipeline
run and shared by all of its trainings, so that one pipeline run is one logger run.

What they receive (names are the metric names of engine/module.py):

- per epoch of every training, step = the epoch: `<step>/train/loss`, `<step>/val/acc` (with a
  val split), `<step>/train/images_per_s`, where <step> is the round's folder (`round_0`,
  `round_1`, ...; `pretrain`, `finetune` in the baseline);
- per finished round, step = the round: `round/test_acc`, `round/val_acc`,
  `round/pseudo_count`, `round/pseudo_precision` (share of the kept pseudo-labels that are
  right), `round/pseudo_coverage` (share of the unlabelled pool kept), `round/pseudo_min_class_
  coverage`, `round/teacher_ece`, `round/images_per_s`; other steps (`pretrain`, `finetune`)
  log the same names under their own folder name at step 0;
- once, as hyper-parameters: the settings the result depends on (config/keys.py), flat.

A resumed run continues the same logger run: CSV and TensorBoard write into the same folder
(the CSV file is appended to), MLflow and W&B get back the run id kept in run_dir/logs/.
Loggers exist on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger

from pipeline.config.keys import result_keys
from pipeline.config.specs import RunSpec
from pipeline.errors import UserError
from pipeline.runtime import dist, io

log = logging.getLogger("pipeline")

ROUND = "round"  # the prefix of per-round metrics (step = the round)
STATE = {"mlflow": "mlflow.json", "wandb": "wandb.json"}  # run ids kept for a resume, in logs/


class RunLoggers:
    """The Lightning loggers of one pipeline run, and what the pipeline logs to them itself."""

    def __init__(self, loggers: list[Logger], run_path: Path) -> None:
        self.lightning = loggers
        self.run_path = run_path

    def step_name(self, step_path: Path) -> str:
        """A step's name in metric names: its folder (`round_1`, `pretrain`), `round_0` for a
        stage whose step is the run dir itself (stage=train, finetune, evaluate)."""
        rel = Path(step_path).resolve().relative_to(self.run_path).as_posix()
        return "round_0" if rel in ("", ".") else rel

    def prefix(self, step_path: Path) -> str:
        """The prefix of a training's per-epoch metrics: `round_1/`."""
        return f"{self.step_name(step_path)}/"

    def log_params(self, config: dict[str, Any]) -> None:
        """The settings the result depends on (of `config`, the resolved config as plain
        values: RunSpec.config), once per logger run (the same on a resume)."""
        params = {k: _param(v) for k, v in result_keys(config).items()}
        for logger in self.lightning:
            logger.log_hyperparams(params)
            logger.save()

    def step_finished(self, step_path: Path, metrics: dict[str, Any]) -> None:
        """A finished step's metrics (a round: step = its number, names `round/...`)."""
        name = self.step_name(step_path)
        prefix, step = f"{name}/", 0
        if name.startswith("round_") and name[6:].isdigit():
            prefix, step = f"{ROUND}/", int(name[6:])
        values = {f"{prefix}{k}": v for k, v in round_metrics(metrics).items()}
        for logger in self.lightning:
            logger.log_metrics(values, step=step)
            logger.save()

    def close(self, status: str, summary: dict[str, Any] | None = None) -> None:
        """End the logger run ("success", "failed"); TensorBoard gets the run's final
        accuracies as its HParams metrics (comparing a sweep's jobs in its HParams tab)."""
        for logger in self.lightning:
            with _quiet_failure(f"closing the {type(logger).__name__}"):
                if summary and type(logger).__name__ == "TensorBoardLogger":
                    final = {
                        f"hparams/{k}": summary[k]
                        for k in ("val_accuracy", "final_test_accuracy")
                        if isinstance(summary.get(k), (int, float))
                    }
                    if final:
                        logger.log_hyperparams(logger.hparams, metrics=final)
                logger.finalize(status)
                if isinstance(logger, WandbLogger) and logger._experiment is not None:
                    logger.experiment.finish(exit_code=0 if status == "success" else 1)


def round_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """A round's metrics.json as the scalars the loggers get per round."""
    out: dict[str, Any] = {
        "test_acc": metrics.get("test_accuracy"),
        "val_acc": metrics.get("val_accuracy"),
        "teacher_ece": metrics.get("teacher_ece"),
        "images_per_s": metrics.get("train_images_per_s"),
    }
    if "per_class_coverage" in metrics and metrics.get("num_unlabelled") is not None:
        out["pseudo_count"] = metrics["num_pseudo"]
        out["pseudo_precision"] = metrics.get("pseudo_accuracy")
        out["pseudo_coverage"] = metrics["num_pseudo"] / max(1, metrics["num_unlabelled"])
        coverage = [c for c in metrics.get("per_class_coverage") or [] if c is not None]
        out["pseudo_min_class_coverage"] = min(coverage) if coverage else None
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def build_run_loggers(cfg: RunSpec, run_path: Path) -> RunLoggers | None:
    """The loggers of `cfg.logger` (None without any), on rank 0 (other ranks: none)."""
    nodes = cfg.logger or {}
    if not nodes:
        return None
    if not dist.is_rank_zero():
        return RunLoggers([], run_path)
    logs = run_path / "logs"
    loggers = []
    for name, node in nodes.items():
        kwargs = _resume_kwargs(name, node, logs)
        try:
            logger = instantiate(node, **kwargs)
        except Exception as e:  # a wrong argument, an unreachable tracking server, ...
            cause = e.__cause__ or e
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise UserError(
                f"logger={name} cannot start ({type(cause).__name__}: {first[:200]}); check "
                f"its settings (python -m pipeline logger={name} --cfg job prints them)"
            ) from None
        _remember(name, logger, logs)
        if isinstance(logger, CSVLogger):
            _append_on_resume(logger)
        loggers.append(logger)
    return RunLoggers(loggers, run_path)


def _resume_kwargs(name: str, node: dict[str, Any], logs: Path) -> dict[str, Any]:
    """Arguments that continue the logger run of an earlier attempt (MLflow's and W&B's run
    ids), and W&B's offline mode unless logged in."""
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    if target == "MLFlowLogger":
        state = _read_state(logs / STATE["mlflow"])
        uri, run_id = node.get("tracking_uri"), state.get("run_id")
        same_store = run_id and state.get("tracking_uri") == uri
        return {"run_id": run_id} if same_store and _mlflow_run_exists(str(uri), run_id) else {}
    if target == "WandbLogger":
        state = _read_state(logs / STATE["wandb"])
        kwargs: dict[str, Any] = {"id": state.get("id") or uuid.uuid4().hex[:8]}
        kwargs["resume"] = "allow"
        offline = node.get("offline")
        kwargs["offline"] = offline = not _wandb_logged_in() if offline is None else offline
        if offline:  # (Lightning's WANDB_MODE=dryrun is not offline for every wandb release)
            kwargs["mode"] = "offline"
        (logs / "wandb").mkdir(parents=True, exist_ok=True)  # wandb wants its folder there
        return kwargs
    return {}


def _remember(name: str, logger: Logger, logs: Path) -> None:
    """Keep the ids a resumed run needs to continue the same MLflow / W&B run."""
    if isinstance(logger, MLFlowLogger):
        state = {"tracking_uri": logger._tracking_uri, "run_id": logger.run_id}
        state["experiment_id"] = logger.experiment_id
        io.write_json(logs / STATE["mlflow"], state)
    elif isinstance(logger, WandbLogger):
        io.write_json(logs / STATE["wandb"], {"id": logger.version})


def _append_on_resume(logger: CSVLogger) -> None:
    """Lightning's CSVLogger removes an existing metrics.csv when it starts: a resumed run
    keeps it and appends (its header's columns kept)."""
    path = Path(logger.log_dir) / "metrics.csv"
    kept = path.read_bytes() if path.is_file() else None
    writer = logger.experiment  # (removes metrics.csv)
    if kept:
        path.write_bytes(kept)
        header = kept.decode().splitlines()[0].split(",") if kept.strip() else []
        writer.metrics_keys = sorted(set(header))


def _mlflow_run_exists(tracking_uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception:
        return False


def _wandb_logged_in() -> bool:
    """Whether W&B has an API key (wandb login, WANDB_API_KEY): then it logs online."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _param(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else json.dumps(value)


@contextlib.contextmanager
def _quiet_failure(what: str) -> Iterator[None]:
    """A logger that fails while closing must not fail the run (its results are written)."""
    try:
        yield
    except Exception as e:
        log.warning("%s failed: %s", what, e)
