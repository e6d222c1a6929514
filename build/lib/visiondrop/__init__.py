"""Training-free visual-token reduction for Hugging Face LLaVA models.

    handle = visiondrop.apply(model, method="visiondrop", budget=64)
    model.generate(**inputs)          # runs pruned; handle.trace describes the last forward
    handle.remove()                   # the model is exactly as before
"""
__all__ = ["METHODS", "Handle", "apply", "build_policy"]


def __getattr__(name: str):
    # Lazy: lmms-eval imports visiondrop.harness.manifest on every run; it should not pay for torch here.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'visiondrop' has no attribute {name!r}")
