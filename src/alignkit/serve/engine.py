"""One loaded model answering chat conversations, one generation at a time: what ``alignkit chat`` and
``alignkit serve`` share.

The model loads as alignkit loads any model for evaluation (:func:`alignkit.models.modeling.load_for_inference`:
a run dir is its base plus its adapter, a merged dir or hub id a plain model, ``demo:tiny-llama`` the demo
model), and prompts go through the chat template exactly as in training and evaluation
(:mod:`alignkit.generation`), so a greedy answer here is the answer ``alignkit eval`` gives.

A lock serialises generations: a model's forward pass is not re-entrant across threads (the KV cache, the
global RNG that a seed resets), so concurrent callers queue on it rather than corrupt one another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.models import modeling
from alignkit.recipe.settings import ModelSettings

Messages = list[dict[str, str]]

# Tokenizers with an unbounded context report model_max_length as a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


class PromptTooLong(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""


@dataclass
class Sampling:
    """How to generate: the knobs of an OpenAI chat completion request (and of ``alignkit chat``)."""

    max_tokens: int | None = None  # None: up to the end of the model's context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; 0: only the chosen token's

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenLogprob:
    """One generated token with its log-probability under the model, and the most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Answer:
    """One generated answer: its text (cut before a stop string), why it ended, and its tokens' logprobs."""

    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """All answers to one prompt."""

    answers: list[Answer]
    prompt_tokens: int


class Engine:
    """A model and tokenizer ready to answer conversations, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.lock = threading.Lock()
        model.eval()
        limits = [tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", None)]
        known = [limit for limit in limits if limit is not None and limit < _NO_LIMIT]
        self.context_length: int | None = min(known) if known else None

    @classmethod
    def load(cls, name_or_path: str, name: str | None = None) -> Engine:
        """The model as evaluation loads it: a run dir (base + adapter), a local model dir, a hub id, a demo model;
        ``name`` is what clients call it (default: ``name_or_path``)."""
        model, tokenizer = modeling.load_for_inference(ModelSettings(name_or_path=name_or_path))
        return cls(model, tokenizer, name or name_or_path)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation with the reply prompt, as :mod:`alignkit.generation` builds them."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        # The template already holds every special token, so the tokenizer must not add a BOS again.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def budget(self, prompt_ids: Sequence[int], sampling: Sampling) -> int:
        """How many tokens to generate at most: ``max_tokens``, else up to the end of the context (256 for a
        model that states none); PromptTooLong when the prompt leaves no room for them."""
        if self.context_length is None:
            return sampling.max_tokens or 256
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens, the model's context {self.context_length}")
        if sampling.max_tokens is not None and sampling.max_tokens > room:
            raise PromptTooLong(f"the prompt is {len(prompt_ids)} tokens and {sampling.max_tokens} more were asked "
                                f"for, but the model's context is {self.context_length} tokens")
        return sampling.max_tokens or room

    def complete(self, messages: Messages, sampling: Sampling, cancel: threading.Event | None = None) -> Completion:
        """``sampling.n`` answers to the conversation ``messages`` (waiting for the model if it is busy)."""
        import torch

        prompt = self.prompt_ids(messages)
        max_new_tokens = self.budget(prompt, sampling)
        input_ids = torch.tensor([prompt] * sampling.n, device=self._device)
        with self.lock, torch.no_grad():
            self._seed(sampling)
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                generation_config=self._config(sampling, max_new_tokens, logits=sampling.top_logprobs is not None),
                tokenizer=self.tokenizer, stopping_criteria=_cancellation(cancel))
        generated = output.sequences[:, len(prompt):]
        answers = []
        for row in range(sampling.n):
            tokens = self._until_end(generated[row].tolist())
            logprobs = None
            if sampling.top_logprobs is not None:
                logprobs = self._logprobs(tokens, [step[row] for step in output.logits], sampling.top_logprobs)
            answers.append(self._answer(tokens, max_new_tokens, sampling.stop, logprobs))
        return Completion(answers=answers, prompt_tokens=len(prompt))

    def stream(self, messages: Messages, sampling: Sampling, cancel: threading.Event | None = None) -> AnswerStream:
        """One answer, piece by piece as it is generated: iterate the returned :class:`AnswerStream`.

        PromptTooLong is raised here, before anything is generated. The pieces joined are exactly
        ``complete(...).answers[0].text``."""
        prompt = self.prompt_ids(messages)
        return AnswerStream(self, prompt, sampling, self.budget(prompt, sampling), cancel or threading.Event())

    def _generate_into(self, prompt: list[int], sampling: Sampling, max_new_tokens: int, streamer, cancel,
                       failure: list[BaseException]) -> None:
        import torch

        input_ids = torch.tensor([prompt], device=self._device)
        try:
            with self.lock, torch.no_grad():
                self._seed(sampling)
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=self._config(sampling, max_new_tokens),
                                    tokenizer=self.tokenizer, streamer=streamer,
                                    stopping_criteria=_cancellation(cancel))
        except BaseException as err:  # handed to the reading thread, which raises it
            failure.append(err)
            streamer.end()

    @property
    def _device(self):
        return next(self.model.parameters()).device

    def _seed(self, sampling: Sampling) -> None:
        import torch

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

    def _config(self, sampling: Sampling, max_new_tokens: int, logits: bool = False):
        from transformers import GenerationConfig

        sample = not sampling.greedy
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=(sampling.top_k or 0) if sample else None,  # 0: no top-k cut (transformers' default is 50)
            repetition_penalty=sampling.repetition_penalty,
            stop_strings=sampling.stop or None,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=logits,
        )

    def _until_end(self, tokens: list[int]) -> list[int]:
        """The generated tokens up to and including the end-of-turn token: a row that ended earlier than the
        others (its end-of-turn token, a stop string) is padded after its end."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        if eos in tokens:
            return tokens[:tokens.index(eos) + 1]
        while tokens and pad != eos and tokens[-1] == pad:
            tokens = tokens[:-1]
        return tokens

    def _answer(self, tokens: list[int], max_new_tokens: int, stop: list[str],
                logprobs: list[TokenLogprob] | None) -> Answer:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _stop_index(text, stop)
        ended = cut is not None or (tokens and tokens[-1] == self.tokenizer.eos_token_id)
        finish = "stop" if ended or len(tokens) < max_new_tokens else "length"
        return Answer(text=text if cut is None else text[:cut], finish_reason=finish, completion_tokens=len(tokens),
                      logprobs=logprobs)

    def _logprobs(self, tokens: list[int], logits: list, top: int) -> list[TokenLogprob]:
        """Each answer token's log-probability from the model's raw next-token logits (the model's own
        distribution, before temperature or top-p), with the ``top`` most likely tokens at that position.
        The end-of-turn token is left out: it is not part of the answer's text."""
        import torch

        shown = tokens[:-1] if tokens and tokens[-1] == self.tokenizer.eos_token_id else tokens
        result = []
        for token, step in zip(shown, logits):
            log_probs = torch.log_softmax(step.float(), dim=-1)
            best = torch.topk(log_probs, top) if top else None
            alternatives = [] if best is None else [
                (self._token_text(i), v) for v, i in zip(best.values.tolist(), best.indices.tolist())]
            result.append(TokenLogprob(self._token_text(token), float(log_probs[token]), alternatives))
        return result

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


def _stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string in ``text`` begins, or None."""
    found = [text.find(s) for s in stop if s and s in text]
    return min(found) if found else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the beginning of a stop string."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest


def _cancellation(cancel: threading.Event | None):
    """A stopping criterion that ends every row once ``cancel`` is set (transformers' StoppingCriteriaList)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if cancel is None:
        return StoppingCriteriaList()

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


class AnswerStream:
    """The text of one answer as it is generated (transformers' ``TextIteratorStreamer`` fed by a generation in a
    worker thread); ``finish_reason`` is set once the iteration ends.

    Pieces that could be the start of a stop string are held back until they are known not to be one, so the
    pieces joined are the answer's text cut before its stop string. Closing the iterator early (a client gone,
    Ctrl-C) or ``cancel`` stops the generation at its next token.
    """

    def __init__(self, engine: Engine, prompt: list[int], sampling: Sampling, max_new_tokens: int,
                 cancel: threading.Event) -> None:
        self.engine, self.prompt, self.sampling, self.max_new_tokens = engine, prompt, sampling, max_new_tokens
        self.cancel = cancel
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        tokenizer, stop = self.engine.tokenizer, self.sampling.stop
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        counted = _count_tokens(streamer)
        failure: list[BaseException] = []
        worker = threading.Thread(target=self.engine._generate_into, daemon=True,
                                  args=(self.prompt, self.sampling, self.max_new_tokens, streamer, self.cancel,
                                        failure))
        worker.start()
        text, sent, stopped = "", 0, False
        try:
            for piece in streamer:
                text += piece
                cut = _stop_index(text, stop)
                if cut is not None:
                    text, stopped = text[:cut], True
                    self.cancel.set()  # the rest is not wanted: free the model for the next caller
                    break
                safe = len(text) - _held_back(text, stop)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            worker.join()
            if failure:
                raise failure[0]
            if len(text) > sent:
                yield text[sent:]
            ended = stopped or counted[-1:] == [tokenizer.eos_token_id]
            self.finish_reason = "stop" if ended or len(counted) < self.max_new_tokens else "length"
        finally:
            self.cancel.set()
            worker.join()


def _count_tokens(streamer) -> list[int]:
    """The answer's token ids as ``streamer`` receives them (the prompt, which it gets first, left out)."""
    tokens: list[int] = []
    put, seen_prompt = streamer.put, []

    def counting_put(value) -> None:
        if seen_prompt:
            tokens.extend(value.reshape(-1).tolist())
        seen_prompt.append(True)
        put(value)

    streamer.put = counting_put
    return tokens
