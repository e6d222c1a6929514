"""lmms-eval hooks of the video-QA tasks (msvd_qa, msrvtt_qa, tgif_qa, activitynet_qa): see harness/video_qa.py."""
from visiondrop.harness.video_qa import (  # noqa: F401
    aggregate_accuracy,
    aggregate_score,
    doc_to_text,
    doc_to_visual,
    process_results,
)
