"""Atomic writes and safe loads, without Lightning: a failed or killed write never leaves a file
that looks finished, and no load can run code that a file carries."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.data import Splits
from pipeline.errors import UserError
from pipeline.runtime.io import (
    atomic_path,
    load_checkpoint,
    read_json,
    read_npz,
    remove_stale_temporaries,
    save_checkpoint,
    write_json,
    write_npz,
    write_text,
)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".tmp"]


def disk_full_after(n_bytes: int):
    """A replacement for a writer: writes n_bytes of junk to the file, then fails like a full disk."""

    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, str | Path) or hasattr(a, "write"))
        if hasattr(target, "write"):
            target.write(b"x" * n_bytes)
        else:
            Path(target).write_bytes(b"x" * n_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_success_leaves_only_the_final_file(tmp_path):
    write_json(tmp_path / "a" / "metrics.json", {"x": 1})
    write_text(tmp_path / "config.yaml", "seed: 0\n")
    write_npz(tmp_path / "p.npz", {"index": np.arange(3)})
    save_checkpoint(tmp_path / "model.ckpt", {"state_dict": {"w": torch.ones(2)}})
    assert read_json(tmp_path / "a" / "metrics.json") == {"x": 1}
    assert read_npz(tmp_path / "p.npz")["index"].tolist() == [0, 1, 2]
    assert load_checkpoint(tmp_path / "model.ckpt")["state_dict"]["w"].tolist() == [1.0, 1.0]
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize(
    "writer, name, patch",
    [
        (lambda p: write_npz(p, {"index": np.arange(10**5)}), "pseudo_labels.npz", "numpy.savez"),
        (
            lambda p: save_checkpoint(p, {"state_dict": {"w": torch.ones(10**5)}}),
            "model.ckpt",
            "torch.save",
        ),
        (lambda p: write_json(p, {"round": 1}), "metrics.json", "pathlib.Path.write_text"),
    ],
)
def test_disk_full_mid_write_leaves_no_artifact_and_no_temporary(
    tmp_path, monkeypatch, writer, name, patch
):
    monkeypatch.setattr(patch, disk_full_after(4096))
    final = tmp_path / "round_1" / name
    with pytest.raises(UserError, match="no space left") as info:
        writer(final)
    assert "\n" not in str(info.value) and name in str(info.value)
    assert not final.exists()
    assert temporaries(tmp_path) == []


def test_failed_rewrite_keeps_the_previous_file_byte_for_byte(tmp_path, monkeypatch):
    final = tmp_path / "metrics.json"
    write_json(final, {"round": 0, "test_accuracy": 0.9})
    before = final.read_bytes()
    monkeypatch.setattr("pathlib.Path.write_text", disk_full_after(3))
    with pytest.raises(UserError):
        write_json(final, {"round": 0, "test_accuracy": 0.1})
    assert final.read_bytes() == before
    assert temporaries(tmp_path) == []


def test_an_unexpected_error_or_interrupt_mid_write_propagates_and_cleans_up(tmp_path):
    final = tmp_path / "summary.json"
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), atomic_path(final) as tmp:
            tmp.write_text('{"half": ')
            raise exc
        assert not final.exists()
        assert temporaries(tmp_path) == []


def test_the_temporary_is_hidden_beside_the_final_name(tmp_path):
    final = tmp_path / "round_0" / "model.ckpt"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".tmp-model.ckpt")
        assert not final.exists()
        tmp.write_bytes(b"done")
    assert final.read_bytes() == b"done"


def test_remove_stale_temporaries_only_removes_temporaries(tmp_path):
    (tmp_path / "round_1").mkdir()
    keep = [tmp_path / "config.yaml", tmp_path / "round_1" / "model.ckpt"]
    stale = [tmp_path / ".tmp-config.yaml.abc", tmp_path / "round_1" / ".tmp-model.ckpt.x1"]
    for p in keep + stale:
        p.write_text("x")
    remove_stale_temporaries(tmp_path)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_splits_save_is_atomic_and_uses_the_temporary_prefix(tmp_path, monkeypatch):
    splits = Splits(labelled=np.arange(3), val=np.arange(0), unlabelled=np.arange(3, 9))
    monkeypatch.setattr("numpy.savez", disk_full_after(100))
    with pytest.raises(UserError, match="no space left on the device while writing .*splits"):
        splits.save(tmp_path / "splits.npz")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # the temporary carries the prefix that the next run's clean-up of a killed run recognises
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(
        "os.replace", lambda src, dst: (renamed.append(Path(src).name), real_replace(src, dst))
    )
    splits.save(tmp_path / "splits.npz")
    assert len(renamed) == 1 and renamed[0].startswith(".tmp-splits.npz")
    assert Splits.load(tmp_path / "splits.npz").unlabelled.tolist() == list(range(3, 9))
    assert temporaries(tmp_path) == []


# --- safe loading -----------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Checkpoints that would run code when loaded with plain pickle, in every container."""
    files = {
        "raw_pickle": tmp_path / "raw.ckpt",
        "torch_zip": tmp_path / "zip.ckpt",
        "open_call": tmp_path / "open.ckpt",
        "legacy_torch": tmp_path / "legacy.ckpt",
    }
    files["raw_pickle"].write_bytes(
        pickle.dumps({"state_dict": {}, "x": _Payload(f"touch {marker}")})
    )
    torch.save(
        {"state_dict": {"w": torch.ones(1)}, "x": _Payload(f"touch {marker}")}, files["torch_zip"]
    )
    torch.save({"state_dict": {}, "x": _OpenPayload(marker)}, files["open_call"])
    torch.save(
        {"state_dict": {}, "x": _Payload(f"touch {marker}")},
        files["legacy_torch"],
        _use_new_zipfile_serialization=False,
    )
    return files


def test_payloads_would_run_with_plain_pickle(tmp_path):
    """The check below is meaningful: the same files do run code under an unsafe load."""
    marker = tmp_path / "ran"
    files = payload_files(tmp_path, marker)
    torch.load(files["torch_zip"], weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_zip", "open_call", "legacy_torch"])
def test_checkpoint_with_a_pickle_payload_is_refused_and_never_runs(tmp_path, kind, recwarn):
    marker = tmp_path / "ran"
    path = payload_files(tmp_path, marker)[kind]
    with pytest.raises(UserError, match="refusing checkpoint") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "unreadable"),
        (b"hello world", "unreadable"),
        (None, "unreadable"),  # a real checkpoint cut in half
    ],
)
def test_corrupt_or_truncated_checkpoint_is_a_user_error(tmp_path, content, match):
    path = tmp_path / "model.ckpt"
    if content is None:
        save_checkpoint(path, {"state_dict": {"w": torch.randn(1000)}})
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_checkpoint_without_state_dict_or_missing_is_a_user_error(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "w.ckpt")
    with pytest.raises(UserError, match="state_dict"):
        load_checkpoint(tmp_path / "w.ckpt")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_npz_with_pickled_objects_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "pseudo_labels.npz"
    np.savez(path, index=np.array([_Payload(f"touch {marker}")], dtype=object))
    with pytest.raises(UserError, match="not a readable .npz"):
        read_npz(path)
    assert not marker.exists()


def test_what_we_write_loads_without_pickle(tmp_path):
    """Checkpoints load with weights_only=True, arrays with allow_pickle=False, text as data."""
    save_checkpoint(
        tmp_path / "model.ckpt",
        {"state_dict": {"net.w": torch.ones(2)}, "hyper_parameters": {"model": {"name": "x"}}},
    )
    write_npz(tmp_path / "p.npz", {"index": np.arange(2), "confidence": np.ones(2, np.float32)})
    write_json(tmp_path / "m.json", {"a": [1, 2]})
    write_text(tmp_path / "c.yaml", "seed: 0\n")
    torch.load(tmp_path / "model.ckpt", weights_only=True)
    np.load(tmp_path / "p.npz", allow_pickle=False)["index"]
    json.loads((tmp_path / "m.json").read_text())
    yaml.safe_load((tmp_path / "c.yaml").read_text())
