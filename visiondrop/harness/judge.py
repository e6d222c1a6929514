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
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .store import ResultStore, judge_label, read_samples

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


@dataclass(frozen=True)
class Judge:
    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = DEFAULT_KEY_ENV
    timeout_s: float = 60.0
    attempts: int = 4

    @classmethod
    def from_env(cls) -> "Judge | None":
        """The judge the environment configures, None if no model is set; a JudgeConfigError if its key is missing
        (raised before anything is evaluated: the tasks ask at load time)."""
        model = os.environ.get(ENV_MODEL)
        if not model:
            return None
        judge = cls(model, os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL,
                    os.environ.get(ENV_KEY_NAME) or DEFAULT_KEY_ENV)
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

    def judge(self, question: str, answer: str, pred: str) -> tuple[bool, float]:
        """(the judge says the prediction matches, its 0-5 score)."""
        body = json.dumps({"model": self.model, "temperature": 0, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_PROMPT.format(question=question, answer=answer, pred=pred)}]}).encode()
        request = urllib.request.Request(self.base_url.rstrip("/") + "/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key()}"})
        for attempt in range(self.attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    content = json.loads(response.read())["choices"][0]["message"]["content"]
                return parse_verdict(content)
            except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as err:
                if attempt == self.attempts - 1:
                    raise RuntimeError(f"the judge {self.model!r} at {self.base_url} failed: {err}") from None
                time.sleep(2 ** attempt)
        raise AssertionError("unreachable")


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
    """Put a judge given in the harness config into the environment the tasks read (not the key: only its name).

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


def judge_entries(entries: list[dict], judge: Judge) -> list[dict]:
    """Per-question entries (question, answer, pred) with the judge's accuracy (0/1) and score filled in; entries
    judged by another judge are judged again."""
    out = []
    for entry in entries:
        if entry.get("accuracy") is None or entry.get("judge") != judge.describe():
            correct, score = judge.judge(entry["question"], entry["answer"], entry["pred"])
            entry = {**entry, "accuracy": float(correct), "score": score, "judge": judge.describe()}
        out.append(entry)
    return out


def summary(entries: list[dict]) -> dict:
    """accuracy (share of "yes", 0..1) and score (mean 0-5) over judged entries; None where none is judged."""
    judged = [e for e in entries if e.get("accuracy") is not None]
    if not judged:
        return {"accuracy": None, "score": None}
    return {"accuracy": sum(e["accuracy"] for e in judged) / len(judged),
            "score": sum(e["score"] for e in judged) / len(judged)}


def judge_record(path: str | Path, judge: Judge) -> dict:
    """Judge the stored answers of the video-QA record at `path` with `judge` and rewrite record and answers (the
    same key: the answers are the same run's). A replaced judge's numbers stay in the record's `earlier_judges`
    and the log names them; its per-answer verdicts are overwritten. Returns the record, with its path."""
    path = Path(path)
    record, samples = json.loads(path.read_text()), read_samples(path)
    entries = judge_entries([s[record["metric"]] for s in samples], judge)
    for sample, entry in zip(samples, entries):
        sample[record["metric"]] = entry
    scores = summary(entries)
    previous, before = record.get("judge"), record.get("score")
    if previous is not None:
        record["earlier_judges"] = record.get("earlier_judges", []) + [
            {"judge": previous, "score": before, "judged": record.get("judged", record.get("created")),
             "metrics": {k: record["metrics"].get(f"{k},none") for k in scores}}]
    record["metrics"] = {**record["metrics"], **{f"{k},none": v for k, v in scores.items()}}
    record["score"] = scores[record["metric"]] * record.get("scale", 100)
    record["judge"], record["judged"] = judge.describe(), datetime.now(timezone.utc).isoformat()
    written = ResultStore(path.parents[3]).write(record, samples)  # <root>/<model>/<method>/<benchmark>/<key>.json
    if previous is None:
        log.info("judged %s with %s: %s %s", path, judge_label(record["judge"]), record["metric"], record["score"])
    else:
        log.warning("re-judged %s: replaced the scores of %s (%s %s) by those of %s (%s %s); the replaced numbers "
                    "are kept in the record's earlier_judges", path, judge_label(previous), record["metric"], before,
                    judge_label(record["judge"]), record["metric"], record["score"])
    return {**record, "path": str(written)}


def judge_records(root: str | Path, judge: Judge, rejudge: bool = False) -> list[Path]:
    """Judge every stored video-QA record under `root` whose answers are unjudged (with `rejudge`, also those
    another judge judged); records this judge judged are left alone. Returns the paths judged."""
    done, others = [], []
    for path in sorted(Path(root).glob("*/*/*/*.json")):
        record = json.loads(path.read_text())  # the maps beside records (.positions.json) have no protocol
        if record.get("protocol") != "video-chatgpt" or record.get("judge") == judge.describe():
            continue
        if record.get("judge") is not None and not rejudge:
            others.append(f"{path} ({judge_label(record['judge'])})")
            continue
        judge_record(path, judge)
        done.append(path)
    if others:
        log.warning("left alone %d record(s) judged by another judge (--rejudge judges them again with %s):\n  %s",
                    len(others), judge_label(judge.describe()), "\n  ".join(others))
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Judge stored video-QA answers (Video-ChatGPT protocol).")
    parser.add_argument("root", nargs="?", default="results/runs", help="the record store (results/runs)")
    parser.add_argument("--model", help=f"judge model (default ${ENV_MODEL})")
    parser.add_argument("--base-url", help=f"OpenAI-compatible endpoint (default ${ENV_BASE_URL} or {DEFAULT_BASE_URL})")
    parser.add_argument("--api-key-env", help=f"the environment variable holding the key (default {DEFAULT_KEY_ENV})")
    parser.add_argument("--rejudge", action="store_true",
                        help="also judge again the records another judge judged (their numbers are kept in "
                             "earlier_judges)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure(args.model, args.base_url, args.api_key_env)
    judge = Judge.from_env()
    if judge is None:
        parser.error(f"no judge model: pass --model or set {ENV_MODEL}")
    paths = judge_records(args.root, judge, args.rejudge)
    print(f"judged {len(paths)} record(s) with {judge.model} at {judge.base_url}")


if __name__ == "__main__":
    main()
