"""The visiondrop_demo task: YAML, lmms-eval hooks (utils.py) and its data (demo.parquet, written by visiondrop/demo/task_data.py)."""
