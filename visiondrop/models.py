"""Re-export: `ModelInfo` now lives with the model-family adapters (`visiondrop.families`), which produce it."""
from .families.base import ModelInfo

__all__ = ["ModelInfo"]
