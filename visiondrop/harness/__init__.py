"""The evaluation harness around the engine: the lmms-eval plugin model and the local benchmark tasks.

Kept import-light: lmms-eval imports `visiondrop.harness.manifest` on every run to register `pruned_lvlm`.
"""
from pathlib import Path

#: lmms-eval task folder shipped with the project; pass it as `--include_path` / `TaskManager(include_path=...)`.
TASKS_DIR = Path(__file__).parent / "tasks"
