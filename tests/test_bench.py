"""scripts/bench.py runs end to end on tiny sizes and writes every figure it promises (the
figures themselves are measured by running it, never asserted here: timings on a shared
machine are noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_script_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        *(sys.executable, str(REPO / "scripts" / "bench.py"), "--out", str(out)),
        *("--repeats", "1", "--train-steps", "30", "--pseudolabel-images", "800"),
        *("--rss-images", "3000", "--skip-default", "--consistency-steps", "2"),
        *("--stream-small", "200", "--stream-large", "400", "--stream-train-images", "200"),
        *("--stream-dir", str(tmp_path / "stream")),
    ]
    proc = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in (
        "train_ratio_vs_raw_loop",
        "train_no_randaugment_ratio_vs_raw_loop",  # digits' default augmentation has RandAugment
        "pseudolabel_ratio_vs_bare_forward",
        "pseudolabel_peak_rss_mb",
        "stream_peak_rss_mb_small",
        "stream_peak_rss_mb_large",
        "stream_first_shard_s",
        "stream_pseudolabel_ratio_vs_bare_loop",
        "stream_train_images_per_s",
        "memory_train_images_per_s",
        "consistency_ours_images_per_s",  # WRN-28-2 at 32 px, FixMatch steps
        "consistency_ratio_vs_raw_fixmatch",
    ):
        assert key in figures, (key, sorted(figures))
        assert figures[key] > 0, (key, figures[key])
    # Both training paths did the same work (bench.py refuses to compare them otherwise).
    assert figures["train_images"] > 0
    assert figures["consistency_steps"] == 3  # 20 labels (2 per class) in batches of 8
    # signed: on a noisy machine the raw loop can come out slower
    assert isinstance(figures["train_overhead_ms_per_step"], float)
