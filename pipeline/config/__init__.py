"""Configuration: the typed schema, each key's type and range in one declaration (schema.py,
declare.py), the checks that span keys (checks.py, pretraining.py, trainer_keys.py) and the one
list of result-neutral keys (keys.py)."""

from pipeline.config.checks import (
    CONF_DIR,
    check_pretrain_source,
    resolve_pretrain_source,
    runs_pretraining,
    uses_pretrained,
    validate,
)
from pipeline.config.schema import register

__all__ = [
    "CONF_DIR",
    "check_pretrain_source",
    "register",
    "resolve_pretrain_source",
    "runs_pretraining",
    "uses_pretrained",
    "validate",
]
