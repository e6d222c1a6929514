"""Training-free visual-token reduction for Hugging Face LLaVA models.

    handle = visiondrop.apply(model, method="visiondrop", budget=64)
    model.generate(**inputs)          # runs pruned; handle.trace describes the last forward
    handle.remove()                   # the model is exactly as before
"""
from .api import METHODS, Handle, apply, build_policy

__all__ = ["METHODS", "Handle", "apply", "build_policy"]
