"""Where the Hydra configs are: the one place that knows.

conf/ lives at the top of the repository. A wheel carries it as `pipeline/conf` (setup.py copies
it at build time), so an installed package finds it beside its own modules; a source checkout
or an editable install finds it one level above the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # pipeline/


def find_conf_dir() -> Path:
    """`pipeline/conf` in an installed wheel, else `conf/` beside the package (a checkout)."""
    installed = _PACKAGE / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    return _PACKAGE.parent / "conf"


CONF_DIR = find_conf_dir()
