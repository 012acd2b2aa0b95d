"""A client of an OpenAI-compatible chat-completions endpoint, for judges and rewards behind an API.

Requests go out a bounded number at a time (``max_concurrency``); a 429, a 5xx, a timeout or a dropped
connection is retried with exponential backoff and jitter (or after the server's ``Retry-After``), up to
``max_retries`` times. A refused request (another 4xx, e.g. a prompt longer than the model's context) is
answered with :class:`Refused` rather than raised, so one bad question never stops a run; a wrong key, model
or URL (401, 403, 404) stops it with an :class:`EndpointError`, since every other request would fail alike.

The API key is read from the environment variable the settings name, sent only as the bearer token, and
appears in no message, log or file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from alignkit.errors import AlignkitError
from alignkit.recipe.settings.endpoint import EndpointSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

BACKOFF_START = 1.0  # seconds before the first retry; doubled each time, with jitter
BACKOFF_CAP = 60.0
RETRIED_STATUSES = (408, 409, 429)  # and every 5xx


class EndpointError(AlignkitError):
    """The endpoint cannot answer at all: a wrong key, model or URL, or no answer after every retry."""


@dataclass
class Reply:
    """An answer's text and, when the endpoint returned them, the most likely alternatives to its first token that is
    not blank."""

    content: str
    first_token_logprobs: list[tuple[str, float]] | None = None  # (token text, log-probability), most likely first


@dataclass
class Refused:
    """The endpoint refused this request (a 4xx other than a key, model or URL problem): why."""

    status: int
    message: str


class ChatEndpoint:
    """Chat completions from one endpoint and model, with retries and bounded concurrency."""

    def __init__(self, settings: EndpointSettings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._key = _read_key(settings.api_key_env)
        self._sleep = sleep
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0

    @property
    def url(self) -> str:
        return self.settings.base_url.rstrip("/") + "/chat/completions"

    def chat(self, messages: Sequence[dict[str, str]], max_tokens: int, top_logprobs: int | None = None
             ) -> Reply | Refused:
        """A greedy (temperature 0) answer to ``messages``, at most ``max_tokens`` long; with ``top_logprobs``,
        also the most likely alternatives to its first token that is not blank."""
        payload: dict[str, Any] = {"model": self.settings.model, "messages": list(messages), "max_tokens": max_tokens,
                                   "temperature": 0}
        if top_logprobs:
            payload |= {"logprobs": True, "top_logprobs": top_logprobs}
        answer = self._post(payload)
        if isinstance(answer, Refused):
            return answer
        try:
            choice = answer["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EndpointError(f"{self.url}: the answer is not a chat completion: {str(answer)[:300]}") from None
        return Reply(content=content, first_token_logprobs=_first_token_logprobs(choice.get("logprobs")))

    def map_as_completed(self, function: Callable[[T], R], items: Sequence[T]) -> Iterator[tuple[int, R]]:
        """``(index, function(item))`` for every item, in the order they finish, at most ``max_concurrency`` at a
        time: a caller can keep each result as it comes (an interrupted run loses only the requests in flight)."""
        if not items:
            return
        with ThreadPoolExecutor(max_workers=min(self.settings.max_concurrency, len(items))) as pool:
            futures = {pool.submit(function, item): index for index, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:  # stopped early (an error, Ctrl-C): send nothing more
                    future.cancel()

    def _post(self, payload: dict[str, Any]) -> dict[str, Any] | Refused:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self._key}"} if self._key else {})
        problem = ""
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                with self._lock:
                    self.retries += 1
            with self._lock:
                self.requests += 1
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code in (401, 403):
                    raise EndpointError(f"{self.url} refused the API key ({err.code}: {message}); check the key in "
                                        f"${self.settings.api_key_env}" if self.settings.api_key_env else
                                        f"{self.url} needs an API key ({err.code}: {message}); name its environment "
                                        "variable in api_key_env") from None
                if err.code == 404:
                    raise EndpointError(f"{self.url}: not found (404: {message}); check base_url and model "
                                        f"'{self.settings.model}'") from None
                if err.code not in RETRIED_STATUSES and err.code < 500:
                    return Refused(err.code, message)
                problem, retry_after = f"{err.code}: {message}", _retry_after(err)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except json.JSONDecodeError as err:
                problem = f"an answer that is not JSON ({err})"
            if attempt < self.settings.max_retries:
                delay = retry_after if retry_after is not None else _backoff(attempt)
                logger.info("%s: %s; retrying in %.1f s", self.url, problem, delay)
                self._sleep(delay)
        raise EndpointError(f"{self.url}: no answer after {self.settings.max_retries + 1} tries (last: {problem})")


def _read_key(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise EndpointError(f"api_key_env: the environment variable {variable} is not set or empty")
    return key


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 1, 2, 4, ... seconds, each between half and all of it."""
    return min(BACKOFF_CAP, BACKOFF_START * 2 ** attempt) * (0.5 + random.random() / 2)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    """The server's Retry-After in seconds (capped), when it gives one as a number."""
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(BACKOFF_CAP, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _error_message(err: urllib.error.HTTPError) -> str:
    """The protocol's error message from an error answer, else the start of its body."""
    try:
        body = err.read().decode(errors="replace")
    except OSError:
        return err.reason or ""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300] or str(err.reason)


def _first_token_logprobs(logprobs: Any) -> list[tuple[str, float]] | None:
    """The ``top_logprobs`` of the first generated token that is not blank, as (token text, logprob) pairs; None if
    the answer has none. Blank tokens are skipped because many tokenizers write a lone word as a word-boundary
    token followed by the word: there the verdict is in the second token, read after the first."""
    try:
        for token in logprobs["content"]:
            if str(token["token"]).strip():
                alternatives = token.get("top_logprobs") or [token]
                return [(str(item["token"]), float(item["logprob"])) for item in alternatives]
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return None
