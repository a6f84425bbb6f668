"""The networks (`model=` config group targets) and how checkpoints of them are read and written."""

from pipeline.models.base import Classifier
from pipeline.models.finetune import (
    count_parameters,
    freeze_for_finetune,
    load_pretrained,
    reset_head,
)
from pipeline.models.resnet import ResNetClassifier, resnet18
from pipeline.models.small_cnn import SmallCNN
from pipeline.models.wide_resnet import WideResNet, wide_resnet28_2

# The constructors a checkpoint may name as its network (models.checkpoint builds nothing else).
NETWORKS = ("SmallCNN", "WideResNet", "resnet18", "wide_resnet28_2")

__all__ = [
    "NETWORKS",
    "Classifier",
    "ResNetClassifier",
    "SmallCNN",
    "WideResNet",
    "count_parameters",
    "freeze_for_finetune",
    "load_pretrained",
    "reset_head",
    "resnet18",
    "wide_resnet28_2",
]
