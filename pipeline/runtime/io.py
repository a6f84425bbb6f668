"""Reading and writing artifacts: atomically (the one atomic writer of the pipeline), and never
with a format that can run code."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import pickletools
import re
import tempfile
import time
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
    under the final name; the temporary file is removed on any error. A disk that is full, over
    quota, read-only or not writable is the user's to fix: one line (UserError, exit 2).
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
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = _os_error(e)
        if cause is not None and cause.errno in WRITE_ERRORS:
            raise UserError(write_error_line(path, cause.errno)) from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it
# The user's to fix, and a re-run resumes: exit 2 and one line, not a traceback.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_error_line(path: Path, code: int) -> str:
    """The one line of a failed write: what went wrong, and how to go on."""
    if code in DISK_FULL:
        fix = "free some space (or point run_dir= elsewhere)"
    else:
        fix = "pass run_dir= (or out=) a folder you can write to"
    return f"{WRITE_ERRORS[code]} while writing {path}: {fix} and re-run the same command to resume"


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: writers that wrap it (torch.save's C++ stream raises a
    RuntimeError while the file's own OSError is its context) still name the errno."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
        seen += 1
    return None


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


def read_npz(path: Path, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every array of an .npz file but those named in `skip` (never read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the path of an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k not in skip}
    except Exception as e:  # pickled objects (refused), truncated or not a zip at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:150]
        raise UserError(f"{path} is not a readable .npz file ({first})") from None


# The checksum of a checkpoint's tensors, stored in the checkpoint itself under this reserved key.
# Inside the file rather than in a sidecar: one file is renamed into place atomically, while a
# pair (checkpoint + sidecar) could be left half-updated by a kill between its two renames. It is
# computed tensor by tensor over their bytes (each a view, or one tensor's copy off the GPU), so
# it never needs a second full copy of the checkpoint in memory.
CHECKSUM_KEY = "pipeline_checksum"


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be trusted: unreadable, cut short, or altered after it was
    written (its tensors do not match their checksum). Bad input (exit 2) where the user gave
    it; a run's own resume state that is damaged is set aside instead (engine/trainer.py)."""


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """torch.save of tensors and plain containers only, so it loads with weights_only=True,
    with the checksum of its tensors (checked by load_checkpoint)."""
    stamped = {**checkpoint, CHECKSUM_KEY: {"sha256": tensors_digest(checkpoint)}}
    with atomic_path(path) as tmp:
        try:
            torch.save(stamped, tmp)
        except RuntimeError:
            # torch.save to a path hides a failed write's errno (a full disk) in a C++
            # RuntimeError. Written again through a Python file, the write raises the OSError
            # itself, which atomic_path turns into one line (or succeeds: the failure passed).
            with open(tmp, "wb") as f:
                torch.save(stamped, f)


def tensors_digest(checkpoint: Any) -> str:
    """sha256 over every tensor of a checkpoint (its place, dtype, shape and bytes), in the
    order the containers hold them; the checksum entry itself is left out."""
    digest = hashlib.sha256()
    for where, tensor in _tensors(checkpoint, ""):
        digest.update(f"{where}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensors(node: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(node, torch.Tensor):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if not (where == "" and key == CHECKSUM_KEY):
                yield from _tensors(value, f"{where}/{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{where}/{i}")


def _tensor_bytes(tensor: torch.Tensor) -> Any:
    t = tensor.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous().reshape(-1)  # no copy for a contiguous CPU tensor
    if t.is_quantized or t.numel() == 0:
        return repr(t.tolist()).encode() if t.numel() else b""
    return memoryview(t.view(torch.uint8).numpy())


def verify_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Check (and remove) the checksum a checkpoint carries; one written before checkpoints
    carried one passes unchecked."""
    stored = checkpoint.pop(CHECKSUM_KEY, None)
    if stored is None:
        return checkpoint
    expected = stored.get("sha256") if isinstance(stored, dict) else None
    if expected != tensors_digest(checkpoint):
        raise DamagedCheckpoint(
            f"checkpoint {path} is damaged: its tensors do not match the checksum written with "
            "them (the file changed after it was saved); use an intact copy"
        )
    return checkpoint


def set_aside(path: Path) -> Path:
    """Rename a damaged file out of the way, kept beside it for a post-mortem:
    `NAME.damaged-<time>`. Returns the new path."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (a file carrying a code-running pickle is refused
    before any of its code runs) and check its checksum. An unreadable, cut or altered file
    raises DamagedCheckpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt=PATH to an existing file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_object(e, path)
        if refused is None:  # random bytes: not a pickle at all, nothing that could run
            raise DamagedCheckpoint(_unreadable(path, e)) from None
        raise UserError(
            f"refusing checkpoint {path}: it holds {refused}, which could run code "
            "when loaded; load it only if you trust it and re-save its state_dict with torch.save"
        ) from None
    except Exception as e:  # any other decoding failure: the file is not a whole checkpoint
        raise DamagedCheckpoint(_unreadable(path, e)) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(
            f"checkpoint {path} has no 'state_dict'; expected a file written by this pipeline or Lightning"
        )
    return verify_checkpoint(ckpt, path)


def _unreadable(path: Path, error: Exception) -> str:
    return (
        f"checkpoint {path} is unreadable or truncated ({type(error).__name__}); "
        "pass a complete .ckpt file written by this pipeline or Lightning"
    )


def _refused_object(error: Exception, path: Path) -> str | None:
    """What the weights-only unpickler refused, e.g. 'a reference to posix.system', from its
    message or, when that names nothing, from the file's pickle opcodes (read, never run).
    None: the file is no pickle at all (random or garbled bytes), so nothing in it could run
    code: it is damaged."""
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
    if found:
        return f"a reference to {found.group(1)}"
    named = _pickle_callable(path)
    return f"a reference to {named}" if named else None


def _pickle_callable(path: Path) -> str | None:
    """The first callable the pickles of a (non-zip) file name, read with pickletools (which
    decodes opcodes and runs nothing); None when there is none or the bytes are no pickle."""
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            while f.peek(1):  # one pickle after another (the legacy torch format)
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        return str(arg).replace(" ", ".")
                    if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        return ".".join(strings[-2:])
                    if op.name in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE"):
                        return "an object to construct"
                    if isinstance(arg, str):
                        strings.append(arg)
    except Exception:  # not a pickle (an unknown opcode, cut short): damaged bytes
        return None
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete `.tmp-*` files a killed run left behind (they never hold a finished artifact)."""
    for tmp in Path(run_dir).rglob(".tmp-*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
