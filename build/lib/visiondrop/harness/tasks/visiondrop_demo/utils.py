"""lmms-eval hooks of the `visiondrop_demo` task: one image, a question, a one-word answer scored by exact match."""
import string


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalize(text):
    """Lower case, punctuation removed, whitespace collapsed: "Yes." and " yes" both read "yes"."""
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
