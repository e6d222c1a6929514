"""The visiondrop_demo task: YAML, lmms-eval hooks (utils.py) and its data generator (make_data.py)."""
