"""Self-training (pseudo-label) pipeline for image classification, on Lightning and Hydra."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.deploy.model import LoadedModel

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def load_model(path: Any, device: Any = "cpu", data: Any = None) -> LoadedModel:
    """A trained checkpoint as a model in eval mode with its preprocessing: ``.net``,
    ``.classes``, ``.preprocess``, ``model(images)`` -> probabilities and
    ``model.predict(images)`` -> (labels, confidence, probs); see pipeline.deploy.model.

    ``import pipeline`` stays light: torch is imported on the first call.
    """
    from pipeline.deploy.model import load_model as load

    return load(path, device=device, data=data)
