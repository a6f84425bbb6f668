"""Reading and writing run artifacts: atomically, and never with a format that can run code."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the body succeeds.

    A kill or a full disk leaves at most a hidden `.tmp-*` file, never a half-written artifact
    under the final name; the temporary file is removed on any error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the path of an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from None


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save of tensors and plain containers only, so it loads with weights_only=True."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True: a file carrying a code-running pickle is refused
    before any of its code runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=PATH to an existing file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"refusing checkpoint {path}: it is not a plain weights file and could run code "
            f"when loaded ({first[:120]}); re-save it as a state_dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(
            f"checkpoint {path} is unreadable or truncated ({type(e).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"checkpoint {path} has no 'state_dict'; expected a file written by this pipeline or Lightning"
        )
    return ckpt


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete `.tmp-*` files a killed run left behind (they never hold a finished artifact)."""
    for tmp in Path(run_dir).rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
