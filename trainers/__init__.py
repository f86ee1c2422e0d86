"""Model, data, head pruning and trainer for MLA language models."""

from .benchmark import DeviceLock, measure_throughput
from .config import (
    BenchmarkConfig,
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
    "BenchmarkConfig",
    "DeviceLock",
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
    "measure_throughput",
    "to_dict",
    "train",
]
