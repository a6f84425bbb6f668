#!/usr/bin/env bash
# The package as a user installs it, not as the tests see it: build the wheel from the files a
# clean clone has, install it (not editable) into a fresh venv, and run the default job from an
# empty directory. The fresh venv borrows the current venv's dependencies through a path
# line in a .pth file (torch is too large to install twice); that line adds the directory
# without running the .pth files inside it, so the current venv's editable link to this
# checkout stays out. The job must import `pipeline`, its configs and the Hydra plugin from the
# installed wheel, which the script checks before it runs.
#   bash scripts/check_wheel.sh [hydra overrides for the job]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python}

# 1. The sources of a clean clone (tracked and new files, nothing ignored), built out of tree
#    so that no build/ or egg-info lands in the checkout.
mkdir "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
else
  cp -r pyproject.toml setup.py MANIFEST.in README.md pipeline hydra_plugins conf "$WORK/src"
fi
# Build with the installed setuptools when it can make wheels by itself (>= 70.1): without
# network an isolated build could not fetch one.
ISOLATION=()
if "$PY" -c 'import setuptools.command.bdist_wheel' 2>/dev/null; then
  ISOLATION=(--no-build-isolation)
fi
"$PY" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/pipeline-*.whl)
"$PY" -c 'import sys, zipfile; sys.exit("pipeline/conf/config.yaml" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$WHEEL" \
  || { echo "check_wheel: $WHEEL has no pipeline/conf/config.yaml" >&2; exit 1; }

# 2. A fresh venv with the wheel installed, the dependencies borrowed.
"$PY" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib")); print(sysconfig.get_path("platlib"))' \
  | sort -u >"$SITE/borrowed_dependencies.pth"
# --ignore-installed: the borrowed directory holds the current venv's own (editable) pipeline,
# which pip must neither count as installed nor try to uninstall.
"$PY" -m pip --python "$VPY" install -q --no-deps --ignore-installed "$WHEEL"

# 3. From an empty directory: the code and configs come from the wheel, then the default job.
mkdir "$WORK/empty"
cd "$WORK/empty"
"$VPY" - "$SITE" <<'PYEOF'
import sys
from pathlib import Path

import hydra_plugins.pipeline_launchers as launchers

import pipeline
from pipeline.config import CONF_DIR

site = Path(sys.argv[1]).resolve()
for name, path in [("pipeline", pipeline.__file__), ("the launcher plugin", launchers.__file__),
                   ("conf/", CONF_DIR)]:
    if site not in Path(path).resolve().parents:
        sys.exit(f"check_wheel: {name} comes from {path}, not from the installed wheel in {site}")
print(f"check_wheel: pipeline {pipeline.__version__} and its configs from {site}")
PYEOF
HELP=$("$VPY" -m pipeline --help)
[[ $HELP == *"stage=selftrain"* ]] || { echo "check_wheel: --help lists no stages" >&2; exit 1; }
start=$(date +%s)
"$VPY" -m pipeline progress=false "$@"
compgen -G "outputs/selftrain/*/seed*/summary.json" >/dev/null \
  || { echo "check_wheel: the default job wrote no summary.json" >&2; exit 1; }
echo "check_wheel: the installed wheel ran python -m pipeline in $(($(date +%s) - start)) s"
