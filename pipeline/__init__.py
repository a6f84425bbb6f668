"""Self-training (pseudo-label) pipeline for image classification, on Lightning and Hydra."""

__version__ = "0.1.0"
