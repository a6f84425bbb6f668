"""The package as users meet it: `python -m pipeline --help` in the app's words, the configs
found in a checkout and in an installed wheel, and the wheel itself (scripts/check_wheel.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_python

from pipeline import usage
from pipeline.config import paths
from pipeline.stages import STAGES

# `--help` as the CLI prints it, and whether printing it imported torch (it must not: the help
# of a CLI should come back at once).
HELP_PROBE = """
import sys
sys.argv = ["pipeline", "--help"]
from pipeline.cli import main
code = None
try:
    main()
except SystemExit as e:
    code = e.code
print("torch imported:", "torch" in sys.modules, "exit:", code, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def help_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", HELP_PROBE],
        cwd=tmp_path_factory.mktemp("anywhere"),  # not the checkout: conf/ is found anyway
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_help_names_the_app_and_imports_no_torch(help_run: subprocess.CompletedProcess) -> None:
    assert help_run.stderr.strip().splitlines()[-1] == "torch imported: False exit: 0"
    out = help_run.stdout
    assert out.startswith("pipeline: self-training with pseudo-labels for image classification")
    assert "powered by Hydra" not in out and "Powered by Hydra" not in out
    assert "cli is" not in out
    assert "python -m pipeline --cfg job" in out


def test_help_lists_every_stage_once_with_a_line(help_run: subprocess.CompletedProcess) -> None:
    lines = [ln.split() for ln in help_run.stdout.splitlines() if ln.startswith("  stage=")]
    assert [words[0] for words in lines] == [f"stage={s}" for s in STAGES]
    assert all(len(words) > 2 for words in lines)  # each stage says what it does
    assert set(usage.STAGE_HELP) == set(STAGES)  # no stage without its line, none left over


def test_help_groups_come_from_conf_without_the_bases(
    help_run: subprocess.CompletedProcess,
) -> None:
    out = help_run.stdout
    listed = {
        ln.split(":")[0].strip(): ln.split(":", 1)[1].strip().split(", ")
        for ln in out.split("== Config groups (group=option) ==")[1].split("==")[0].splitlines()
        if ln.strip()
    }
    on_disk = {
        d.name: sorted(f.stem for f in d.glob("*.yaml") if not f.stem.startswith("_"))
        for d in (REPO / "conf").iterdir()
        if d.is_dir() and d.name != "hydra"
    }
    assert listed == {k: v for k, v in on_disk.items() if v}
    assert "digits" in listed["data"] and "small_cnn" in listed["model"]
    # the bases exist on disk and are hidden
    assert (REPO / "conf" / "data" / "_torchvision.yaml").is_file()
    for base in ("_torchvision", "_ssl_protocol", "_source", "_natural_images"):
        assert base not in out


def test_conf_dir_in_a_checkout_is_the_top_level_conf() -> None:
    assert paths.CONF_DIR == REPO / "conf"
    assert (paths.CONF_DIR / "config.yaml").is_file()


def test_conf_dir_in_an_installed_wheel_is_pipeline_conf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed, `pipeline/conf` (setup.py's copy) is the one; without it, the checkout's."""
    package = tmp_path / "site-packages" / "pipeline"
    (package / "conf").mkdir(parents=True)
    monkeypatch.setattr(paths, "_PACKAGE", package)
    assert paths.find_conf_dir() == tmp_path / "site-packages" / "conf"  # no config.yaml yet
    (package / "conf" / "config.yaml").write_text("stage: selftrain\n")
    assert paths.find_conf_dir() == package / "conf"


def test_setup_copies_every_config_into_the_package(tmp_path: Path) -> None:
    """setup.py's build_py step puts conf/**.yaml under pipeline/conf of the build dir."""
    code = (
        "import runpy, sys; sys.argv = ['setup.py', '-q', 'build_py', '--build-lib', sys.argv[1]];"
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    run_python(code, str(tmp_path / "lib"), timeout=120)
    copied = sorted(
        p.relative_to(tmp_path / "lib" / "pipeline" / "conf")
        for p in (tmp_path / "lib" / "pipeline" / "conf").rglob("*.yaml")
    )
    assert copied == sorted(p.relative_to(REPO / "conf") for p in (REPO / "conf").rglob("*.yaml"))
    assert (tmp_path / "lib" / "pipeline" / "cli.py").is_file()


@pytest.mark.slow
def test_the_installed_wheel_runs_from_an_empty_directory() -> None:
    """scripts/check_wheel.sh (as CI runs it, with a shorter job): build, install into a fresh
    venv, check that the code and configs come from it, run, find summary.json."""
    done = subprocess.run(
        [
            "bash",
            "scripts/check_wheel.sh",
            "train.epochs=1",
            "train.min_steps=20",
            "selftrain.rounds=1",
            "pseudo_label.tta_views=0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pipeline 0.1.0 and its configs from" in done.stdout
    assert "check_wheel: the installed wheel ran python -m pipeline in" in done.stdout
