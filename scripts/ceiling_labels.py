"""The pool's true labels, written as a pseudo_labels.npz: the ceiling of self-training on a pool.

    python scripts/ceiling_labels.py --out truth.npz data=mnist5k data.imbalance.unlabelled_ratio=50 seed=0
    python -m pipeline stage=train pseudo_in=truth.npz data=mnist5k data.imbalance.unlabelled_ratio=50 seed=0

The first command composes the config from the same overrides as a run and makes the same splits.
It writes every pool image whose label the dataset knows, with its true label and confidence 1.
The second command, with the run's options, trains the student that a round would train if its
teacher were never wrong and kept the whole pool. The merge (with `pseudo_label.balance=duplicate`'s
duplication; a cap is a selection, so it does not apply), `labelled_fraction`, the noise, and with
`consistency.students=true` the online method on the pool, are all as in a round.
Its test accuracy bounds what the round's student can reach on that pool with that training.

For measurement only. These are the labels that the pipeline otherwise never trains on, so
the figure is a ceiling, not a result. In an open-set pool the foreign images (no known class,
true label -1) are left out. A pool with no known labels (an image folder's unlabelled_dir)
has no ceiling, and the script exits 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from bench import compose  # scripts/ is on sys.path when this file runs as a script


def ceiling_labels(cfg) -> tuple[dict[str, np.ndarray], int]:
    """(the pseudo_labels.npz arrays of every pool image whose true label is known, pool size)."""
    from pipeline.data.task import prepare_task
    from pipeline.errors import UserError

    task = prepare_task(cfg.data, cfg.seed, None)
    truth = task.unlabelled_truth()
    if truth is None or not (truth >= 0).any():
        raise UserError("the pool's true labels are unknown here: it has no ceiling")
    index = np.flatnonzero(truth >= 0).astype(np.int64)
    arrays = {
        "index": index,
        "label": truth[index].astype(np.int64),
        "confidence": np.ones(len(index), np.float32),
    }
    return arrays, len(truth)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("overrides", nargs="*", help="the run's overrides (data=..., seed=...)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    from pipeline.errors import UserError
    from pipeline.runtime.io import write_npz

    if args.out.suffix != ".npz":
        print(f"error: --out {args.out} must end in .npz", file=sys.stderr)
        return 2
    try:
        arrays, pool = ceiling_labels(compose(*args.overrides))
        write_npz(args.out, arrays)  # whole or absent; a full or read-only disk is a UserError
    except (UserError, HydraException) as err:  # a bad key or value: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote the true labels of {len(arrays['index'])} of the {pool} pool images to {args.out}; "
        "train on them: "
        + shlex.join(
            ["python", "-m", "pipeline", "stage=train", f"pseudo_in={args.out}", *args.overrides]
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
