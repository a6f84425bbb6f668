"""The real configs compose for every stage, dataset and model, and their objects instantiate."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline import config
from pipeline.cli import resolve
from pipeline.config.keys import differing_keys, run_name
from pipeline.engine.trainer import build_trainer
from pipeline.errors import UserError
from pipeline.stages import STAGES

config.register()


def plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    extra = {
        "pseudolabel": ["ckpt=x.ckpt"],
        "evaluate": ["ckpt=x.ckpt"],
        "finetune": ["ckpt=x.ckpt"],
        "report": ["report.sweep_dir=/tmp"],
        "predict": ["ckpt=x.ckpt", "input=/tmp", "out=p.csv"],
        "export": ["ckpt=x.ckpt", "format=onnx"],
    }.get(stage, [])
    cfg = resolve(compose_cfg(f"stage={stage}", *extra))
    assert cfg.stage == stage
    net = instantiate(cfg.model.net)
    out = net(torch.zeros(2, cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    assert out.shape == (2, cfg.data.num_classes)
    opt = instantiate(cfg.optimizer)(net.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    sched = instantiate(cfg.scheduler)(opt, T_max=10)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize(
    "data", ["digits", "mnist5k", "cifar10", "cifar100", "svhn", "stl10", "mnist", "fashion_mnist"]
)
@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "wide_resnet28_2"])
def test_data_and_model_groups_compose(data, model):
    cfg = resolve(compose_cfg(f"data={data}", f"model={model}"))
    assert cfg.data.name == data and cfg.model.name == model
    assert len(cfg.data.mean) == len(cfg.data.std) == cfg.data.channels
    net = instantiate(cfg.model.net)
    assert net.num_classes == cfg.data.num_classes


def test_image_folder_needs_its_dir():
    with pytest.raises(UserError, match="labelled_dir"):
        resolve(compose_cfg("data=image_folder", "data.num_classes=3"))


def test_pretrain_source_is_the_other_bundled_set():
    cfg = resolve(compose_cfg("stage=baseline"))
    assert cfg.pretrain_data.name == "mnist5k"
    assert cfg.pretrain_data.image_size == cfg.data.image_size == 8
    cfg = resolve(compose_cfg("stage=baseline", "data=mnist5k"))
    assert cfg.pretrain_data.name == "digits" and cfg.pretrain_data.image_size == 24  # (recipe)


def test_a_datasets_recipe_comes_with_it_and_the_command_line_wins():
    cfg = resolve(compose_cfg("data=mnist5k"))  # conf/recipe/mnist5k.yaml
    assert (cfg.data.image_size, cfg.train.epochs, cfg.selftrain.rounds) == (24, 25, 3)
    assert cfg.pseudo_label.balance == "duplicate"
    cfg = resolve(compose_cfg("data=mnist5k", "data.image_size=16", "train.epochs=3"))
    assert (cfg.data.image_size, cfg.train.epochs) == (16, 3)
    cfg = resolve(compose_cfg("data=cifar10"))  # the literature's threshold
    assert cfg.pseudo_label.threshold == 0.95 and cfg.train.epochs == 60
    cfg = resolve(compose_cfg())  # digits: the root config's settings
    assert (cfg.data.image_size, cfg.train.epochs, cfg.pseudo_label.threshold) == (8, 60, 0.8)
    assert (cfg.pseudo_label.balance, cfg.selftrain.rounds) == ("none", 2)


def test_pretraining_on_the_target_is_refused():
    with pytest.raises(UserError, match="leaks"):
        resolve(compose_cfg("stage=baseline", "pretrain_data=digits"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("pseudo_label.threshold=1.5", "threshold"),
        ("pseudo_label.threshold=-0.1", "threshold"),
        ("selftrain.rounds=-1", "rounds"),
        ("stage=nonsense", "unknown stage"),
        ("data.labels_per_class=0", "labels_per_class"),
        ("finetune.mode=partial", "finetune.mode"),
        ("init=imagenet", "init"),
        ("trainer.num_threads=0", "num_threads"),
        ("trainer.num_threads=two", "num_threads"),
        ("train.checkpoint_every_s=-1", "checkpoint_every_s=-1.0 must be >= 0"),
    ],
)
def test_bad_values_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        resolve(compose_cfg(override))


def test_schema_rejects_wrong_types_and_unknown_keys():
    with pytest.raises(ConfigCompositionException, match="threshold"):
        compose_cfg("pseudo_label.threshold=high")
    with pytest.raises(ConfigCompositionException, match="treshold"):
        compose_cfg("pseudo_label.treshold=0.5")


def test_result_neutral_keys_do_not_count_as_a_different_config():
    a = resolve(compose_cfg())
    b = resolve(
        compose_cfg(
            "trainer.devices=2", "progress=false", "data.num_workers=2", "trainer.num_threads=1"
        )
    )
    assert differing_keys(plain(a), plain(b)) == []
    c = resolve(compose_cfg("seed=1", "pseudo_label.threshold=0.9"))
    assert differing_keys(plain(a), plain(c)) == ["pseudo_label.threshold", "seed"]


def test_run_name_is_safe_bounded_and_order_free():
    assert run_name([]) == "default"
    assert "/" not in run_name(["data.labelled_dir=/a/b"])
    assert len(run_name(["x=" + "y" * 500])) <= 100
    assert run_name(["train.epochs=3", "seed=1", "progress=false", "trainer.devices=2"]) == (
        "train.epochs=3"
    )
    assert run_name(["b=1", "a=2"]) == run_name(["a=2", "b=1"]) == "a=2,b=1"


def test_the_listed_trainer_arguments_are_the_installed_lightnings():
    import inspect

    import lightning as L

    from pipeline.config.checks import TRAINER_ARGUMENTS

    live = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    assert set(TRAINER_ARGUMENTS) == live


def test_trainer_arguments_pass_through_and_unknown_ones_are_refused():
    cfg = resolve(compose_cfg("+trainer.gradient_clip_val=1.0", "trainer.accelerator=cpu"))
    trainer = build_trainer(cfg.trainer, progress=False)
    assert trainer.gradient_clip_val == 1.0
    with pytest.raises(UserError, match="gradient_clip_vall is not a Lightning Trainer argument"):
        resolve(compose_cfg("+trainer.gradient_clip_vall=1.0"))
    with pytest.raises(UserError, match="trainer.max_epochs is set by the pipeline; use train"):
        resolve(compose_cfg("+trainer.max_epochs=3"))


def test_resolved_config_has_no_interpolations():
    cfg = resolve(compose_cfg())
    text = OmegaConf.to_yaml(cfg)
    assert "${" not in text


def test_the_multirun_flag_may_follow_overrides():
    """`python -m pipeline data=mnist5k -m seed=0,1,2` (the README's form) reaches Hydra with
    `-m` first: its parser refuses overrides on both sides of a flag."""
    from pipeline.command_line import mode_flags_first

    args = ["data=mnist5k", "data.labels_per_class=10", "-m", "seed=0,1,2"]
    assert mode_flags_first(args) == [
        "-m",
        "data=mnist5k",
        "data.labels_per_class=10",
        "seed=0,1,2",
    ]
    assert mode_flags_first(["--multirun", "seed=0,1"]) == ["--multirun", "seed=0,1"]
    assert mode_flags_first(["seed=1", "--cfg", "job"]) == ["seed=1", "--cfg", "job"]


def test_paths_holding_equals_signs_are_passed_quoted():
    """Run and job dirs are named by their overrides: a path pasted from the output works."""
    from pipeline.command_line import quote_path_overrides

    path = "outputs/selftrain/seed=0,train.epochs=2/round_0/model.ckpt"
    assert quote_path_overrides([f"ckpt={path}", "seed=1", "-m", "train.epochs=2,3"]) == [
        f"ckpt='{path}'",
        "seed=1",
        "-m",
        "train.epochs=2,3",
    ]
    assert quote_path_overrides([f"+report.sweep_dir={path}"]) == [f"+report.sweep_dir='{path}'"]
    # Already quoted, or no '=' in the value (a sweep over plain paths): left alone.
    assert quote_path_overrides([f"ckpt='{path}'", "ckpt=a.ckpt,b.ckpt"]) == [
        f"ckpt='{path}'",
        "ckpt=a.ckpt,b.ckpt",
    ]
    assert quote_path_overrides(["hydra.sweep.dir=multirun/a=b"]) == [
        "hydra.sweep.dir='multirun/a=b'"
    ]


# --- one declaration per key: type and range, checked before anything is written ------------


@pytest.mark.parametrize(
    "override, line",
    [
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 must be > 0; e.g. optimizer.lr=0.003"),
        ("optimizer.lr=abc", "optimizer.lr='abc' must be a number > 0; e.g. optimizer.lr=0.003"),
        (
            "data.labels_per_class=2.5",
            "data.labels_per_class=2.5 must be a whole number >= 1 (or null)",
        ),
        (
            "pseudo_label.threshold=1.5",
            "pseudo_label.threshold=1.5 is outside [0, 1]; pass a confidence such as 0.8",
        ),
        ("data.val_per_class=1.5", "data.val_per_class=1.5 must be a whole number >= 0"),
        ("data.test_fraction=0", "data.test_fraction=0 is outside (0, 1) or null"),
        ("data.in_memory=maybe", "data.in_memory='maybe'; choose one of auto, true, false"),
        ("data.cache=mapped", "data.cache='mapped'; choose one of none, decoded"),
        ("model.cache_features=1", "model.cache_features=1 must be true or false"),
        (
            "data.imbalance.labelled_ratio=true",
            "data.imbalance.labelled_ratio=true must be a number >= 1 (or null); "
            "the max/min class count, e.g. 10",
        ),
        ("data.augment.rotate=-5", "data.augment.rotate=-5 is outside [0, 180]; degrees"),
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("trainer.num_threads=0", "trainer.num_threads=0 must be >= 1 or null"),
        ("seed=-1", "seed=-1 is outside [0, 4294967296)"),
        ("train.select=best", "train.select='best'; choose one of last, best_val"),
        ("train.ema_decay=1.0", "train.ema_decay=1.0 is outside [0, 1) or null; pass a decay"),
        (
            "train.logit_adjust=-1",
            "train.logit_adjust=-1.0 must be >= 0; tau of the logit-adjusted",
        ),
    ],
)
def test_a_declared_key_out_of_its_type_or_range_is_one_line_naming_it(override, line):
    with pytest.raises(UserError) as refused:
        resolve(compose_cfg(override))
    assert str(refused.value).startswith(line)
    assert "\n" not in str(refused.value)


def test_every_declared_key_defaults_to_its_default_option():
    """The declarations of the free-form groups hold the default options' values (digits,
    small_cnn, adamw, cosine; sgd's momentum): a key renamed in conf/ without its declaration fails."""
    from pipeline.config.schema import DECLARED

    cfg, sgd = resolve(compose_cfg()), resolve(compose_cfg("optimizer=sgd"))
    assert sgd.optimizer.momentum == DECLARED["optimizer."].momentum
    assert compare_declared(cfg.optimizer, DECLARED["optimizer."], "optimizer.") == ["momentum"]
    for prefix in ("data.", "model.", "scheduler."):
        node = OmegaConf.select(cfg, prefix[:-1])
        assert compare_declared(node, DECLARED[prefix], prefix) == []


def compare_declared(node, schema, prefix) -> list[str]:
    """Assert each declared default equals the node's value; returns the keys it lacks."""
    import dataclasses

    absent = []
    for f in dataclasses.fields(schema):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            absent += compare_declared(node[f.name], type(default), f"{prefix}{f.name}.")
        elif f.name not in node:
            absent.append(f.name)
        else:
            value = node[f.name]
            value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            assert value == default, f"{prefix}{f.name}: {value!r} != declared {default!r}"
    return absent


def test_the_range_words_read_as_written():
    from pipeline.config.declare import Range

    assert Range(ge=0, le=1).bounds() == "in [0, 1]"
    assert Range(gt=0, lt=1).bounds() == "in (0, 1)"
    assert Range(ge=0.5).bounds() == ">= 0.5"
    assert Range(gt=0).bounds() == "> 0"
    assert Range(le=0).bounds() == "<= 0"
    assert Range(ge=1).admits(1) and not Range(ge=1).admits(0)
    assert Range(choices=("a",)).admits("a") and not Range(choices=("a",)).admits("b")
