"""What lmms-eval 0.7.3's stock video task modules need at import, on the locked stack (no decord).

- LongVideoBench (`longvideobench_val_v`): its `utils.py` imports decord at the top, for the interleaved variant
  (`longvideobench_val_i`, which decodes frames itself); the `_v` task gives each video's path, which the plugin
  decodes with PyAV (`harness.video`). `install_decord_stand_in` puts a stand-in module under the name `decord`
  (when no real decord is importable) so that the module loads; the stand-in's reader refuses to decode, naming
  what to use instead, so no task silently decodes with it.
- ActivityNet-QA (`activitynetqa`, whose prompt and video lookup the project's `activitynet_qa` task reuses): its
  `utils.py` reads `os.environ["HF_HOME"]` at import; `prepare` sets it to huggingface_hub's own default where it is
  unset, where the stock tasks look for videos either way.

The plugin calls `prepare` when it is built, before lmms-eval loads any task (the harness and the lmms-eval CLI
both build the model first).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any


class StandInVideoReader:
    """decord's `VideoReader` in name only: decoding goes through the plugin's PyAV reader instead."""

    def __init__(self, uri: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"decord is not installed (the locked stack reads videos with PyAV), so {uri!r} cannot be decoded here: "
            "use the task variant that gives video paths (e.g. longvideobench_val_v, not _i), which the pruned_lvlm "
            "plugin decodes with PyAV")


def cpu(device_id: int = 0) -> int:
    """decord's CPU context, which the stock modules pass to `VideoReader`."""
    return device_id


def install_decord_stand_in() -> bool:
    """Make `import decord` succeed with the stand-in unless a real decord is importable; True if installed."""
    if "decord" in sys.modules or importlib.util.find_spec("decord") is not None:
        return False
    module = types.ModuleType("decord", "visiondrop's stand-in for decord (visiondrop.harness.stock_tasks)")
    module.VideoReader, module.cpu = StandInVideoReader, cpu
    sys.modules["decord"] = module
    return True


def prepare() -> None:
    """Everything the stock video task modules need before lmms-eval imports them (module docstring)."""
    install_decord_stand_in()
    if "HF_HOME" not in os.environ:
        from huggingface_hub import constants

        os.environ["HF_HOME"] = constants.HF_HOME
