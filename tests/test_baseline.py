"""The supervised-pretraining baseline (Zoph et al. 2020): fine-tune modes freeze what they say
while Lightning trains, heads are re-created, the baseline and init=pretrained run end to end,
a source holding the target's images is refused, and the four-arm experiment composes."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_cfg, compose_spec
from hydra import compose, initialize_config_dir
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import config
from pipeline.cli import CONF_DIR, resolve
from pipeline.data import ImageArrays
from pipeline.engine import fit as engine_fit
from pipeline.errors import UserError
from pipeline.models import checkpoint as models
from pipeline.runtime.io import save_checkpoint
from pipeline.selftrain.merge import merge_labelled_and_pseudo

config.register()


pytestmark = pytest.mark.usefixtures("one_thread")


# --- fine-tune modes, checked on the LightningModule while it trains ---------------------------


class RecordTraining(L.Callback):
    """At every training batch: which parameters require grad, which BatchNorms are in training
    mode, and the learning rate of each optimizer group (body, head)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        net = pl_module.net
        self.seen.append(
            {
                "grad": {n for n, p in net.named_parameters() if p.requires_grad},
                "bn_training": {
                    n for n, m in net.named_modules() if isinstance(m, _BatchNorm) and m.training
                },
                "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
                "module_training": pl_module.training,
            }
        )


def _pretrained_checkpoint(cfg, path: Path) -> dict[str, torch.Tensor]:
    """A 'pretrained' 10-class source model whose weights and BN statistics are not a fresh
    model's; saved the way stage=pretrain saves it."""
    torch.manual_seed(123)
    source = models.build_net(cfg, 10)
    source.train()
    with torch.no_grad():
        source(torch.randn(16, 1, 8, 8) * 2 + 0.5)  # move the running statistics
    hparams = models.hparams_for(cfg, cfg.data, 10)
    save_checkpoint(path, models.model_checkpoint(source, hparams, {"pretrain_source": "test"}))
    return {k: v.clone() for k, v in source.state_dict().items()}


def _finetune(tmp_path: Path, *overrides: str):
    """Fine-tune a 3-class target net from a 10-class checkpoint with the pipeline's own steps
    (init_from_pretrained, finetune_setup, fit), recording what Lightning trains."""
    cfg = compose_spec(
        "trainer.accelerator=cpu",
        "progress=false",
        "model.net.width=8",
        "train.min_steps=6",
        "train.batch_size=8",
        *overrides,
    )
    source = _pretrained_checkpoint(cfg, tmp_path / "source.ckpt")
    net = models.build_net(cfg, 3)
    recreated = models.init_from_pretrained(cfg, net, tmp_path / "source.ckpt")
    start = {k: v.clone() for k, v in net.state_dict().items()}
    lr_scale, frozen = models.finetune_setup(cfg, net)
    g = torch.Generator().manual_seed(0)
    images = ImageArrays(torch.randint(0, 256, (24, 1, 8, 8), generator=g, dtype=torch.uint8), None)
    train_set = merge_labelled_and_pseudo(np.arange(24) % 3, None, 3)
    recorder = RecordTraining()
    build = engine_fit.build_trainer

    def build_with_recorder(*args, callbacks=None, **kwargs):
        return build(*args, callbacks=[*(callbacks or []), recorder], **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_fit, "build_trainer", build_with_recorder)
        engine_fit.fit(
            cfg, cfg.data, net, images, train_set, tmp_path / "ft", 0, 2,
            models.hparams_for(cfg, cfg.data, 3), None, lr_scale, frozen,
        )  # fmt: skip
    assert len(recorder.seen) >= 6
    return cfg, net, source, start, recreated, recorder.seen


def _changed(before: dict, after: dict, prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def test_head_is_new_and_backbone_loaded(tmp_path):
    cfg, net, source, start, recreated, _ = _finetune(tmp_path, "finetune.mode=full")
    assert net.head.out_features == 3 and recreated == ["head.bias", "head.weight"]
    for key, value in source.items():
        if not key.startswith("head."):
            assert torch.equal(start[key], value), key  # every backbone layer loaded


def test_full_trains_everything_with_a_smaller_backbone_lr(tmp_path):
    cfg, net, _, start, _, seen = _finetune(tmp_path, "finetune.mode=full")
    all_params = {n for n, _ in net.named_parameters()}
    all_bn = {n for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
    base_lr = cfg.optimizer["lr"]
    for step in seen:
        assert step["grad"] == all_params and step["bn_training"] == all_bn
        body_lr, head_lr = step["lrs"]
        assert body_lr <= cfg.finetune.lr_scale * base_lr + 1e-12  # cosine only lowers it
        assert body_lr == pytest.approx(cfg.finetune.lr_scale * head_lr)
    assert seen[0]["lrs"] == pytest.approx([cfg.finetune.lr_scale * base_lr, base_lr])
    params = {n for n, _ in net.named_parameters()}
    assert _changed(start, net.state_dict()) >= params  # every layer moved


def test_linear_trains_only_the_head_and_keeps_bn_statistics(tmp_path):
    _, net, _, start, _, seen = _finetune(tmp_path, "finetune.mode=linear")
    for step in seen:
        assert step["module_training"]
        assert step["grad"] == {"head.weight", "head.bias"}
        assert step["bn_training"] == set()  # every BatchNorm of the backbone in eval mode
    after = net.state_dict()
    assert _changed(start, after, "features.") == set()  # weights and BN stats bit-identical
    assert _changed(start, after, "head.") == {"head.weight", "head.bias"}


def test_last_layers_freezes_the_first_blocks(tmp_path):
    _, net, _, start, _, seen = _finetune(
        tmp_path, "finetune.mode=last_layers", "finetune.trainable_blocks=1"
    )
    blocks = net.blocks()  # SmallCNN: 3 stages; the last one and the head train
    names = {id(p): n for n, p in net.named_parameters()}
    last = {names[id(p)] for p in blocks[-1].parameters()}
    frozen_bn = {
        n for n, m in net.named_modules()
        if isinstance(m, _BatchNorm) and any(m is b for blk in blocks[:-1] for b in blk.modules())
    }  # fmt: skip
    all_bn = {n for n, m in net.named_modules() if isinstance(m, _BatchNorm)}
    for step in seen:
        assert step["grad"] == last | {"head.weight", "head.bias"}
        assert step["bn_training"] == all_bn - frozen_bn and frozen_bn
    after = net.state_dict()
    frozen_keys = {
        k for k in start
        if k.startswith("features.") and not any(k.startswith(n + ".") for n in all_bn - frozen_bn)
        and k not in last
    }  # fmt: skip
    assert frozen_keys and _changed(start, after) & frozen_keys == set()
    assert last <= _changed(start, after) and {"head.weight", "head.bias"} <= _changed(start, after)


def test_checkpoint_that_cannot_load_is_named(tmp_path):
    cfg = compose_spec("model.net.width=8")
    _pretrained_checkpoint(cfg, tmp_path / "w8.ckpt")
    wider = compose_spec("model.net.width=16")
    with pytest.raises(UserError, match=r"features\.0\.weight checkpoint \(8,1,3,3\) vs model"):
        models.init_from_pretrained(wider, models.build_net(wider, 3), tmp_path / "w8.ckpt")
    other = compose_spec("model=resnet18", "data.channels=1")
    with pytest.raises(UserError, match="is a model=small_cnn.*pass model=small_cnn"):
        models.init_from_pretrained(other, models.build_net(other, 3), tmp_path / "w8.ckpt")


# --- config: the source, the refusal, the experiment -------------------------------------------


def test_default_source_is_the_other_bundled_set_shaped_and_normalised_like_the_target():
    cfg = resolve(compose_cfg("stage=baseline", "data=mnist5k", "data.image_size=16"))
    src = cfg.pretrain_data
    assert src.name == "digits" and src.image_size == 16 and src.channels == 1
    assert list(src.mean) == list(cfg.data.mean) and list(src.std) == list(cfg.data.std)
    assert src.labels_per_class is None
    cfg = resolve(compose_cfg("stage=baseline", "data=digits", "pretrain_data=fashion_mnist"))
    assert cfg.pretrain_data.name == "fashion_mnist" and cfg.pretrain_data.image_size == 8
    assert list(cfg.pretrain_data.mean) == [0.5]


@pytest.mark.parametrize(
    "overrides",
    [
        ["stage=baseline", "pretrain_data=digits"],
        ["stage=pretrain", "data=mnist5k", "pretrain_data=mnist5k"],
        ["stage=selftrain", "init=pretrained", "pretrain_data=digits"],
        ["stage=train", "init=pretrained", "data=mnist5k", "pretrain_data=mnist"],  # same images
    ],
)
def test_source_holding_the_target_images_is_refused(overrides):
    with pytest.raises(UserError, match="leaks the target's labels"):
        resolve(compose_cfg(*overrides))


def test_auto_source_needs_a_name_for_other_targets():
    with pytest.raises(UserError, match="pretrain_data=auto has an offline source only"):
        resolve(compose_cfg("stage=baseline", "data=cifar10"))
    resolve(compose_cfg("data=cifar10"))  # self-training from scratch needs no source
    # torchvision weights or an existing checkpoint are sources too: nothing to pretrain
    resolve(
        compose_cfg(
            "stage=baseline", "data=cifar10", "model=resnet18", "model.weights=IMAGENET1K_V1"
        )
    )


def test_weights_and_checkpoint_sources_are_checked(tmp_path):
    with pytest.raises(UserError, match="model=small_cnn has no torchvision weights"):
        resolve(compose_cfg("stage=baseline", "model.weights=IMAGENET1K_V1"))
    with pytest.raises(UserError, match="pretrain.ckpt=.* does not exist"):
        resolve(compose_cfg("init=pretrained", f"pretrain.ckpt={tmp_path / 'missing.ckpt'}"))


@pytest.mark.parametrize(
    "arm, stage, init",
    [
        ("supervised", "train", "scratch"),
        ("pretrain_finetune", "baseline", "pretrained"),
        ("selftrain", "selftrain", "scratch"),
        ("selftrain_pretrained", "selftrain", "pretrained"),
    ],
)
def test_experiment_arms(arm, stage, init):
    cfg = compose_cfg("experiment=pretrain_vs_selftrain", f"arm={arm}")
    assert (cfg.stage, cfg.init) == (stage, init)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose(
            "config", overrides=["experiment=pretrain_vs_selftrain"], return_hydra_config=True
        )
    params = hydra_cfg.hydra.sweeper.params
    assert set(params["arm"].split(",")) == {
        "supervised", "pretrain_finetune", "selftrain", "selftrain_pretrained"
    }  # fmt: skip
    assert (
        len(params["seed"].split(",")) == 3
        and len(str(params["data.labels_per_class"]).split(",")) == 2
    )


# --- end to end through the CLI ---------------------------------------------------------------

# one short epoch on 500 of the source's 4000 labels; the pretrainings are shared (cache)
PRETRAIN = ["pretrain.epochs=1", "train.min_steps=30", "pretrain_data.labels_per_class=50"]


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    from conftest import FAST, run_cli

    root = tmp_path_factory.mktemp("baseline")
    run_dir = root / "run"
    cache = f"pretrain.cache_dir={root / 'cache'}"
    proc = run_cli(*FAST, *PRETRAIN, cache, "stage=baseline", f"run_dir={run_dir}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_baseline_end_to_end(baseline_run):
    run_dir = baseline_run
    for name in ("pretrain/model.ckpt", "pretrain/metrics.json", "finetune/model.ckpt",
                 "finetune/metrics.json", "config.yaml", "summary.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "baseline" and summary["dataset"] == "digits"
    assert summary["num_labelled"] == 40 and summary["num_unlabelled"] > 0
    assert [r["round"] for r in summary["rounds"]] == [0]
    assert summary["final_test_accuracy"] == summary["rounds"][0]["test_accuracy"] > 0.3
    assert summary["wall_time_s"] > 0
    assert summary["pretrain_source"] == "mnist5k" and summary["finetune_mode"] == "full"
    pretrain = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
    assert pretrain["num_labelled"] == 500 and pretrain["source"] == "mnist5k"
    (entry,) = (run_dir.parent / "cache").iterdir()  # shared with later runs of the same kind
    assert entry.name.startswith("mnist5k-seed0-")
    assert (entry / "model.ckpt").read_bytes() == (run_dir / "pretrain/model.ckpt").read_bytes()


@pytest.mark.slow
def test_finetune_stage_from_the_pretrained_checkpoint(baseline_run, tmp_path):
    from conftest import FAST, run_cli

    ckpt = baseline_run / "pretrain" / "model.ckpt"
    proc = run_cli(*FAST, "stage=finetune", f"ckpt={ckpt}", "finetune.mode=linear",
                   f"run_dir={tmp_path / 'ft'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["stage"] == "finetune" and summary["final_test_accuracy"] > 0.2
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["finetune_mode"] == "linear"


@pytest.mark.slow
def test_selftrain_from_pretrained(baseline_run, tmp_path):
    """init=pretrained: the pretraining comes first inside the run; here it is the baseline's,
    taken from the shared cache (its settings differ only in what pretraining does not read)."""
    from conftest import FAST, run_cli

    run_dir = tmp_path / "run"
    cache = f"pretrain.cache_dir={baseline_run.parent / 'cache'}"
    # a weak teacher (one short pretraining epoch, two epochs): a low threshold keeps some labels
    args = ["train.epochs=2", "init=pretrained", "pseudo_label.threshold=0.2"]
    proc = run_cli(*FAST, *PRETRAIN, cache, *args, f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = "".join((proc.stdout + proc.stderr).split())  # the log wraps long lines anywhere
    assert "takenfrompretrain.cache_dir" in log  # not trained again
    pretrained = (baseline_run / "pretrain" / "model.ckpt").read_bytes()
    assert (run_dir / "pretrain" / "model.ckpt").read_bytes() == pretrained
    assert len(list((baseline_run.parent / "cache").iterdir())) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "selftrain" and [r["round"] for r in summary["rounds"]] == [0, 1]
    assert summary["rounds"][1]["num_pseudo"] > 0


def test_pretraining_on_the_target_exits_2(tmp_path):
    from conftest import run_cli

    run_dir = tmp_path / "run"
    proc = run_cli("stage=baseline", "pretrain_data=digits", f"run_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "leaks the target's labels" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()
