"""Reference PyTorch model of the DeepSeek-V3 architecture (the numerical oracle)."""

from dsv3_export.reference.args import PRESETS, ConfigError, ModelArgs
from dsv3_export.reference.model import Transformer, count_parameters

__all__ = ["PRESETS", "ConfigError", "ModelArgs", "Transformer", "count_parameters"]
