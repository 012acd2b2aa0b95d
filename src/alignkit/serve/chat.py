"""``alignkit chat``: talk to a model in the terminal, its answers streamed as they are generated.

The conversation (an optional system turn, then every user turn and answer) goes through the model's chat
template each turn, so the model sees its history as it saw conversations in training. ``/reset`` starts
over, ``/exit`` or end of input leaves, and Ctrl-C stops the answer being written (the session goes on; at
the prompt it only clears the line).

With standard input not a terminal, each input line is one user turn and each answer is printed on one
line, without prompts or banners, so a chat can be scripted: ``printf 'hi\\nmore\\n' | alignkit chat RUN``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
from typing import TextIO

from alignkit.recipe.settings import GenerationSettings
from alignkit.serve.engine import Engine, Messages, PromptTooLong, Sampling

RESET, EXIT = "/reset", "/exit"
# GenerationSettings fields that are no chat option: beam search cannot stream, and a chat answers one prompt.
NOT_CHAT_OPTIONS = ("num_beams", "batch_size")


def chat_options() -> list[dataclasses.Field]:
    """The generation knobs ``alignkit chat`` takes as options: a recipe's ``generation`` settings."""
    return [f for f in dataclasses.fields(GenerationSettings) if f.name not in NOT_CHAT_OPTIONS]


def sampling_of(settings: GenerationSettings) -> Sampling:
    """The engine's sampling from a recipe's generation settings (greedy unless ``do_sample``)."""
    return Sampling(max_tokens=settings.max_new_tokens, temperature=settings.temperature if settings.do_sample else 0,
                    top_p=settings.top_p or 1.0, top_k=settings.top_k,
                    repetition_penalty=settings.repetition_penalty, seed=settings.seed)


class Chat:
    """A conversation with ``engine``: the history, and one turn at a time."""

    def __init__(self, engine: Engine, settings: GenerationSettings, system: str | None = None) -> None:
        self.engine = engine
        self.system = system
        self.sampling = sampling_of(settings)
        self.history: Messages = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system turn stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, text: str, out: TextIO) -> str:
        """Answer the user turn ``text``, writing the answer to ``out`` as it is generated; returns it.

        Ctrl-C while it is written stops the answer: what was written so far stays in the history, marked
        as cut short on ``out``. A turn that no longer fits the model's context is refused with a message and
        left out of the history."""
        turn = [*self.history, {"role": "user", "content": text}]
        try:
            stream = self.engine.stream(turn, self.sampling)
        except PromptTooLong as err:
            out.write(f"[not answered: {err}; /reset starts a new conversation]\n")
            out.flush()
            return ""
        # Seeded once, for the first answer: a session's samples then repeat run to run, without every turn
        # drawing the same random numbers.
        self.sampling = dataclasses.replace(self.sampling, seed=None)
        pieces: list[str] = []
        # closing() ends the generation at once when Ctrl-C lands here rather than inside the stream.
        with contextlib.closing(iter(stream)) as generated:
            try:
                for piece in generated:
                    if not pieces:
                        piece = piece.lstrip()  # a tokenizer's word-boundary space before the first word
                        if not piece:
                            continue
                    out.write(piece)
                    out.flush()
                    pieces.append(piece)  # once shown: the history holds what the user saw
            except KeyboardInterrupt:
                out.write(" [stopped]")
        out.write("\n")
        out.flush()
        answer = "".join(pieces).strip()
        self.history = [*turn, {"role": "assistant", "content": answer}]
        return answer


def run_chat(engine: Engine, settings: GenerationSettings, system: str | None = None,
             stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The chat loop on ``stdin`` / ``stdout``: interactive on a terminal, one turn per line otherwise."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    chat = Chat(engine, settings, system)
    if interactive:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            # A shell starts background jobs (`cmd &`, scripts without job control) with Ctrl-C ignored, and the
            # ignoring is inherited; Python then never raises KeyboardInterrupt. On a terminal, Ctrl-C must stop
            # an answer or clear the prompt however the chat was started.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"chatting with {engine.name}: {RESET} forgets the conversation, {EXIT} or Ctrl-D leaves, Ctrl-C "
              "stops an answer", file=sys.stderr)
    while True:
        try:
            line = _read(stdin, stdout, interactive)
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, as a shell does
            stdout.write("\n")
            continue
        if line is None or line.strip() == EXIT:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            chat.reset()
            if interactive:
                print("(conversation reset)", file=sys.stderr)
            continue
        chat.answer(text, stdout)


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next line, without its newline; None at the end of input."""
    if interactive and stdin is sys.stdin:
        try:
            return input("> ")  # readline's line editing and history where Python has it
        except EOFError:
            stdout.write("\n")
            return None
    if interactive:
        stdout.write("> ")
        stdout.flush()
    line = stdin.readline()
    return line.rstrip("\n") if line else None
