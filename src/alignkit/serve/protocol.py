"""The OpenAI chat-completions protocol as ``alignkit serve`` speaks it: a request body checked into a
conversation and :class:`~alignkit.serve.engine.Sampling`, answers shaped as the protocol's JSON, and its
error object.

Checked by hand rather than by a schema library so that every refusal names the offending field the way the
protocol does (``{"error": {"message", "type", "param", "code"}}``) and the command line does not pay for
importing a web framework.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from alignkit.serve.engine import Answer, Completion, Messages, Sampling

ROLES = ("system", "developer", "user", "assistant")
MAX_N = 16
MAX_TOP_LOGPROBS = 20  # the protocol's own limit
MAX_STOP = 4


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the protocol's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The protocol's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    """A checked chat-completion request."""

    model: str
    messages: Messages
    sampling: Sampling
    stream: bool


def parse_chat_request(body: Any, served: str) -> ChatRequest:
    """The request ``body`` (parsed JSON) checked against the protocol and the served model's name; a
    :class:`RequestError` names the first thing wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model' is required", "model")
    if model != served:
        raise RequestError(404, f"the model '{model}' does not exist; this server serves '{served}'", "model",
                           "model_not_found")
    messages = _messages(body.get("messages"))
    logprobs = _typed(body, "logprobs", bool, False)
    top_logprobs = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    max_tokens = _integer(body, "max_completion_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", None, 1, None)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        n=_integer(body, "n", 1, 1, MAX_N),
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", None, None, None),
        top_logprobs=(top_logprobs or 0) if logprobs else None,
    )
    stream = _typed(body, "stream", bool, False)
    if stream and sampling.n > 1:
        raise RequestError(400, "streaming more than one answer (n > 1) is not supported", "n")
    if stream and logprobs:
        raise RequestError(400, "logprobs are not supported with stream: true; ask without streaming", "logprobs")
    return ChatRequest(model=model, messages=messages, sampling=sampling, stream=stream)


def _messages(value: Any) -> Messages:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(400, f"{where}.role is {role!r}; it must be one of {', '.join(ROLES)}", f"{where}.role")
        # The chat templates alignkit trains with know system, user and assistant turns; "developer" is the
        # protocol's newer name for the system turn.
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content(message.get("content"), f"{where}.content")})
    if messages[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must not be the assistant's: there is nothing to answer",
                           "messages")
    return messages


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or the protocol's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(part["text"] for part in value)
    raise RequestError(400, f"{where} must be a string or a list of text parts ({{type: text, text}})", where)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return stops


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise RequestError(400, f"'{name}' must be a {kind.__name__}, got {value!r}", name)
    return value


def _integer(body: dict, name: str, default: int | None, low: int | None, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"'{name}' must be an integer, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(400, f"'{name}' must be in [{low}, {high if high is not None else 'inf'}], got {value}",
                           name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        raise RequestError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion_body(completion: Completion, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    generated = sum(answer.completion_tokens for answer in completion.answers)
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": answer.text},
                     "logprobs": _logprobs_body(answer), "finish_reason": answer.finish_reason}
                    for i, answer in enumerate(completion.answers)],
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": generated,
                  "total_tokens": completion.prompt_tokens + generated},
    }


def _logprobs_body(answer: Answer) -> dict[str, Any] | None:
    if answer.logprobs is None:
        return None
    return {"content": [
        {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": token, "logprob": value, "bytes": list(token.encode())} for token, value in t.top]}
        for t in answer.logprobs]}


def chunk_body(chunk_id: str, created: int, model: str, delta: dict[str, str], finish_reason: str | None = None
               ) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object of a streamed answer."""
    return {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def models_body(model: str, created: int) -> dict[str, Any]:
    """The ``/v1/models`` list: the one served model."""
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "alignkit"}]}
