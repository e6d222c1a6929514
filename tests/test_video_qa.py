"""Video QA through the harness. Open-ended: docs from a release's layout, the plugin on a tiny Video-LLaVA, the
Video-ChatGPT judge on a local stub endpoint (127.0.0.1, no network), judging later, and the key kept secret.
Multiple choice: the stock lmms-eval MVBench and Video-MME tasks on local data in their releases' formats."""
import json
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer, GenerationConfig

from test_harness import config
from visiondrop.families import ModelInfo
from visiondrop.harness import app, job, judge, video_qa
from visiondrop.harness.store import read_samples
from visiondrop.methods import policy_for
from visiondrop.testing.videos import write_demo_video

KEY = "sk-test-secret-0123456789"
QUESTIONS = [("q1", "Is the shape red?", "yes", "clip0"), ("q2", "What moves across the video?", "a circle", "clip1")]


class StubJudge(BaseHTTPRequestHandler):
    """Answers as the judge does: 'yes' (score 4) for questions about colour, 'no' (score 1) otherwise; a model
    named "...-harsh" says 'no' (score 0) to everything."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        verdict = "{'pred': 'no', 'score': 0}" if body["model"].endswith("-harsh") else \
            "{'pred': 'yes', 'score': 4}" if "Question: Is the shape red?" in body["messages"][1]["content"] else \
            "{'pred': 'no', 'score': 1}"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StubJudge.requests = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.fixture
def no_judge(monkeypatch):
    for name in (judge.ENV_MODEL, judge.ENV_BASE_URL, judge.ENV_KEY_NAME, judge.DEFAULT_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def test_a_sweeps_later_job_without_a_judge_does_not_inherit_an_earlier_jobs(no_judge, monkeypatch):
    judge.configure("judge-a", "http://127.0.0.1:1/v1", "KEY_A")
    judge.configure(None, None, None)  # the next job of the sweep sets none: the environment's own (none here)
    assert all(name not in os.environ for name in (judge.ENV_MODEL, judge.ENV_BASE_URL, judge.ENV_KEY_NAME))
    monkeypatch.setenv(judge.ENV_MODEL, "own-judge")
    judge.configure("judge-b", None, None)
    assert os.environ[judge.ENV_MODEL] == "judge-b"
    judge.configure(None, None, None)
    assert os.environ[judge.ENV_MODEL] == "own-judge"


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory):
    """A Video-ChatGPT-layout release (test_q.json, test_a.json, videos/) turned into the task's docs file."""
    root = tmp_path_factory.mktemp("MSVD_Zero_Shot_QA")
    for i, (_, _, _, name) in enumerate(QUESTIONS):
        write_demo_video(root / "videos" / f"{name}.mp4", seed=i, length=12)
    (root / "test_q.json").write_text(json.dumps([{"video_name": v, "question": q, "question_id": i}
                                                  for i, q, _, v in QUESTIONS]))
    (root / "test_a.json").write_text(json.dumps([{"answer": a, "type": 0, "question_id": i}
                                                  for i, _, a, _ in QUESTIONS]))
    docs = video_qa.prepare("msvd", root)
    path = root / "docs.json"
    path.write_text(json.dumps(docs))
    return path


def test_prepare_reads_the_releases_layouts(docs_file, tmp_path):
    docs = json.loads(docs_file.read_text())
    assert [(d["question_id"], d["question"], d["answer"]) for d in docs] == [q[:3] for q in QUESTIONS]
    assert all(d["video"].endswith(f"/videos/{q[3]}.mp4") for d, q in zip(docs, QUESTIONS))
    (tmp_path / "test_qa.json").write_text(json.dumps([{"answer": "dog", "id": 5, "question": "what runs?",
                                                        "video_id": 7010}]))  # MSRVTT-QA as released
    write_demo_video(tmp_path / "videos" / "video7010.mp4", seed=3, length=8)
    [doc] = video_qa.prepare("msrvtt", tmp_path)
    assert doc["question_id"] == "5" and doc["video"].endswith("video7010.mp4")
    (tmp_path / "videos" / "video7010.mp4").unlink()
    with pytest.raises(FileNotFoundError, match="1 video\\(s\\) of msrvtt not found .* 'video7010'"):
        video_qa.prepare("msrvtt", tmp_path)


def qa_config(tmp_path, tiny_video_dir, docs_file):
    cfg = config(tmp_path, "model=video-llava-7b", f"model.pretrained={tiny_video_dir}", "model.device=cpu",
                 "model.dtype=float32", "method=visiondrop", "budget.ratio=0.25", "benchmarks=video_qa", "limit=null")
    [msvd] = [b for b in cfg.benchmarks if b.task == "msvd_qa"]
    msvd.data.dataset_kwargs.data_files.test = str(docs_file)
    cfg.benchmarks = [msvd]
    return cfg


def test_judged_run_records_the_judge_and_never_the_key(tmp_path, tiny_video_dir, docs_file, endpoint, no_judge,
                                                        monkeypatch):
    monkeypatch.setenv(judge.DEFAULT_KEY_ENV, KEY)
    cfg = qa_config(tmp_path, tiny_video_dir, docs_file)
    cfg.judge.model, cfg.judge.base_url = "stub-judge-1", endpoint
    [record] = job.run_job(cfg)
    assert record["score"] == 50.0 and record["metrics"]["score,none"] == 2.5  # one yes (4), one no (1)
    assert record["judge"] == {"model": "stub-judge-1", "base_url": endpoint, "protocol": "video-chatgpt"}
    assert record["docs"] == 2 and record["measured_tokens"] == 514  # 25% of 8 x 257 video tokens
    assert len(StubJudge.requests) == 2
    assert all(r["auth"] == f"Bearer {KEY}" and r["body"]["model"] == "stub-judge-1" and
               r["path"] == "/v1/chat/completions" for r in StubJudge.requests)
    path = tmp_path / "runs"
    written = "".join(p.read_text() for p in path.rglob("*") if p.is_file())
    assert "stub-judge-1" in written and KEY not in written  # records, answers, maps: the judge but not its key
    assert KEY not in json.dumps(OmegaConf.to_container(cfg))  # what Hydra saves and wandb logs


def test_without_a_judge_answers_are_stored_and_judged_later(tmp_path, tiny_video_dir, docs_file, endpoint,
                                                             no_judge, monkeypatch):
    cfg = qa_config(tmp_path, tiny_video_dir, docs_file)
    [record] = job.run_job(cfg)
    assert record["score"] is None and record["judge"] is None and record["protocol"] == "video-chatgpt"
    samples = read_samples(record["path"])
    assert [s["accuracy"]["question"] for s in samples] == [q[1] for q in QUESTIONS]
    assert all("score" not in s["accuracy"] and s["accuracy"]["pred"] == s["response"] for s in samples)

    monkeypatch.setenv("MY_JUDGE_KEY", KEY)
    judge.main([str(tmp_path / "runs"), "--model", "stub-judge-2", "--base-url", endpoint,
                "--api-key-env", "MY_JUDGE_KEY"])
    judged = json.loads(open(record["path"]).read())
    assert judged["score"] == 50.0 and judged["metrics"]["score,none"] == 2.5
    assert judged["judge"]["model"] == "stub-judge-2" and len(StubJudge.requests) == 2
    assert [s["accuracy"]["score"] for s in map(json.loads, open(record["path"].replace(".json", ".samples.jsonl")))] \
        == [4.0, 1.0]
    assert KEY not in open(record["path"]).read()
    judge.main([str(tmp_path / "runs"), "--model", "stub-judge-2", "--base-url", endpoint,
                "--api-key-env", "MY_JUDGE_KEY"])
    assert len(StubJudge.requests) == 2  # judged records are left alone


def test_another_judge_judges_the_stored_answers_again_and_tables_never_mix_judges(
        tmp_path, tiny_video_dir, docs_file, endpoint, no_judge, monkeypatch, caplog):
    """The judge is no part of the run identity: a job whose record another judge (or none) scored judges the
    stored answers again, without generating them again, and the record names the new judge."""
    from visiondrop.harness.store import ResultStore
    from visiondrop.harness.tables import build_table

    cfg = qa_config(tmp_path, tiny_video_dir, docs_file)
    [unjudged] = job.run_job(cfg)  # no judge: answers stored
    answers = [s["response"] for s in map(json.loads, open(unjudged["path"].replace(".json", ".samples.jsonl")))]
    store = ResultStore(tmp_path / "runs")
    _, note = build_table(store.frame(), None, "video-llava-7b")
    assert "1 cell(s) unjudged" in note

    def decode(*args, **kwargs):
        raise AssertionError("a video was decoded: the answers were generated again")

    monkeypatch.setattr("visiondrop.harness.lmms_model.read_frames", decode)
    monkeypatch.setenv(judge.DEFAULT_KEY_ENV, KEY)
    cfg.judge.base_url = endpoint
    runs = {}
    for model in ("stub-judge-1", "stub-judge-harsh"):
        cfg.judge.model = model
        with caplog.at_level("INFO"):
            [runs[model]] = job.run_job(cfg)
        assert runs[model]["path"] == unjudged["path"]  # the same run's record, rewritten
        assert runs[model]["judge"] == {"model": model, "base_url": endpoint, "protocol": "video-chatgpt"}
        samples = read_samples(unjudged["path"])
        assert [s["response"] for s in samples] == answers and all(s["accuracy"]["judge"]["model"] == model
                                                                   for s in samples)
    assert [r["body"]["model"] for r in StubJudge.requests] == ["stub-judge-1"] * 2 + ["stub-judge-harsh"] * 2
    assert runs["stub-judge-1"]["score"] == 50.0 and "earlier_judges" not in runs["stub-judge-1"]
    harsh = json.loads(open(unjudged["path"]).read())
    assert harsh["score"] == 0.0 and harsh["metrics"]["score,none"] == 0.0
    assert [(e["judge"]["model"], e["score"], e["metrics"]["score"]) for e in harsh["earlier_judges"]] == \
        [("stub-judge-1", 50.0, 2.5)]
    assert f"replaced the scores of stub-judge-1 at {endpoint} (accuracy 50.0)" in caplog.text
    assert job.run_job(cfg) == [] and len(StubJudge.requests) == 4  # judged by the configured judge: skipped

    judge.main([str(tmp_path / "runs"), "--model", "stub-judge-1", "--base-url", endpoint])
    assert len(StubJudge.requests) == 4 and "left alone 1 record(s) judged by another judge" in caplog.text
    judge.main([str(tmp_path / "runs"), "--model", "stub-judge-1", "--base-url", endpoint, "--rejudge"])
    assert len(StubJudge.requests) == 6 and json.loads(open(unjudged["path"]).read())["score"] == 50.0

    table, note = build_table(store.frame(), None, "video-llava-7b")
    assert table["MSVD-QA"].tolist() == [50.0] and f"judged by stub-judge-1 at {endpoint}" in note
    other = {**json.loads(open(unjudged["path"]).read()), "method": "fastv", "key": "0" * 16, "score": 0.0,
             "judge": {"model": "stub-judge-harsh", "base_url": endpoint, "protocol": "video-chatgpt"}}
    store.write({**other, "identity": {**other["identity"], "method": "fastv"}})
    with pytest.raises(ValueError, match="scored by 2 judges, which one table must not mix") as refused:
        build_table(store.frame(), None, "video-llava-7b")
    assert f"stub-judge-1 at {endpoint}: VisionDrop 514 on MSVD-QA" in str(refused.value)
    assert f"stub-judge-harsh at {endpoint}: FastV 514 on MSVD-QA" in str(refused.value)

    logged = []  # the Hydra app logs records judged again to the job's wandb run, as evaluated ones

    @contextmanager
    def job_run(cfg, label):
        yield lambda record, samples: logged.append((record, samples))

    monkeypatch.setattr("visiondrop.harness.dashboard.job_run", job_run)
    cfg.judge.model = "stub-judge-harsh"
    outcome = app.run(cfg)
    assert outcome.status == "ran" and outcome.records == [unjudged["path"]]
    assert outcome.reason == f"1 stored record(s) judged again by stub-judge-harsh at {endpoint}, answers not " \
        "generated again"
    [(record, samples)] = logged
    assert record["score"] == 0.0 and [s["accuracy"]["score"] for s in samples] == [0.0, 0.0]
    assert app.run(cfg).status == "done" and len(logged) == 1 and len(StubJudge.requests) == 8
    written = "".join(p.read_text() for p in (tmp_path / "runs").rglob("*") if p.is_file())
    assert KEY not in written and KEY not in caplog.text


def test_a_judge_without_its_key_fails_before_any_video_is_decoded(tmp_path, tiny_video_dir, docs_file, no_judge,
                                                                   monkeypatch):
    def decode(*args, **kwargs):
        raise AssertionError("a video was decoded")

    monkeypatch.setattr("visiondrop.harness.lmms_model.read_frames", decode)
    monkeypatch.setattr("visiondrop.harness.video.read_frames", decode)
    cfg = qa_config(tmp_path, tiny_video_dir, docs_file)
    cfg.judge.model = "gpt-4o-mini"
    with pytest.raises(judge.JudgeConfigError, match="needs an API key in the environment variable "
                                                     "VISIONDROP_JUDGE_API_KEY, which is not set"):
        job.run_job(cfg)


def test_video_table_sets_the_papers_mean_beside_ours(tmp_path):
    from test_tables import record, write

    from visiondrop.harness.store import ResultStore
    from visiondrop.harness.tables import build_table

    rows = []
    for method, budget, scores in (("none", None, (50.0, 70.0, 60.0)), ("visiondrop", 257.0, (45.0, 66.0, 30.0))):
        for bench, score in zip(("TGIF-QA", "MSVD-QA", "MSRVTT-QA"), scores):
            rows.append({**record(method, budget, bench, score), "model": "video-llava-7b"})
    frame = write(ResultStore(tmp_path), *rows)
    table, note = build_table(frame, "results/paper/paper_tables.csv", "video-llava-7b")
    row = table.loc[("VisionDrop", 257.0)]
    assert row["Mean"] == 47.0 and row["Mean paper"] == 47.3 and abs(row["Mean diff"] + 0.3) < 1e-9
    assert table["Mean"].iloc[0] == 60.0  # the full model's row comes first
    assert "Mean: plain mean of the columns" in note


def answering(letter: str, tiny_video_dir, folder):
    """A copy of the tiny Video-LLaVA whose generation config (a stock `generate` option, `sequence_bias`) makes it
    answer `letter` and stop: its answers are generated by the model and known, so the stock scoring's result is."""
    shutil.copytree(tiny_video_dir, folder)
    [token] = AutoTokenizer.from_pretrained(folder)(letter, add_special_tokens=False).input_ids
    generation = GenerationConfig.from_pretrained(folder)
    generation.sequence_bias = [[[token], 100.0], [[token, generation.eos_token_id], 200.0]]
    generation.save_pretrained(folder)
    return folder


def offline(monkeypatch):
    """Any connection beyond the loopback address fails (HF_HUB_OFFLINE is set too, by conftest)."""
    connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


@pytest.mark.parametrize("frames", [None, 4])
def test_stock_mvbench_task_runs_on_local_data(tmp_path, tiny_video_dir, no_judge, monkeypatch, frames):
    """Multiple choice through lmms-eval's own `mvbench_action_sequence`: annotations from a local file (`data`),
    videos where the stock task looks for them ($HF_HOME/mvbench_video/star/Charades_segment); a model that answers
    "B" gets the question whose answer is the second candidate right and the other wrong. Videos are sampled to the
    checkpoint's 8 frames, or to `model.frames`, which is part of the records' identity."""
    offline(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    candidates = ["It stopped.", "It turned red.", "It vanished."]
    docs = []
    for i in range(2):
        write_demo_video(tmp_path / "hf" / "mvbench_video" / "star" / "Charades_segment" / f"v{i}.mp4", seed=i,
                         length=10)
        docs.append({"video": f"v{i}.mp4", "question": "What happened after the shape moved?",
                     "candidates": candidates, "answer": candidates[i]})  # A, then B
    (tmp_path / "action_sequence.json").write_text(json.dumps(docs))
    model = answering("B", tiny_video_dir, tmp_path / "answers_b")
    cfg = config(tmp_path, "model=video-llava-7b", f"model.pretrained={model}", "model.device=cpu",
                 "model.dtype=float32", "method=fastv", "budget.ratio=0.25", "benchmarks=video_mc", "limit=null",
                 *([] if frames is None else [f"model.frames={frames}"]))
    [bench] = [b for b in cfg.benchmarks if b.task == "mvbench_action_sequence"]
    bench.data = {"dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"train": str(tmp_path / "action_sequence.json")}}}
    cfg.benchmarks = [bench]
    [record] = job.run_job(cfg)
    samples = read_samples(record["path"])
    assert [s["response"] for s in samples] == ["B", "B"]
    assert [s["mvbench_accuracy"]["score"] for s in samples] == [0, 1]
    assert record["task"] == "mvbench_action_sequence" and record["docs"] == 2 and record["score"] == 50.0
    assert abs(record["measured_tokens"] - 257 * (frames or 8) / 4) < 2  # 25% of the video's tokens, FastV's rounding
    assert record["identity"]["preprocessing"].get("frames") == frames == record["run_info"].get("frames")


# Video-MME rows as lmms-lab/Video-MME ships them (videomme/test-00000-of-00001.parquet): two videos, five questions,
# categories from the stock task's lists (its scoring keys on them), options written "A. ...", answers as letters.
VIDEOMME = [("001", "fFjv93ACGo8", "short", "Knowledge", "Humanity & History", [
                ("Counting Problem", "How many shapes are there?", "B"),
                ("Object Recognition", "Which shape is shown?", "A"),
                ("Attribute Perception", "What colour is the shape?", "C")]),
            ("002", "JspVuT6rsLA", "medium", "Sports Competition", "Football", [
                ("Action Recognition", "What does the shape do?", "B"),
                ("Temporal Reasoning", "What happens last?", "D")])]


def test_stock_videomme_task_runs_on_a_local_copy_of_the_release(tmp_path, tiny_video_dir, no_judge, monkeypatch):
    """lmms-eval's own `videomme` (prompt, answer extraction, scoring): the questions from a local parquet (`data`),
    the videos where the stock task looks for them ($HF_HOME/videomme/data/<videoID>.mp4, as the release's
    videos_chunked_*.zip unpack); a model that answers "B" scores the share of questions whose answer is B."""
    offline(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = []
    for seed, (video_id, youtube_id, duration, domain, sub_category, questions) in enumerate(VIDEOMME):
        write_demo_video(tmp_path / "hf" / "videomme" / "data" / f"{youtube_id}.mp4", seed=seed, length=10)
        for number, (task_type, question, answer) in enumerate(questions, 1):
            rows.append({"video_id": video_id, "duration": duration, "domain": domain, "sub_category": sub_category,
                         "url": f"https://www.youtube.com/watch?v={youtube_id}", "videoID": youtube_id,
                         "question_id": f"{video_id}-{number}", "task_type": task_type, "question": question,
                         "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": answer})
    parquet = tmp_path / "Video-MME" / "videomme" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(parquet)
    model = answering("B", tiny_video_dir, tmp_path / "answers_b")
    cfg = config(tmp_path, "model=video-llava-7b", f"model.pretrained={model}", "model.device=cpu",
                 "model.dtype=float32", "method=fastv", "budget.ratio=0.25", "benchmarks=video_mc", "limit=null")
    [bench] = [b for b in cfg.benchmarks if b.task == "videomme"]
    bench.data = {"dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": str(parquet)}}}
    cfg.benchmarks = [bench]
    last = tmp_path / "hf" / "videomme" / "data" / f"{VIDEOMME[-1][1]}.mp4"
    last.rename(last.with_suffix(".missing"))  # the stock task sys.exit()s on it: the job fails, naming the video
    stopped = rf"benchmark Video-MME: lmms-eval task 'videomme_local' stopped: .*{last.name}"
    with pytest.raises(RuntimeError, match=stopped):
        job.run_job(cfg)
    last.with_suffix(".missing").rename(last)
    [record] = job.run_job(cfg)
    samples = read_samples(record["path"])
    answers = [row["answer"] for row in rows]
    assert [s["target"] for s in samples] == answers and [s["response"] for s in samples] == ["B"] * len(rows)
    assert [s["videomme_perception_score"]["score"] for s in samples] == [float(a == "B") for a in answers]
    assert record["task"] == "videomme" and record["docs"] == len(rows)
    assert record["score"] == 100 * answers.count("B") / len(answers) == 40.0  # metric in %, scale 1
    assert abs(record["measured_tokens"] - 514) < 2  # 25% of a video's 2,056 tokens, FastV's rounding


def test_the_video_experiment_reaches_every_budget_it_sweeps():
    """Every job of `experiment=video` reaches its retention ratio on Video-LLaVA-7B (none is skipped as
    unreachable), within one token a frame in the method's own count."""
    configs = Path(__file__).parents[1] / "configs"
    sweep = OmegaConf.load(configs / "experiment" / "video.yaml").hydra.sweeper.params
    info = ModelInfo(n_visual=2056, n_layers=32, vision_layer=22, cls_kept=True, crops=8, video=True)
    methods = [OmegaConf.load(configs / "method" / f"{choice}.yaml") for choice in sweep.method.split(",")]
    assert {m.name for m in methods} == {"none", "visiondrop", "fastv", "pyramiddrop", "sparsevlm", "visionzip"}
    for chosen in (m for m in methods if m.name != "none"):  # the unpruned model takes no budget
        for ratio in (float(r) for r in str(sweep["budget.ratio"]).split(",")):
            described = policy_for(info, chosen.name, ratio=ratio, **chosen.options).describe()
            assert abs(described["equivalent_tokens"] - ratio * 2056) <= 8, (chosen.name, ratio, described)
