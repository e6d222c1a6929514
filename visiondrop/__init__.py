"""Training-free visual-token reduction for Hugging Face LLaVA models.

    handle = visiondrop.apply(model, method="visiondrop", budget=64)
    model.generate(**inputs)          # runs pruned; handle.trace describes the last forward
    handle.remove()                   # the model is exactly as before
"""
__all__ = ["METHODS", "Handle", "apply", "build_policy"]

#: The import order of the packages, bottom first: a module imports only from its own layer or those below
#: (tests/test_layers.py checks every import, lazy ones included). A name covers its submodules, except the root
#: package, the facade over `api`, which stands for itself only.
LAYERS = (
    ("visiondrop.core", "visiondrop.stack"),  # shared value types; the stack's version checks
    ("visiondrop.families", "visiondrop.testing"),  # model-family adapters; tiny-model builders beside them
    ("visiondrop.engine",),  # the mechanics: layer loop, encoder cut, scoring, merging, trace
    ("visiondrop.methods", "baselines"),  # the registry and VisionDrop's policy; one module per baseline
    ("visiondrop.api", "visiondrop"),  # apply / remove
    ("visiondrop.efficiency",),  # FLOPs and latency
    ("visiondrop.harness",),  # configs, jobs, the results store, lmms-eval, tables
    ("visiondrop.demo",),  # the built-in tiny setup
)


def __getattr__(name: str):
    # Lazy: lmms-eval imports visiondrop.harness.manifest on every run; it should not pay for torch here.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'visiondrop' has no attribute {name!r}")
