"""Using a trained model: self-describing checkpoints (and old ones without the fields),
stage=predict of a folder or tar shards to CSV / Parquet (every image once, top-k, error rows,
resumable parts, the same rows from 1 or 2 DDP processes), stage=export to ONNX and TorchScript
checked against PyTorch, and `pipeline.load_model`.

The fast tests build a small untrained network in-process; the slow ones train a tiny model
through the CLI on a generated JPEG folder and run the real stages."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli, run_python
from streaming_data import CLASSES, class_tree, flat_folder, jpeg, shards
from test_config import compose_cfg

from pipeline.cli import resolve
from pipeline.config.specs import run_spec
from pipeline.deploy import table
from pipeline.deploy.model import load_model, read_card
from pipeline.engine.predict import ShardPlan, Unreadable
from pipeline.errors import UserError
from pipeline.models.checkpoint import build_net, hparams_for, load_net, model_checkpoint
from pipeline.runtime.io import load_checkpoint, save_checkpoint
from pipeline.runtime.rundir import RunDir

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
TRAIN = [
    "stage=train",
    "data=image_folder",
    "progress=false",
    "trainer.accelerator=cpu",
    "trainer.num_threads=1",
    "train.epochs=2",
    "train.min_steps=20",
    f"data.num_classes={len(CLASSES)}",
    "data.image_size=16",
    "data.channels=1",
    "data.mean=[0.3]",
    "data.std=[0.3]",
]
RUN = ["progress=false", "trainer.accelerator=cpu", "trainer.num_threads=1"]
OLD_KEYS = {"model", "dataset", "num_classes", "in_channels", "image_size"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env=ONE_THREAD)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])


def bad(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- fast: an untrained network written the way the pipeline writes checkpoints -------------


def tiny_cfg(*overrides: str):
    return run_spec(resolve(
        compose_cfg(
            "data.num_classes=3", "data.image_size=16", "data.mean=[0.3]", "data.std=[0.3]",
            "model.net.width=8", *overrides,
        )
    ))  # fmt: skip


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    net = build_net(cfg, 3)
    with torch.no_grad():  # running statistics that are not a fresh network's
        net.train()(torch.rand(32, 1, 16, 16) * 2)
    path = tmp_path / "tiny.ckpt"
    save_checkpoint(path, model_checkpoint(net, hparams_for(cfg, cfg.data, 3, CLASSES), {}))
    return path


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(7):
        paths.append(folder / f"{i}.jpg")
        paths[-1].write_bytes(jpeg(i % 3, rng))
    return paths


def old_format(ckpt: Path, dest: Path) -> Path:
    """The checkpoint as the pipeline wrote it before checkpoints described themselves."""
    new = load_checkpoint(ckpt)
    hp = {k: v for k, v in new["hyper_parameters"].items() if k in OLD_KEYS}
    torch.save({"state_dict": new["state_dict"], "hyper_parameters": hp}, dest)
    return dest


def test_checkpoints_describe_themselves_and_load_weights_only(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert set(hp) >= OLD_KEYS  # the keys checkpoints always had are kept
    assert hp["classes"] == CLASSES and hp["in_channels"] == 1 and hp["image_size"] == 16
    assert hp["mean"] == [0.3] and hp["std"] == [0.3]
    assert hp["model"]["net"]["_target_"] == "pipeline.models.SmallCNN"
    assert hp["pipeline_version"] == __import__("pipeline").__version__
    assert hp["config"]["data"]["image_size"] == 16 and hp["config"]["model"]["name"] == "small_cnn"
    assert hp["augment"]["translate"] == 0.125  # the ranges of the test-time views
    card = read_card(tiny_ckpt)
    assert card.classes == CLASSES and card.num_classes == 3 and not card.build_net().training


def test_load_model_predicts_paths_and_tensors(tiny_ckpt, photos):
    model = load_model(tiny_ckpt)
    assert not model.net.training and model.classes == CLASSES
    assert model.preprocess["image_size"] == 16 and model.preprocess["mean"] == [0.3]
    labels, confidence, probs = model.predict([str(p) for p in photos])
    assert len(labels) == 7 and set(labels) <= set(CLASSES)
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(confidence, probs.max(1))
    assert labels == [CLASSES[i] for i in probs.argmax(1)]
    # the same as the network on the images decoded the pipeline's way, normalised by hand
    from pipeline.deploy.model import read_image

    uint8 = torch.stack([read_image(p, 1, 16) for p in photos])
    with torch.no_grad():
        manual = model.net((uint8.float() / 255 - 0.3) / 0.3).softmax(1).numpy()
    np.testing.assert_allclose(probs, manual, atol=1e-6)
    np.testing.assert_allclose(model(uint8).numpy(), manual, atol=1e-6)
    np.testing.assert_allclose(model(uint8.float() / 255).numpy(), manual, atol=1e-6)
    assert model(uint8[0]).shape == (1, 3)  # one (C, H, W) image
    # RGB of another size is converted and resized like the pipeline's sets
    rgb = torch.randint(0, 256, (2, 3, 40, 24), dtype=torch.uint8)
    assert model.predict(rgb).probs.shape == (2, 3)
    # batching changes nothing; with views, the mean over them
    np.testing.assert_allclose(model.predict(photos, batch_size=3).probs, probs, atol=1e-6)
    assert not np.allclose(model.predict(photos, tta_views=2).probs, probs)
    photos[0].write_bytes(b"not an image")
    with pytest.raises(ValueError, match="0.jpg"):
        model.predict(photos)


def test_pipeline_load_model_is_lazy():
    code = (
        "import sys, pipeline; assert 'torch' not in sys.modules; "
        "assert callable(pipeline.load_model); print('light')"
    )
    assert "light" in run_python(code)


def test_old_checkpoint_without_the_new_fields_still_loads(tiny_ckpt, photos, tmp_path):
    old = old_format(tiny_ckpt, tmp_path / "old.ckpt")
    cfg = tiny_cfg()
    net = load_net(cfg, old, 3)  # the training stages read it as before
    assert sum(p.numel() for p in net.parameters()) > 0
    with pytest.raises(UserError, match="does not record mean and std"):
        read_card(old)
    with pytest.raises(UserError, match="does not record mean and std"):
        load_model(old)
    with pytest.raises(UserError, match="data=digits"):  # another dataset's config is no help
        read_card(old, {"name": "cifar10", "mean": [0.5], "std": [0.5]}, "data=digits")
    # what it lacks, given: the same predictions as the self-describing checkpoint
    model = load_model(old, data={"mean": [0.3], "std": [0.3], "classes": CLASSES})
    new = load_model(tiny_ckpt).predict(photos)
    again = model.predict(photos)
    assert again.labels == new.labels
    np.testing.assert_allclose(again.probs, new.probs, atol=1e-7)
    # the data config it was trained with: class names from its labelled tree
    tree = tmp_path / "tree"
    for name in CLASSES:
        (tree / name).mkdir(parents=True)
    card = read_card(old, {"name": "digits", "mean": [0.3], "std": [0.3], "labelled_dir": tree})
    assert card.classes == CLASSES and card.pipeline_version is None
    card = read_card(old, {"name": "digits", "mean": [0.3], "std": [0.3]})
    assert card.classes == ["0", "1", "2"]


def test_a_checkpoint_naming_another_callable_is_refused(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["hyper_parameters"]["model"]["net"]["_target_"] = "os.system"
    save_checkpoint(tmp_path / "evil.ckpt", ckpt)
    with pytest.raises(UserError, match="os.system, which is not a network"):
        read_card(tmp_path / "evil.ckpt").build_net()


def test_predict_and_export_settings_are_checked():
    good = ["stage=predict", "ckpt=m.ckpt", "input=/tmp"]
    resolve(compose_cfg(*good, "out=p.csv"))
    resolve(compose_cfg(*good, "out=p.parquet", "predict.topk=1", "predict.tta_views=4"))
    resolve(compose_cfg("stage=export", "ckpt=m.ckpt", "format=torchscript"))
    errors = [
        (["stage=predict", "input=/tmp", "out=p.csv"], "needs a checkpoint"),
        (["stage=predict", "ckpt=m.ckpt", "out=p.csv"], "needs input="),
        ([*good], "out=FILE ending in .csv or .parquet"),
        ([*good, "out=p.txt"], "(got out=p.txt)"),
        ([*good, "out=p.csv", "predict.topk=0"], "predict.topk=0 must be >= 1"),
        ([*good, "out=p.csv", "predict.tta_views=-1"], "predict.tta_views=-1"),
        (["stage=export", "ckpt=m.ckpt"], "format=onnx or format=torchscript"),
        (["stage=export", "ckpt=m.ckpt", "format=tflite"], "format='tflite'; choose one of onnx"),
        (["stage=export", "format=onnx"], "needs a checkpoint"),
    ]
    for overrides, needle in errors:
        with pytest.raises(UserError) as e:
            resolve(compose_cfg(*overrides))
        assert needle in str(e.value), (overrides, str(e.value))
    # format's null is only its unset default: the refusal offers the formats alone
    with pytest.raises(UserError) as e:
        resolve(compose_cfg("stage=export", "ckpt=m.ckpt", "format=tflite"))
    assert str(e.value).endswith("choose one of onnx, torchscript"), str(e.value)


def test_a_missing_optional_package_names_the_install_command(tiny_ckpt, tmp_path, monkeypatch):
    import importlib.util

    from pipeline.deploy.export import run_export
    from pipeline.deploy.predict import run_predict

    real = importlib.util.find_spec
    absent = {"onnxruntime", "pyarrow"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n in absent else real(n, *a)
    )
    run = RunDir(tmp_path / "run")
    cfg = tiny_cfg("stage=export", f"ckpt={tiny_ckpt}", "format=onnx")
    with pytest.raises(UserError, match=r"onnxruntime; pip install -e '\.\[export\]'"):
        run_export(cfg, run)
    cfg = tiny_cfg("stage=predict", f"ckpt={tiny_ckpt}", f"input={tmp_path}", "out=p.parquet")
    with pytest.raises(UserError, match=r"pyarrow; pip install -e '\.\[parquet\]'"):
        run_predict(cfg, run)


def test_torchscript_export_matches_and_a_mismatch_writes_nothing(tiny_ckpt, photos, monkeypatch):
    from pipeline.deploy import export

    card = read_card(tiny_ckpt)
    target = export.export_path(tiny_ckpt, "torchscript")
    info = export.preprocess_path(target)
    assert target.name == "tiny.torchscript.pt" and info.name == "tiny.preprocess.json"
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # as if the export disagreed with PyTorch
    with pytest.raises(UserError, match="differs from the PyTorch model"):
        export.export(card, "torchscript", target, info)
    assert not target.exists() and not info.exists()
    assert not list(target.parent.glob(".tmp-*"))
    monkeypatch.undo()
    diff = export.export(card, "torchscript", target, info)
    assert diff <= 1e-4
    scripted = torch.jit.load(str(target))
    x = load_model(tiny_ckpt).pixels(photos)
    np.testing.assert_allclose(
        scripted(x).detach().numpy(), load_model(tiny_ckpt).predict(photos).probs, atol=1e-5
    )
    described = json.loads(info.read_text())
    assert described["exports"]["torchscript"]["file"] == target.name
    assert described["classes"] == CLASSES and described["preprocess"]["mean"] == [0.3]
    assert described["input"]["shape"] == ["batch", 1, 16, 16]


def test_parts_are_joined_in_input_order_and_another_commands_parts_are_dropped(tmp_path):
    plan = ShardPlan(5, 2)  # rows 0-2, 3-4
    parts = tmp_path / "out.csv.parts"
    assert table.parts_to_do(parts, plan, "A") == [0, 1]
    keys = np.array([f"k{i}" for i in range(5)])
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    bad = Unreadable(np.array([1]), ["k1 (/x): broken"])
    first = table.part_arrays(keys[[0, 2]], np.array([0, 2]), probs[:2], bad, keys[[1]], "/x", 2)
    second = table.part_arrays(keys[3:], np.array([3, 4]), probs[2:], Unreadable(np.zeros(0, int), []), keys[:0], "/x", 2)  # fmt: skip
    for s, arrays in enumerate((first, second)):
        np.savez(table.part_file(parts, s, plan), **arrays)
    assert table.parts_to_do(parts, plan, "A") == []
    counts = table.write_table(parts, plan, tmp_path / "out.csv", ["a", "b", "c"], 2)
    assert counts["num_images"] == 5 and counts["num_bad_images"] == 1 and not parts.exists()
    frame = pd.read_csv(tmp_path / "out.csv")
    assert list(frame.columns) == table.columns(2)
    assert list(frame.path) == ["k0", "k1", "k2", "k3", "k4"]
    assert list(frame["class"].fillna("")) == ["b", "", "a", "c", "a"]
    assert frame.error.fillna("").tolist() == ["", "broken", "", "", ""]
    assert frame.top2_class[0] == "c" and frame.top2_prob[0] == pytest.approx(0.2)
    # parts of another command (another plan digest) are not reused
    assert table.parts_to_do(parts, plan, "A") == [0, 1]
    np.savez(table.part_file(parts, 0, plan), **first)
    assert table.parts_to_do(parts, plan, "A") == [1]
    assert (
        table.parts_to_do(parts, plan, "B") == [0, 1]
        and not table.part_file(parts, 0, plan).exists()
    )


# --- slow: a model trained through the CLI, the stages run as a user runs them --------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model trained through the CLI on a generated JPEG tree; the generated root."""
    root = tmp_path_factory.mktemp("deploy")
    class_tree(root / "labelled", per_class=6, seed=0)
    class_tree(root / "test", per_class=4, seed=1)
    truth = flat_folder(root / "new", 23, seed=2)
    (root / "truth.json").write_text(json.dumps(truth))
    run_dir = root / "train"
    ok(
        cli(
            *TRAIN, f"data.labelled_dir={root / 'labelled'}", f"data.test_dir={root / 'test'}",
            f"data.cache_dir={root / 'cache'}", f"run_dir={run_dir}",
        )
    )  # fmt: skip
    return run_dir / "model.ckpt", root


def predict(ckpt: Path, root: Path, inp, out: Path, run: str, *extra: str):
    return cli(
        *RUN, "stage=predict", f"ckpt={ckpt}", f"input={inp}", f"out={out}",
        f"data.cache_dir={root / 'cache'}", f"run_dir={root / 'runs' / run}", *extra,
    )  # fmt: skip


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.jpg"))


@pytest.mark.slow
def test_predict_a_folder_to_csv_and_parquet(trained):
    ckpt, root = trained
    out = root / "pred.csv"
    ok(predict(ckpt, root, root / "new", out, "csv", "predict.shard_size=5"))
    frame = pd.read_csv(out)
    assert list(frame.columns) == table.columns(3)  # predict.topk=5 capped at 3 classes
    assert len(frame) == 23 and sorted(frame.path) == files(root / "new")  # each file once
    assert list(frame.path) == sorted(frame.path)  # in the listing's order
    assert set(frame["class"]) <= set(CLASSES) and frame.error.isna().all()
    assert (frame["class"] == frame.top1_class).all()
    np.testing.assert_allclose(frame.confidence, frame.top1_prob)
    tops = frame[["top1_prob", "top2_prob", "top3_prob"]].to_numpy()
    assert (np.diff(tops, axis=1) <= 0).all()  # most probable first
    np.testing.assert_allclose(tops.sum(1), 1, atol=1e-4)  # all 3 classes: they sum to 1
    for _, row in frame.iterrows():  # each class once per row
        assert sorted([row.top1_class, row.top2_class, row.top3_class]) == CLASSES
    truth = json.loads((root / "truth.json").read_text())
    right = [CLASSES[truth[int(p.split("img")[1][:5])]] == c for p, c in zip(frame.path, frame["class"], strict=True)]  # fmt: skip
    assert np.mean(right) > 0.5  # the trained model, not chance
    assert not table.parts_dir(out).exists()
    summary = json.loads((root / "runs" / "csv" / "summary.json").read_text())
    assert summary["num_images"] == 23 and summary["num_bad_images"] == 0
    assert sum(summary["predicted_per_class"].values()) == 23
    # load_model gives what stage=predict wrote
    got = load_model(ckpt).predict([root / "new" / p for p in frame.path])
    assert got.labels == list(frame["class"])
    np.testing.assert_allclose(got.confidence, frame.confidence, atol=1e-5)
    # Parquet, top-2, with the test-time views of pseudo-labelling
    pq = root / "pred.parquet"
    ok(predict(ckpt, root, root / "new", pq, "pq", "predict.topk=2", "predict.tta_views=3"))
    views = pd.read_parquet(pq)
    assert list(views.columns) == table.columns(2) and list(views.path) == list(frame.path)
    assert views.confidence.dtype == np.float32
    tta = load_model(ckpt).predict([root / "new" / p for p in views.path], tta_views=3)
    assert tta.labels == list(views["class"])
    np.testing.assert_allclose(tta.confidence, views.confidence, atol=1e-6)
    assert not np.allclose(views.confidence, frame.confidence, atol=1e-4)


@pytest.mark.slow
def test_corrupt_images_are_error_rows_or_refused(trained, tmp_path):
    ckpt, root = trained
    folder = tmp_path / "photos"
    flat_folder(folder, 9, seed=4)
    (folder / "part1" / "img00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "part0" / "notes.png").write_bytes(b"plain text")
    line = bad(predict(ckpt, root, folder, tmp_path / "p.csv", "fail"), "cannot read image")
    assert "part0/notes.png" in line  # the first of the two in the listing's order
    assert "data.on_bad_image=skip" in line and not (tmp_path / "p.csv").exists()
    out = tmp_path / "p.parquet"
    ok(predict(ckpt, root, folder, out, "skip", "data.on_bad_image=skip"))
    frame = pd.read_parquet(out)
    assert len(frame) == 10
    errors = frame[frame.error.notna()]
    assert sorted(errors.path) == ["part0/notes.png", "part1/img00003.jpg"]
    assert errors["class"].isna().all() and errors.confidence.isna().all()
    assert all("(" not in e or "not a valid image" in e for e in errors.error)  # the reason only
    assert frame[frame.error.isna()]["class"].notna().all()


@pytest.mark.slow
def test_predict_tar_shards(trained, tmp_path):
    ckpt, root = trained
    shards(tmp_path / "s", 13, per_shard=5, seed=5, labelled=False)
    out = tmp_path / "s.csv"
    ok(predict(ckpt, root, f"'{tmp_path / 's' / 'pool-{000..002}.tar'}'", out, "tar"))
    frame = pd.read_csv(out)
    assert len(frame) == 13 and frame.path.is_unique
    assert frame.path[0] == "pool-000.tar/000000" and frame.path.iloc[-1] == "pool-002.tar/000012"
    nothing = f"'{tmp_path / 'nothing-{0..1}.tar'}'"
    line = bad(predict(ckpt, root, nothing, out, "none"), "does not exist")
    assert line.startswith("error: input=")


@pytest.mark.slow
def test_a_stopped_predict_redoes_only_the_missing_parts(trained, tmp_path):
    ckpt, root = trained
    folder = tmp_path / "photos"
    flat_folder(folder, 12, seed=6, nested=False)
    good = (folder / "img00010.jpg").read_bytes()
    (folder / "img00010.jpg").write_bytes(b"broken")  # in the last of 3 parts
    out = tmp_path / "p.csv"
    args = ["predict.shard_size=4"]
    bad(predict(ckpt, root, folder, out, "resume", *args), "img00010.jpg")  # stops there
    parts = table.parts_dir(out)
    done = sorted(p.name for p in parts.glob("part-*"))
    assert done == ["part-00000-of-00003.npz", "part-00001-of-00003.npz"] and not out.exists()
    # mark the first part: if it were predicted again, the mark would be gone
    first = parts / done[0]
    with np.load(first) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["top_prob"][:, 0] = 0.5
    np.savez(first, **arrays)
    (folder / "img00010.jpg").write_bytes(good)  # fixed in place: the listing is the same
    proc = predict(ckpt, root, folder, out, "resume", *args)
    ok(proc)
    assert "3 parts (1 to do)" in proc.stdout + proc.stderr
    resumed = pd.read_csv(out)
    assert len(resumed) == 12 and not parts.exists()
    assert (resumed.confidence[:4] == 0.5).all()  # part 0 was taken as it was
    rest = load_model(ckpt).predict([folder / p for p in resumed.path[4:]])
    assert rest.labels == list(resumed["class"][4:])
    np.testing.assert_allclose(rest.confidence, resumed.confidence[4:], atol=1e-5)
    # the same command again: nothing to redo; another out: written from the same run
    proc = predict(ckpt, root, folder, out, "resume", *args)
    ok(proc)
    assert "nothing to redo" in proc.stdout + proc.stderr
    ok(predict(ckpt, root, folder, tmp_path / "copy.csv", "resume", *args))
    assert len(pd.read_csv(tmp_path / "copy.csv")) == 12


@pytest.mark.slow
def test_one_and_two_ddp_processes_write_the_same_rows(trained, tmp_path):
    ckpt, root = trained
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    ok(predict(ckpt, root, root / "new", one, "ddp1", "predict.shard_size=4"))
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "predict.shard_size=4"]
    ok(predict(ckpt, root, root / "new", two, "ddp2", *ddp))
    a, b = pd.read_csv(one), pd.read_csv(two)
    assert len(b) == 23 and b.path.is_unique
    pd.testing.assert_frame_equal(a, b)
    # a corrupt file met by rank 1 (in the second of 3 parts): every rank stops with exit 2,
    # one line on stderr
    broken = tmp_path / "broken"
    flat_folder(broken, 9, seed=8)
    (broken / "part1" / "img00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    bad(predict(ckpt, root, broken, tmp_path / "b.csv", "ddp3", *ddp), "part1/img00003.jpg")


@pytest.mark.slow
def test_an_old_checkpoint_predicts_with_its_data_config(trained, tmp_path):
    ckpt, root = trained
    old = old_format(ckpt, tmp_path / "old.ckpt")
    line = bad(predict(old, root, root / "new", tmp_path / "o.csv", "old1"), "mean and std")
    assert "trained on data=image_folder" in line and "this command has data=digits" in line
    given = ["data=image_folder", f"data.labelled_dir={root / 'labelled'}", "data.num_classes=3",
             "data.mean=[0.3]", "data.std=[0.3]"]  # fmt: skip
    ok(predict(old, root, root / "new", tmp_path / "o.csv", "old2", *given))
    ok(predict(ckpt, root, root / "new", tmp_path / "n.csv", "new", *given))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "o.csv"), pd.read_csv(tmp_path / "n.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_beside_the_checkpoint_checked_against_pytorch(trained, tmp_path, fmt):
    ckpt, root = trained
    ok(cli(*RUN, "stage=export", f"ckpt={ckpt}", f"format={fmt}", f"run_dir={tmp_path / 'run'}"))
    target = ckpt.with_suffix({"onnx": ".onnx", "torchscript": ".torchscript.pt"}[fmt])
    info = json.loads(ckpt.with_name("model.preprocess.json").read_text())
    assert info["exports"][fmt]["file"] == target.name
    assert info["exports"][fmt]["checked_max_abs_diff"] <= 1e-4
    assert info["classes"] == CLASSES and info["preprocess"]["std"] == [0.3]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["file"] == str(target) and summary["max_abs_diff"] <= 1e-4
    # the exported file on real images gives load_model's probabilities
    model = load_model(ckpt)
    paths = sorted((root / "new").rglob("*.jpg"))
    x = model.pixels(paths)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = session.run(["probs"], {"image": x.numpy()})[0]
    else:
        got = torch.jit.load(str(target))(x).detach().numpy()
    np.testing.assert_allclose(got, model.predict(paths).probs, atol=1e-4)
