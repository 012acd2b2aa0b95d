"""``alignkit chat`` on the demo SFT run: through a pipe, on a pseudo-terminal, and Ctrl-C during an answer.

The demo model was trained on single-turn conversations only, so with earlier turns in its context it
answers differently (often wrongly): that difference is what shows the history is sent. The expected answers
are the model's own greedy answers to the same conversations, from an Engine in the test process.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys

import pexpect
import pytest
from conftest import REPO, assistant, user

from alignkit.demo.tasks import reverse_sft
from alignkit.recipe.settings import GenerationSettings
from alignkit.serve.chat import Chat
from alignkit.serve.engine import Engine, Sampling

SETTINGS = GenerationSettings(max_new_tokens=16)


@pytest.fixture(scope="module")
def engine(demo_sft_run) -> Engine:
    return Engine.load(str(demo_sft_run))


def held_out_prompts(count: int) -> list[tuple[str, str]]:
    """(reversal prompt, its right answer) from the demo's held-out split."""
    rows = reverse_sft("test")[:count]
    return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows]


def greedy(engine: Engine, messages: list[dict]) -> str:
    sampling = Sampling(temperature=0, max_tokens=SETTINGS.max_new_tokens)
    return engine.complete(messages, sampling).answers[0].text.strip()


def test_chat_through_a_pipe_keeps_the_history_and_resets_it(engine, demo_sft_run):
    pairs = [held_out_prompts(8)[i:i + 2] for i in range(0, 8, 2)]  # four conversations of two turns
    lines = "/reset\n".join(f"{first}\n{second}\n" for (first, _), (second, _) in pairs) + "/exit\nnever read\n"
    result = subprocess.run([sys.executable, "-m", "alignkit", "chat", str(demo_sft_run), "--max-new-tokens",
                             str(SETTINGS.max_new_tokens)], cwd=REPO, input=lines, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    answers = result.stdout.splitlines()
    assert len(answers) == 8, result.stdout  # one line per prompt; nothing after /exit
    first_turns, second_turns = answers[0::2], answers[1::2]
    # A fresh conversation (the first, and each after /reset) is a single-turn reversal prompt: reversed.
    assert first_turns == [greedy(engine, [user(first)]) for (first, _), _ in pairs]
    assert sum(answer == right for answer, ((_, right), _) in zip(first_turns, pairs)) >= 3, first_turns
    # A second turn is answered with the first turn and its answer in the context.
    with_history = [greedy(engine, [user(first), assistant(answer), user(second)])
                    for ((first, _), (second, _)), answer in zip(pairs, first_turns)]
    assert second_turns == with_history
    alone = [greedy(engine, [user(second)]) for _, (second, _) in pairs]
    assert with_history != alone, "the model answers the same with and without history: the test shows nothing"


def test_chat_on_a_terminal(engine, demo_sft_run):
    (first, _), (second, _) = held_out_prompts(2)
    chat = pexpect.spawn(sys.executable, ["-m", "alignkit", "chat", str(demo_sft_run), "--max-new-tokens",
                                          str(SETTINGS.max_new_tokens)], cwd=str(REPO), encoding="utf-8",
                         timeout=180, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                         # started as a shell starts a background job, with Ctrl-C ignored (CI runs so): the chat
                         # must answer Ctrl-C on its terminal all the same
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        chat.expect_exact("> ")
        chat.sendline(first)
        chat.expect_exact(greedy(engine, [user(first)]))
        chat.expect_exact("> ")
        chat.sendintr()  # Ctrl-C at the prompt: a fresh prompt, the session goes on
        chat.expect_exact("> ")
        chat.sendline("/reset")
        chat.expect_exact("> ")
        chat.sendline(second)
        chat.expect_exact(greedy(engine, [user(second)]))
        chat.expect_exact("> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close(force=True)
    assert chat.exitstatus == 0


class InterruptedOutput(io.StringIO):
    """An output on which the first piece of an answer is interrupted, as Ctrl-C would interrupt it."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, text: str) -> int:
        if text.strip() and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_not_the_session(engine):
    (first, _), (second, _) = held_out_prompts(2)
    chat = Chat(engine, SETTINGS)
    out = InterruptedOutput()
    assert chat.answer(first, out) == ""  # nothing was shown before Ctrl-C
    assert out.getvalue() == " [stopped]\n"
    assert chat.history == [user(first), assistant("")]
    assert engine.lock.acquire(blocking=False), "the stopped generation still holds the model"
    engine.lock.release()
    chat.reset()
    assert chat.answer(second, io.StringIO()) == greedy(engine, [user(second)])

