"""The training step and last.ckpt: Lightning's own optimization loop, with no private patch of
Lightning's; last.ckpt is written every checkpoint_every_s seconds of training (0: every step)
or every epoch (null)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import StopAtEpoch, assert_same_weights, fit_small

pytestmark = pytest.mark.usefixtures("one_thread")


class _Mode(L.Callback):
    """Records, at every training batch, whether the module used automatic optimization."""

    def __init__(self) -> None:
        self.automatic: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.automatic.append(pl_module.automatic_optimization)


def test_gradient_accumulation_takes_lightnings_loop(tmp_path):
    mode = _Mode()
    _, net, _, _, fit = fit_small(
        tmp_path, "acc", "+trainer.accumulate_grad_batches=2", epochs=2, callbacks=[mode]
    )
    assert set(mode.automatic) == {True}
    assert fit.steps * 2 == len(mode.automatic)  # one optimizer step per two batches
    assert all(torch.isfinite(p).all() for p in net.parameters())


# The one private Lightning name the pipeline may use, and where: the signal connector that
# keeps Lightning from ending a TERM-ed job with exit 0 without saving (engine/trainer.py).
ALLOWED_PRIVATE = {
    ("engine/trainer.py", "_SignalConnector"),
    ("engine/trainer.py", "_signal_connector"),
}


def lightning_private_names() -> set[str]:
    """The private attributes of Lightning's Trainer and LightningModule (an instance of each)
    and of the classes the pipeline subclasses."""
    from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    objects = [trainer, L.LightningModule(), L.Callback, Checkpoint, ModelCheckpoint]
    names = set()
    for obj in objects:
        names |= set(dir(obj)) | set(getattr(obj, "__dict__", {}))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def lightning_properties() -> set[str]:
    """The properties of the Lightning classes the pipeline subclasses: one overridden in a
    subclass (a self-switching automatic_optimization, a cached state_key) changes how
    Lightning's internals behave."""
    from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

    classes = [L.Trainer, L.LightningModule, L.Callback, Checkpoint, ModelCheckpoint]
    return {n for c in classes for n in dir(c) if isinstance(getattr(c, n, None), property)}


def test_the_pipeline_patches_no_lightning_internals():
    """No private name of Lightning is imported, read, set or overridden anywhere in pipeline/
    but the signal connector (ALLOWED_PRIVATE); nor is a LightningModule's __setattr__."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "pipeline"
    private = lightning_private_names()
    assert {"_current_fx_name", "_trainer", "_signal_connector"} <= private
    properties = lightning_properties()
    assert {"automatic_optimization", "state_key"} <= properties
    found = set()
    for path in package.rglob("*.py"):
        rel = str(path.relative_to(package))
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                names = [a.name for a in node.names if a.name.startswith("_")]
                names += [p for p in node.module.split(".") if p.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr in private:
                names = [node.attr]
            elif isinstance(node, ast.FunctionDef) and (
                node.name in private or node.name == "__setattr__"
            ):
                names = [node.name]
            elif isinstance(node, ast.FunctionDef) and node.name in properties:
                decorators = {ast.unparse(d).split(".")[0] for d in node.decorator_list}
                names = [node.name] if decorators & {"property", node.name} else []
            elif isinstance(node, ast.Constant) and node.value in private:
                names = [node.value]  # object.__setattr__(self, "_current_fx_name", ...)
            found |= {(rel, n) for n in names}
    assert found <= ALLOWED_PRIVATE, sorted(found - ALLOWED_PRIVATE)


class _Saves(L.Callback):
    """The global step of every checkpoint written."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(int(checkpoint["global_step"]))


@pytest.mark.parametrize(
    ("every_s", "expected"),
    [("0", "every step"), ("3600", "never"), ("null", "every epoch")],
)
def test_last_checkpoint_interval(tmp_path, every_s, expected):
    saves = _Saves()
    _, _, _, _, fit = fit_small(
        tmp_path, "run", f"train.checkpoint_every_s={every_s}", callbacks=[saves]
    )
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    per_epoch = fit.steps // 3
    if expected == "never":
        assert saves.steps == [] and not last.exists()
        return
    want = list(range(1, fit.steps + 1))
    if expected == "every epoch":
        want = [per_epoch * (e + 1) for e in range(3)]
    assert saves.steps == want
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == fit.steps
    if expected == "every epoch":  # written after the epoch's record
        assert [e["epoch"] for e in state["pipeline_epochs"]] == [0, 1, 2]


def test_a_last_ckpt_of_the_previous_writer_resumes_to_the_same_weights(tmp_path, recwarn):
    """A last.ckpt written by Lightning's ModelCheckpoint (before LastCheckpoint) holds that
    callback's state: the training resumes from it, silently, to an uninterrupted run's weights."""
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        fit_small(tmp_path, "killed", callbacks=[StopAtEpoch(2)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    key = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0}"
    state["callbacks"] = {key: {"best_model_path": str(last), "last_model_path": ""}}
    torch.save(state, last)
    recwarn.clear()
    _, resumed, _, _, fit = fit_small(tmp_path, "killed")
    assert not [w for w in recwarn if "callbacks used to create" in str(w.message)]
    _, whole, _, _, _ = fit_small(tmp_path, "whole")
    assert fit.steps == int(state["global_step"]) * 3 // 2  # epochs 0-1 saved, epoch 2 redone
    assert_same_weights(resumed, whole)


def _two_groups(self):
    """configure_optimizers as it was before one group: body and head apart, same settings."""
    named = list(self.net.named_parameters())
    body = [p for n, p in named if not n.startswith("head.")]
    head = [p for n, p in named if n.startswith("head.")]
    optimizer = self.optimizer_factory([{"params": body}, {"params": head}])
    scheduler = self.scheduler_factory(optimizer, T_max=self._total_steps())
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_a_last_ckpt_with_two_param_groups_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The optimizer keeps body and head in one group unless fine-tuning scales the body's lr;
    a last.ckpt written with the two groups of earlier versions resumes into the one group, to
    the weights of an uninterrupted run."""
    from pipeline.engine.module import LitClassifier

    with monkeypatch.context() as mp:
        mp.setattr(LitClassifier, "configure_optimizers", _two_groups)
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            fit_small(tmp_path, "killed", callbacks=[StopAtEpoch(2)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    old = torch.load(last, weights_only=True)
    assert len(old["optimizer_states"][0]["param_groups"]) == 2
    assert len(old["lr_schedulers"][0]["base_lrs"]) == 2
    _, resumed, _, _, fit = fit_small(tmp_path, "killed")
    new = torch.load(last, weights_only=True)  # (rewritten at the last epoch's end)
    assert len(new["optimizer_states"][0]["param_groups"]) == 1
    assert len(new["lr_schedulers"][0]["base_lrs"]) == 1
    assert new["optimizer_states"][0]["state"].keys() == old["optimizer_states"][0]["state"].keys()
    _, whole, _, _, _ = fit_small(tmp_path, "whole")
    assert fit.steps == int(old["global_step"]) * 3 // 2  # epochs 0-1 saved, epoch 2 trained
    assert_same_weights(resumed, whole)
