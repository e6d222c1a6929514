"""The stock MMBench-CN functions, and the static (rule-based) scoring the stock MMBench-EN dev task uses."""
from lmms_eval.tasks.mmbench.cn_utils import (  # noqa: F401 - the task's doc_to_* and process_results
    mmbench_doc_to_text,
    mmbench_doc_to_visual,
    mmbench_evaluator,
    mmbench_process_results,
)


def mmbench_aggregate_dev_results_static(results, args) -> float:
    """Overall accuracy (%) with circular evaluation, answer letters extracted by rules (no OpenAI API)."""
    overall, _, _ = mmbench_evaluator.eval_result(results, eval_method="static")
    return overall * 100
