"""The Video-ChatGPT judge of open-ended video QA, on any OpenAI-compatible chat endpoint; and judging later.

    VISIONDROP_JUDGE_MODEL=gpt-3.5-turbo-0125 VISIONDROP_JUDGE_BASE_URL=https://api.openai.com/v1 \\
        VISIONDROP_JUDGE_API_KEY=... python scripts/judge.py results/runs      # judge stored answers later

The protocol of Video-ChatGPT (Maaz et al. 2023), which the Video-LLaVA papers score MSVD-QA, MSRVTT-QA and
TGIF-QA with: per question the judge reads the question, the reference answer and the prediction and replies with
a Python dict `{'pred': 'yes' | 'no', 'score': 0..5}`; accuracy is the share of "yes", the score the mean. Results
move by several points with the judge model, so the judge (model and base URL) is recorded with every result.

Configuration: the model and base URL come from the harness config (`judge.model`, `judge.base_url`) or the
environment (`VISIONDROP_JUDGE_MODEL`, `VISIONDROP_JUDGE_BASE_URL`); the key only from the environment, from the
variable `judge.api_key_env` names (default `VISIONDROP_JUDGE_API_KEY`), so that it never reaches a record, a log,
a config Hydra saves or wandb. With no judge model configured the answers are stored unjudged (score None) and
`python scripts/judge.py` judges them later.

Nothing generated is lost to the judge: the job stores the answers (atomically, as every record) before any judge
call, and judges the stored record afterwards (`judge_record`), never inside lmms-eval (whose retries of
`process_results` would repeat calls). `judge.concurrency` requests run at once; a 429 or 503 waits its
Retry-After, other faults back off exponentially with full jitter; after `judge.max_failures` failed requests the
run stops. Whatever stops judging part-way leaves the record with every answer, the verdicts obtained and
`judging.state` "incomplete" (no score, tables show the cell as incomplete); the job again, or scripts/judge.py,
judges only the answers still missing a verdict.

The judge is not part of the run identity (the answers do not depend on it): a job whose record was judged by
another judge, or not at all, judges the stored answers again with the configured one instead of skipping or
re-generating (`judge_record`); the record then names the new judge, keeps the replaced judge's numbers in
`earlier_judges`, and the log says what was replaced. Tables refuse to mix judges (`harness.tables`).
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from .store import ResultStore, judge_label, read_record, read_samples

log = logging.getLogger(__name__)

ENV_MODEL, ENV_BASE_URL, ENV_KEY_NAME = "VISIONDROP_JUDGE_MODEL", "VISIONDROP_JUDGE_BASE_URL", "VISIONDROP_JUDGE_API_KEY_ENV"
DEFAULT_KEY_ENV = "VISIONDROP_JUDGE_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

SYSTEM_PROMPT = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and determine if "
    "they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: - Focus on the "
    "meaningful match between the predicted answer and the correct answer.\n- Consider synonyms or paraphrases as "
    "valid matches.\n- Evaluate the correctness of the prediction compared to the answer.")
USER_PROMPT = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {question}\nCorrect Answer: "
    "{answer}\nPredicted Answer: {pred}\n\nProvide your evaluation only as a yes/no and score where the score is an "
    "integer value between 0 and 5, with 5 indicating the highest meaningful match. Please generate the response "
    "in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of "
    "'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR "
    "EXPLANATION. Only provide the Python dictionary string. For example, your response should look like this: "
    "{{'pred': 'yes', 'score': 4.8}}.")


class JudgeConfigError(RuntimeError):
    """A judge is asked for but cannot be used (no key, say)."""


class JudgingIncomplete(RuntimeError):
    """Judging stopped before every answer had a verdict; the record keeps the answers and the verdicts obtained,
    and says so (`judging.state` "incomplete"): the job again, or scripts/judge.py, judges only the rest."""


class AnswerFailed(RuntimeError):
    """One answer's every attempt failed: it stays unjudged, the run goes on (up to its failure cap)."""


class _TooManyFailures(RuntimeError):
    pass


@dataclass(frozen=True)
class Judge:
    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_KEY_ENV
    timeout_s: float = 60.0
    attempts: int = 5  # requests per answer before it is left unjudged
    concurrency: int = 16  # requests in flight at once
    max_failures: int = 100  # failed requests per run before judging stops and keeps what it has
    backoff_s: float = 1.0  # the first retry waits up to this (full jitter), doubling per attempt
    max_wait_s: float = 300.0  # the longest wait between attempts, Retry-After included
    checkpoint_s: float = 60.0  # verdicts are written to the record at least this often while judging

    @classmethod
    def from_env(cls, **settings) -> "Judge | None":
        """The judge the environment configures (with the pool `settings` given), None if no model is set; a
        JudgeConfigError if its key is missing (raised before anything is evaluated)."""
        model = os.environ.get(ENV_MODEL)
        if not model:
            return None
        judge = cls(model, os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL,
                    os.environ.get(ENV_KEY_NAME) or DEFAULT_KEY_ENV,
                    **{k: v for k, v in settings.items() if v is not None})
        judge.api_key()
        return judge

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeConfigError(
                f"the judge {self.model!r} at {self.base_url} needs an API key in the environment variable "
                f"{self.api_key_env}, which is not set: export it (the key is never read from configs), or unset "
                f"{ENV_MODEL} / judge.model to store the answers unjudged and judge them later with scripts/judge.py")
        return key

    def describe(self) -> dict:
        """What a record stores about the judge (never the key)."""
        return {"model": self.model, "base_url": self.base_url, "protocol": "video-chatgpt"}

    def ask(self, question: str, answer: str, pred: str) -> tuple[bool, float]:
        """One request: (the judge says the prediction matches, its 0-5 score); raises on any fault."""
        body = json.dumps({"model": self.model, "temperature": 0, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)}]}).encode()
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key()}"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            content = json.loads(response.read())["choices"][0]["message"]["content"]
        return parse_verdict(content)

    def judge(self, question: str, answer: str, pred: str, run: "_Run | None" = None) -> tuple[bool, float]:
        """`ask` with retries: a reply's Retry-After honoured (429, 503), else exponential back-off with full jitter;
        each failed request counts against the run's `max_failures`. AnswerFailed after `attempts` failures."""
        run = run or _Run(self)
        for attempt in range(self.attempts):
            if run.stop.is_set():  # the run hit its failure cap while this answer waited its turn
                raise _TooManyFailures(run.reason)
            try:
                return self.ask(question, answer, pred)
            except JudgeConfigError:
                raise
            except (OSError, KeyError, IndexError, TypeError, ValueError, SyntaxError) as err:
                # OSError: URLError, HTTPError, timeouts, resets; the others: a reply that is not a verdict
                run.failed(err)
                if attempt == self.attempts - 1:
                    raise AnswerFailed(f"the judge {self.model!r} at {self.base_url} failed {self.attempts} times, "
                                       f"last: {_describe(err)}") from None
                if run.stop.wait(self.wait_s(attempt, err)):
                    raise _TooManyFailures(run.reason)
        raise AssertionError("unreachable")

    def wait_s(self, attempt: int, err: Exception) -> float:
        """Seconds before the next attempt: the server's Retry-After where it sends one, else full jitter."""
        retry_after = err.headers.get("Retry-After") if isinstance(err, urllib.error.HTTPError) and err.headers \
            else None
        if retry_after is not None:
            try:
                seconds = float(retry_after)
            except ValueError:  # an HTTP date
                try:
                    when = parsedate_to_datetime(retry_after)
                    seconds = (when - datetime.now(when.tzinfo or timezone.utc)).total_seconds()
                except (TypeError, ValueError):  # neither: back off as without one
                    seconds = None
            if seconds is not None:
                return min(max(seconds, 0.0), self.max_wait_s)
        return random.uniform(0, min(self.backoff_s * 2 ** attempt, self.max_wait_s))


class _Run:
    """The failure count a judging run shares across its threads; at `max_failures` it stops the run."""

    def __init__(self, judge: Judge):
        self.limit, self.count, self.reason = judge.max_failures, 0, ""
        self.lock, self.stop = threading.Lock(), threading.Event()

    def failed(self, err: Exception) -> None:
        with self.lock:
            self.count += 1
            if self.count >= self.limit and not self.stop.is_set():
                self.reason = f"{self.count} failed judge requests (judge.max_failures), last: {_describe(err)}"
                self.stop.set()
        if self.stop.is_set():
            raise _TooManyFailures(self.reason)


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def parse_verdict(content: str) -> tuple[bool, float]:
    """The judge's reply `{'pred': 'yes', 'score': 4}` (a Python dict literal, maybe in surrounding text)."""
    start, end = content.find("{"), content.rfind("}")
    verdict = ast.literal_eval(content[start:end + 1]) if 0 <= start < end else None
    if not isinstance(verdict, dict) or "pred" not in verdict or "score" not in verdict:
        raise ValueError(f"the judge's reply is not a dict with 'pred' and 'score': {content!r}")
    return str(verdict["pred"]).strip().lower().startswith("yes"), float(verdict["score"])


#: what `configure` last put into the environment, and what the variable held before (None: unset)
_CONFIGURED: dict[str, tuple[str, str | None]] = {}


def configure(model: str | None, base_url: str | None, api_key_env: str | None) -> None:
    """Put a judge given in the harness config into the environment `Judge.from_env` reads (not the key: only its
    name).

    A setting left null falls back to the environment's own value, not to one an earlier job's config put there
    (the jobs of a sweep share one process).
    """
    for name, value in ((ENV_MODEL, model), (ENV_BASE_URL, base_url), (ENV_KEY_NAME, api_key_env)):
        configured, before = _CONFIGURED.pop(name, (None, None))
        if configured is not None and os.environ.get(name) == configured:  # still ours: back to its own value
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
        if value:
            _CONFIGURED[name] = value, os.environ.get(name)
            os.environ[name] = value


def judged(entry: dict, judge: Judge) -> bool:
    return entry.get("accuracy") is not None and entry.get("judge") == judge.describe()


def judge_entries(entries: list[dict], judge: Judge, save: Callable[[list[dict]], None] | None = None
                  ) -> tuple[list[dict], str | None]:
    """Fill in the judge's accuracy (0/1) and score of per-question entries (question, answer, pred), in place, as
    the verdicts come (so an interrupt keeps them); returns the entries and why judging stopped early (None if every
    entry has its verdict). Entries this judge judged are left alone, those another judge judged are judged again.
    `concurrency` requests run at once; `save(entries)` sees the verdicts so far every `checkpoint_s`."""
    out = entries
    todo = [i for i, entry in enumerate(out) if not judged(entry, judge)]
    if not todo:
        return out, None
    run, errors = _Run(judge), []
    last_save = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=judge.concurrency, thread_name_prefix="judge")
    try:
        futures = {pool.submit(judge.judge, out[i]["question"], out[i]["answer"], out[i]["pred"], run): i
                   for i in todo}
        with tqdm(total=len(todo), desc=f"judge {judge.model}", unit="answer") as bar:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    correct, score = future.result()
                except _TooManyFailures:
                    break
                except JudgeConfigError as err:  # a key that went missing: no request can succeed
                    errors.append(str(err))
                    run.stop.set()
                    break
                except AnswerFailed as err:  # left for the next run
                    errors.append(str(err))
                    bar.set_postfix(failed=run.count)
                    continue
                out[i] = {**out[i], "accuracy": float(correct), "score": score, "judge": judge.describe()}
                bar.update()
                if save is not None and time.monotonic() - last_save > judge.checkpoint_s:
                    save(out)
                    last_save = time.monotonic()
    finally:
        run.stop.set()  # threads waiting to retry give up; queued requests are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    missing = sum(not judged(entry, judge) for entry in out)
    if not missing:
        return out, None
    reason = run.reason or (errors[-1] if errors else "stopped")
    return out, f"{missing} of {len(out)} answer(s) unjudged: {reason}"


def summary(entries: list[dict]) -> dict:
    """accuracy (share of "yes", 0..1) and score (mean 0-5) over judged entries; None where none is judged."""
    judged_entries = [e for e in entries if e.get("accuracy") is not None]
    if not judged_entries:
        return {"accuracy": None, "score": None}
    return {"accuracy": sum(e["accuracy"] for e in judged_entries) / len(judged_entries),
            "score": sum(e["score"] for e in judged_entries) / len(judged_entries)}


def judging_state(record: dict) -> str:
    """How far a video-QA record is judged: "unjudged", "incomplete" (a judge stopped part-way) or "complete"."""
    state = (record.get("judging") or {}).get("state")
    return state or ("complete" if record.get("judge") is not None else "unjudged")


def needs_judging(record: dict, judge: Judge) -> bool:
    """A video-QA record that `judge` has not judged fully (judged by another judge, none, or part-way)."""
    return record.get("protocol") == "video-chatgpt" and (
        record.get("judge") != judge.describe() or judging_state(record) != "complete")


def judge_record(path: str | Path, judge: Judge) -> dict:
    """Judge the stored answers of the video-QA record at `path` that `judge` has not judged, and rewrite record and
    answers (the same key: the answers are the same run's); returns the record, with its path.

    A fault part-way (HTTP errors past the failure cap, a reply that is not a verdict, a key gone missing, an
    interrupt) still writes every verdict obtained, with `judging.state` "incomplete" and no score, and raises
    JudgingIncomplete (an interrupt propagates as itself). A replaced judge's numbers stay in the record's
    `earlier_judges` and the log names them; its per-answer verdicts are overwritten."""
    path = Path(path)
    record, samples = read_record(path), read_samples(path)
    if record is None:
        raise ValueError(f"{path}: not a readable record, nothing to judge")
    store = ResultStore(path.parents[3])  # <root>/<model>/<method>/<benchmark>/<key>.json
    previous, before = record.get("judge"), record.get("score")
    if previous is not None and previous != judge.describe():
        record["earlier_judges"] = record.get("earlier_judges", []) + [
            {"judge": previous, "score": before, "judged": record.get("judged", record.get("created")),
             "metrics": {k: record["metrics"].get(f"{k},none") for k in ("accuracy", "score")}}]

    def save(entries: list[dict], stopped: str | None = None) -> None:
        for sample, entry in zip(samples, entries):
            sample[record["metric"]] = entry
        scores = summary(entries) if stopped is None else {"accuracy": None, "score": None}  # never a part score
        record["metrics"] = {**record["metrics"], **{f"{k},none": v for k, v in scores.items()}}
        record["score"] = None if scores[record["metric"]] is None else scores[record["metric"]] * record.get(
            "scale", 100)
        record["judge"], record["judged"] = judge.describe(), datetime.now(timezone.utc).isoformat()
        done = sum(judged(entry, judge) for entry in entries)
        record["judging"] = {"state": "complete" if stopped is None else "incomplete", "judged": done,
                             "answers": len(entries), **({"error": stopped} if stopped else {})}
        store.write(record, samples)

    entries = [s[record["metric"]] for s in samples]
    stopped: str | None = "stopped by an interrupt or an unexpected error"
    try:
        entries, stopped = judge_entries(entries, judge, lambda partial: save(partial, "in progress"))
    finally:
        save(entries, stopped)
    if stopped is not None:
        raise JudgingIncomplete(f"{path}: judging incomplete, {stopped}; the answers and the verdicts obtained are "
                                "kept: run the job again, or `python scripts/judge.py`, to judge the rest")
    if previous is None or previous == judge.describe():
        log.info("judged %s with %s: %s %s", path, judge_label(record["judge"]), record["metric"], record["score"])
    else:
        log.warning("re-judged %s: replaced the scores of %s (%s %s) by those of %s (%s %s); the replaced numbers "
                    "are kept in the record's earlier_judges", path, judge_label(previous), record["metric"], before,
                    judge_label(record["judge"]), record["metric"], record["score"])
    return {**record, "path": str(path)}


def judge_records(root: str | Path, judge: Judge, rejudge: bool = False) -> tuple[list[Path], list[str]]:
    """Judge every stored video-QA record under `root` that `judge` has not judged fully (unjudged, or stopped
    part-way; with `rejudge`, also those another judge judged). Returns the paths judged and the faults of those
    whose judging stopped part-way (each still written, `judging.state` "incomplete")."""
    done, others, faults = [], [], []
    for path, record in ResultStore(root).readable():
        if not needs_judging(record, judge):
            continue
        if record.get("judge") not in (None, judge.describe()) and not rejudge:
            others.append(f"{path} ({judge_label(record['judge'])})")
            continue
        try:
            judge_record(path, judge)
        except JudgingIncomplete as err:
            faults.append(str(err))
            continue
        done.append(path)
    if others:
        log.warning("left alone %d record(s) judged by another judge (--rejudge judges them again with %s):\n  %s",
                    len(others), judge_label(judge.describe()), "\n  ".join(others))
    return done, faults


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Judge stored video-QA answers (Video-ChatGPT protocol).")
    parser.add_argument("root", nargs="?", default="results/runs", help="the record store (results/runs)")
    parser.add_argument("--model", help=f"judge model (default ${ENV_MODEL})")
    parser.add_argument("--base-url", help=f"OpenAI-compatible endpoint (default ${ENV_BASE_URL} or {DEFAULT_BASE_URL})")
    parser.add_argument("--api-key-env", help=f"the environment variable holding the key (default {DEFAULT_KEY_ENV})")
    parser.add_argument("--concurrency", type=int, help=f"requests in flight at once (default {Judge.concurrency})")
    parser.add_argument("--max-failures", type=int,
                        help=f"failed requests before judging stops and keeps what it has (default {Judge.max_failures})")
    parser.add_argument("--rejudge", action="store_true",
                        help="also judge again the records another judge judged (their numbers are kept in "
                             "earlier_judges)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure(args.model, args.base_url, args.api_key_env)
    judge = Judge.from_env(concurrency=args.concurrency, max_failures=args.max_failures)
    if judge is None:
        parser.error(f"no judge model: pass --model or set {ENV_MODEL}")
    paths, faults = judge_records(args.root, judge, args.rejudge)
    print(f"judged {len(paths)} record(s) with {judge.model} at {judge.base_url}")
    if faults:
        sys.exit(f"{len(faults)} record(s) judged part-way:\n  " + "\n  ".join(faults))


if __name__ == "__main__":
    main()
