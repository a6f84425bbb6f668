"""Reading and writing artifacts: atomically (the one atomic writer of the pipeline), and never
with a format that can run code."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
import warnings
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
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # as an ordinary open() would (mkstemp gives 0600)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            raise UserError(
                f"no space left on the device while writing {path}: free some space (or point "
                "run_dir= elsewhere) and re-run the same command to resume"
            ) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it
# A full disk (or quota) is the user's to fix, and a re-run resumes: exit 2, not a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    except Exception as e:  # pickled objects (refused), truncated or not a zip at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise UserError(f"{path} is not a readable .npz file ({first})") from None


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
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refusing checkpoint {path}: it holds {_refused_object(e)}, which could run code "
            "when loaded; load it only if you trust it and re-save its state_dict with torch.save"
        ) from None
    except Exception as e:  # any other decoding failure: the file is not a whole checkpoint
        raise UserError(
            f"checkpoint {path} is unreadable or truncated ({type(e).__name__}); "
            "pass a complete .ckpt file written by this pipeline or Lightning"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"checkpoint {path} has no 'state_dict'; expected a file written by this pipeline or Lightning"
        )
    return ckpt


def _refused_object(error: Exception) -> str:
    """What the weights-only unpickler refused, from its long message, e.g. 'posix.system'."""
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
    return f"a reference to {found.group(1)}" if found else "more than plain tensors and containers"


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete `.tmp-*` files a killed run left behind (they never hold a finished artifact)."""
    for tmp in Path(run_dir).rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
