"""The judge and the reward behind an OpenAI-compatible endpoint: against ``alignkit serve`` of the demo judge
(the same verdicts as the local judge, cached; RLAIF through it, killed and rerun), and against a small fake
endpoint in this process for what a real server cannot be made to do on cue (a 429, a 5xx, no logprobs, an
unparseable answer) and for a rating model (the demo has none)."""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, free_port, run_cli, served

from alignkit.demo.tasks import DEMO_JUDGE_TEMPLATE, reverse_judge_pairs
from alignkit.errors import RecipeError
from alignkit.feedback import JudgeSettings, load_judge
from alignkit.feedback.api_judge import APIJudge, read_verdict
from alignkit.feedback.endpoint import ChatEndpoint, EndpointError, Reply
from alignkit.feedback.rewards import load_reward_functions
from alignkit.feedback.verdicts import VerdictCache
from alignkit.recipe import schema
from alignkit.recipe.loading import load_recipe
from alignkit.recipe.settings.endpoint import EndpointSettings
from alignkit.recipe.settings.reward import RewardSettings

DEMO_JUDGE = dict(template=DEMO_JUDGE_TEMPLATE, constitution="The right answer reverses the words.",
                  chain_of_thought=True, reasoning_instruction="Check each answer.", max_new_tokens=24)
KEY_ENV, KEY = "ALIGNKIT_TEST_JUDGE_KEY", "judge-key-77aa"


def held_out_pairs(count: int) -> tuple[list, list[str], list[str]]:
    pairs = reverse_judge_pairs("test")[:count]
    return [p["prompt"] for p in pairs], [p["right"] for p in pairs], [p["wrong"] for p in pairs]


@pytest.fixture(scope="module")
def served_judge(demo_judge_run, tmp_path_factory, monkeypatch_module):
    """``alignkit serve`` of the demo judge, keyed; the key is in this process's environment too."""
    monkeypatch_module.setenv(KEY_ENV, KEY)
    with served(demo_judge_run, tmp_path_factory.mktemp("judge-serve") / "serve.log", KEY_ENV, KEY) as base:
        yield base


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_served_demo_judge_gives_the_local_judges_verdicts_and_caches_them(served_judge, demo_judge_run,
                                                                               tmp_path, caplog):
    prompts, right, wrong = held_out_pairs(12)
    first = [r if i % 2 else w for i, (r, w) in enumerate(zip(right, wrong))]  # the right answer on either side
    second = [w if i % 2 else r for i, (r, w) in enumerate(zip(right, wrong))]
    api = EndpointSettings(base_url=f"{served_judge}/v1", model=str(demo_judge_run), api_key_env=KEY_ENV,
                           cache_dir=str(tmp_path / "cache"))
    settings = schema.build(JudgeSettings, {"api": vars(api), **DEMO_JUDGE}, "judge")
    assert settings.kind == "llm"
    judge = load_judge(settings)
    assert isinstance(judge, APIJudge)
    with caplog.at_level(logging.DEBUG):
        remote = judge.compare(prompts, first, second)
    local = load_judge(JudgeSettings(kind="llm", model=str(demo_judge_run), **DEMO_JUDGE)).compare(prompts, first,
                                                                                                   second)
    assert max(abs(a - b) for a, b in zip(remote, local)) < 1e-3, (remote, local)
    stats = judge.stats.summary()
    # 12 pairs in both orders, each a chain of thought and then the verdict: 48 requests, all read from logprobs.
    assert stats["verdicts_logprobs"] == 24 and stats["requests"] == 48 and stats["cache_hits"] == 0, stats
    assert stats["option_mass"] > 0.9, stats

    # Asked again, by a new judge (a resumed or repeated run): every verdict comes from the cache.
    again = load_judge(settings)
    assert again.compare(prompts, first, second) == remote
    stats = again.stats.summary()
    assert (stats["compared"], stats["cache_hits"], stats["requests"]) == (12, 24, 0), stats
    assert not any(name.startswith("verdicts_") for name in stats), stats  # nothing asked
    assert len(VerdictCache(tmp_path / "cache")) == 24
    stored = b"".join(path.read_bytes() for path in (tmp_path / "cache").iterdir())
    assert KEY.encode() not in stored and KEY not in caplog.text


# ---- a fake endpoint ----------------------------------------------------------------------------------------


class FakeEndpoint:
    """An OpenAI-style chat-completions endpoint in a thread: ``respond(body, count) -> (status, json, headers)``
    decides every answer; it records the requests and their Authorization headers."""

    def __init__(self, respond: Callable[[dict, int], tuple[int, dict, dict]]) -> None:
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.authorizations.append(self.headers.get("Authorization"))
                status, answer, headers = respond(body, len(fake.requests))
                data = json.dumps(answer).encode()
                self.send_response(status)
                for name, value in ({"Content-Type": "application/json"} | headers).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(content: str, top: list[tuple[str, float]] | None = None) -> dict:
    logprobs = None if top is None else {"content": [{"token": top[0][0], "logprob": top[0][1], "top_logprobs": [
        {"token": token, "logprob": value} for token, value in top]}]}
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
                         "finish_reason": "stop"}]}


def rule_verdict(body: dict) -> str:
    """The fake judge's verdict: the option whose answer reverses the prompt's words ("1" or "2")."""
    question = body["messages"][0]["content"]
    phrase = question.split("reverse:")[1].split("\n")[0].split()
    answer_1 = question.split("\n1: ")[1].split("\n")[0]
    return "1" if answer_1 == " ".join(reversed(phrase)) else "2"


def fake_judge(base_url: str, tmp_path: Path, **endpoint) -> APIJudge:
    api = EndpointSettings(base_url=base_url, model="fake-judge", cache_dir=str(tmp_path / "cache"), **endpoint)
    return load_judge(JudgeSettings(api=api, template=DEMO_JUDGE_TEMPLATE, constitution="Reverse."))


def test_retries_a_429_and_a_500_then_answers(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)

    def respond(body: dict, count: int):
        if count == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if count == 2:
            return 503, {"error": {"message": "overloaded"}}, {"Retry-After": "0"}
        label = rule_verdict(body)
        return 200, completion(label, [(label, -0.01), ("1" if label == "2" else "2", -4.6)]), {}

    prompts, right, wrong = held_out_pairs(3)
    with FakeEndpoint(respond) as url:
        judge = fake_judge(url, tmp_path, api_key_env=KEY_ENV, max_concurrency=1)
        preferences = judge.compare(prompts, right, wrong)
    assert all(p > 0.95 for p in preferences), preferences
    stats = judge.stats.summary()
    assert stats["retries"] == 2 and stats["requests"] == 6 + 2 and stats["verdicts_logprobs"] == 6, stats


def test_the_key_comes_from_the_environment_only(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = FakeEndpoint(lambda body, count: (200, completion("1"), {}))
    prompts, right, wrong = held_out_pairs(1)
    with server as url:
        fake_judge(url, tmp_path, api_key_env=KEY_ENV).compare(prompts, right, wrong)
    assert server.authorizations == [f"Bearer {KEY}"] * 2
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EndpointError, match=f"{KEY_ENV} is not set"):
        fake_judge("http://127.0.0.1:9/v1", tmp_path, api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        EndpointSettings(base_url="http://x/v1", model="m", api_key_env="sk-this-is-a-key")


def test_a_wrong_key_stops_the_run_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server = FakeEndpoint(lambda body, count: (401, {"error": {"message": "invalid api key"}}, {}))
    prompts, right, wrong = held_out_pairs(1)
    with server as url, pytest.raises(EndpointError, match="refused the API key") as failure:
        fake_judge(url, tmp_path, api_key_env=KEY_ENV).compare(prompts, right, wrong)
    assert KEY not in str(failure.value) and len(server.requests) <= 2  # no retry of a 401


def test_gives_up_after_max_retries_with_backoff(tmp_path):
    waits: list[float] = []
    server = FakeEndpoint(lambda body, count: (500, {"error": {"message": "boom"}}, {}))
    with server as url:
        endpoint = ChatEndpoint(EndpointSettings(base_url=url, model="m", max_retries=3), sleep=waits.append)
        with pytest.raises(EndpointError, match="no answer after 4 tries.*500: boom"):
            endpoint.chat([{"role": "user", "content": "hi"}], max_tokens=1)
    assert len(server.requests) == 4 and len(waits) == 3
    assert all(0.5 * 2 ** i <= wait <= 2 ** i for i, wait in enumerate(waits)), waits  # about 1, 2, 4 s


def test_without_logprobs_the_verdict_is_parsed_and_unparseable_answers_are_counted(tmp_path):
    def respond(body: dict, count: int):
        assert "logprobs" not in body  # logprobs: false asks for none
        question = body["messages"][0]["content"]
        if "glacier" in question:
            return 200, completion("I cannot tell."), {}
        return 200, completion(f"Answer {rule_verdict(body)} is better."), {}

    prompts, right, wrong = held_out_pairs(6)
    assert any("glacier" in p[0]["content"] for p in prompts)
    with FakeEndpoint(respond) as url:
        judge = fake_judge(url, tmp_path, logprobs=False)
        preferences = judge.compare(prompts, right, wrong)
    unparseable = [i for i, p in enumerate(prompts) if "glacier" in p[0]["content"]]
    assert [preferences[i] for i in unparseable] == [0.5] * len(unparseable)
    assert all(preferences[i] == 1.0 for i in range(len(prompts)) if i not in unparseable)
    stats = judge.stats.summary()
    assert stats["skipped_unparseable"] == len(unparseable) and stats["verdicts_unparseable"] == 2 * len(unparseable)
    assert stats["verdicts_parsed"] == 2 * (len(prompts) - len(unparseable)), stats


def test_read_verdict():
    options = ("1", "2")
    assert read_verdict(Reply("1", [("1", -0.1), (" 2", -2.4), ("x", -5.0)]), options).first == pytest.approx(
        0.9 / (0.9 + 0.0907), abs=1e-3)
    assert read_verdict(Reply("The better one is 2, not 1.", [("The", -0.1)]), options).first == 0.0
    assert read_verdict(Reply("12 of them", None), options).how == "unparseable"  # a label only as part of a word
    assert read_verdict(Reply("A", None), ("A", "B")).first == 1.0


def test_api_judge_recipes():
    template = load_recipe(str(REPO / "recipes/qwen2.5-0.5b/rlaif-api-judge.yaml"))
    judge = template.sections["rlaif"].judge
    assert judge.kind == "llm" and judge.api.api_key_env == "JUDGE_API_KEY"
    demo = load_recipe(str(REPO / "recipes/demo/rlaif-api.yaml")).sections["rlaif"].judge
    assert demo.api.model == "runs/demo-judge" and demo.model is None
    both = "rlaif.judge.api={base_url: 'http://127.0.0.1:8/v1', model: m}"
    with pytest.raises(RecipeError, match="takes 'model' \\(a local model\\) or 'api' \\(an endpoint\\), not both"):
        load_recipe(str(REPO / "recipes/demo/rlaif.yaml"), [both])


def test_rlaif_killed_mid_labelling_gets_the_verdicts_it_paid_for_from_the_cache(served_judge, demo_judge_run,
                                                                                noisy_sft_run, tmp_path):
    """recipes/demo/rlaif-api.yaml, shortened, against ``alignkit serve`` of the demo judge: killed once the
    judge has received some verdicts, then run again; the second run asks only for the verdicts it lacks."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = ["rlaif", str(REPO / "recipes/demo/rlaif-api.yaml"), f"model.name_or_path={noisy_sft_run}",
            f"train.output_dir={run_dir}", f"rlaif.judge.api.base_url={served_judge}/v1",
            f"rlaif.judge.api.model={demo_judge_run}", f"rlaif.judge.api.cache_dir={cache}",
            f"rlaif.judge.api.api_key_env={KEY_ENV}", "rlaif.iterations=1", "rlaif.prompts_per_iteration=16",
            "train.max_steps=4", "train.save_strategy=no", "evaluate.max_samples=8"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "alignkit", *args], cwd=REPO, stdout=out, stderr=out)
        deadline = time.time() + 300
        while not ((cache / "verdicts.sqlite").exists() and len(VerdictCache(cache)) >= 16):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no 16 verdicts within 300 s"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait()
    paid_for = len(VerdictCache(cache))
    assert not (run_dir / "iteration-1" / "pairs.jsonl").exists()  # killed while labelling

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    [entry] = [json.loads(line) for line in (run_dir / "rlaif_log.jsonl").read_text().splitlines()]
    print(f"killed after {paid_for} cached verdicts; the rerun: {entry}")
    questions = 2 * (entry["pairs_judged"] - entry.get("judge_skipped_empty_answer", 0))  # both orders of a pair
    asked = sum(value for name, value in entry.items() if name.startswith("judge_verdicts_"))
    assert entry["judge_cache_hits"] >= paid_for and entry["judge_cache_hits"] + asked == questions
    assert len(VerdictCache(cache)) == questions  # every verdict paid for once
    assert KEY not in (run_dir / "recipe.yaml").read_text() and KEY_ENV in (run_dir / "recipe.yaml").read_text()


# ---- a reward source behind an API ------------------------------------------------------------------------------


def test_an_api_reward_is_the_expected_rating_and_is_cached(tmp_path):
    def respond(body: dict, count: int):
        question = body["messages"][0]["content"]
        answer = question.split("Answer: ")[1].split("\n")[0]
        if answer == "?":
            return 200, completion("no idea"), {}
        if "logprobs" not in body:
            return 200, completion("I give it a 7 out of 9"), {}
        # 8 with probability 0.75, 2 with 0.25 (and a token that is no digit)
        return 200, completion("8", [("8", math.log(0.6)), ("2", math.log(0.2)), ("ok", math.log(0.2))]), {}

    raw = {"sources": [{"api": {"base_url": "", "model": "rater", "cache_dir": str(tmp_path / "cache")},
                        "constitution": "Reverse the words."}]}
    prompts = [[{"role": "user", "content": "reverse: apple river"}]] * 2
    with FakeEndpoint(respond) as url:
        raw["sources"][0]["api"]["base_url"] = url
        [reward] = load_reward_functions(schema.build(RewardSettings, raw, "reward"))
        assert reward(prompts=prompts, completions=["river apple", "?"]) == pytest.approx([(0.75 * 8 + 0.25 * 2) / 9,
                                                                                          0.5])
        assert reward(prompts=prompts, completions=["river apple", "?"]) == pytest.approx([0.7222, 0.5], abs=1e-4)
        raw["sources"][0]["api"]["logprobs"] = False
        [parsed] = load_reward_functions(schema.build(RewardSettings, raw, "reward"))
        assert parsed(prompts=prompts[:1], completions=["river apple"]) == pytest.approx([7 / 9])
    stats = reward.stats.summary()
    assert stats["cache_hits"] == 2 and stats["requests"] == 2 and stats["skipped_unrated"] == 2, stats
    assert stats["verdicts_logprobs"] == 1 and stats["verdicts_unparseable"] == 1, stats
    with pytest.raises(RecipeError, match="exactly one of 'model'.*'api'"):
        schema.build(RewardSettings, {"sources": [{"api": {"base_url": url, "model": "m"}, "model": "rm"}]}, "reward")
