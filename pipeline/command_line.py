"""The command line around Hydra: what `python -m pipeline` passes to Hydra (mode flags first,
path values quoted), and what Hydra says back when the command line does not compose (held
back, then printed as the one line of the exit-2 contract). Used by the entry point, cli.py.
"""

from __future__ import annotations

import re
from typing import Any


class _HydraHintFilter:
    """stderr until a job starts: held back, so that when the command line does not compose,
    Hydra's message (several lines, and a 'set HYDRA_FULL_ERROR' hint) can be printed as the
    one line of the exit-2 contract. Once a job or a sweep starts, it is written as it comes."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.held: list[str] | None = []

    def write(self, text: str) -> int:
        if self.held is not None:
            self.held.append(text)
            return len(text)
        if "HYDRA_FULL_ERROR" in text:
            return len(text)
        return self.stream.write(text)

    def release(self) -> None:
        held, self.held = self.held, None
        if held:
            self.write("".join(held))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def hydra_error_line(text: str) -> str:
    """Hydra's composition error as one line: headings joined, option lists inlined, the
    details (full_key, object_type, search path, hints) dropped."""
    key = re.search(r"full_key: (\S+)", text)
    if key and re.search(r"Key '[^']+' not in '\w+'|is not in struct", text):
        return (
            f"unknown config key {key.group(1)}; check the spelling "
            "(python -m pipeline --cfg job prints every key)"
        )
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or "HYDRA_FULL_ERROR" in line:
            continue
        if line.startswith("Config search path"):
            break
        if raw[:1] in " \t":  # details under a heading: keep only lists of options
            listing = parts and parts[-1].endswith((":", ","))
            if listing and not line.startswith("_"):  # _torchvision etc. are not choices
                parts[-1] += f" {line},"
            continue
        parts.append(line.rstrip("."))
    line = "; ".join(p.rstrip(",") for p in parts) or "the command line does not compose"
    if "hydra/sweeper/optuna" in text or "hydra/sweeper: optuna" in text:
        line += "; the Optuna sweeper is not installed: pip install -e '.[optuna]'"
    return line


# Keys whose values are paths. Run and job dirs are named by their overrides
# (`train.epochs=2,seed=0`), so a path pasted from the output may hold `=` and `,`, which
# Hydra's override grammar reads as syntax; such a value is passed quoted.
PATH_KEYS = {
    "ckpt", "pseudo_in", "out", "input", "run_dir", "sweep_dir", "dir", "root", "cache_dir",
    "labelled_dir", "unlabelled_dir", "test_dir", "val_dir",
}  # fmt: skip


def quote_path_overrides(args: list[str]) -> list[str]:
    """`ckpt=outputs/selftrain/train.epochs=2/seed0/round_0/model.ckpt` as if it had been
    written `ckpt='outputs/...'`: an unquoted `=` in a value is never valid Hydra syntax, so
    quoting a path key's value that holds one changes no command line that worked before."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        if (
            sep
            and not key.startswith("-")
            and name in PATH_KEYS
            and "=" in value
            and value[:1] not in ("'", '"')
        ):
            if "'" not in value:
                arg = f"{key}='{value}'"
            elif '"' not in value:
                arg = f'{key}="{value}"'
        quoted.append(arg)
    return quoted


MODE_FLAGS = ("-m", "--multirun", "-r", "--run")


def mode_flags_first(args: list[str]) -> list[str]:
    """`python -m pipeline data=mnist5k -m seed=0,1,2` as if `-m` came first: Hydra's parser
    takes the overrides as one run of positional arguments, and refuses a second run after a
    flag (`unrecognized arguments: seed=0,1,2`). The mode flags take no value, so moving them
    changes no command line that worked before."""
    return [a for a in args if a in MODE_FLAGS] + [a for a in args if a not in MODE_FLAGS]
