"""Build hook: the Hydra configs (conf/, at the top of the repository) go into the wheel as
`pipeline/conf`, where pipeline/config/paths.py looks for them in an installed package.

All metadata is in pyproject.toml; this file only adds that copy to `build_py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """`build_py`, then conf/ copied to build/lib/pipeline/conf (YAML files only)."""

    def run(self) -> None:
        super().run()
        # An editable install reads conf/ where it is: nothing to copy.
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "pipeline" / "conf"
        if target.exists():
            shutil.rmtree(target)  # a stale copy could keep a config deleted since
        for source in sorted(CONF.rglob("*.yaml")):
            dest = target / source.relative_to(CONF)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)


setup(cmdclass={"build_py": BuildPyWithConf})
