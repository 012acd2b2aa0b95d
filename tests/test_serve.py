"""``alignkit serve`` on the demo SFT run, talked to with the official ``openai`` client and with raw HTTP.

One keyed server per module (a subprocess on a free localhost port): the tests with the key are the
protocol's, the ones without it check that the key is required.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import REPO, run_ok, served

KEY_ENV, KEY = "ALIGNKIT_TEST_SERVE_KEY", "test-key-4f1c"
MAX_TOKENS = 16  # recipes/demo/eval.yaml's max_new_tokens
SERVED_AS = "demo-sft"  # --served-model-name


@pytest.fixture(scope="module")
def server(demo_sft_run, tmp_path_factory):
    """(base URL, served model name) of ``alignkit serve`` on the demo SFT run, with an API key."""
    with served(demo_sft_run, tmp_path_factory.mktemp("serve") / "serve.log", KEY_ENV, KEY, "--served-model-name",
                SERVED_AS) as base:
        yield base, SERVED_AS


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def eval_predictions(demo_sft_run, tmp_path_factory) -> list[dict]:
    """What ``alignkit eval`` answers (greedy) on 8 held-out reversal prompts of the demo SFT run."""
    out = tmp_path_factory.mktemp("serve-eval") / "eval"
    # One prompt per generate() call, as the server answers it: left padding in a batch may move a near-tie.
    run_ok("eval", "recipes/demo/eval.yaml", f"model.name_or_path={demo_sft_run}", f"train.output_dir={out}",
           "evaluate.compare=null", "evaluate.max_samples=8", "evaluate.generation.batch_size=1")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and sum(r["prediction"] == r["reference"] for r in rows) >= 6, rows  # the run reverses
    return rows


def ask(client, model: str, messages: list[dict], **options):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                          **options)


def post(base: str, path: str, body: bytes | str, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON body) of a raw POST, whatever the status."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(f"{base}{path}", data=body.encode() if isinstance(body, str) else body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_and_health(server, client):
    base, model = server
    assert [m.id for m in client.models.list().data] == [model]
    with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:  # open without the key
        assert json.loads(answer.read()) == {"status": "ok"}


def test_a_greedy_completion_is_the_answer_alignkit_eval_gives(server, client, eval_predictions):
    _, model = server
    for row in eval_predictions[:3]:
        completion = ask(client, model, row["prompt"])
        choice = completion.choices[0]
        # alignkit's evaluation strips the decoded answer; the protocol's text keeps the tokenizer's leading space.
        assert choice.message.content.strip() == row["prediction"]
        assert choice.finish_reason == "stop"
        assert completion.usage.completion_tokens >= 1 and completion.usage.prompt_tokens > 5


def test_streaming_gives_the_same_text_as_a_plain_completion(server, client, eval_predictions):
    _, model = server
    for row in eval_predictions[:3]:
        stop = row["prediction"].split()[-1]
        for options in ({}, {"stop": [stop]}):  # an answer cut before a stop string too
            plain = ask(client, model, row["prompt"], **options).choices[0]
            chunks = list(ask(client, model, row["prompt"], stream=True, **options))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert streamed == plain.message.content
            assert chunks[-1].choices[0].finish_reason == plain.finish_reason == "stop"
            if options:
                assert plain.message.content.strip() == row["prediction"][:row["prediction"].find(stop)].strip()


def test_top_logprobs_are_the_models_own_log_softmax(server, client, eval_predictions, demo_sft_run):
    import torch

    from alignkit.serve.engine import Engine

    _, model = server
    prompt = eval_predictions[0]["prompt"]
    tokens = ask(client, model, prompt, logprobs=True, top_logprobs=5).choices[0].logprobs.content
    assert len(tokens) >= 2
    engine = Engine.load(str(demo_sft_run))
    ids = engine.prompt_ids(prompt)
    for token in tokens:  # the whole sequence again at every step: no KV cache, no generate()
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        best = torch.topk(expected, 5)
        assert [t.token for t in token.top_logprobs] == [engine.tokenizer.decode([i]) for i in best.indices.tolist()]
        for alternative, value in zip(token.top_logprobs, best.values.tolist()):
            assert abs(alternative.logprob - value) < 1e-4
        assert token.token == token.top_logprobs[0].token and abs(token.logprob - best.values[0].item()) < 1e-4
        ids.append(best.indices[0].item())  # greedy: the chosen token is the most likely one


def test_eight_concurrent_clients_each_get_their_own_answer(server, eval_predictions):
    base, model = server

    def one(row: dict) -> str:
        own = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        return ask(own, model, row["prompt"]).choices[0].message.content.strip()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(one, eval_predictions))
    assert answers == [row["prediction"] for row in eval_predictions]


def test_n_answers_sampled_with_a_seed_repeat(server, client, eval_predictions):
    _, model = server
    prompt = eval_predictions[0]["prompt"]
    first, second = (client.chat.completions.create(model=model, messages=prompt, n=3, temperature=1.5, seed=7,
                                                     max_tokens=MAX_TOKENS) for _ in range(2))
    assert len(first.choices) == 3
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "x", "messages": [', 400, None),  # malformed JSON
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "reverse: " + "apple " * 400}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
])
def test_bad_requests_get_a_4xx_error_object_and_the_server_keeps_serving(server, client, body, status, param):
    base, model = server
    if isinstance(body, dict):
        body = json.dumps({"model": model} | body)
    got, answer = post(base, "/v1/chat/completions", body)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["param"] == param
    assert ask(client, model, [{"role": "user", "content": "reverse: apple river stone"}]).choices[0].message.content


def test_without_the_key_a_keyed_server_answers_401(server):
    base, model = server
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    for key in (None, "wrong-key"):
        status, answer = post(base, "/v1/chat/completions", body, key=key)
        assert status == 401 and answer["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong-key", max_retries=0).models.list()


def test_serve_refuses_an_unset_key_variable(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    result = subprocess.run([sys.executable, "-m", "alignkit", "serve", "demo:tiny-llama", "--api-key-env", KEY_ENV],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and KEY_ENV in result.stderr
