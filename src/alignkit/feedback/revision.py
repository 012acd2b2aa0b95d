"""Constitutional AI's supervised stage (Bai et al. 2022): a model critiques an answer against principles,
then rewrites it; the rewritten answers are SFT data.

One round is a conversation continued twice::

    user:      <prompt>
    assistant: <answer>
    user:      <critique request, with the constitution>
    assistant: <critique>            generated
    user:      <revision request, with the constitution>
    assistant: <revision>            generated, the answer for the next round and the SFT target

With ``rounds`` > 1 the revision is critiqued and revised again. An empty critique or revision ends that
answer's rounds; an answer with no non-empty revision never becomes training data (the stage counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit import generation
from alignkit.feedback.base import Messages
from alignkit.recipe import schema
from alignkit.recipe.settings import GenerationSettings
from alignkit.recipe.settings.judge_text import DEFAULT_CONSTITUTION

DEFAULT_CRITIQUE_REQUEST = ("Point out the specific ways in which your last answer falls short of these "
                            "principles: {constitution}")
DEFAULT_REVISION_REQUEST = ("Rewrite your last answer so that it follows these principles: {constitution} "
                            "Reply with the rewritten answer only.")


def _greedy() -> GenerationSettings:
    return GenerationSettings(do_sample=False, max_new_tokens=256)


@dataclass
class RevisionSettings:
    """The critique -> revision step run before RLAIF's first iteration (Constitutional AI's supervised stage)."""

    constitution: str = field(
        default=DEFAULT_CONSTITUTION,
        metadata={"help": "The principles the answers are critiqued and revised against; fills {constitution}."},
    )
    critique_request: str = field(
        default=DEFAULT_CRITIQUE_REQUEST, metadata={"help": "The user turn asking for a critique ({constitution})."}
    )
    revision_request: str = field(
        default=DEFAULT_REVISION_REQUEST, metadata={"help": "The user turn asking for a rewrite ({constitution})."}
    )
    model: str | None = field(
        default=None,
        metadata={"help": "Who critiques and revises: a run dir, local dir or hub id (null: the policy itself, as "
                  "in Constitutional AI)."},
    )
    rounds: int = field(default=1, metadata={"help": "Critique -> revision rounds per answer."})
    prompts: int | None = field(
        default=None, metadata={"help": "Training prompts to revise answers for, a seeded draw (null: all)."}
    )
    generation: GenerationSettings = field(
        default_factory=_greedy,
        metadata={"help": "How the first answers, critiques and revisions are generated (default: greedy, 256 "
                  "tokens)."},
    )
    sft: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "TRL SFTConfig options of the fine-tune on the revisions (max_steps, learning_rate, "
                  "assistant_only_loss...), over the train section's transformers options (batch size, precision...)."},
    )

    def __post_init__(self) -> None:
        from trl import SFTConfig

        self.sft = schema.check_dict(SFTConfig, self.sft, "rlaif.revision.sft")
        for name in ("rounds",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts must be >= 1 or null, got {self.prompts}")
        for name in ("critique_request", "revision_request"):
            try:
                getattr(self, name).format(constitution="")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"{name} may only use the placeholder {{constitution}} (write {{{{ and }}}} for "
                                 f"braces): {err}") from None


@dataclass
class Revision:
    """One prompt's answer, and each round's critique and revision."""

    prompt: Messages
    answer: str
    critiques: list[str] = field(default_factory=list)
    revisions: list[str] = field(default_factory=list)
    stopped: bool = False  # an empty critique or revision: no further rounds

    @property
    def final(self) -> str:
        """The last non-empty revision ("" when there is none)."""
        return next((text for text in reversed(self.revisions) if text.strip()), "")


def critique_and_revise(model, tokenizer, prompts: Sequence[Messages], answers: Sequence[str],
                        settings: RevisionSettings) -> list[Revision]:
    """Critique and revise each answer to its prompt, ``settings.rounds`` times, with ``model``."""
    critique = settings.critique_request.format(constitution=settings.constitution)
    revise = settings.revision_request.format(constitution=settings.constitution)
    results = [Revision(prompt=list(p), answer=a, stopped=not a.strip())
               for p, a in zip(prompts, answers, strict=True)]
    for _ in range(settings.rounds):
        active = [r for r in results if not r.stopped]
        if not active:
            break
        asked = [critique_conversation(r, critique) for r in active]
        for r, text in zip(active, generation.generate(model, tokenizer, asked, settings.generation)):
            r.critiques.append(text)
            r.stopped = not text.strip()
        active = [r for r in active if not r.stopped]
        asked = [[*critique_conversation(r, critique), {"role": "assistant", "content": r.critiques[-1]},
                  {"role": "user", "content": revise}] for r in active]
        for r, text in zip(active, generation.generate(model, tokenizer, asked, settings.generation)):
            r.revisions.append(text)
            r.stopped = not text.strip()
    return results


def critique_conversation(revision: Revision, request: str) -> Messages:
    """The conversation that asks for a critique of the latest answer (the first, or the last revision)."""
    latest = revision.revisions[-1] if revision.revisions else revision.answer
    return [*revision.prompt, {"role": "assistant", "content": latest}, {"role": "user", "content": request}]
