"""Reading the YAML files the pipeline writes (a run's config.yaml, Hydra's overrides.yaml) back
as plain values: the one reader, so that no layer above needs OmegaConf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def read_yaml(path: Path, resolve: bool = True) -> Any:
    """The file's content as plain containers, interpolations resolved where they can be (a
    config.yaml is written resolved; one that is not keeps them as text; resolve=False: never,
    e.g. a list of command-line overrides). Raises what the YAML parser raises for a file that
    is not YAML."""
    node = OmegaConf.load(path)
    return plain(node) if resolve else OmegaConf.to_container(node)


def plain(node: Any) -> Any:
    """An OmegaConf node as plain containers, its interpolations resolved where they can be
    (those that cannot be resolved are kept as text)."""
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:
        return OmegaConf.to_container(node, resolve=False)
