"""An OpenAI-compatible chat-completions endpoint as a recipe names it (``judge: {api: {...}}``): plain data;
``alignkit.feedback.endpoint`` talks to it.

Any server that speaks the protocol works: a hosted model, vLLM, TGI, llama.cpp, or ``alignkit serve``. The
API key is never written in a recipe (recipes are saved into run dirs): ``api_key_env`` names the
environment variable that holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class EndpointSettings:
    """Where and how to ask an OpenAI-compatible chat-completions endpoint."""

    base_url: str = field(
        metadata={"help": "The API's base URL, up to and including /v1 (e.g. http://127.0.0.1:8000/v1)."})
    model: str = field(metadata={"help": "The model name the endpoint serves (its /v1/models id)."})
    api_key_env: str | None = field(
        default=None,
        metadata={"help": "Environment variable holding the API key, sent as a bearer token; null for none. The key "
                  "itself is never written in a recipe, a run dir, a log or a report."},
    )
    max_concurrency: int = field(default=8, metadata={"help": "Requests in flight at once, at most."})
    max_retries: int = field(
        default=5,
        metadata={"help": "Retries of a request answered 429 or 5xx, or timed out, with exponential backoff "
                  "(honouring Retry-After)."},
    )
    timeout: float = field(default=120.0, metadata={"help": "Seconds to wait for one answer."})
    logprobs: bool = field(
        default=True,
        metadata={"help": "Ask for top_logprobs and read the verdict from the option tokens' probabilities; false "
                  "for endpoints that refuse logprobs (the verdict is then parsed from the answer's text)."},
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where verdicts are cached, so a repeated or resumed run never asks for the same one twice "
                  "(null: alignkit's cache, $ALIGNKIT_CACHE/verdicts)."},
    )

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got '{self.base_url}'")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(f"api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), got "
                             f"'{self.api_key_env[:4]}...': never put the key itself in a recipe")
        for name in ("max_concurrency", "timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
