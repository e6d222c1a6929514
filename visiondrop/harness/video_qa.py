"""Open-ended video QA (MSVD-QA, MSRVTT-QA, TGIF-QA) as lmms-eval tasks, judged by the Video-ChatGPT protocol.

The tasks (`visiondrop/harness/tasks/video_qa/`) read one JSON list of docs, {question_id, question, answer,
video: absolute path}, which `prepare` writes from a dataset as its release ships it:

    python -m visiondrop.harness.video_qa msvd /data/MSVD_Zero_Shot_QA --out data/msvd_qa_test.json

Layouts read (found by their files under the root):
- Video-ChatGPT / Video-LLaVA's `GPT_Zero_Shot_QA/<SET>_Zero_Shot_QA/`: `test_q.json` (video_name, question,
  question_id) and `test_a.json` (answer, type, question_id), videos in `videos/` (any extension);
- MSVD-QA (Xu et al. 2017): `test_qa.json` (answer, id, question, video_id) and `youtube_mapping.txt`
  (`<clip> vid<N>`), videos `YouTubeClips/<clip>.avi` (or `videos/`);
- MSRVTT-QA: `test_qa.json` with numeric video_id, videos `video<id>.mp4` in `videos/` (or the root);
- TGIF-QA (Jang et al. 2017): `Test_frameqa_question.tsv` (gif_name, question, answer, ...), videos
  `<gif_name>.gif` in `gifs/` (or `videos/`).
ActivityNet-QA (`activitynet_qa`) reads lmms-eval/ActivityNetQA's docs as released, with the stock `activitynetqa`
prompt and video lookup, and scores with `process_results` below.
Videos are decoded with PyAV, 8 frames sampled uniformly (`visiondrop.harness.video`). The tasks never call the
judge: the harness stores the answers first and judges the stored record after (`visiondrop.harness.judge`), or
`scripts/judge.py` does later, so a judge fault loses no answer and lmms-eval's retries repeat no judge call.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .judge import summary

DATASETS = ("msvd", "msrvtt", "tgif")
VIDEO_DIRS = ("videos", "YouTubeClips", "gifs", ".")


# -- lmms-eval hooks --------------------------------------------------------------------------------------------
def doc_to_visual(doc: dict) -> list[str]:
    return [doc["video"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict:
    """The answer, unjudged: one entry, aggregated into accuracy and score once judged (`judge.judge_record`)."""
    # judged entries only carry "accuracy" and "score" (lmms-eval's standard error reads "score" where present)
    entry = {"question_id": doc["question_id"], "question": doc["question"], "answer": doc["answer"],
             "pred": results[0].strip()}
    return {"accuracy": entry, "score": entry}


def aggregate_accuracy(entries: list[dict]) -> float | None:
    return summary(entries)["accuracy"]


def aggregate_score(entries: list[dict]) -> float | None:
    return summary(entries)["score"]


# -- preparing the docs from a release ----------------------------------------------------------------------------
def prepare(dataset: str, root: str | Path, videos: str | Path | None = None) -> list[dict]:
    """The docs of `dataset`'s test questions under `root` (see the module docstring), each video found on disk."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    root = Path(root)
    if (root / "test_q.json").exists():
        questions = json.loads((root / "test_q.json").read_text())
        answers = {a["question_id"]: a["answer"] for a in json.loads((root / "test_a.json").read_text())}
        rows = [(q["question_id"], q["question"], answers[q["question_id"]], q["video_name"]) for q in questions]
    elif dataset == "tgif" and (root / "Test_frameqa_question.tsv").exists():
        with open(root / "Test_frameqa_question.tsv", newline="") as f:
            rows = [(f"{r['gif_name']}_{i}", r["question"], r["answer"], r["gif_name"])
                    for i, r in enumerate(csv.DictReader(f, delimiter="\t"))]
    elif (root / "test_qa.json").exists():
        names = {}
        if dataset == "msvd":
            mapping = (root / "youtube_mapping.txt").read_text().split()
            names = {int(vid.removeprefix("vid")): clip for clip, vid in zip(mapping[::2], mapping[1::2])}
        rows = [(q["id"], q["question"], q["answer"],
                 names[q["video_id"]] if dataset == "msvd" else f"video{q['video_id']}")
                for q in json.loads((root / "test_qa.json").read_text())]
    else:
        raise FileNotFoundError(f"{root}: no test_q.json + test_a.json, test_qa.json or Test_frameqa_question.tsv "
                                "(see visiondrop.harness.video_qa for the layouts read)")
    folders = [Path(videos)] if videos else [root / d for d in VIDEO_DIRS if (root / d).is_dir()]
    found = {p.stem: p for folder in folders for p in folder.iterdir() if p.is_file()}
    missing = sorted({name for *_, name in rows if name not in found})
    if missing:
        raise FileNotFoundError(f"{len(missing)} video(s) of {dataset} not found in {', '.join(map(str, folders))}, "
                                f"e.g. {missing[0]!r} (pass --videos FOLDER)")
    return [{"question_id": str(qid), "question": question, "answer": str(answer),
             "video": str(found[name].absolute())} for qid, question, answer, name in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the docs file of a video-QA task from its release.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("root", help="the release's folder (question/answer files, videos)")
    parser.add_argument("--videos", help="the videos' folder, if not under the root")
    parser.add_argument("--out", required=True, help="the docs JSON to write (point the benchmark's data at it)")
    args = parser.parse_args(argv)
    docs = prepare(args.dataset, args.root, args.videos)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(docs))
    print(f"{len(docs)} questions -> {args.out}")


if __name__ == "__main__":
    main()
