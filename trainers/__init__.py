"""Model, data and trainer for MLA language models."""

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig, build, to_dict
from .data import MQARSource, WindowSource, load_data
from .model import LanguageModel, build_model
from .trainer import load_checkpoint, train

__all__ = [
    "ConfigError",
    "DataConfig",
    "LanguageModel",
    "MQARSource",
    "ModelConfig",
    "TrainConfig",
    "WindowSource",
    "build",
    "build_model",
    "load_checkpoint",
    "load_data",
    "to_dict",
    "train",
]
