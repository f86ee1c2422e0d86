"""Model, data and trainer for MLA language models."""

from .config import ConfigError, DataConfig, ModelConfig, TrainConfig, build, to_dict

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "build", "to_dict"]
