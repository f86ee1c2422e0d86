"""Model, data, head pruning and trainer for MLA language models."""

from .config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PruningConfig,
    TrainConfig,
    build,
    to_dict,
)
from .data import MQARSource, WindowSource, load_data
from .model import LanguageModel, build_model
from .pruning import HeadPruner, compact
from .trainer import load_checkpoint, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "HeadPruner",
    "LanguageModel",
    "MQARSource",
    "ModelConfig",
    "PruningConfig",
    "TrainConfig",
    "WindowSource",
    "build",
    "build_model",
    "compact",
    "load_checkpoint",
    "load_data",
    "to_dict",
    "train",
]
