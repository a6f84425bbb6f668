"""Noisy Student in full: students of their own architecture (growing per round), weight EMA with
BatchNorm statistics of the averaged weights, class balancing by duplication, and the bad
values of their settings refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAtEpoch, compose_cfg, compose_spec, fit_small
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline import config
from pipeline.cli import resolve
from pipeline.config.architecture import round_models, round_names
from pipeline.config.specs import run_spec
from pipeline.engine import ema as engine_ema
from pipeline.engine import fit as engine_fit
from pipeline.engine.augment import BatchAugment
from pipeline.errors import UserError
from pipeline.models import checkpoint as models
from pipeline.runtime.io import save_checkpoint
from pipeline.runtime.seed import seed_global
from pipeline.selftrain.merge import merge_labelled_and_pseudo
from pipeline.selftrain.select import (
    PseudoLabels,
    balance_target,
    cap_per_class,
    duplicate_to_k,
    per_class_stats,
    select_pseudo_labels,
)

config.register()


pytestmark = pytest.mark.usefixtures("one_thread")


# --- balancing: pure functions on hand-made arrays ---------------------------------------------


def test_balance_target_is_max_per_class_or_the_median_count():
    label = np.array([0] * 5 + [1] * 2 + [2] * 9 + [3] * 1)  # counts 5, 2, 9, 1 (4: none)
    assert balance_target(label, 3) == 3
    assert balance_target(label, None) == 5  # upper median of 1, 2, 5, 9
    capped = np.concatenate([np.full(min(n, 5), c) for c, n in enumerate([5, 2, 9, 1])])
    assert balance_target(capped, None) == 5  # capping at K leaves K the median
    assert balance_target(np.array([], np.int64), None) is None


def test_duplicate_to_k_cycles_through_the_most_confident_first():
    label = np.array([0, 1, 0, 2, 0, 1, 2, 2, 2])
    conf = np.array([0.90, 0.99, 0.95, 0.9, 0.97, 0.92, 0.91, 0.93, 0.94], np.float32)
    rows = duplicate_to_k(label, conf, 4)
    assert rows[:9].tolist() == list(range(9))  # every row once, in order
    extra = rows[9:]
    # class 0 has 3 rows: one more, its most confident (row 4, 0.97);
    # class 1 has 2 rows: two more, 0.99 then 0.92 (rows 1, 5); class 2 has 4: none
    assert extra.tolist() == [4, 1, 5]
    counts = np.bincount(label[rows])
    assert counts.tolist() == [4, 4, 4]
    # a class far below K cycles: 1 row -> K copies of it
    rows = duplicate_to_k(np.array([0, 1, 1, 1]), np.array([0.9, 0.8, 0.7, 0.6]), 3)
    assert np.bincount(np.array([0, 1, 1, 1])[rows]).tolist() == [3, 3]


def test_duplicated_rows_reference_the_same_images():
    pseudo = PseudoLabels(
        index=np.array([10, 11, 12, 13], np.int64),
        label=np.array([0, 1, 1, 1], np.int64),
        confidence=np.array([0.9, 0.99, 0.98, 0.97], np.float32),
        probs=np.eye(2, dtype=np.float32)[[0, 1, 1, 1]],
    )
    merged = merge_labelled_and_pseudo(np.array([0, 1]), pseudo, 2, 0.5, duplicate_to=3)
    assert merged.num_labelled == 2 and len(merged) == 2 + 4 + 2
    pseudo_rows = merged.source == 1
    assert merged.position[pseudo_rows].tolist() == [10, 11, 12, 13, 10, 10]
    assert np.bincount(merged.label[pseudo_rows]).tolist() == [3, 3]
    assert (merged.weight[pseudo_rows] == 0.5).all()
    targets = merged.target_rows(np.arange(len(merged))).numpy()
    assert targets[-2:].tolist() == [[1.0, 0.0], [1.0, 0.0]]  # soft targets follow their rows
    # without duplication: today's merge
    plain = merge_labelled_and_pseudo(np.array([0, 1]), pseudo, 2, 0.5)
    assert plain.position[plain.source == 1].tolist() == [10, 11, 12, 13]


def test_balance_cap_and_none_select_as_documented():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 4, generator=g) * 4, dim=1)
    index = torch.arange(200)
    conf, label = probs.max(1)
    mask = conf >= 0.5
    # balance=none with max_per_class: today's cap
    today = cap_per_class(label, conf, mask, 7)
    none = select_pseudo_labels(index, probs, 0.5, max_per_class=7, balance="none")
    assert none.index.tolist() == torch.nonzero(today).flatten().tolist()
    # balance=none without max_per_class: no cap
    assert len(select_pseudo_labels(index, probs, 0.5)) == int(mask.sum())
    # balance=cap without max_per_class: K is the median class count
    k = balance_target(label[mask].numpy(), None)
    capped = select_pseudo_labels(index, probs, 0.5, balance="cap")
    assert np.bincount(capped.label).max() == k
    assert (
        sorted(capped.index.tolist())
        == torch.nonzero(cap_per_class(label, conf, mask, k)).flatten().tolist()
    )
    # duplicate selects like cap (each sample once); the merge duplicates
    dup = select_pseudo_labels(index, probs, 0.5, balance="duplicate")
    assert dup.index.tolist() == capped.index.tolist()


def test_coverage_counts_unique_samples():
    pseudo = PseudoLabels(
        index=np.array([0, 1, 2], np.int64),
        label=np.array([0, 0, 1], np.int64),
        confidence=np.ones(3, np.float32),
    )
    truth = np.array([0, 0, 1, 1, 1, 0])
    stats = per_class_stats(pseudo, truth, 2, 6)
    assert stats["per_class_coverage"] == [2 / 3, 1 / 3]  # duplication does not change it


# --- configuration: the architecture of each round, bad values ----------------------------------


def test_student_model_defaults_to_model():
    cfg = resolve(compose_cfg())
    assert cfg.student_model == cfg.model
    assert round_names(cfg) == ["small_cnn"] * 3
    cfg = resolve(compose_cfg("model=small_cnn_wide"))
    assert cfg.student_model.name == "small_cnn_wide" and cfg.student_model.net.width == 64


def test_student_model_group_and_per_round_list():
    cfg = resolve(compose_cfg("student_model=resnet18"))
    assert cfg.model.name == "small_cnn" and cfg.student_model.name == "resnet18"
    assert cfg.student_model.net.in_channels == 1 and cfg.student_model.net.weights is None
    assert round_names(cfg) == ["small_cnn", "resnet18", "resnet18"]
    cfg = resolve(
        compose_cfg("selftrain.rounds=3", "selftrain.student_models=[same,small_cnn_wide]")
    )
    # the list wins over student_model; rounds past its end keep its last entry
    assert round_names(cfg) == ["small_cnn", "small_cnn", "small_cnn_wide", "small_cnn_wide"]
    third = round_models(cfg)[2]
    assert third["net"]["width"] == 64 and third["net"]["num_classes"] == 10
    spec = run_spec(cfg)
    assert spec.for_round(2).model.name == "small_cnn_wide"
    assert spec.for_round(2).config["model"]["name"] == "small_cnn_wide"
    assert spec.for_round(1) is spec  # `same`: the run's own spec, nothing copied
    assert spec.model.name == "small_cnn"  # the run's own spec is left as it is
    net = models.build_net(spec.for_round(3), 10)
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("pseudo_label.balance=foo", "pseudo_label.balance='foo'; choose one of none, cap, dup"),
        ("train.ema_decay=1.0", "train.ema_decay=1.0 is outside [0, 1)"),
        ("train.ema_decay=-0.5", "train.ema_decay=-0.5 is outside [0, 1)"),
        ("selftrain.student_models=[nope]", "names model 'nope'"),
        ("selftrain.student_models=[small_cnn,small_cnn,small_cnn]", "at most one per round"),
        ("selftrain.student_models=[]", "names no model"),
    ],
)
def test_bad_values_are_refused(override, needle):
    with pytest.raises(UserError, match=None) as e:
        resolve(compose_cfg(override))
    assert needle in str(e.value)


def test_bad_value_exits_2_with_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("pseudo_label.balance=foo", f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pseudo_label.balance='foo'")
    assert not (tmp_path / "run").exists()


def test_one_pretrain_ckpt_cannot_start_students_of_another_architecture(tmp_path):
    ckpt = tmp_path / "pre.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(UserError, match="students of model=small_cnn_wide"):
        resolve(
            compose_cfg("init=pretrained", f"pretrain.ckpt={ckpt}", "student_model=small_cnn_wide")
        )


# --- checkpoints name their architecture ------------------------------------------------------


def _save(cfg, path: Path, num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = models.build_net(cfg, num_classes)
    save_checkpoint(
        path, models.model_checkpoint(net, models.hparams_for(cfg, cfg.data, num_classes), {})
    )
    return net.state_dict()


def test_checkpoint_of_another_architecture_loads_as_it_names(tmp_path):
    wide = compose_spec("model=small_cnn_wide")
    state = _save(wide, tmp_path / "wide.ckpt")
    small = compose_spec()  # this run's model= is small_cnn
    net = models.load_net(small, tmp_path / "wide.ckpt", 10)
    assert net.num_features == 4 * 64
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert models.checkpoint_model_name(tmp_path / "wide.ckpt") == "small_cnn_wide"
    with pytest.raises(UserError, match="takes 1-channel images, the data has 3"):
        models.load_net(small, tmp_path / "wide.ckpt", 10, channels=3)


def test_checkpoint_naming_a_foreign_network_is_refused(tmp_path):
    cfg = compose_spec()
    marker = tmp_path / "RAN"
    for target, extra in (
        ("os.system", {"command": f"touch {marker}"}),
        ("pipeline.models.load_pretrained", {}),
        ("pipeline.models.SmallCNN", {"width": {"_target_": "os.system", "command": "true"}}),
    ):
        model = {"name": "evil", "net": {"_target_": target, **extra}}
        path = tmp_path / "evil.ckpt"
        torch.save({"state_dict": {}, "hyper_parameters": {"model": model}}, path)
        with pytest.raises(UserError, match="refusing|nested argument"):
            models.load_net(cfg, path, 10)
    assert not marker.exists()


# --- EMA ---------------------------------------------------------------------------------------


def test_warmup_decay_follows_tensorflow():
    assert engine_ema.warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert engine_ema.warmup_decay(0.999, 90) == pytest.approx(0.91)
    assert engine_ema.warmup_decay(0.999, 10**6) == 0.999
    assert engine_ema.warmup_decay(0.0, 5) == 0.0


def test_recompute_batchnorm_matches_swa_update_bn():
    cfg = compose_spec("model.net.width=8")
    torch.manual_seed(0)
    net = models.build_net(cfg, 10)
    inputs = [torch.randn(16, 1, 8, 8) * 3 + 1 for _ in range(5)]
    reference = models.build_net(cfg, 10)
    reference.load_state_dict(net.state_dict())
    net.train()
    assert engine_ema.recompute_batchnorm(net, inputs) == 5
    torch.optim.swa_utils.update_bn([(x,) for x in inputs], reference)
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def _fit(tmp_path: Path, name: str, ema: str, epochs: int = 3, callbacks=()):
    """fit_small with train.ema_decay=`ema`: cfg, net, the data and the training set."""
    cfg, net, images, train_set, _ = fit_small(
        tmp_path, name, f"train.ema_decay={ema}", epochs=epochs, callbacks=callbacks
    )
    return cfg, net, images, train_set


def _bn_buffers(net) -> dict[str, torch.Tensor]:
    return {
        n: b
        for n, b in net.named_buffers()
        if n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_ema_with_decay_zero_is_the_trained_model(tmp_path):
    _, plain, _, _ = _fit(tmp_path, "plain", "null")
    _, averaged, _, _ = _fit(tmp_path, "ema", "0.0")
    for (name, a), b in zip(plain.named_parameters(), averaged.parameters(), strict=True):
        assert torch.equal(a, b), name
    # the BatchNorm statistics were recomputed for the (here: same) weights, and are sane
    for name, b in _bn_buffers(averaged).items():
        assert torch.isfinite(b.float()).all(), name


def test_ema_batchnorm_statistics_are_those_of_the_averaged_weights(tmp_path):
    cfg, net, images, train_set = _fit(tmp_path, "ema", "0.9")
    saved = {n: b.clone() for n, b in _bn_buffers(net).items()}
    assert all(torch.isfinite(b.float()).all() for b in saved.values())
    assert all((b > 0).all() for n, b in saved.items() if n.endswith("running_var"))
    # Replay the training batches through the same (averaged) weights: the same statistics.
    data = engine_fit.batches(
        cfg.data, images, targets=train_set.target_rows, weight=torch.from_numpy(train_set.weight)
    )
    dm = engine_fit.datamodule(
        cfg, cfg.data, 0, None, train=data,
        train_batches=engine_fit.training_batches(train_set, cfg, 3),
    )  # fmt: skip
    net.train()
    engine_ema.recompute_batchnorm(net, dm.training_inputs(torch.device("cpu"), 100))
    for name, b in _bn_buffers(net).items():
        assert torch.allclose(b.float(), saved[name].float(), atol=1e-5), name
    # ... and not the statistics the last weights of training ran with
    _, plain, _, _ = _fit(tmp_path, "plain", "null")
    means = [n for n in saved if n.endswith("running_mean")]
    assert any(not torch.allclose(saved[n], _bn_buffers(plain)[n], atol=1e-4) for n in means)


def test_ema_state_is_in_last_ckpt_and_resumes(tmp_path, monkeypatch):
    seen: list[int] = []
    end = engine_ema.EMA.on_train_end

    def record(self, trainer, pl_module):
        seen.append(int(self._average_model.n_averaged))
        end(self, trainer, pl_module)

    monkeypatch.setattr(engine_ema.EMA, "on_train_end", record)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        _fit(tmp_path, "killed", "0.9", callbacks=[StopAtEpoch(2)])
    last = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "current_model_state" in last and "averaging_state" in last
    steps_before = int(last["averaging_state"]["n_averaged"])
    assert steps_before == last["global_step"] > 0
    _fit(tmp_path, "killed", "0.9")  # the same call again resumes from last.ckpt
    _fit(tmp_path, "whole", "0.9")
    assert len(seen) == 2 and seen[0] == seen[1]  # the resumed average counts every step


# --- a whole run: growing students, duplication, EMA --------------------------------------------

GROWING = [
    "train.epochs=4",
    "train.min_steps=60",
    "selftrain.rounds=2",
    "selftrain.student_models=[small_cnn_wide,small_cnn]",
    "pseudo_label.balance=duplicate",
    "train.ema_decay=0.99",
]


@pytest.fixture(scope="module")
def growing_run(tmp_path_factory):
    from conftest import FAST, run_cli

    run_dir = tmp_path_factory.mktemp("growing") / "run"
    proc = run_cli(*FAST, *GROWING, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.slow
def test_checkpoints_name_their_architecture(growing_run):
    run_dir, proc = growing_run
    names = []
    for k in range(3):
        ckpt = torch.load(run_dir / f"round_{k}" / "model.ckpt", weights_only=True)
        names.append(ckpt["hyper_parameters"]["model"]["name"])
        width = ckpt["state_dict"]["net.head.weight"].shape[1] // 4
        assert width == (64 if names[-1] == "small_cnn_wide" else 32)
    assert names == ["small_cnn", "small_cnn_wide", "small_cnn"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary["rounds"]] == names
    # round 2's teacher (round 1, small_cnn_wide) loaded and labelled: round 2 has pseudo-labels
    assert summary["rounds"][2]["num_pseudo"] > 0
    assert all(r["test_accuracy"] > 0.3 for r in summary["rounds"])
    assert "network" in proc.stdout and "small_cnn_wide" in proc.stdout


@pytest.mark.slow
def test_duplicate_balancing_in_a_run(growing_run, tmp_path):
    from conftest import FAST, run_cli

    run_dir, _ = growing_run
    diagnostics = json.loads((run_dir / "round_1" / "pseudo_diagnostics.json").read_text())
    assert diagnostics["balance"] == "duplicate"
    with np.load(run_dir / "round_1" / "pseudo_labels.npz") as z:
        index, label = z["index"], z["label"]
    assert len(np.unique(index)) == len(index)  # each sample kept once: duplication is later
    counts = np.bincount(label)
    k = diagnostics["balance_k"]
    assert counts.max() <= k
    assert diagnostics["num_pseudo_rows"] == sum(max(k, c) for c in counts if c)
    assert len(diagnostics["per_class_coverage"]) == 10
    # stage=merge writes the duplicated training set
    proc = run_cli(
        *FAST, "pseudo_label.balance=duplicate", "stage=merge",
        f"pseudo_in={run_dir / 'round_1' / 'pseudo_labels.npz'}", f"run_dir={tmp_path / 'm'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(tmp_path / "m" / "train_set.npz") as z:
        pseudo_positions = z["position"][z["source"] == 1]
    assert len(pseudo_positions) == diagnostics["num_pseudo_rows"]
    assert len(np.unique(pseudo_positions)) == len(index)


@pytest.mark.slow
def test_growing_run_resumes_and_its_checkpoints_serve_other_stages(growing_run, tmp_path):
    from conftest import FAST, run_cli

    run_dir, _ = growing_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli(*FAST, *GROWING, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    # stage=pseudolabel with the wide student while model= is small_cnn: built as it names
    out = tmp_path / "pl.npz"
    proc = run_cli(
        *FAST, "stage=pseudolabel", f"ckpt={run_dir / 'round_1' / 'model.ckpt'}", f"out={out}",
        f"run_dir={tmp_path / 'pl'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "pl" / "summary.json").read_text())
    assert summary["model"] == "small_cnn_wide" and summary["num_pseudo"] > 0


@pytest.mark.slow
def test_report_shows_the_architecture_per_round(growing_run, tmp_path):
    from pipeline.report import write_report

    run_dir, _ = growing_run
    write_report(run_dir, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "networks per round" in report
    assert "small_cnn → small_cnn_wide → small_cnn" in report


@pytest.mark.slow
def test_init_pretrained_pretrains_each_student_architecture(tmp_path):
    from conftest import FAST, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli(
        *FAST, "init=pretrained", "pretrain.epochs=1", "student_model=small_cnn_wide",
        f"run_dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    for step, name in (("pretrain", "small_cnn"), ("pretrain_small_cnn_wide", "small_cnn_wide")):
        ckpt = torch.load(run_dir / step / "model.ckpt", weights_only=True)
        assert ckpt["hyper_parameters"]["model"]["name"] == name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary["rounds"]] == ["small_cnn", "small_cnn_wide"]


def test_no_frozen_batchnorm_is_recomputed():
    cfg = compose_spec("model.net.width=8")
    net = models.build_net(cfg, 10)
    frozen = [m for m in net.modules() if isinstance(m, _BatchNorm)][:2]
    net.train()
    for m in frozen:
        m.eval()
    before = [m.running_mean.clone() for m in frozen]
    engine_ema.recompute_batchnorm(net, [torch.randn(8, 1, 8, 8) + 5])
    assert all(torch.equal(m.running_mean, b) for m, b in zip(frozen, before, strict=True))


def test_randaugment_noise_depends_on_its_generator_only():
    """The students' RandAugment draws from torch's global generator, seeded from the batch's
    own generator: the same noise for the same seed, whatever ran before (a resumed run draws
    what the uninterrupted one drew), different noise for another seed."""
    augment = BatchAugment(randaugment_ops=2, translate=0.1, cutout=0.25)
    images = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8)
    first = augment(images, torch.Generator().manual_seed(7))
    torch.rand(1000)  # the global generator moves on, as training does between two steps
    again = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    seed_global(123)  # the global CPU generator as torch.manual_seed leaves it
    drawn = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(drawn, torch.rand(5))
