"""Online pseudo-labelling (consistency=...) inside the pipeline's training: the pool batches
paired with the training batches, the configs, the diagnostics, and exact resume. The methods
themselves are tested on hand-made tensors in test_consistency_methods.py."""

from __future__ import annotations

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch
from conftest import FAST, assert_same_weights, compose_cfg, fit_small, run_cli

from pipeline.config.schema import ConsistencyConfig
from pipeline.config.specs import consistency_spec
from pipeline.consistency import ConsistencySpec
from pipeline.engine.batches import EpochBatches, with_pool
from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schema_and_spec_defaults_agree():
    assert dataclasses.asdict(ConsistencySpec()) == dataclasses.asdict(ConsistencyConfig())


@pytest.mark.parametrize("method", ["none", "fixmatch", "flexmatch", "freematch", "softmatch"])
def test_each_method_composes_into_its_spec(method):
    spec = consistency_spec(compose_cfg(f"consistency={method}"))
    assert spec.method == method
    if method == "softmatch":
        assert spec.dist_align  # SoftMatch's uniform alignment
    if method == "freematch":
        assert spec.fairness_weight == 0.001
    assert spec.debias == 0.0  # DebiasPL is off unless asked for


def test_debias_composes_with_any_method():
    spec = consistency_spec(compose_cfg("consistency=freematch", "consistency.debias=0.4"))
    assert (spec.method, spec.debias, spec.fairness_weight) == ("freematch", 0.4, 0.001)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("consistency.mu=0", "consistency.mu=0 must be >= 1"),
        ("consistency.threshold=1.5", "consistency.threshold=1.5 is outside [0, 1]"),
        ("consistency.temperature=0", "consistency.temperature=0.0 must be > 0"),
        ("consistency.ema_momentum=1.0", "consistency.ema_momentum=1.0 is outside [0, 1)"),
        ("consistency.method=mixmatch", "consistency.method='mixmatch'; choose one of"),
        ("consistency.debias=-0.4", "consistency.debias=-0.4 must be >= 0"),
    ],
)
def test_bad_consistency_values_are_refused(override, words):
    from pipeline.config.checks import validate

    with pytest.raises(UserError) as refused:
        validate(compose_cfg("consistency=fixmatch", override))
    assert words in str(refused.value)


def test_pool_rows_pair_each_batch_with_mu_times_its_size():
    def make(rng):
        perm = rng.permutation(10)
        return [perm[:4], perm[4:8], perm[8:]]

    paired = with_pool(make, pool_size=7, mu=3)
    a = paired(np.random.default_rng(5))
    b = paired(np.random.default_rng(5))
    assert [len(p) for _, p in a] == [12, 12, 6]  # mu x the batch's size
    for (x, p), (y, q) in zip(a, b, strict=True):  # the same (seed, epoch): the same pairs
        assert np.array_equal(x, y) and np.array_equal(p, q)
    rows = np.concatenate([p for _, p in a])
    # The pool is walked in whole permutations: each image once per pass of 7.
    for start in range(0, 28, 7):
        assert sorted(rows[start : start + 7]) == list(range(7))
    # The training batches are make's own (drawn first from the generator).
    assert all(
        np.array_equal(x, y) for (x, _), y in zip(a, make(np.random.default_rng(5)), strict=True)
    )


def test_each_rank_takes_its_share_of_both_parts(monkeypatch):
    from pipeline.runtime import dist

    def make(rng):
        return [(np.arange(4), np.arange(100, 112))]

    shares = []
    for r in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        monkeypatch.setattr(dist, "world_size", lambda: 2)
        shares.append(list(EpochBatches(make, seed=0)))
    (lab0, pool0), (lab1, pool1) = shares[0][0], shares[1][0]
    assert lab0.tolist() == [0, 2] and lab1.tolist() == [1, 3]
    assert sorted(pool0.tolist() + pool1.tolist()) == list(range(100, 112))
    assert len(pool0) == len(pool1) == 6


class StopAtStep(L.Callback):
    """A kill (KeyboardInterrupt) before optimizer step `step` (mid-epoch, last.ckpt written at
    every step with train.checkpoint_every_s=0)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def fit_with_pool(tmp_path, name, method, *overrides, callbacks=(), epochs=3):
    """A small net trained with `consistency=method` on 24 labelled and 48 pool images of 3
    classes (random pixels; the pool's truth given for the diagnostics)."""
    from pipeline.data import ImageArrays
    from pipeline.engine import augment
    from pipeline.engine.fit import OnlinePool

    def pool(cfg, g):
        images = torch.randint(0, 256, (48, 1, 8, 8), generator=g, dtype=torch.uint8)
        truth = torch.arange(48) % 3
        return OnlinePool(
            ImageArrays(images, truth),
            cfg.consistency,
            augment.BatchAugment(translate=0.125),
            augment.BatchAugment(translate=0.125, cutout=0.5, randaugment_ops=2),
            truth,
        )

    _, net, _, _, result = fit_small(
        tmp_path,
        name,
        "train.checkpoint_every_s=0",
        f"consistency={method}",
        "consistency.mu=2",
        "consistency.threshold=0.34",
        *overrides,
        epochs=epochs,
        callbacks=callbacks,
        pool=pool,
    )
    return net, result


@pytest.mark.parametrize("method", ["fixmatch", "flexmatch", "freematch", "softmatch"])
def test_each_method_trains_and_records_its_diagnostics(tmp_path, method):
    net, result = fit_with_pool(tmp_path, "run", method)
    assert result.steps >= 12
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for epoch in result.epochs:
        assert 0.0 <= epoch["mask_rate"] <= 1.0
        assert len(epoch["class_thresholds"]) == 3
        if epoch["mask_rate"] > 0:
            assert 0.0 <= epoch["masked_pseudo_accuracy"] <= 1.0
    if method == "fixmatch":
        assert {t for e in result.epochs for t in e["class_thresholds"]} == {0.34}


def test_debias_records_the_pool_prior_and_keeps_it_in_the_checkpoint(tmp_path):
    _, result = fit_with_pool(tmp_path, "run", "fixmatch", "consistency.debias=0.4")
    priors = [epoch["pool_prior"] for epoch in result.epochs]
    assert len(priors) == 3 and all(len(p) == 3 for p in priors)
    assert all(sum(p) == pytest.approx(1.0, abs=1e-5) for p in priors)
    assert priors[-1] != [round(1 / 3, 6)] * 3  # it moved from its uniform start
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    p_hat = state["pipeline_consistency"]["debias.p_hat"]
    assert p_hat.tolist() == pytest.approx(priors[-1], abs=1e-6)
    plain = fit_with_pool(tmp_path, "plain", "fixmatch", epochs=1)[1]
    assert "pool_prior" not in plain.epochs[0]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights_and_state(tmp_path):
    """FlexMatch keeps the most state (a selected label per pool image): killed at step 7 of 12
    (mid-epoch 1), the resumed training ends bit for bit where the uninterrupted one does."""
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        fit_with_pool(tmp_path, "killed", "flexmatch", callbacks=[StopAtStep(7)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 7
    assert "selected" in " ".join(state["pipeline_consistency"])  # FlexMatch's record
    assert not any(k.startswith("consistency.") for k in state["state_dict"])
    resumed, fit_r = fit_with_pool(tmp_path, "killed", "flexmatch")
    whole, fit_w = fit_with_pool(tmp_path, "whole", "flexmatch")
    assert fit_r.steps == fit_w.steps
    assert_same_weights(resumed, whole)
    # The method's state in the final checkpoints' records agrees too.
    assert fit_r.epochs[-1]["class_thresholds"] == fit_w.epochs[-1]["class_thresholds"]


@pytest.mark.slow
def test_stage_train_with_fixmatch_beats_chance_and_writes_the_diagnostics(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(
        *FAST,
        "stage=train",
        "consistency=fixmatch",
        "consistency.mu=2",
        "consistency.threshold=0.7",
        f"run_dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert all("mask_rate" in e and len(e["class_thresholds"]) == 10 for e in metrics["epochs"])


ABLATION_ARMS = {
    "supervised": ("train", "scratch", "none"),
    "pretrain_finetune": ("baseline", "pretrained", "none"),
    "selftrain": ("selftrain", "scratch", "none"),
    "selftrain_pretrained": ("selftrain", "pretrained", "none"),
    "fixmatch": ("train", "scratch", "fixmatch"),
    "fixmatch_pretrained": ("train", "pretrained", "fixmatch"),
    "freematch": ("train", "scratch", "freematch"),
    "freematch_pretrained": ("train", "pretrained", "freematch"),
    "selftrain_fixmatch": ("selftrain", "scratch", "fixmatch"),
    "selftrain_fixmatch_pretrained": ("selftrain", "pretrained", "fixmatch"),
    "selftrain_fixmatch_teacher": ("selftrain", "scratch", "fixmatch"),
}


@pytest.mark.parametrize("data", ["digits", "mnist5k"])
@pytest.mark.parametrize("arm", ABLATION_ARMS)
def test_the_ablation_arms_compose_to_their_stage_init_and_method(arm, data):
    """Whatever method the data's recipe chooses (mnist5k's: a FixMatch teacher), each arm
    trains with its own, and the loop + FixMatch arm with it in every round."""
    cfg = compose_cfg("experiment=ssl_ablation", f"arm={arm}", f"data={data}")
    assert (cfg.stage, cfg.init, cfg.consistency.method) == ABLATION_ARMS[arm]
    if cfg.stage == "selftrain" and cfg.consistency.method != "none":
        assert cfg.consistency.students == (arm != "selftrain_fixmatch_teacher")


def test_a_recipe_chooses_the_method_and_the_command_line_replaces_it():
    """consistency=auto (the default) takes the recipe's method: mnist5k's teacher trains with
    FixMatch and its students offline; digits has none. consistency=NAME on the command line
    wins over the recipe, consistency=none included."""
    spec = consistency_spec(compose_cfg("data=mnist5k"))
    assert (spec.method, spec.students, spec.threshold, spec.mu) == ("fixmatch", False, 0.95, 7)
    assert consistency_spec(compose_cfg()) == ConsistencySpec()  # digits: none, every default
    assert consistency_spec(compose_cfg("data=mnist5k", "consistency=none")).method == "none"
    spec = consistency_spec(compose_cfg("data=mnist5k", "consistency=freematch"))
    assert (spec.method, spec.fairness_weight) == ("freematch", 0.001)
    spec = consistency_spec(compose_cfg("data=mnist5k", "consistency.students=true"))
    assert (spec.method, spec.students) == ("fixmatch", True)


@pytest.mark.slow
def test_with_students_false_only_the_teacher_trains_online(tmp_path):
    """consistency.students=false: the teacher's epochs carry the online method's diagnostics,
    the students' none (they train on the round's offline pseudo-labels alone)."""
    import json

    run_dir = tmp_path / "run"
    r = run_cli(
        *FAST,
        "consistency=fixmatch",
        "consistency.students=false",
        "consistency.mu=2",
        "consistency.threshold=0.7",
        f"run_dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = json.loads((run_dir / "round_0" / "metrics.json").read_text())
    student = json.loads((run_dir / "round_1" / "metrics.json").read_text())
    assert all("mask_rate" in e for e in teacher["epochs"])
    assert teacher["epochs"][-1]["mask_rate"] > 0
    assert not any("mask_rate" in e for e in student["epochs"])
    assert teacher["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert student["num_pseudo"] > 0  # the students learn from the teacher's offline labels


def test_the_ablation_sweeps_every_arm_over_three_seeds():
    from hydra import compose, initialize_config_dir

    from pipeline.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=ssl_ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["arm"].split(",") == list(ABLATION_ARMS)
    assert params["seed"].split(",") == ["0", "1", "2"]


@pytest.mark.slow
def test_two_ddp_ranks_share_the_pool_batch_and_take_the_same_steps(tmp_path):
    """FlexMatch on 2 gloo ranks: each rank takes half of every pool batch, the per-image
    selections are all-gathered; the job takes the steps one process takes, and its diagnostics
    cover both ranks' pool images."""
    import json

    common = [*FAST, "stage=train", "train.epochs=2", "train.min_steps=30", "train.batch_size=16"]
    common += ["consistency=flexmatch", "consistency.mu=2", "consistency.threshold=0.7"]
    result = {}
    for name, extra in (("one", []), ("two", ["trainer.devices=2", "trainer.strategy=ddp"])):
        run_dir = tmp_path / name
        r = run_cli(*common, *extra, f"run_dir={run_dir}", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        result[name] = json.loads((run_dir / "metrics.json").read_text())
    assert result["one"]["train_steps"] == result["two"]["train_steps"] >= 30
    for epoch in result["two"]["epochs"]:
        assert 0.0 < epoch["mask_rate"] <= 1.0 and len(epoch["class_thresholds"]) == 10
