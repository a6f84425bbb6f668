"""The networks (`model=` config group targets) and how checkpoints of them are read and written."""

from pipeline.models.base import Classifier
from pipeline.models.finetune import (
    count_parameters,
    freeze_for_finetune,
    load_pretrained,
    param_groups,
    reset_head,
)
from pipeline.models.resnet import ResNetClassifier, resnet18
from pipeline.models.small_cnn import SmallCNN
from pipeline.models.wide_resnet import WideResNet, wide_resnet28_2
from pipeline.models.zoo import ZooClassifier, timm_model, torchvision_model

# The constructors a checkpoint may name as its network (models.checkpoint builds nothing else).
# The zoo constructors are rebuilt with their download switches off (OFFLINE_REBUILD): the
# checkpoint's own weights replace whatever they would fetch.
NETWORKS = (
    "SmallCNN",
    "WideResNet",
    "resnet18",
    "wide_resnet28_2",
    "torchvision_model",
    "timm_model",
)
# The arguments that fetch pretrained weights, and the value that fetches none.
OFFLINE_REBUILD = {"weights": None, "pretrained": False}

__all__ = [
    "NETWORKS",
    "OFFLINE_REBUILD",
    "Classifier",
    "ResNetClassifier",
    "SmallCNN",
    "WideResNet",
    "ZooClassifier",
    "count_parameters",
    "freeze_for_finetune",
    "load_pretrained",
    "param_groups",
    "reset_head",
    "resnet18",
    "timm_model",
    "torchvision_model",
    "wide_resnet28_2",
]
