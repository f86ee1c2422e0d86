"""AutoMLA: architecture search for Multi-Level Attention language models."""

__version__ = "0.1.0"
