"""lmms-eval model registration (entry-point group `lmms_eval.models`): the id `pruned_lvlm`.

lmms-eval loads this on every run, so it names the class by path instead of importing it.
"""
from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(model_id="pruned_lvlm", simple_class_path="visiondrop.harness.lmms_model.PrunedLVLM")
