"""Judging stored open-ended answers on a loopback stub judge (127.0.0.1): a bounded pool of concurrent requests,
Retry-After and back-off, a failure cap, and every kind of judge fault part-way through leaving the record with its
answers, the verdicts obtained and judging marked incomplete; judging again asks only for what is missing."""
import json
import os
import threading
import urllib.error
from email.message import Message
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from test_tables import record as table_record
from test_video_qa import QUESTIONS as QA, docs_file  # noqa: F401 (a fixture)
from visiondrop.harness import judge
from visiondrop.harness.store import ResultStore, read_samples
from visiondrop.harness.tables import INCOMPLETE, build_table
from visiondrop.testing.judge_stub import StubJudge, completion

KEY_ENV = "TEST_JUDGE_KEY"
QUESTIONS = [f"Question {i}?" for i in range(8)]


@pytest.fixture(autouse=True)
def key(monkeypatch):
    """The judge's key set; the judge settings scripts/judge.py puts into the environment undone afterwards."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    for name in (judge.ENV_MODEL, judge.ENV_BASE_URL, judge.ENV_KEY_NAME):
        monkeypatch.delenv(name, raising=False)


def yes_for_even(body: dict) -> str:
    """'yes' (score 4) for even-numbered questions, 'no' (score 1) for odd ones."""
    number = int(body["messages"][1]["content"].split("Question: Question ")[1].split("?")[0])
    return "{'pred': 'yes', 'score': 4}" if number % 2 == 0 else "{'pred': 'no', 'score': 1}"


def asked(stub: StubJudge) -> list[str]:
    return [r["body"]["messages"][1]["content"].split("\n")[2].removeprefix("Question: ") for r in stub.requests]


def make_judge(stub: StubJudge, **settings) -> judge.Judge:
    return judge.Judge("stub-judge", stub.url, KEY_ENV, **{"backoff_s": 0.01, "attempts": 2, **settings})


def stored_answers(tmp_path) -> str:
    """A video-QA record as a job stores it before judging: every answer, no verdict."""
    entries = [{"question_id": str(i), "question": q, "answer": "yes", "pred": f"answer {i}"}
               for i, q in enumerate(QUESTIONS)]
    record = {**table_record("visiondrop", 64.0, "MSVD-QA", None), "model": "video-llava-7b", "metric": "accuracy",
              "metrics": {"accuracy,none": None, "score,none": None}, "protocol": "video-chatgpt", "scale": 100,
              "judge": None, "judging": {"state": "unjudged", "judged": 0, "answers": len(entries)}}
    samples = [{"doc_id": i, "target": "yes", "response": e["pred"], "accuracy": e} for i, e in enumerate(entries)]
    return str(ResultStore(tmp_path / "runs").write(record, samples))


def test_requests_run_concurrently_up_to_the_bound():
    """Each request waits at a barrier of 4: judging completes only if 4 requests are in flight together, and the
    stub never sees more than the configured 4 (no timing involved)."""
    barrier = threading.Barrier(4, timeout=20)
    with StubJudge(yes_for_even, on_request=lambda body: barrier.wait()) as stub:
        entries = [{"question": q, "answer": "yes", "pred": "yes"} for q in QUESTIONS]
        judged, stopped = judge.judge_entries(entries, make_judge(stub, concurrency=4))
    assert stopped is None and stub.peak == 4 and len(stub.requests) == len(QUESTIONS)
    assert [e["accuracy"] for e in judged] == [1.0, 0.0] * 4 and [e["score"] for e in judged] == [4.0, 1.0] * 4


def test_retry_after_and_jittered_backoff():
    def rate_limited(seconds):
        headers = Message()
        if seconds is not None:
            headers["Retry-After"] = seconds
        return urllib.error.HTTPError("http://127.0.0.1/v1", 429, "Too Many Requests", headers, None)

    j = judge.Judge("m", backoff_s=1.0, max_wait_s=30.0)
    assert j.wait_s(0, rate_limited("7")) == 7.0 and j.wait_s(0, rate_limited("600")) == 30.0  # capped
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    assert 15 < j.wait_s(0, rate_limited(later)) <= 20
    assert 0 <= j.wait_s(0, rate_limited("soon")) <= 1  # unparsable: back-off as without one
    waits = [j.wait_s(3, rate_limited(None)) for _ in range(200)]  # full jitter over [0, 1 s x 2^3]
    assert all(0 <= w <= 8 for w in waits) and max(waits) > 4 and min(waits) < 4
    assert all(0 <= j.wait_s(9, OSError("reset")) <= 30 for _ in range(20))

    # the stub rate-limits the first two requests with Retry-After: 0; each answer is judged in the end
    with StubJudge(yes_for_even, fault=lambda n, body: (429, {"Retry-After": "0"}, b"{}") if n < 2 else None) as stub:
        entries = [{"question": q, "answer": "yes", "pred": "yes"} for q in QUESTIONS[:4]]
        judged, stopped = judge.judge_entries(entries, make_judge(stub, concurrency=1, attempts=3))
    assert stopped is None and len(stub.requests) == 6 and [e["score"] for e in judged] == [4.0, 1.0, 4.0, 1.0]


def test_the_failure_cap_stops_the_run_and_keeps_what_it_has():
    with StubJudge(fault=lambda n, body: (500, {}, b"down") if n >= 2 else None) as stub:
        entries = [{"question": q, "answer": "yes", "pred": "yes"} for q in QUESTIONS]
        judged, stopped = judge.judge_entries(entries, make_judge(stub, concurrency=1, attempts=3, max_failures=4))
    assert "6 of 8 answer(s) unjudged: 4 failed judge requests (judge.max_failures)" in stopped
    assert "HTTP Error 500" in stopped and len(stub.requests) == 2 + 4  # stopped at the cap, nothing more asked
    assert [e.get("score") for e in judged] == [4.0, 4.0] + [None] * 6


def http_500(n, body):
    return (500, {}, b"internal error") if "Question 5?" in body["messages"][1]["content"] else None


def not_a_verdict(n, body):
    return (200, {}, completion("I would say it matches.")) if "Question 5?" in body["messages"][1]["content"] \
        else None


FAULTS = {  # each hits answer 5 only, on every attempt: the seven others are judged
    "http error": (http_500, {}),
    "timeout": (None, {"timeout_s": 0.3}),
    "not a verdict": (not_a_verdict, {}),
}


@pytest.mark.parametrize("fault", [*FAULTS, "missing key"])
def test_a_judge_fault_part_way_keeps_answers_and_verdicts_and_judging_again_asks_only_for_the_rest(
        tmp_path, monkeypatch, fault):
    path = stored_answers(tmp_path)
    answers = [s["response"] for s in read_samples(path)]
    if fault == "missing key":  # the key disappears from the environment after the third request
        seen = []

        def drop_key(body):
            seen.append(body)
            if len(seen) == 3:
                os.environ.pop(KEY_ENV)
        stub, settings = StubJudge(yes_for_even, on_request=drop_key), {"concurrency": 1}
    else:
        respond, settings = FAULTS[fault]
        slow = (lambda body: threading.Event().wait(1.0) if "Question 5?" in body["messages"][1]["content"]
                else None) if fault == "timeout" else None
        stub = StubJudge(yes_for_even, fault=respond, on_request=slow)
    with stub:
        with pytest.raises(judge.JudgingIncomplete, match="judging incomplete, .* answer\\(s\\) unjudged") as err:
            judge.judge_record(path, make_judge(stub, **{"concurrency": 4, **settings}))
        assert "run the job again, or `python scripts/judge.py`" in str(err.value)
        if fault == "missing key":
            assert "needs an API key in the environment variable TEST_JUDGE_KEY" in str(err.value)
        record, samples = json.loads(open(path).read()), read_samples(path)
        verdicts = {s["doc_id"]: s["accuracy"].get("score") for s in samples}
        expected = {i: 4.0 if i % 2 == 0 else 1.0 for i in range(8)}
        judged = {i for i, v in verdicts.items() if v is not None}
        assert [s["response"] for s in samples] == answers  # every answer kept
        assert judged and all(verdicts[i] == expected[i] for i in judged)  # the verdicts obtained, kept
        if fault != "missing key":
            assert judged == set(range(8)) - {5} and len(stub.requests) == 7 + 2  # answer 5 tried `attempts` times
        assert record["judging"]["state"] == "incomplete" and record["judging"]["judged"] == len(judged)
        assert record["score"] is None and record["metrics"]["accuracy,none"] is None  # never a part score
        assert record["judge"]["model"] == "stub-judge" and "earlier_judges" not in record

        frame = ResultStore(tmp_path / "runs").frame()
        table, note = build_table(frame, None, "video-llava-7b")
        assert table[INCOMPLETE].tolist() == ["MSVD-QA"] and table["MSVD-QA"].isna().all()
        assert "1 cell(s) judging incomplete" in note

        monkeypatch.setenv(KEY_ENV, "sk-test")
        stub.fault = stub.on_request = None  # the judge is healthy again
        before = len(stub.requests)
        cli = [str(tmp_path / "runs"), "--model", "stub-judge", "--base-url", stub.url, "--api-key-env", KEY_ENV]
        judge.main(cli)  # as the job again would: only the missing answers are asked for
        retried = asked(stub)[before:]
        assert sorted(int(q.split()[1].rstrip("?")) for q in retried) == sorted(set(range(8)) - judged)
        record = json.loads(open(path).read())
        assert record["judging"] == {"state": "complete", "judged": 8, "answers": 8} and record["score"] == 50.0
        assert [s["accuracy"]["score"] for s in read_samples(path)] == [expected[i] for i in range(8)]
        before = len(stub.requests)
        judge.main(cli)
        assert len(stub.requests) == before  # complete: left alone


def test_scripts_judge_exits_non_zero_when_judging_stops_part_way(tmp_path, capsys):
    path = stored_answers(tmp_path)
    with StubJudge(yes_for_even, fault=http_500) as stub, pytest.raises(SystemExit) as stop:
        judge.main([str(tmp_path / "runs"), "--model", "stub-judge", "--base-url", stub.url,
                    "--api-key-env", KEY_ENV, "--concurrency", "2"])
    assert "1 record(s) judged part-way" in str(stop.value) and path in str(stop.value)


def test_a_job_stores_its_answers_before_a_failing_judge_and_judges_only_the_rest_when_run_again(
        tmp_path, tiny_video_dir, docs_file, monkeypatch):
    """The tiny Video-LLaVA answers two questions; the judge answers HTTP 500 to one of them on every attempt. The
    job fails, but its record holds both answers and the one verdict, and the judge was asked `attempts` times for
    the failing answer (lmms-eval's retries add none); the job again judges only that answer, decoding no video."""
    from omegaconf import open_dict

    from test_video_qa import qa_config
    from visiondrop.harness import job

    monkeypatch.setenv(judge.DEFAULT_KEY_ENV, "sk-test")
    cfg = qa_config(tmp_path, tiny_video_dir, docs_file)
    moves = "What moves across the video?"
    failing = lambda n, body: (500, {}, b"down") if moves in body["messages"][1]["content"] else None  # noqa: E731
    with StubJudge(fault=failing) as stub:
        with open_dict(cfg):
            cfg.judge.update(model="stub-judge", base_url=stub.url, attempts=3, backoff_s=0.01)
        with pytest.raises(judge.JudgingIncomplete, match="judging incomplete, 1 of 2 answer\\(s\\) unjudged"):
            job.run_job(cfg)
        [(path, _)] = ResultStore(tmp_path / "runs").readable()
        record, samples = json.loads(open(path).read()), read_samples(path)
        assert record["judging"]["state"] == "incomplete" and record["score"] is None and record["docs"] == 2
        assert [s["accuracy"]["question"] for s in samples] == [q[1] for q in QA]
        assert [s["accuracy"].get("score") for s in samples] == [4.0, None] and all(s["response"] for s in samples)
        assert asked(stub).count(moves) == 3 and len(stub.requests) == 4

        def decode(*args, **kwargs):
            raise AssertionError("a video was decoded: the answers were generated again")

        monkeypatch.setattr("visiondrop.harness.lmms_model.read_frames", decode)
        stub.fault = None
        [judged] = job.run_job(cfg)
    assert judged["path"] == str(path) and judged["judging"]["state"] == "complete" and judged["score"] == 100.0
    assert asked(stub)[4:] == [moves]  # only the missing verdict was asked for


def test_sigterm_while_judging_keeps_the_verdicts_obtained(tmp_path):
    """SIGTERM (Slurm pre-emption) arrives while the fourth answer is being judged: the job's handler unwinds it,
    and the record keeps the verdicts obtained, marked incomplete."""
    import signal

    from visiondrop.harness.app import Terminated, terminate_cleanly

    path = stored_answers(tmp_path)
    seen = []

    def preempt(body):
        seen.append(body)
        if len(seen) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with StubJudge(yes_for_even, on_request=preempt) as stub, terminate_cleanly(), pytest.raises(Terminated):
        judge.judge_record(path, make_judge(stub, concurrency=1))
    record, samples = json.loads(open(path).read()), read_samples(path)
    scores = [s["accuracy"].get("score") for s in samples]
    assert scores[:3] == [4.0, 1.0, 4.0] and scores[5:] == [None] * 3  # the fourth may or may not have landed
    assert record["judging"]["state"] == "incomplete" and record["judging"]["judged"] == sum(v is not None
                                                                                           for v in scores)
    assert record["score"] is None
