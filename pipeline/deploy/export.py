"""`stage=export ckpt=M.ckpt format=onnx|torchscript`: the checkpoint's network as one file
beside it (`M.onnx`, `M.torchscript.pt`; or `out=`), with `M.preprocess.json` saying how an
image becomes its input.

The exported model takes float32 images (N, C, S, S) in [0, 1] (pixels / 255, any batch size)
and returns the class probabilities (N, num_classes): the normalisation by mean and std and the
softmax are inside it. Before the file is put in place its outputs are checked against the
PyTorch model on random batches (onnxruntime for ONNX): a difference above 1e-4 refuses it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io as stdio
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config.specs import RunSpec
from pipeline.deploy.model import ModelCard, read_card
from pipeline.deploy.predict import old_checkpoint_hint, writable
from pipeline.errors import UserError
from pipeline.runtime import io
from pipeline.runtime.rundir import RunDir

TOLERANCE = 1e-4
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": ()}
INSTALL = "pip install -e '.[export]' (or pip install onnx onnxscript onnxruntime)"


class Exportable(nn.Module):
    """The network with its normalisation and softmax: [0, 1] pixels in, probabilities out."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((image - self.mean) / self.std), dim=1)


def run_export(cfg: RunSpec, run: RunDir) -> dict[str, Any]:
    fmt = str(cfg.format)
    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"format={fmt} needs the package(s) {', '.join(missing)}; {INSTALL}")
    card = read_card(cfg.ckpt, cfg.data.node, old_checkpoint_hint(cfg))
    target = export_path(Path(str(cfg.ckpt)), fmt, cfg.out)
    info = preprocess_path(target)
    diff = run.on_rank_zero(lambda: writable(target, lambda: export(card, fmt, target, info)))
    return {
        "stage": "export",
        "ckpt": str(Path(str(cfg.ckpt)).resolve()),
        "format": fmt,
        "file": str(target),
        "preprocess": str(info),
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
    }


def export_path(ckpt: Path, fmt: str, out: Any = None) -> Path:
    """Where the export goes: `out`, or beside the checkpoint, named after it."""
    if out:
        return Path(str(out)).expanduser().resolve()
    return ckpt.expanduser().resolve().with_suffix(SUFFIX[fmt])


def preprocess_path(target: Path) -> Path:
    """`M.preprocess.json` beside `M.onnx` / `M.torchscript.pt`."""
    name = target.name
    for suffix in (*SUFFIX.values(), target.suffix):
        if suffix and name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return target.with_name(f"{name}.preprocess.json")


def export(card: ModelCard, fmt: str, target: Path, info: Path) -> float:
    """Write the export and its JSON (each atomically, the model only once checked); returns
    the largest difference to PyTorch's probabilities."""
    module = Exportable(card.build_net(), card.mean, card.std).eval()
    batches = check_batches(card)
    with torch.inference_mode():
        expected = [module(x).numpy() for x in batches]
    with io.atomic_path(target) as tmp:
        if fmt == "onnx":
            write_onnx(module, batches[0], tmp)
            got = [run_onnx(tmp, x) for x in batches]
        else:
            write_torchscript(module, batches[0], tmp)
            got = [run_torchscript(tmp, x) for x in batches]
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
        if not diff <= TOLERANCE:
            raise UserError(
                f"the {fmt} export of {card.path} differs from the PyTorch model by {diff:.3g} "
                f"(> {TOLERANCE}) on a random batch; nothing was written (try the other format)"
            )
    io.write_json(info, describe(card, fmt, target, diff, info))
    return diff


def check_batches(card: ModelCard) -> list[torch.Tensor]:
    """Random [0, 1] batches of 8, 1 and 3 images (the batch axis is dynamic)."""
    g = torch.Generator().manual_seed(0)
    shape = (card.channels, card.image_size, card.image_size)
    return [torch.rand((n, *shape), generator=g) for n in (8, 1, 3)]


def describe(card: ModelCard, fmt: str, target: Path, diff: float, info: Path) -> dict[str, Any]:
    """The exports' JSON: the input and output of the exported models (the same for every
    format), the preprocessing, where they came from, and each export's file and check (those
    of the same checkpoint already listed in `info` are kept)."""
    c, s = card.channels, card.image_size
    source = {"checkpoint": str(card.path.resolve()), "checkpoint_state": _state(card.path)}
    exports: dict[str, Any] = {}
    if info.exists():
        before = io.read_json(info)
        if {k: before.get(k) for k in source} == source:
            exports = {
                f: e
                for f, e in (before.get("exports") or {}).items()
                if (info.parent / str(e.get("file"))).exists()
            }
    exports[fmt] = {"file": target.name, "checked_max_abs_diff": diff, "tolerance": TOLERANCE}
    return {
        "exports": dict(sorted(exports.items())),
        "input": {
            "name": "image",
            "shape": ["batch", c, s, s],
            "dtype": "float32",
            "range": "[0, 1]: pixel values / 255, not normalised",
        },  # fmt: skip
        "output": {
            "name": "probs",
            "shape": ["batch", card.num_classes],
            "dtype": "float32",
            "meaning": "softmax probabilities, columns in the order of classes",
        },  # fmt: skip
        "normalization_inside_model": True,
        "preprocess": card.preprocess(),
        "classes": card.classes,
        "architecture": card.model.get("name"),
        "pipeline_version": card.pipeline_version,
        **source,
    }


def _state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and deprecation notes: keep them out of the output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdio.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["image"],
            output_names=["probs"],
            dynamic_shapes={"image": {0: batch}},
        )


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"image": x.numpy()})[0]


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Saved to memory, then written by Python: torch.jit.save to a path aborts the whole
    process (SIGABRT, from a C++ destructor) when the disk fills, while a Python write raises
    the OSError that the atomic writer turns into one line. The copy is one model's size."""
    with _quiet():
        traced = torch.jit.trace(module, example)
        buffer = stdio.BytesIO()
        torch.jit.save(traced, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def run_torchscript(path: Path, x: torch.Tensor) -> np.ndarray:
    with _quiet(), torch.inference_mode():
        return torch.jit.load(str(path)).eval()(x).numpy()
