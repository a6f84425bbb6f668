"""Typed specs built once from the composed config: what the building blocks take instead of
the whole config."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.consistency import ConsistencySpec


def consistency_spec(cfg: DictConfig) -> ConsistencySpec:
    """The run's online pseudo-labelling settings (`consistency=`)."""
    return ConsistencySpec(**OmegaConf.to_container(cfg.consistency, resolve=True))  # type: ignore[arg-type]
